"""The features a kernel may support (``attention-ref check --supports``), as one table: each name
with what it means. Hypothesis-free, so that the command line can list them without importing the
testing tools."""

from __future__ import annotations

#: Feature -> what a kernel that declares it does (the keywords it takes, the results it returns, the
#: shapes it handles).
KERNEL_FEATURE_HELP = {
    "mask": "takes mask= (bool, True = may attend)",
    "bias": "takes bias= (additive, may hold -inf)",
    "scale": "takes scale=",
    "causal": "takes causal=",
    "bottom_right": "takes alignment='bottom_right' with causal and window",
    "gqa": "handles Hq > Hkv (query head h uses kv head h // (Hq/Hkv))",
    "value_dim": "handles Ev != E",
    "softcap": "takes softcap=",
    "window": "takes window=(left, right)",
    "dropout": "takes dropout_p= and dropout_mask= (bool keep-mask)",
    "lse": "returns lse with return_lse=True",
    "weights": "returns weights with return_weights=True",
    "grad": "is differentiable (dq, dk, dv)",
    "dbias": "gives the bias's gradient too",
    "mask_mod": "takes mask_mod=(b, h, q_idx, kv_idx) -> bool (FlexAttention's, rule 22)",
    "score_mod": "takes score_mod=(score, b, h, q_idx, kv_idx) -> score (FlexAttention's, rule 22)",
}
#: The features a kernel may support, in the order of ``KERNEL_FEATURE_HELP``.
KERNEL_FEATURES = tuple(KERNEL_FEATURE_HELP)
#: Further features of a full implementation of SPEC.md (our backends): inputs of any rank,
#: ``compute_dtype``, the spec's error messages, the blocked algorithm's ``block_q``, ``block_k``
#: and ``dense`` keywords (rule 19), and packed variable-length attention, ``varlen_attention`` and
#: ``varlen_attention_vjp`` (rule 20), and attention through a paged KV cache, ``paged_attention`` (rule 21).
SPEC_FEATURES = (*KERNEL_FEATURES, "any_rank", "compute_dtype", "spec_errors", "blocks", "varlen", "paged")

#: What a kernel may return, in this order: out first, then weights and lse.
RESULTS = ("out", "weights", "lse")
#: How a kernel reads a boolean mask: "attend" (True = may attend, SPEC.md rule 6, torch SDPA, jax.nn) or
#: "ignore" (True = masked out, as torch ``nn.MultiheadAttention``'s masks): the checker passes ``~mask``.
MASK_POLARITIES = ("attend", "ignore")
#: The wider dtypes a kernel may declare for out (``out_dtype``): out is returned in it for narrower inputs.
OUT_DTYPES = ("float32", "float64")


def parse_returns(returns: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A declaration of what a kernel returns on every call (``"out,weights"`` or ``("out", "weights")``),
    checked: out first, then any of weights and lse in that order. ValueError otherwise."""
    names = tuple(part.strip() for part in returns.split(",")) if isinstance(returns, str) else tuple(returns)
    ordered = [name for name in RESULTS if name in names]
    if not names or names[0] != "out" or list(names) != ordered or len(set(names)) != len(names):
        raise ValueError(f"returns must be out followed by any of weights, lse in that order "
                         f"(out; out,weights; out,lse; out,weights,lse), got {','.join(names) or 'nothing'}")
    return names
