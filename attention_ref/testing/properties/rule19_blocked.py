"""rule 19: the blocked algorithm: results without weights (the blocked path of our backends, the
fast path of many kernels) match the float64 oracle; with any tile (``block_q``, ``block_k``: 1,
non-divisors, larger than L or S), out, lse and the gradients match it within the bound of rule 19,
and the blocked results agree with the dense ones (``dense=True``)."""

from __future__ import annotations

from hypothesis import strategies as st

from ..assertions import assert_attention_close, assert_gradients_close, assert_same_results, bounds_for
from ..cases import AttentionCase, call, call_vjp, random_cotangent
from ..implementation import Subject
from ..runner import attention_property
from ._common import SEEDS

#: Tile sizes: 1, small sizes that rarely divide L or S, and one beyond every drawn L and S. A few
#: values, so that a jitted backend compiles few programs.
BLOCK_SIZES = st.sampled_from((1, 2, 3, 5, 64))


@attention_property("results_without_weights_match_oracle", (11, 19), cases={}, requires=("weights",))
def results_without_weights_match_oracle(subject: Subject, case: AttentionCase) -> None:
    """out (and lse, when returned) without ``return_weights`` match the float64 oracle within the
    tolerance rule (every feature, every dtype): the weights' request changes nothing else."""
    flags = dict(return_lse=True) if "lse" in subject.features else {}
    assert_attention_close(call(subject.impl, case, **flags), case, calibrated=subject.calibrated)


@attention_property("blocked_matches_oracle_for_any_tile", (19,), cases={}, extra=(BLOCK_SIZES, BLOCK_SIZES),
                    requires=("blocks", "lse"))
def blocked_matches_oracle_for_any_tile(subject: Subject, example: tuple[AttentionCase, int, int]) -> None:
    """With any tile ``(block_q, block_k)``, out and lse match the float64 oracle within rule 19's
    bound, and agree with the dense algorithm's within the sum of both bounds."""
    case, block_q, block_k = example
    blocked = call(subject.impl, case, return_lse=True, block_q=block_q, block_k=block_k)
    assert_attention_close(blocked, case, calibrated=subject.calibrated, key_block=block_k)
    dense = call(subject.impl, case, return_lse=True, dense=True)
    bound = bounds_for(subject, case, key_block=block_k) + bounds_for(subject, case)
    assert_same_results(blocked, dense, bound, case, f"blocked ({block_q} x {block_k}) against dense")


@attention_property("blocked_gradients_match_oracle_for_any_tile", (14, 19), cases={},
                    extra=(BLOCK_SIZES, BLOCK_SIZES, SEEDS), requires=("blocks", "grad"))
def blocked_gradients_match_oracle_for_any_tile(subject: Subject, example: tuple[AttentionCase, int, int, int]) -> None:
    """With any tile, the FlashAttention-2 backward's dq, dk, dv and dbias match the float64 oracle's
    within the gradient tolerance, exactly 0 where SPEC.md fixes them (excluded keys, fully excluded
    rows), never NaN."""
    case, block_q, block_k, seed = example
    d_out = random_cotangent(case, seed)
    grads = call_vjp(subject.impl, case, d_out, block_q=block_q, block_k=block_k)
    assert_gradients_close(grads, case, d_out, calibrated=subject.calibrated, with_dbias="dbias" in subject.features,
                           key_block=block_k)
