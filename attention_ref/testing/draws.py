"""Draws that depend only on the seed, the settings and the features: Hypothesis' local constants
left out while a property runs.

Hypothesis (6.13x and later) mixes into its draws the literals of every *local* module in
``sys.modules`` (not the standard library or site-packages, not test files): with an editable install
this package's own modules, and always the user's kernel modules. Which of them are imported when a
property runs depends on what ran before in the process (another crosscheck target, another property,
the user's test collection), so the same seed drew different cases in a fresh process, in a
crosscheck worker that had run a jax target, or under ``check --workers``. ``without_local_constants``
empties that pool for the duration of a run (and the cache of constants Hypothesis keeps per draw
type, before and after), so that a property's cases are the same in every process. Hypothesis' own
global constants (edge values such as 0, -1, the float limits) are still drawn. If Hypothesis no
longer has this mechanism, it does nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

_lock = threading.RLock()


@contextlib.contextmanager
def without_local_constants() -> Iterator[None]:
    """Hypothesis draws no constants collected from local modules inside this block (reentrant)."""
    try:
        from hypothesis.internal.conjecture import providers

        original: Any = providers._get_local_constants
        cache: Any = providers.CONSTANTS_CACHE.cache
        empty = providers.Constants()
    except (ImportError, AttributeError):  # another Hypothesis: nothing to leave out
        yield
        return
    with _lock:
        cache.clear()  # constants already collected are cached per draw type
        providers._get_local_constants = lambda: empty
        try:
            yield
        finally:
            providers._get_local_constants = original
            cache.clear()
