"""Hypothesis strategies that draw whole multi-head attention layer calls (:class:`LayerCase`):
shapes (batch dims, lengths, features, heads, GQA, head dims), which biases exist, the per-head
options (mask, key padding, causal, window, softcap, dropout) and the dtype are drawn and shrink;
values come from a NumPy generator seeded by Hypothesis, weights scaled by ``1/sqrt(fan_in)`` as
layers initialise them.

Feature switches take ``None`` (drawn), ``True`` (always) or ``False`` (never).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

from ..dropout import dropout_mask
from ..frameworks import numpy_dtype
from ..layers.params import MHAParams
from ..plan import FLOATING_DTYPES
from .layer_cases import LayerCase


def _switch(draw: Any, value: bool | None) -> bool:
    return draw(st.booleans()) if value is None else value


def random_params(rng: np.random.Generator, *, dims: dict[str, int], biases: tuple[bool, bool, bool, bool],
                  dtype: np.dtype) -> MHAParams:
    """MHAParams of the given ``dims`` (d_q, d_k, d_v, H, Hkv, hd, hd_v, d_out), weights normal with
    standard deviation ``1/sqrt(fan_in)``, biases (where ``biases`` says) normal with 0.5."""
    d = dims
    shapes = [(d["d_q"], d["H"], d["hd"]), (d["d_k"], d["Hkv"], d["hd"]), (d["d_v"], d["Hkv"], d["hd_v"]),
              (d["H"], d["hd_v"], d["d_out"])]
    weights = [rng.standard_normal(s) / np.sqrt(s[0] * (s[1] if i == 3 else 1)) for i, s in enumerate(shapes)]
    bias_shapes = [(d["H"], d["hd"]), (d["Hkv"], d["hd"]), (d["Hkv"], d["hd_v"]), (d["d_out"],)]
    bias_arrays = [0.5 * rng.standard_normal(s) if has else None for s, has in zip(bias_shapes, biases, strict=True)]
    return MHAParams(*(None if x is None else x.astype(dtype) for x in (*weights, *bias_arrays)))


@st.composite
def layer_cases(
    draw: Any,
    *,
    dtypes: tuple[str, ...] = FLOATING_DTYPES,
    mask: bool | None = None,
    key_padding: bool | None = None,
    causal: bool | None = None,
    window: bool | None = None,
    softcap: bool | None = None,
    dropout: bool | None = None,
    gqa: bool | None = None,
    max_length: int = 6,
    max_features: int = 8,
) -> LayerCase:
    """A LayerCase within the switches (None: drawn)."""
    dtype_name = draw(st.sampled_from(dtypes))
    batch = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    length, features = st.integers(1, max_length), st.integers(1, max_features)
    q_len, kv_len = draw(length), draw(length)
    kv_heads = draw(st.sampled_from((1, 2)))
    heads = kv_heads * (draw(st.sampled_from((2, 3))) if _switch(draw, gqa) else 1)
    dims = dict(d_q=draw(features), d_k=draw(features), d_v=draw(features), H=heads, Hkv=kv_heads,
                hd=draw(st.integers(1, 6)), hd_v=draw(st.integers(1, 6)), d_out=draw(features))
    biases = tuple(draw(st.lists(st.booleans(), min_size=4, max_size=4)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = numpy_dtype(dtype_name)
    logits_shape = (*batch, heads, q_len, kv_len)
    options: dict[str, Any] = {}
    if _switch(draw, mask):
        options["mask"] = rng.random(logits_shape) < 0.8
    padding = rng.random((*batch, kv_len)) < 0.8 if _switch(draw, key_padding) else None
    if _switch(draw, causal):
        options["causal"] = True
        options["alignment"] = draw(st.sampled_from(("top_left", "bottom_right")))
    if _switch(draw, window):
        options["window"] = (draw(st.none() | st.integers(0, 3)), draw(st.none() | st.integers(0, 3)))
    if _switch(draw, softcap):
        options["softcap"] = draw(st.sampled_from((0.5, 5.0, 30.0)))
    if _switch(draw, dropout):
        p = draw(st.sampled_from((0.1, 0.5)))
        options.update(dropout_p=p, dropout_mask=dropout_mask(logits_shape, p, seed=int(rng.integers(2**31))))
    return LayerCase(
        query=rng.standard_normal((*batch, q_len, dims["d_q"])).astype(dtype),
        key=rng.standard_normal((*batch, kv_len, dims["d_k"])).astype(dtype),
        value=rng.standard_normal((*batch, kv_len, dims["d_v"])).astype(dtype),
        params=random_params(rng, dims=dims, biases=biases, dtype=dtype),
        key_padding_mask=padding, **options,
    )
