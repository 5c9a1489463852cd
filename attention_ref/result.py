"""The result type of ``attention`` when weights or lse are requested (SPEC.md rule 11)."""

from __future__ import annotations

from typing import Any, NamedTuple


class AttentionOutput(NamedTuple):
    """``out (..., Hq, L, Ev)`` in the input dtype; ``weights (..., Hq, L, S)`` and ``lse (..., Hq, L)``
    in the compute dtype, or None when not requested."""

    out: Any
    weights: Any = None
    lse: Any = None
