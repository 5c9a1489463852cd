"""What the conformance properties run against: an :class:`Implementation` of SPEC.md's calls, seen
by a property as a :class:`Subject` (the implementation, the features it supports and the tolerance
rule it is held to).

Our backends (``attention_ref.backends``) and the checker's ``KernelImplementation`` around someone
else's kernel (``attention_ref.testing.check``) are both implementations; ``run_property`` builds
the subject.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .strategies import ALL_FEATURES, Features


class Implementation(Protocol):
    """The calls of SPEC.md, taking and returning the implementation's arrays.

    ``attention(q, k, v, **keywords)`` takes the spec's keyword names (rules 3-13 and the return
    flags) and returns out or an ``AttentionOutput``; ``attention_vjp(q, k, v, d_out, **keywords)``
    returns ``Gradients`` (rule 14). Both are declared as read-only properties of a callable type, so
    that methods with explicit keyword-only signatures conform. ``asarray`` converts a NumPy array to
    the implementation's arrays and ``to_numpy`` back.
    """

    @property
    def name(self) -> str: ...

    @property
    def attention(self) -> Callable[..., Any]: ...

    @property
    def attention_vjp(self) -> Callable[..., Any]: ...

    def asarray(self, x: np.ndarray) -> Any: ...

    def to_numpy(self, x: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class Subject:
    """What a property receives: ``impl``, the ``features`` it supports (cases are drawn within them
    and properties use nothing else), and whether it is held to the ``calibrated`` tolerance rule
    (other people's kernels, ``attention_ref.tolerance``) instead of the derived bound of SPEC.md's
    own implementations."""

    impl: Implementation
    features: Features = ALL_FEATURES
    calibrated: bool = False

    @property
    def name(self) -> str:
        return self.impl.name
