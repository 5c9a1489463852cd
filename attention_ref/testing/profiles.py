"""Hypothesis profiles of attention_ref, namespaced so they never collide with a user's.

- ``attention_ref.ci``: the CI run (deterministic, sized for 2 cores in well under 10 minutes);
- ``attention_ref.dev``: the default for local runs;
- ``attention_ref.thorough``: a long search before a release.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

PROFILE_EXAMPLES = {"attention_ref.ci": 75, "attention_ref.dev": 150, "attention_ref.thorough": 1000}


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
