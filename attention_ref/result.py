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


class LayerGradients(NamedTuple):
    """The gradients of ``sum(multi_head_attention(...) * d_out)`` (SPEC.md rule 18): ``d_query``,
    ``d_key``, ``d_value`` in the shapes and dtype of the inputs; ``params``, an ``MHAParams`` of the
    parameters' gradients (None where the layer has no such bias); ``dbias`` in bias's shape and dtype,
    or None when the call had no bias. In self-attention (one x passed as query, key and value) the
    gradient of x is ``d_query + d_key + d_value``."""

    d_query: Any
    d_key: Any
    d_value: Any
    params: Any
    dbias: Any = None
