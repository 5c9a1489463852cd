"""Draws that depend only on the seed, the settings, the features and the kernel: Hypothesis' local
constants pinned while a property runs.

Hypothesis (6.13x and later) mixes into its draws the literals of every *local* module in
``sys.modules`` (not the standard library or site-packages, not test files): with an editable install
this package's own modules, and the user's modules. Which of them are imported when a property runs
depends on what ran before in the process (another crosscheck target, another property, the user's
test collection), so the same seed drew different cases in a fresh process, in a crosscheck worker
that had run a jax target, or under ``check --workers``. ``pinned_local_constants(modules)`` makes the
pool exactly the literals of ``modules`` (those Hypothesis counts as local: a user's kernel module,
whose tile sizes and other constants are good edge values to draw) for the duration of a run, and
clears the cache of constants Hypothesis keeps per draw type before and after, so that a property's
cases are the same in every process. Hypothesis' own global constants (edge values such as 0, -1, the
float limits) are still drawn. If Hypothesis no longer has this mechanism, it does nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterable, Iterator
from types import ModuleType
from typing import Any

_lock = threading.RLock()


@contextlib.contextmanager
def pinned_local_constants(modules: Iterable[ModuleType] = ()) -> Iterator[None]:
    """Inside this block Hypothesis draws, of the constants it collects from local modules, only
    those of ``modules`` (each counted only if Hypothesis counts it as local); reentrant."""
    try:
        from hypothesis.internal.conjecture import providers
        from hypothesis.internal.constants_ast import constants_from_module, is_local_module_file

        original: Any = providers._get_local_constants
        cache: Any = providers.CONSTANTS_CACHE.cache
        pool = providers.Constants()
        for module in modules:
            path = getattr(module, "__file__", None)
            if path is not None and is_local_module_file(path):
                pool |= constants_from_module(module)
    except (ImportError, AttributeError):  # another Hypothesis: nothing to pin
        yield
        return
    with _lock:
        cache.clear()  # constants already collected are cached per draw type
        providers._get_local_constants = lambda: pool
        try:
            yield
        finally:
            providers._get_local_constants = original
            cache.clear()


def defining_modules(*objects: Any) -> list[ModuleType]:
    """The modules that define ``objects`` (a kernel, its backward; None and builtins skipped)."""
    found = [inspect.getmodule(obj) for obj in objects if obj is not None]
    return list(dict.fromkeys(module for module in found if module is not None))
