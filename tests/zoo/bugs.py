"""The zoo's table: every planted bug, what it does, the features it is checked with, and the property
that must catch it.

Each row names a switch of ``make_kernel`` (``tests/zoo/kernel.py``) or of ``tiled_kernel``
(``tests/zoo/tiled.py``, planted at tile 32). ``supports`` is what the buggy kernel is checked with
(``attention_ref.testing.check``'s ``supports``): the features needed to observe the bug with the
property ``catches`` (that property's own requirements included), and no more (one exception, with
its reason: ``bias_times_scale``). ``catches`` is a
property of ``attention_ref.testing.PROPERTIES``: run alone (``check(..., properties=(catches,))``),
seed 0, every dtype, it must report "FAIL".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .kernel import Kernel, make_kernel, reference_kernel
from .tiled import TILED_BUGS, tiled_kernel

#: The features of the zoo's kernel (``make_kernel``): every feature ``check`` knows.
ALL_FEATURES = ("mask", "bias", "scale", "causal", "bottom_right", "gqa", "value_dim", "softcap", "window",
                "dropout", "lse", "weights", "grad", "dbias", "mask_mod", "score_mod")
#: The features of the tiled kernel: the forward ones but windows and dropout.
TILED_FEATURES = ("mask", "bias", "scale", "causal", "bottom_right", "gqa", "value_dim", "softcap", "lse", "weights")
#: The dtypes every kernel of the zoo is checked in.
ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: The tile size of the tiled kernel's bugs (several tiles are reached at S > 128).
BUGGY_TILE_SIZE = 32


@dataclass(frozen=True)
class Bug:
    """One planted bug: its switch ``name``, a one-line ``description``, the property that ``catches``
    it and the features (``supports``) it is checked with."""

    name: str
    description: str
    catches: str
    supports: tuple[str, ...]

    @property
    def kernel(self) -> Kernel:
        """The correct kernel with this bug planted."""
        return buggy_kernel(self.name)


@functools.cache
def buggy_kernel(name: str) -> Kernel:
    """The kernel with the bug ``name`` planted (tiled ones at ``BUGGY_TILE_SIZE``)."""
    if name in TILED_BUGS:
        return tiled_kernel(BUGGY_TILE_SIZE, **{name: True})
    return make_kernel(**{name: True})


BUGS: tuple[Bug, ...] = (
    # scale
    Bug("missing_scale", "never multiplies the logits by the scale (neither 1/sqrt(E) nor an explicit one)",
        "zero_scale_averages_attended_values", ("scale",)),
    Bug("scale_from_value_dim", "default scale 1/sqrt(Ev) instead of 1/sqrt(E): seen only when E != Ev",
        "default_scale_is_inverse_sqrt_head_dim", ("value_dim",)),
    Bug("scale_applied_twice", "multiplies by the scale twice (scale² q·k), once in q and once on the logits",
        "scale_is_homogeneous", ("scale",)),
    # softmax
    Bug("softmax_over_queries", "softmax over the query axis instead of the key axis (weights and out)",
        "weights_rows_sum_to_one", ("weights",)),
    Bug("nan_on_fully_masked_rows", "naive softmax: a fully excluded row gives NaN (exp(-inf - (-inf)))",
        "fully_excluded_rows_are_zero", ("mask",)),
    Bug("mean_v_on_fully_masked_rows",
        "masks with a finite fill (-1e9): a fully excluded row gives mean(V), uniform weights, a finite lse",
        "fully_excluded_rows_are_zero", ("mask",)),
    Bug("no_max_subtraction", "softmax without subtracting the row max: exp overflows (NaN) or underflows "
        "for large logits", "huge_logits_stay_finite", ("scale",)),
    Bug("row_max_includes_masked_keys",
        "row max over all keys, excluded ones included: the result depends on excluded keys, and a large "
        "excluded logit underflows the row", "excluded_keys_get_zero_weight", ("mask",)),
    # mask, causal and window
    Bug("inverted_mask", "reads the boolean mask as True = masked out", "excluded_keys_get_zero_weight", ("mask",)),
    Bug("mask_only_first_batch", "the mask is applied to batch element 0 only", "batch_dims_equal_a_loop",
        ("mask",)),
    Bug("decode_fast_path_ignores_mask", "a fast path for L == 1 (decode) that ignores the mask",
        "excluded_keys_get_zero_weight", ("mask",)),
    Bug("causal_strict", "causal keeps j < i + offset: each query loses its diagonal key",
        "causal_equals_explicit_mask", ("causal", "mask")),
    Bug("causal_one_key_too_many", "causal keeps j <= i + offset + 1: each query sees one future key",
        "causal_ignores_future_keys", ("causal",)),
    Bug("bottom_right_as_top_left", "ignores alignment: bottom_right is computed as top_left (offset 0)",
        "causal_equals_explicit_mask", ("causal", "bottom_right", "mask")),
    Bug("top_left_as_bottom_right", "ignores alignment: top_left is computed as bottom_right (offset S - L)",
        "causal_equals_explicit_mask", ("causal", "mask")),
    Bug("bottom_right_offset_negated", "bottom_right causal offset L - S instead of S - L",
        "causal_equals_explicit_mask", ("causal", "bottom_right", "mask")),
    Bug("window_left_off_by_one", "window keeps one key too many on the left (i + offset - left - 1)",
        "window_equals_explicit_mask", ("window", "mask")),
    Bug("window_ignores_right", "window ignores its right bound", "window_equals_explicit_mask", ("window", "mask")),
    Bug("window_always_top_left", "window aligned top-left even when bottom_right is asked",
        "window_equals_explicit_mask", ("window", "bottom_right", "mask")),
    # GQA, bias and softcap
    Bug("gqa_tile_order", "GQA query head h uses kv head h % Hkv (tile order), not h // (Hq/Hkv)",
        "gqa_equals_repeated_kv_heads", ("gqa",)),
    # With the default scale alone (1/sqrt(E), E <= 8) the error is small: seed 0 misses it in 100
    # examples (seeds 1-3 and 300 examples catch it); an explicit scale (2, -1, ...) shows it at once.
    Bug("bias_times_scale", "the bias is multiplied by the scale (as in scale (q·k + bias))",
        "matches_float64_oracle", ("bias", "scale")),
    Bug("softcap_after_bias", "softcap applied after adding the bias (a -inf bias becomes -softcap)",
        "neg_inf_bias_equals_mask", ("mask", "bias", "softcap")),
    Bug("softcap_without_outer_factor", "softcap as tanh(x / c), missing the outer factor c",
        "softcap_bounds_weight_ratios", ("softcap", "weights")),
    # precision
    Bug("half_precision_accumulation",
        "logits, softmax and P·V in float16/bfloat16 instead of float32: seen in half precision when the logits "
        "are large (the calibrated tolerance admits half-precision roundings of small ones)",
        "large_scale_selects_extreme_key", ("scale",)),
    Bug("float64_computed_in_float32",
        "float64 inputs computed in float32 and cast back (a silent downcast): only observable in float64",
        "matches_float64_oracle", ()),
    # results
    Bug("output_heads_seq_transposed",
        "output computed as (B, L, Hq, Ev) and reshaped (not transposed) to (B, Hq, L, Ev): seen when L, Hq > 1",
        "matches_float64_oracle", ()),
    Bug("lse_log2", "lse in log2 units (lse / ln 2), as exp2-based kernels keep it",
        "weights_and_lse_agree_with_output", ("weights", "lse")),
    Bug("lse_missing_row_max", "lse = log(sum exp(x - m)): the row max is never added back",
        "matches_float64_oracle", ("lse",)),
    Bug("lse_zero_on_fully_masked_rows", "lse 0 instead of -inf on fully excluded rows (S = 0 included)",
        "fully_excluded_rows_are_zero", ("lse",)),
    Bug("weights_unnormalised", "returned weights are exp(x - max), not divided by the row sum",
        "weights_rows_sum_to_one", ("weights",)),
    # tiled kernel
    Bug("tiled_no_rescale",
        "tile 32, the output accumulator is not rescaled when the running max grows: seen only for S > 32",
        "matches_float64_oracle", ()),
    Bug("tiled_drops_last_partial_tile",
        "tile 32, loops over S // 32 full tiles and drops the last partial tile: seen when S % 32 != 0",
        "matches_float64_oracle", ()),
    # dropout
    Bug("dropout_without_rescale", "dropout without the 1 / (1 - p) rescale",
        "dropout_all_keep_scales_by_inverse_keep_probability", ("dropout",)),
    Bug("weights_after_dropout", "returned weights are those after dropout, not before",
        "dropout_equals_manual_computation", ("dropout", "weights")),
    # backward
    Bug("score_mod_on_unscaled_logits", "score_mod applied to q·k before the scale, not to the scaled logits",
        "bias_only_score_mod_equals_bias", ("score_mod",)),
    Bug("score_mod_given_kv_head", "score_mod's h is the kv head h // (Hq/Hkv), not the query head, under GQA",
        "bias_only_score_mod_equals_bias", ("score_mod", "gqa")),
    Bug("mask_mod_query_key_swapped", "mask_mod called as mask_mod(b, h, kv_idx, q_idx)",
        "mask_mod_equals_explicit_mask", ("mask_mod",)),
    Bug("partial_blocks_ignore_mask_mod", "block-sparse: every 4 x 4 block mask_mod allows a key in is attended "
        "whole (partial blocks taken as full)", "mask_mod_equals_explicit_mask", ("mask_mod",)),
    Bug("score_mod_after_softcap", "score_mod applied after the softcap and the bias, not to the scaled logits",
        "score_mod_runs_before_softcap_and_bias", ("score_mod", "softcap")),
    Bug("dq_missing_scale", "dq is never multiplied by the scale", "gradients_match_float64_oracle", ("grad",)),
    Bug("dk_dv_tile_order_groups", "dk and dv summed over the wrong GQA group (query heads h % Hkv, tile order)",
        "gradients_match_float64_oracle", ("gqa", "grad")),
    Bug("probabilities_from_lse_in_backward",
        "backward recomputes P = exp(x - lse): NaN gradients through a fully masked row (lse = -inf)",
        "gradients_vanish_through_excluded_keys", ("mask", "grad")),
    Bug("backward_without_row_term", "softmax backward without the row term D = rowsum(P dP)",
        "logit_gradient_rows_sum_to_zero", ("bias", "grad", "dbias")),
    Bug("softcap_backward_without_derivative", "softcap backward misses the factor 1 - tanh²",
        "gradients_match_finite_differences", ("softcap", "grad")),
    Bug("backward_ignores_dropout", "backward uses P instead of P·keep/(1-p) (dropout forgotten in dv and dP)",
        "gradients_match_float64_oracle", ("dropout", "grad")),
    Bug("dbias_averaged_over_broadcast_dims", "dbias averaged, not summed, over the dims the bias was broadcast over",
        "gradients_match_float64_oracle", ("bias", "grad", "dbias")),
)

#: name -> row.
BUGS_BY_NAME: dict[str, Bug] = {bug.name: bug for bug in BUGS}


@dataclass(frozen=True)
class CorrectKernel:
    """A correct kernel of the zoo and the features it is checked with."""

    name: str
    kernel: Kernel
    supports: tuple[str, ...]


#: The correct kernels: the zoo's kernel (every feature, its own backward) and the tiled kernel at
#: tiles of 1, 16, 32 and 64 keys.
CORRECT_KERNELS: dict[str, CorrectKernel] = {
    "reference": CorrectKernel("reference", reference_kernel, ALL_FEATURES),
    **{f"tiled_{t}": CorrectKernel(f"tiled_{t}", tiled_kernel(t), TILED_FEATURES) for t in (1, 16, 32, 64)},
}


def markdown_table() -> str:
    """The bug table as README.md shows it: ``| bug | what it does | caught by |``, one row per bug."""
    lines = ["| bug | what it does | caught by |", "|---|---|---|"]
    lines += [f"| `{bug.name}` | {bug.description} | `{bug.catches}` |" for bug in BUGS]
    return "\n".join(lines)
