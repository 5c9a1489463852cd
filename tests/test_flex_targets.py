"""The FlexAttention crosscheck targets (attention_ref/testing/flex_targets.py): flex_attention eager and
compiled (``torch.compile(fullgraph=True)``) on the CPU, through ``check(...)`` with their declarations
and on fixed cases against the float64 oracle, and their findings: both agree within the tolerance rule
with every dense feature declared; flex refuses empty sequences (S = 0 in flex_attention, L = 0 or S = 0
in create_block_mask, lse None for L = 0); the compiled CPU kernel refuses float64 and return_lse."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from attention_ref.testing.adapters import available_targets, find_target
from attention_ref.testing.assertions import assert_attention_close
from attention_ref.testing.cases import AttentionCase
from attention_ref.testing.flex_targets import FLEX_COMPILED, FLEX_EAGER, flex_kernel
from attention_ref.testing.report import Status

from .conftest import import_or_skip


def _target(name: str):  # type: ignore[no-untyped-def]
    target = next(t for t in available_targets("cpu") if t.name == name)
    assert find_target(name, "cpu", target.builder).name == name
    return target


def test_declarations_on_the_cpu() -> None:
    import_or_skip("torch")
    eager, compiled = _target(FLEX_EAGER), _target(FLEX_COMPILED)
    assert {"mask", "bias", "causal", "bottom_right", "window", "softcap", "gqa", "lse"} <= set(eager.supports)
    assert "lse" not in compiled.supports and "grad" not in eager.supports + compiled.supports
    assert compiled.dtypes == ("bfloat16", "float32") and compiled.few_shapes and eager.few_shapes


def test_eager_passes_the_dense_properties() -> None:
    import_or_skip("torch")
    properties = ("matches_float64_oracle", "fully_excluded_rows_are_zero")
    report = _target(FLEX_EAGER).run(dtypes=("float32",), max_examples=3, seed=0, properties=properties)
    statuses = {o.name: o.status for o in report.outcomes if o.name in properties}
    details = {o.name: o.detail or "" for o in report.outcomes}
    assert all(statuses[name] == Status.PASS for name in properties[:-1]), statuses
    # fully_excluded_rows_are_zero builds an S = 0 case itself (outside the size menu): flex raises
    assert statuses["fully_excluded_rows_are_zero"] == Status.ERROR
    assert "IndexError" in details["fully_excluded_rows_are_zero"]


def _case(rng: np.random.Generator, dtype: type) -> AttentionCase:
    """GQA (4 query heads on 2 kv heads), S = 130 (two flex blocks), Ev != E, a mask with a fully masked row,
    bottom-right causal, a window, softcap and a bias."""
    q = (rng.standard_normal((2, 4, 5, 4)) * 2).astype(dtype)
    k = (rng.standard_normal((2, 2, 130, 4)) * 2).astype(dtype)
    v = rng.standard_normal((2, 2, 130, 3)).astype(dtype)
    mask = rng.random((1, 4, 5, 130)) > 0.3
    mask[0, 1, 2] = False
    return AttentionCase(q, k, v, mask=mask, bias=rng.standard_normal((5, 130)).astype(dtype), scale=0.6,
                         causal=True, alignment="bottom_right", window=(60, None), softcap=4.0)


def _call(kernel, case: AttentionCase, **flags):  # type: ignore[no-untyped-def]
    import torch

    keywords = {name: torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x
                for name, x in case.as_keywords().items() if x is not None}
    keywords |= {name: torch.from_numpy(x) for name, x in case.array_keywords().items() if x is not None}
    keywords.pop("dropout_p", None)
    return kernel(*(torch.from_numpy(x) for x in (case.q, case.k, case.v)), **keywords, **flags)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eager_matches_the_oracle_with_every_feature(dtype: type) -> None:
    import_or_skip("torch")
    case = _case(np.random.default_rng(0), dtype)
    out, _, lse = (None if x is None else x.numpy() for x in _call(flex_kernel(False), case, return_lse=True))
    assert np.all(out[0, 1, 2] == 0) and np.all(lse[0, 1, 2] == -np.inf)  # the fully masked row, as SPEC.md
    from attention_ref.result import AttentionOutput

    assert_attention_close(AttentionOutput(out, None, lse), case)


# torch's own DeprecationWarnings while compiling (an autograd Function instantiated in create_block_mask's
# vmap, torch.jit.script_method in inductor), which pytest here turns into errors
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_matches_the_oracle_on_one_shape_and_refuses_float64() -> None:
    import_or_skip("torch")
    case = _case(np.random.default_rng(1), np.float32)
    kernel = flex_kernel(True)
    out = _call(kernel, case).numpy()
    assert np.all(out[0, 1, 2] == 0)
    assert_attention_close(out, case)
    with pytest.raises(Exception, match="float64|torch.float64"):
        _call(kernel, _case(np.random.default_rng(1), np.float64))


def test_flex_refuses_empty_sequences() -> None:
    torch = import_or_skip("torch")
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    kernel = flex_kernel(False)
    q, k, v = torch.ones(1, 1, 3, 2), torch.ones(1, 1, 0, 2), torch.ones(1, 1, 0, 2)
    with pytest.raises(IndexError):
        kernel(q, k, v)  # S = 0: flex_attention's own max() over no keys
    with pytest.raises(IndexError):
        kernel(q[:, :, :0], torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), causal=True)  # L = 0: create_block_mask
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        _, aux = flex_attention(q[:, :, :0], torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2),
                                return_aux=AuxRequest(lse=True))
    assert aux.lse is None  # L = 0: no lse at all (SPEC.md: an empty (B, H, 0) array)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's own, while compiling (see above)
def test_compiled_fails_to_lower_a_bias_broadcast_over_queries_and_keys() -> None:
    """A real inductor bug (torch 2.13, CPU), found by bias_row_constant_changes_nothing: a score_mod reading a
    bias of shape (1, 1), expanded to (B, H, L, S), does not lower ("All the buffers in the score and mask
    subgraph should be in kernel_group.args.input_buffers"); a (1, S) bias compiles and agrees."""
    torch = import_or_skip("torch")
    kernel = flex_kernel(True)
    q, k, v = torch.randn(1, 1, 1, 3), torch.randn(1, 1, 130, 3), torch.randn(1, 1, 130, 3)
    with pytest.raises(Exception, match="should be in kernel_group.args.input_buffers"):
        kernel(q, k, v, bias=torch.randn(1, 1))


def test_eager_flex_keeps_rule_22s_conventions() -> None:
    """torch's own flex_attention, given our programs as they are (ar.flex's, tables and all), agrees with
    rule 22: h the query head under GQA, b the batch element, the score the scaled logit before the softcap
    and the bias, mask_mod one more mask."""
    import_or_skip("torch")
    target = find_target(FLEX_EAGER, "cpu", "attention_ref.testing.flex_targets:flex_targets")
    assert {"mask_mod", "score_mod"} <= set(target.supports)
    rule22 = ("mask_mod_equals_explicit_mask", "bias_only_score_mod_equals_bias", "softcap_score_mod_equals_softcap",
              "score_mod_runs_before_softcap_and_bias")
    report = target.run(dtypes=("float32",), max_examples=5, seed=0, properties=rule22)
    assert {o.name: o.status for o in report.outcomes if o.name in rule22} == dict.fromkeys(rule22, Status.PASS), \
        report.render()


def test_the_flex_targets_run_only_when_named() -> None:
    """The compiled one recompiles per shape, and shrinking recompiles per candidate; the eager one traces
    each new shape and program (some 0.3 s a call): too slow for the default crosscheck, which CI runs
    (opt_in), so they run when a crosscheck names them (--target flex)."""
    import_or_skip("torch")
    from attention_ref.testing.crosscheck import crosscheck

    compiled = find_target(FLEX_COMPILED, "cpu", "attention_ref.testing.flex_targets:flex_targets")
    eager = find_target(FLEX_EAGER, "cpu", "attention_ref.testing.flex_targets:flex_targets")
    assert compiled.opt_in and eager.opt_in
    builders = ("attention_ref.testing.flex_targets:flex_targets",)
    assert crosscheck(builders=builders, dtypes=("float32",), max_examples=1).results == []
    report = crosscheck(builders=builders, dtypes=("float32",), max_examples=1, properties=("matches_float64_oracle",),
                        workers=1, only=("eager",))
    assert [target.name for target, _, _ in report.results] == [FLEX_EAGER]
