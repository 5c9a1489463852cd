"""The result types: ``attention`` with weights or lse requested (SPEC.md rule 11), and
``attention_vjp`` (rule 14)."""

from __future__ import annotations

from typing import Any, NamedTuple


class AttentionOutput(NamedTuple):
    """``out (..., Hq, L, Ev)`` in the input dtype; ``weights (..., Hq, L, S)`` and ``lse (..., Hq, L)``
    in the compute dtype, or None when not requested."""

    out: Any
    weights: Any = None
    lse: Any = None


class Gradients(NamedTuple):
    """``dq``, ``dk``, ``dv`` in the shapes and dtype of q, k, v; ``dbias`` in bias's shape and dtype,
    or None when the call had no bias."""

    dq: Any
    dk: Any
    dv: Any
    dbias: Any = None
