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
}
#: The features a kernel may support, in the order of ``KERNEL_FEATURE_HELP``.
KERNEL_FEATURES = tuple(KERNEL_FEATURE_HELP)
#: Further features of a full implementation of SPEC.md (our backends): inputs of any rank,
#: ``compute_dtype``, and the spec's error messages.
SPEC_FEATURES = (*KERNEL_FEATURES, "any_rank", "compute_dtype", "spec_errors")
