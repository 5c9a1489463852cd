"""The framework kernels through the checker: torch SDPA and jax.nn pass (with their declared
conventions), a declared convention is verified rather than assumed, torch's CPU flash kernel is
flagged for its one bug, and ``attention-ref crosscheck`` prints the matrix."""

from __future__ import annotations

import re

import pytest

from attention_ref.cli import main
from attention_ref.testing.adapters import available_targets, flax_nnx, jax_nn, torch_sdpa
from attention_ref.testing.check import check

from .conftest import import_or_skip

HALF_AND_SINGLE = ("float32", "float16", "bfloat16")
SDPA_FEATURES = ("mask", "bias", "scale", "causal", "gqa", "value_dim")
JAX_FEATURES = ("mask", "bias", "scale", "causal", "gqa", "lse")


def statuses(report) -> dict[str, str]:
    return {o.name: o.status for o in report.outcomes}


def test_torch_sdpa_math_passes_in_every_cpu_dtype() -> None:
    import_or_skip("torch")
    report = check(torch_sdpa("MATH"), framework="torch", supports=SDPA_FEATURES, dtypes=HALF_AND_SINGLE,
                   seed=0, max_examples=50)
    assert report.passed, str(report)
    assert "convention differs" not in statuses(report).values()


def test_torch_cpu_flash_passes_without_scale() -> None:
    import_or_skip("torch")
    features = tuple(f for f in SDPA_FEATURES if f not in ("scale", "value_dim"))
    report = check(torch_sdpa("FLASH_ATTENTION"), framework="torch", supports=features, dtypes=HALF_AND_SINGLE,
                   seed=0, max_examples=50)
    assert report.passed, str(report)


def test_torch_cpu_flash_nan_with_causal_and_nonpositive_scale_is_flagged() -> None:
    """torch 2.13's CPU flash kernel: with is_causal and scale <= 0, rows with a causally excluded
    key are NaN (the math backend is right). The shrunk case must show exactly that."""
    import_or_skip("torch")
    features = tuple(f for f in SDPA_FEATURES if f != "value_dim")
    report = check(torch_sdpa("FLASH_ATTENTION"), framework="torch", supports=features, seed=0, max_examples=25,
                   properties=("matches_float64_oracle",))
    failure = next(o for o in report.outcomes if o.name == "matches_float64_oracle")
    assert failure.status == "FAIL" and "nan" in failure.detail and "causal=True" in failure.detail
    scale = float(failure.detail.split("scale=")[1].split(",")[0].removeprefix("np.float64(").rstrip(")"))
    assert scale <= 0, failure.detail


def test_jax_nn_passes_with_its_declared_convention() -> None:
    import_or_skip("jax")
    report = check(jax_nn("xla"), framework="jax", supports=JAX_FEATURES, layout="blhd", fully_masked="mean_v",
                   seed=0, max_examples=6, few_shapes=True)
    assert report.passed, str(report)
    fully_masked = next(o for o in report.outcomes if o.name == "fully_excluded_rows_are_zero")
    assert fully_masked.status == "convention differs" and "mean(v)" in fully_masked.detail


def test_jax_nn_fails_when_declared_as_the_spec() -> None:
    """The convention is verified, not assumed: declared "zero", jax.nn's mean(v) rows fail."""
    import_or_skip("jax")
    report = check(jax_nn("xla"), framework="jax", supports=("mask",), layout="blhd", seed=0, max_examples=15,
                   few_shapes=True, fail_fast=True)
    failure = next(o for o in report.outcomes if o.status == "FAIL")
    assert "expected np.float64(0.0) exactly" in failure.detail, failure.detail


def test_torch_sdpa_math_gradients_pass_in_every_cpu_dtype() -> None:
    """torch SDPA with autograd: dq, dk, dv and the float attn_mask's gradient (dbias) pass."""
    import_or_skip("torch")
    report = check(torch_sdpa("MATH"), framework="torch", supports=(*SDPA_FEATURES, "grad", "dbias"),
                   dtypes=HALF_AND_SINGLE, seed=0, max_examples=20)
    assert report.passed, str(report)
    assert statuses(report)["gradients_match_float64_oracle"] == "pass"


def test_jax_nn_gradients_and_local_window_pass_with_a_mask() -> None:
    """jax.nn with jax.vjp, and local_window_size against window, pass (mask, not bias: see below).
    The properties of windows and gradients only: the others run on jax.nn in the test above, and on
    every feature in the crosscheck CI runs after the tests."""
    import_or_skip("jax")
    supports = ("mask", "scale", "causal", "gqa", "window", "grad")
    chosen = ("matches_float64_oracle", "window_equals_explicit_mask", "gradients_match_float64_oracle",
              "gradients_vanish_through_excluded_keys")
    report = check(jax_nn("xla"), framework="jax", supports=supports, layout="blhd", fully_masked="mean_v",
                   seed=0, max_examples=6, few_shapes=True, properties=chosen)
    assert report.passed, str(report)
    assert statuses(report)["window_equals_explicit_mask"] in ("pass", "convention differs")
    assert statuses(report)["gradients_match_float64_oracle"] in ("pass", "convention differs")


