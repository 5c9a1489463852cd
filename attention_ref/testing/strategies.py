"""Hypothesis strategies that draw whole attention cases.

Shapes, dtype and options are drawn by Hypothesis (and shrink); array values come from a NumPy
generator seeded by Hypothesis, with a drawn distribution and magnitude, so that data are always
varied (Hypothesis' own array fill repeats one value most of the time) and every example is
reproducible from the printed case.

Feature switches take ``None`` (drawn), ``True`` (always) or ``False`` (never).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st

from ..dropout import dropout_mask
from ..features import SPEC_FEATURES
from ..frameworks import numpy_dtype
from ..plan import ALIGNMENTS, FLOATING_DTYPES
from .cases import AttentionCase

#: Value distributions for q, k, v and bias: smooth, uniform, small integers (ties, exact
#: arithmetic), heavy-tailed (outliers) and sparse (mostly zeros).
DISTRIBUTIONS = ("normal", "uniform", "integers", "heavy_tailed", "sparse")
#: Magnitudes of q and k entries: logits from tiny (~1e-6) to large (~1e3).
QK_MAGNITUDES = (1e-3, 0.1, 1.0, 3.0, 10.0)


#: The sizes ``attention_cases(few_shapes=True)`` draws from: the corners (L = 1, L > S, L < S,
#: several tiles, GQA, E != Ev) with few distinct shapes, for kernels compiled once per shape.
FEW_SHAPES = {"batch": (1, 2), "heads": (1, 2), "length": (1, 5), "long": (130,), "head_dim": (3, 4),
              "window": (0, 1, 4)}



@dataclass(frozen=True)
class Features:
    """What an implementation supports: strategies draw only cases within it, and properties that
    need an unsupported feature do not apply. Without ``any_rank``, cases are ``(B, H, L, E)``."""

    supports: frozenset[str] = field(default_factory=lambda: frozenset(SPEC_FEATURES))
    dtypes: tuple[str, ...] = FLOATING_DTYPES
    #: Draw sizes from ``FEW_SHAPES`` (kernels that compile once per shape).
    few_shapes: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.supports) - set(SPEC_FEATURES)
        if unknown:
            raise ValueError(f"unknown features {sorted(unknown)}; known: {', '.join(SPEC_FEATURES)}")

    def __contains__(self, feature: str) -> bool:
        return feature in self.supports


#: Everything SPEC.md defines.
ALL_FEATURES = Features()

_SWITCHES = ("mask", "bias", "scale", "causal", "softcap", "gqa", "window", "dropout")


def feature_cases(features: Features, **switches: Any) -> st.SearchStrategy[AttentionCase] | None:
    """``attention_cases`` restricted to ``features``; None when a switch set to True asks for an
    unsupported feature. Other keyword arguments go to ``attention_cases`` unchanged."""
    for name in _SWITCHES:
        wanted = switches.get(name)
        if name not in features:
            if wanted is True:
                return None
            switches[name] = False
    if "any_rank" not in features:  # kernels: (B, H, L, E), masks and biases of rank >= 2, S > 128 at times
        switches.update(rank2=False, min_batch_dims=1, max_batch_dims=1, min_mask_rank=2)
        switches.setdefault("long_kv_len", 160)
    if "value_dim" not in features:
        switches["value_dim_equals_head_dim"] = True
    alignments = ALIGNMENTS if "bottom_right" in features else ("top_left",)
    return attention_cases(dtypes=features.dtypes, alignments=alignments, few_shapes=features.few_shapes, **switches)


def random_values(rng: np.random.Generator, shape: tuple[int, ...], distribution: str, magnitude: float) -> np.ndarray:
    """float64 values of the given distribution, scaled to about ``magnitude``."""
    if distribution == "normal":
        values = rng.standard_normal(shape)
    elif distribution == "uniform":
        values = rng.uniform(-1.0, 1.0, shape)
    elif distribution == "integers":
        values = rng.integers(-3, 4, shape).astype(np.float64)
    elif distribution == "heavy_tailed":
        values = np.clip(rng.standard_t(2.0, shape), -20.0, 20.0)
    elif distribution == "sparse":
        values = rng.standard_normal(shape) * (rng.random(shape) < 0.3)
    else:
        raise ValueError(f"unknown distribution {distribution!r}")
    return np.asarray(values * magnitude)  # an array even for shape ()


def _feature(draw: Any, switch: bool | None) -> bool:
    return draw(st.booleans()) if switch is None else switch


@st.composite
def broadcast_shapes(draw: Any, target: tuple[int, ...], min_rank: int = 0) -> tuple[int, ...]:
    """A shape broadcastable (right-aligned) to ``target``: some leading dims dropped (down to a
    scalar or a key-padding ``(S,)`` shape), some set to 1."""
    kept = draw(st.integers(min_value=min(min_rank, len(target)), max_value=len(target)))
    shape = target[len(target) - kept:]
    return tuple(draw(st.sampled_from((n, 1))) if n != 1 else 1 for n in shape)


@st.composite
def attention_cases(
    draw: Any,
    *,
    dtypes: tuple[str, ...] = FLOATING_DTYPES,
    rank2: bool | None = None,
    min_batch_dims: int = 0,
    max_batch_dims: int = 2,
    max_batch_size: int = 3,
    max_kv_heads: int = 3,
    max_group_size: int = 3,
    gqa: bool | None = None,
    min_q_len: int = 0,
    max_q_len: int = 9,
    min_kv_len: int = 0,
    max_kv_len: int = 9,
    long_kv_len: int | None = None,
    max_head_dim: int = 8,
    min_value_dim: int = 1,
    max_value_dim: int = 8,
    value_dim_equals_head_dim: bool = False,
    mask: bool | None = None,
    min_mask_rank: int = 0,
    fully_masked_rows: bool | None = None,
    bias: bool | None = None,
    neg_inf_bias: bool | None = None,
    scale: bool | None = None,
    causal: bool | None = None,
    alignments: tuple[str, ...] = ALIGNMENTS,
    softcap: bool | None = None,
    window: bool | None = None,
    dropout: bool | None = None,
    qk_magnitudes: tuple[float, ...] = QK_MAGNITUDES,
    few_shapes: bool = False,
) -> AttentionCase:
    """Draw an ``AttentionCase``.

    Shapes reach rank 2, up to ``max_batch_dims`` batch dims, ``Hq = Hkv * group`` with Hkv > 1
    and group > 1 (GQA; ``gqa=True`` forces group > 1, ``False`` group = 1), L and S from 0 and
    either larger, E != Ev (unless ``value_dim_equals_head_dim``). ``mask``: a random boolean mask
    in a broadcast shape, with ``fully_masked_rows`` forced in some examples (mask and bias of rank
    at least ``min_mask_rank``); ``bias``: random values with ``-inf`` entries
    (``neg_inf_bias``); ``scale``: an explicit scale (zero and negative included) instead of the
    default; ``causal`` with a drawn alignment; ``softcap``; ``window`` (left, right), each side
    unbounded or from 0 to beyond the lengths, at the drawn alignment; ``dropout``: a probability
    (0 included) with a keep-mask from ``attention_ref.dropout_mask`` in a broadcast shape. With
    ``long_kv_len``, S is drawn from 129 to ``long_kv_len`` in about one example in eight (several
    tiles of a tiled kernel).
    ``few_shapes`` draws every size (and window side) from the small menu ``FEW_SHAPES`` (within the
    bounds), for kernels that compile once per shape.
    """

    def size(low: int, high: int, kind: str) -> st.SearchStrategy[int]:
        if not few_shapes:
            return st.integers(low, high)
        return st.sampled_from([n for n in FEW_SHAPES[kind] if low <= n <= high] or [low])

    dtype = draw(st.sampled_from(dtypes))
    # Rank 2 in about one example in six: it cannot reach GQA or batch dims.
    use_rank2 = draw(st.integers(0, 5)) == 0 if rank2 is None else rank2
    if gqa is True or min_batch_dims > 0:
        use_rank2 = False
    if use_rank2:
        lead, hkv, group = (), 1, 1
    else:
        lead = tuple(draw(st.lists(size(1, max_batch_size, "batch"), min_size=min_batch_dims, max_size=max_batch_dims)))
        hkv = draw(size(1, max_kv_heads, "heads"))
        group = 1 if gqa is False else draw(size(2 if gqa else 1, max_group_size, "heads"))
    length = draw(size(min_q_len, max_q_len, "length"))
    keys = draw(size(min_kv_len, max_kv_len, "length"))
    if long_kv_len is not None and draw(st.integers(0, 7)) == 0:  # several kernel tiles of 64 or 128 keys
        keys = draw(size(129, long_kv_len, "long"))
    head_dim = draw(size(1, max_head_dim, "head_dim"))
    value_dim = head_dim if value_dim_equals_head_dim else draw(size(min_value_dim, max_value_dim, "head_dim"))

    heads = () if use_rank2 else (hkv * group,)
    kv_heads = () if use_rank2 else (hkv,)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    qk_distribution = draw(st.sampled_from(DISTRIBUTIONS))
    qk_magnitude = draw(st.sampled_from(qk_magnitudes))
    v_distribution = draw(st.sampled_from(DISTRIBUTIONS))
    np_dtype = numpy_dtype(dtype)

    def values(shape: tuple[int, ...], distribution: str, magnitude: float) -> np.ndarray:
        return random_values(rng, shape, distribution, magnitude).astype(np_dtype)

    q = values((*lead, *heads, length, head_dim), qk_distribution, qk_magnitude)
    k = values((*lead, *kv_heads, keys, head_dim), qk_distribution, qk_magnitude)
    v = values((*lead, *kv_heads, keys, value_dim), v_distribution, 1.0)
    logits_shape = (*lead, *heads, length, keys)

    mask_array = None
    if _feature(draw, mask):
        mask_shape = draw(broadcast_shapes(logits_shape, min_mask_rank))
        keep = draw(st.sampled_from((0.2, 0.5, 0.8, 0.95)))
        mask_array = np.asarray(rng.random(mask_shape) < keep)
        if _feature(draw, fully_masked_rows) and mask_array.ndim >= 2 and mask_array.shape[-2] > 0:
            rows = rng.random(mask_array.shape[-2]) < 0.4
            mask_array[..., rows, :] = False
            if mask_array.ndim >= 3 and mask_array.shape[-3] > 1:  # a whole head masked
                mask_array[..., int(rng.integers(mask_array.shape[-3])), :, :] = False

    bias_array = None
    if _feature(draw, bias):
        bias_shape = draw(broadcast_shapes(logits_shape, min_mask_rank))
        bias_array = random_values(rng, bias_shape, draw(st.sampled_from(DISTRIBUTIONS)),
                                   draw(st.sampled_from((0.1, 1.0, 10.0))))
        if _feature(draw, neg_inf_bias):
            bias_array[rng.random(bias_shape) < draw(st.sampled_from((0.1, 0.3, 1.0)))] = -np.inf
        # Any floating dtype no wider than the compute dtype (SPEC.md rule 5).
        bias_dtypes = FLOATING_DTYPES if dtype == "float64" else FLOATING_DTYPES[:3]
        bias_array = bias_array.astype(numpy_dtype(draw(st.sampled_from((dtype, *bias_dtypes)))))

    scale_value = None
    if _feature(draw, scale):
        scale_value = draw(st.one_of(
            st.sampled_from((0.0, -1.0, 1e-3, 0.125, 2.0)),
            st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False),
        ))
    use_causal = _feature(draw, causal)
    alignment = draw(st.sampled_from(alignments))
    softcap_value = None
    if _feature(draw, softcap):
        softcap_value = draw(st.one_of(st.sampled_from((0.5, 1.0, 5.0, 30.0)),
                                       st.floats(0.05, 50.0, allow_nan=False)))
    window_value = None
    if _feature(draw, window):  # a window side is a static option of compiled kernels: a menu for them
        sides = st.one_of(st.none(), st.sampled_from(FEW_SHAPES["window"]) if few_shapes
                          else st.integers(0, max(length, keys) + 1))
        window_value = (draw(sides), draw(sides))
    dropout_p, keep = 0.0, None
    if _feature(draw, dropout):
        dropout_p = draw(st.sampled_from((0.0, 0.1, 0.5, 0.9)))
        keep = dropout_mask(draw(broadcast_shapes(logits_shape, min_mask_rank)), dropout_p,
                            draw(st.integers(0, 2**32 - 1)))
    return AttentionCase(q, k, v, mask=mask_array, bias=bias_array, scale=scale_value,
                         causal=use_causal, alignment=alignment, softcap=softcap_value, window=window_value,
                         dropout_p=dropout_p, dropout_mask=keep)
