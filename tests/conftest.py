"""Shared fixtures: Hypothesis profiles and the backends under test.

The Hypothesis profile comes from ``--hypothesis-profile`` (CI: ``attention_ref.ci``); the default
for local runs is ``attention_ref.dev``. A backend whose framework is not installed is skipped,
unless ``ATTENTION_REF_REQUIRE_ALL_BACKENDS=1`` (set by CI), where it fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import pytest
from hypothesis import settings

from attention_ref.testing import register_profiles

register_profiles()
settings.load_profile("attention_ref.dev")

BACKEND_NAMES = ("numpy", "jax", "torch")
REQUIRE_ALL = os.environ.get("ATTENTION_REF_REQUIRE_ALL_BACKENDS") == "1"


def _param(name: str) -> object:
    missing = importlib.util.find_spec(name) is None
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        missing and not REQUIRE_ALL, reason=f"{name} is not installed"))


def import_or_skip(name: str) -> ModuleType:
    """Import a framework; skip the module when it is missing, unless all backends are required."""
    return importlib.import_module(name) if REQUIRE_ALL else pytest.importorskip(name)


BACKENDS = [_param(name) for name in BACKEND_NAMES]
#: The backends tests run on: all when required, else the installed ones.
TESTED_BACKEND_NAMES = [n for n in BACKEND_NAMES if REQUIRE_ALL or importlib.util.find_spec(n) is not None]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> object:
    import attention_ref as ar

    return ar.get_backend(request.param)