def test_jax_nn_nan_gradients_when_a_bias_row_is_all_neg_inf() -> None:
    """A finding: jax.nn gives NaN out for a row whose bias is all -inf (its declared convention) and
    NaN dk, dv for the whole head, even with a zero cotangent on that row; the checker fails it."""
    import_or_skip("jax")
    import numpy as np

    from attention_ref.testing.assertions import assert_gradients_close
    from attention_ref.testing.cases import AttentionCase, call_vjp
    from attention_ref.testing.check import KernelImplementation
    from attention_ref.testing.strategies import Features

    impl = KernelImplementation(jax_nn("xla"), framework="jax", layout="blhd", fully_masked="mean_v",
                                features=Features(frozenset(("bias", "grad", "dbias")), ("float32",)))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, n, 3)).astype(np.float32) for n in (2, 4, 4))
    bias = np.zeros((1, 1, 2, 4), np.float32)
    bias[..., 0, :] = -np.inf
    case = AttentionCase(q, k, v, bias=bias)
    d_out = np.ones((1, 1, 2, 3), np.float32)
    grads = call_vjp(impl, case, d_out)
    assert np.isnan(grads.dk).all() and np.isnan(grads.dv).all()
    with pytest.raises(AssertionError, match="nan"):
        assert_gradients_close(grads, case, d_out)


def test_flax_nnx_passes_with_its_declared_convention() -> None:
    import_or_skip("flax")
    report = check(flax_nnx, framework="jax", supports=("mask", "bias", "causal", "gqa"), layout="blhd",
                   fully_masked="mean_v", seed=0, max_examples=5, few_shapes=True)
    assert report.passed, str(report)


def test_targets_are_listed_per_installed_framework() -> None:
    import_or_skip("torch")
    names = [t.name for t in available_targets("cpu")]
    assert "torch.sdpa[MATH]" in names and "torch.sdpa[FLASH_ATTENTION]" in names
    with pytest.raises(ValueError, match="device"):
        available_targets("tpu")


def test_cli_crosscheck_prints_the_matrix(capsys: pytest.CaptureFixture[str]) -> None:
    import_or_skip("torch")
    import_or_skip("jax")
    status = main(["crosscheck", "--target", "torch.sdpa[MATH]", "--target", "jax.nn", "--max-examples", "2",
                   "--property", "matches_float64_oracle", "--property", "fully_excluded_rows_are_zero"])
    out = capsys.readouterr().out
    assert status == 0, out
    header = next(line for line in out.splitlines() if line.startswith("property"))
    assert "torch.sdpa[MATH]" in header and "jax.nn.dot_product_attention[xla]" in header
    assert re.fullmatch(r"\d+ passed, \d+ convention differs, \d+ failed, 0 errors", out.splitlines()[-1])
    strict = main(["crosscheck", "--target", "torch.sdpa[FLASH", "--max-examples", "10", "--strict",
                   "--property", "matches_float64_oracle"])
    assert strict == 1  # the CPU flash kernel's NaN bug


def test_torch_math_dropout_mask_follows_the_spec() -> None:
    """torch's math attention with an explicit keep-mask (the private op torch's own tests use) gives
    SPEC.md's dropout output and gradients; its returned probabilities are P * keep (not rescaled),
    neither SPEC.md's weights (before dropout) nor the probabilities actually used."""
    torch = import_or_skip("torch")
    import numpy as np

    import attention_ref as ar
    from attention_ref.testing import AttentionCase, assert_attention_close, assert_gradients_close
    from attention_ref.testing.assertions import assert_within

    rng = np.random.default_rng(0)
    case = AttentionCase(*(rng.standard_normal(shape) for shape in ((2, 4, 3, 5), (2, 2, 6, 5), (2, 2, 6, 3))),
                         causal=True, dropout_p=0.3, dropout_mask=ar.dropout_mask((2, 4, 3, 6), 0.3, seed=1))
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in (case.q, case.k, case.v))
    keep = torch.from_numpy(case.dropout_mask)
    out, attn = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, 0.3, True, keep, enable_gqa=True)
    assert_attention_close(out.detach().numpy(), case)
    oracle = case.oracle()
    assert_within("attn vs weights * keep", attn.detach().numpy(), oracle.weights * case.dropout_mask,
                  case.bounds(oracle=oracle).weights, case)
    d_out = np.ones(out.shape)
    grads = torch.autograd.grad(out, (q, k, v), torch.from_numpy(d_out))
    assert_gradients_close(ar.Gradients(*(g.numpy() for g in grads)), case, d_out)
