"""Shared fixtures: Hypothesis profiles and the backends under test.

The Hypothesis profile is ``attention_ref.ci`` (what CI runs) unless ``--hypothesis-profile`` names
another (``attention_ref.dev`` or ``attention_ref.thorough`` for longer searches), which Hypothesis'
pytest plugin then loads. A backend whose framework is not installed is skipped, unless
``ATTENTION_REF_REQUIRE_ALL_BACKENDS=1`` (set by CI), where it fails: every test that needs a
framework gets it through ``import_or_skip`` or ``BACKENDS``.

``--device cuda`` (or gpu, cpu; optionally ``:N``) puts the arrays that the ``backend`` fixture's
``asarray`` makes for the torch and jax backends on that device (``attention_ref.testing.verify.on_device``;
numpy stays on the CPU); ``backend_on_device(name)`` gives the same backend to tests that take a name. A
device that torch or jax (those installed) cannot use is a usage error before any test runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import Phase, settings

from attention_ref.testing import register_profiles
from attention_ref.testing.profiles import DEFAULT_PROFILE

register_profiles()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="where the torch and jax backends' arrays go: cpu (default), "
                     "cuda or gpu, optionally :N (numpy stays on the CPU)")


#: The ``--device`` of this run.
DEVICE = "cpu"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Load the default profile unless the command line names one (Hypothesis' plugin loads that);
    check ``--device``."""
    global DEVICE
    if not config.getoption("--hypothesis-profile", default=None):
        settings.load_profile(DEFAULT_PROFILE)
    DEVICE = config.getoption("--device")
    from attention_ref.testing.verify import DEVICE_FRAMEWORKS, on_device, parse_device

    try:
        if parse_device(DEVICE)[0] != "cpu":
            for name in DEVICE_FRAMEWORKS:
                if importlib.util.find_spec(name) is not None:
                    on_device(name, DEVICE)
    except ValueError as error:  # DeviceNotAvailableError included
        raise pytest.UsageError(f"--device {DEVICE}: {error}") from None


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


def backend_on_device(name: str) -> Any:
    """The backend called ``name``, its arrays on this run's ``--device`` (numpy's on the CPU)."""
    import attention_ref as ar
    from attention_ref.testing.verify import DEVICE_FRAMEWORKS, on_device

    backend = ar.get_backend(name)
    return on_device(backend, DEVICE if backend.framework in DEVICE_FRAMEWORKS else "cpu")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> object:
    return backend_on_device(request.param)


@pytest.fixture
def without_shrinking() -> Iterator[None]:
    """The current Hypothesis profile without its shrink phase, which ``check`` and ``check_layer``
    inherit: a bug test asks only whether the property fails, and shrinking the failing case is nearly
    all of its time (seconds to tens of seconds a bug; benchmarks/checker.py keeps it, as users run
    ``check``)."""
    current = settings.get_current_profile_name()
    settings.register_profile(f"{current}.no_shrink", parent=settings.get_profile(current),
                              phases=(Phase.explicit, Phase.reuse, Phase.generate))
    settings.load_profile(f"{current}.no_shrink")
    yield
    settings.load_profile(current)
