"""rule 10: dtypes, compute dtype and accuracy: out in the input dtype, weights and lse in the compute
dtype, ``compute_dtype="float64"`` computing in float64; the forms of the results (rule 11).
(The accuracy itself, the tolerance rule, is ``matches_float64_oracle``.)

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

import numpy as np

from ...result import AttentionOutput
from ..assertions import assert_within, bounds_for
from ..cases import AttentionCase, call, full_results
from ..implementation import Subject
from ..runner import attention_property
from ..strategies import numpy_dtype


@attention_property("result_types_and_dtypes", (1, 10, 11), cases={}, requires=("compute_dtype", "weights", "lse"))
def result_types_and_dtypes(subject: Subject, case: AttentionCase) -> None:
    """Output in the input dtype; weights and lse in the compute dtype; the result's form and shapes;
    compute_dtype='float64' computes in float64."""
    impl = subject.impl
    out = call(impl, case).out
    heads = case.logits_shape[:-2]
    assert out.dtype == numpy_dtype(case.dtype) and out.shape == (*heads, case.q_len, case.value_dim), (
        f"out: {out.dtype} {out.shape}\n  case: {case!r}")
    arrays = [impl.asarray(x) for x in (case.q, case.k, case.v)]
    extra = {name: None if x is None else impl.asarray(x) for name, x in case.array_keywords().items()}
    bare = impl.attention(*arrays, **extra, **case.scalar_keywords())
    assert not isinstance(bare, AttentionOutput), "with no flags, attention returns the output array"
    only_weights = impl.attention(*arrays, **extra, **case.scalar_keywords(), return_weights=True)
    only_lse = impl.attention(*arrays, **extra, **case.scalar_keywords(), return_lse=True)
    assert isinstance(only_weights, AttentionOutput) and only_weights.lse is None and only_weights.weights is not None
    assert isinstance(only_lse, AttentionOutput) and only_lse.weights is None and only_lse.lse is not None
    oracle = case.oracle()
    for compute_dtype in dict.fromkeys((case.default_compute_dtype, "float64")):
        result = full_results(impl, case, compute_dtype=compute_dtype)
        assert result.out.dtype == numpy_dtype(case.dtype), f"out dtype {result.out.dtype}\n  case: {case!r}"
        for name, x, shape in (("weights", result.weights, case.logits_shape),
                               ("lse", result.lse, case.logits_shape[:-1])):
            assert x.dtype == np.dtype(compute_dtype) and x.shape == shape, (
                f"{name}: {x.dtype} {x.shape}, expected {compute_dtype} {shape}\n  case: {case!r}")
        bounds = bounds_for(subject, case, compute_dtype=compute_dtype, oracle=oracle)
        assert_within(f"weights with compute_dtype={compute_dtype}", result.weights, oracle.weights, bounds.weights,
                      case, exact=~case.allowed())
