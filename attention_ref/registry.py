"""Backends by name: a table resolved with importlib on first use, plus third-party registrations.

Nothing here imports jax or torch until a backend of theirs is requested; ``available_backends``
answers from ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .backends.base import Backend  # imports no framework
from .frameworks import framework_of

ENTRY_POINT_GROUP = "attention_ref.backends"


class BackendNotAvailableError(ImportError):
    """A known backend whose framework is not installed."""


@dataclass(frozen=True)
class BuiltinBackend:
    module: str  # module of attention_ref holding the backend class
    class_name: str
    framework_module: str  # what must be importable
    extra: str  # the pip extra that installs it


BUILTIN_BACKENDS = {
    "numpy": BuiltinBackend("attention_ref.backends.numpy", "NumpyBackend", "numpy", ""),
    "jax": BuiltinBackend("attention_ref.backends.jax", "JaxBackend", "jax", "jax"),
    "torch": BuiltinBackend("attention_ref.backends.torch", "TorchBackend", "torch", "torch"),
}
ALIASES = {"np": "numpy", "pytorch": "torch"}

_registered: dict[str, Callable[[], Backend]] = {}
_instances: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    """Register a backend: ``factory()`` returns an ``attention_ref.Backend`` (a subclass implementing
    its abstract methods; the front door, signatures and result types come with it). Overrides an
    entry point of the same name; built-in names and aliases cannot be replaced."""
    if name in BUILTIN_BACKENDS or name in ALIASES:
        raise ValueError(f"{name!r} is a built-in backend and cannot be replaced")
    _registered[name] = factory
    _instances.pop(name, None)


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_backends() -> list[str]:
    """Every backend name that ``get_backend`` accepts (aliases excluded), installed or not."""
    names = list(BUILTIN_BACKENDS)
    names += [n for n in sorted({*_registered, *_entry_points()}) if n not in names]
    return names


def available_backends() -> list[str]:
    """The known backends whose framework is installed (imports no framework)."""
    available = [
        name
        for name, entry in BUILTIN_BACKENDS.items()
        if importlib.util.find_spec(entry.framework_module) is not None
    ]
    return available + [n for n in known_backends() if n not in BUILTIN_BACKENDS]


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (``"numpy"``/``"np"``, ``"jax"``, ``"torch"``/``"pytorch"``, or a
    registered one), created on first use and cached.

    Raises ValueError for an unknown name and BackendNotAvailableError (an ImportError) naming the
    pip extra when its framework is not installed.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a string, got {name!r}")
    name = ALIASES.get(name, name)
    if name in _instances:
        return _instances[name]
    if name in BUILTIN_BACKENDS:
        entry = BUILTIN_BACKENDS[name]
        if importlib.util.find_spec(entry.framework_module) is None:
            raise BackendNotAvailableError(
                f"the {name} backend needs {entry.framework_module}, which is not installed; "
                f"install it with: pip install 'attention_ref[{entry.extra}]'"
            )
        backend: Backend = getattr(importlib.import_module(entry.module), entry.class_name)()
    elif name in _registered:
        backend = _registered[name]()
    elif name in (entry_points := _entry_points()):
        backend = entry_points[name].load()()
    else:
        raise ValueError(
            f"unknown backend {name!r}; known backends: {', '.join(known_backends())} "
            f"(aliases: {', '.join(f'{a}={n}' for a, n in ALIASES.items())})"
        )
    if not isinstance(backend, Backend):
        raise TypeError(f"the factory of backend {name!r} returned {type(backend).__name__}, not an "
                        "attention_ref.Backend (subclass it: the front door and the signatures come with it)")
    _instances[name] = backend
    return backend


def backend_for(x: Any) -> Backend:
    """The built-in backend of the framework that array ``x`` belongs to."""
    framework = framework_of(x)
    if framework is None:
        raise TypeError(f"q must be an array (numpy, jax, torch), got {type(x).__name__}")
    return get_backend(framework)
