"""Hypothesis profiles of attention_ref, namespaced so they never collide with a user's.

- ``attention_ref.ci``: what CI runs, and the default of the test suite (``pytest`` without
  ``--hypothesis-profile`` loads it; deterministic, sized for 2 cores in well under 10 minutes);
- ``attention_ref.dev``: a longer local search, opt-in (``--hypothesis-profile=attention_ref.dev``);
- ``attention_ref.thorough``: a long search before a release, opt-in.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

PROFILE_EXAMPLES = {"attention_ref.ci": 75, "attention_ref.dev": 150, "attention_ref.thorough": 1000}
#: The profile of a test run that names none.
DEFAULT_PROFILE = "attention_ref.ci"


def register_profiles() -> None:
    """Register the three profiles (idempotent). No deadline: JAX compiles on new shapes."""
    for name, examples in PROFILE_EXAMPLES.items():
        settings.register_profile(
            name,
            max_examples=examples,
            deadline=None,
            derandomize=name == "attention_ref.ci",
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow],
        )
