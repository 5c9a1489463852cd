"""The crosscheck's worker processes: keras runs on the backend its target names (one process per
target, ``KERAS_BACKEND`` set there) with the conventions it declares; a worker that crashes or
hangs becomes ERROR outcomes for its own target, never a hung crosscheck; and the report is the same
whatever the number of workers.

This module is also the builder of the broken targets below (``broken_targets``): workers import it
by name, so its top level imports nothing beyond the standard library and numpy."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

KERAS_TORCH = "keras.ops.dot_product_attention[torch]"
KERAS_TORCH_BIAS = "keras.ops.dot_product_attention[torch, bias]"
KERAS_JAX = "keras.ops.dot_product_attention[jax]"
BROKEN = "tests.test_crosscheck_workers:broken_targets"


# ---- broken targets (built again in their worker from this module) ----------------------------------


def _crashing_kernel(q: Any, k: Any, v: Any) -> Any:
    print("crashing_kernel: about to die", file=sys.stderr, flush=True)
    os._exit(7)


def _hanging_kernel(q: Any, k: Any, v: Any) -> Any:
    time.sleep(600)
    return q


def _textbook(q: Any, k: Any, v: Any, scale: float) -> Any:
    logits = q @ k.swapaxes(-1, -2) * scale
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True, initial=-np.inf))
    return (weights / weights.sum(axis=-1, keepdims=True)) @ v


def _numpy_kernel(q: Any, k: Any, v: Any) -> Any:
    return _textbook(q, k, v, 1 / np.sqrt(q.shape[-1]))


def _unscaled_kernel(q: Any, k: Any, v: Any) -> Any:
    return _textbook(q, k, v, 1.0)  # the bug: no 1/sqrt(E)


def _kernel_needing_its_environment(q: Any, k: Any, v: Any) -> Any:
    if os.environ.get("ATTENTION_REF_TEST_WORKER") != "set":
        raise RuntimeError("ATTENTION_REF_TEST_WORKER is not set in this worker")
    return _numpy_kernel(q, k, v)


def broken_targets(device: str) -> list[Any]:
    from attention_ref.testing.adapters import Target

    return [Target("numpy.crashes", "numpy", _crashing_kernel, (), dtypes=("float64",), cost=1),
            Target("numpy.hangs", "numpy", _hanging_kernel, (), dtypes=("float64",), cost=2),
            Target("numpy.textbook", "numpy", _numpy_kernel, (), dtypes=("float64",), cost=3),
            Target("numpy.unscaled", "numpy", _unscaled_kernel, (), dtypes=("float64",), cost=4),
            Target("numpy.needs_its_environment", "numpy", _kernel_needing_its_environment, (), dtypes=("float64",),
                   environment=(("ATTENTION_REF_TEST_WORKER", "set"),), cost=5)]


# ---- tests -------------------------------------------------------------------------------------------


def _require(*modules: str) -> None:
    """Skip unless every module is installed (keras is never imported here: its backend is the
    worker's), or fail when CI requires every framework."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing and os.environ.get("ATTENTION_REF_REQUIRE_ALL_BACKENDS") == "1":
        pytest.fail(f"not installed: {', '.join(missing)}")
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def _statuses(report: Any, name: str) -> dict[str, str]:
    result = next(result for target, result, _ in report.results if target.name == name)
    return {o.name: o.status for o in result.outcomes}


def _outcome(report: Any, name: str, prop: str) -> Any:
    result = next(result for target, result, _ in report.results if target.name == name)
    return next(o for o in result.outcomes if o.name == prop)


def test_a_crashed_or_hung_worker_is_an_error_of_its_own_target() -> None:
    """The crash (exit status 7, its stderr quoted) and the hang (stopped at the timeout) are ERRORs
    of the property they were on, the properties after it ERROR (not checked), n/a stays n/a; the
    healthy target in the same crosscheck passes."""
    from attention_ref.testing.crosscheck import crosscheck

    chosen = ("matches_float64_oracle", "key_permutation_invariance", "causal_equals_explicit_mask")
    start = time.perf_counter()
    report = crosscheck(builders=(BROKEN,), only=("numpy.crashes", "numpy.hangs", "numpy.textbook"),
                        properties=chosen, max_examples=3, timeout=5, workers=3)
    assert time.perf_counter() - start < 60
    assert [target.name for target, _, _ in report.results] == ["numpy.crashes", "numpy.hangs", "numpy.textbook"]
    for name, how in (("numpy.crashes", "exited with status 7"), ("numpy.hangs", "timed out after 5 s")):
        statuses = _statuses(report, name)
        assert statuses["matches_float64_oracle"] == "ERROR" and statuses["key_permutation_invariance"] == "ERROR"
        assert statuses["causal_equals_explicit_mask"] == "n/a"  # needs causal, which none declares
        assert statuses["weights_rows_sum_to_one"] == "not run"
        first = _outcome(report, name, "matches_float64_oracle").detail
        assert f"worker {how} while checking this property" in first, first
        later = _outcome(report, name, "key_permutation_invariance").detail
        assert later == f"not checked: the crosscheck worker {how} while checking matches_float64_oracle"
    assert "crashing_kernel: about to die" in _outcome(report, "numpy.crashes", "matches_float64_oracle").detail
    healthy = _statuses(report, "numpy.textbook")
    assert healthy["matches_float64_oracle"] == "pass" and healthy["key_permutation_invariance"] == "pass"
    assert not report.passed
    row = next(line for line in report.render().splitlines() if line.startswith("matches_float64_oracle"))
    assert row.split() == ["matches_float64_oracle", "ERROR", "ERROR", "pass"]
    jsonschema = pytest.importorskip("jsonschema")
    from attention_ref.testing.report_files import junit_tree, schema

    jsonschema.validate(report.document(), schema())  # the dead workers' stderr included
    errors = [case.find("error") for case in junit_tree(report.document()).getroot().iter("testcase")]
    assert sum(error is not None for error in errors) == 4  # two properties of each broken target


def test_a_dead_worker_keeps_the_outcomes_it_wrote() -> None:
    from attention_ref.testing.adapters import find_target
    from attention_ref.testing.crosscheck import _dead_worker_report
    from attention_ref.testing.report import PropertyOutcome, Status

    target = find_target("numpy.textbook", "cpu", BROKEN)
    finished = PropertyOutcome("matches_float64_oracle", (1,), Status.PASS)
    chosen = ("matches_float64_oracle", "key_permutation_invariance", "query_permutation_equivariance")
    result = _dead_worker_report(target, ("float64",), chosen, {finished.name: finished}, "exited with status -11",
                                 "Fatal Python error: Segmentation fault")
    outcomes = {o.name: o for o in result.outcomes}
    assert outcomes["matches_float64_oracle"] is finished
    assert outcomes["key_permutation_invariance"].status == "ERROR"
    assert "Segmentation fault" in outcomes["key_permutation_invariance"].detail
    assert outcomes["query_permutation_equivariance"].detail == (
        "not checked: the crosscheck worker exited with status -11 while checking key_permutation_invariance")
    assert [o.name for o in result.outcomes] == [o.name for o in target.plan(("float64",), chosen)]


def _without_times(text: str) -> str:
    return re.sub(r"\d+\.\d s\)", "s)", text)


def test_the_report_is_the_same_whatever_the_number_of_workers() -> None:
    """A correct kernel, one without its scale (a FAIL with its shrunk case) and one that runs only in
    a worker with its environment variable, by one worker and by two: the same matrix, the same
    details, in the targets' order (two workers start the costliest target first)."""
    from attention_ref.testing.crosscheck import crosscheck

    options: dict[str, Any] = dict(builders=(BROKEN,), max_examples=5,
                                   only=("numpy.textbook", "numpy.unscaled", "numpy.needs_its_environment"),
                                   properties=("matches_float64_oracle", "default_scale_is_inverse_sqrt_head_dim"))
    started: list[str] = []
    one = crosscheck(workers=1, **options)
    two = crosscheck(workers=2, progress=started.append, **options)
    assert [t.name for t, _, _ in two.results] == ["numpy.textbook", "numpy.unscaled", "numpy.needs_its_environment"]
    assert started[0] == "checking numpy.needs_its_environment (float64) ..."
    assert _statuses(one, "numpy.unscaled")["matches_float64_oracle"] == "FAIL"
    for name in ("numpy.textbook", "numpy.needs_its_environment"):
        assert _statuses(one, name)["matches_float64_oracle"] == "pass", one.render()
    assert _without_times(one.render()) == _without_times(two.render())


def test_a_worker_runs_the_targets_its_environment_allows() -> None:
    from attention_ref.testing.crosscheck import _compatible

    keras_jax = (("KERAS_BACKEND", "jax"),)
    assert _compatible(keras_jax, ()) and _compatible(keras_jax, keras_jax) and _compatible((), ())
    assert not _compatible(keras_jax, (("KERAS_BACKEND", "torch"),)) and not _compatible((), keras_jax)


def test_keras_runs_on_each_backend_with_its_declared_conventions() -> None:
    """keras' jax and torch backends, each in its own worker (its kernel refuses to run on another
    backend: that would be an ERROR). jax and the torch mask target give mean(v) on fully masked
    rows (verified: "convention differs" with that evidence); the torch bias target gives 0, as the
    spec; every one matches the oracle on these examples."""
    _require("keras", "torch", "jax")
    from attention_ref.testing.crosscheck import crosscheck

    report = crosscheck(only=(KERAS_JAX, "keras.ops.dot_product_attention[torch"), max_examples=3, workers=2,
                        properties=("matches_float64_oracle", "fully_excluded_rows_are_zero"))
    names = [t.name for t, _, _ in report.results]
    assert names == [KERAS_JAX, KERAS_TORCH, KERAS_TORCH_BIAS]
    assert {t.framework for t, _, _ in report.results} == {"jax", "torch"}
    for name in (KERAS_JAX, KERAS_TORCH):
        fully_masked = _outcome(report, name, "fully_excluded_rows_are_zero")
        assert fully_masked.status == "convention differs" and "mean(v)" in fully_masked.detail, fully_masked
    assert _statuses(report, KERAS_TORCH_BIAS)["fully_excluded_rows_are_zero"] == "pass"
    for name in names:
        assert _statuses(report, name)["matches_float64_oracle"] in ("pass", "convention differs"), report.render()


KERAS_TORCH_FINDINGS = """
import numpy as np, torch, keras
from keras import ops
assert keras.backend.backend() == "torch"
rng = np.random.default_rng(0)
q, k, v = (torch.from_numpy(rng.standard_normal((1, n, 2, 4)).astype(np.float32)) for n in (3, 5, 5))
mask = torch.ones(3, 5, dtype=torch.bool)
mask[0] = False
bias = torch.zeros(3, 5)
bias[0] = -float("inf")
try:
    ops.dot_product_attention(q, k, v, mask=mask, bias=bias * 0)
except ValueError as error:
    print("mask with bias:", error)
masked = ops.dot_product_attention(q, k, v, mask=mask)[0, 0]
print("mask row is mean(v):", bool(torch.allclose(masked, v[0].mean(0), atol=1e-6)))
print("-inf bias row:", ops.dot_product_attention(q, k, v, bias=bias)[0, 0].abs().max().item())
print("causal, scale 0:", ops.dot_product_attention(q, k, v, is_causal=True, scale=0.0)[0, 0, 0, 0].item())
try:
    out = ops.dot_product_attention(q[:, :1], k, v, bias=torch.zeros(1, 5), is_causal=True, scale=0.0)
    print("bias with causal, scale 0:", out[0, 0, 0, 0].item())
except RuntimeError as error:
    print("bias with causal:", error)
"""


def test_keras_torch_refuses_what_its_targets_leave_out() -> None:
    """Why the keras torch backend is two targets, neither with both bias and causal: it refuses a mask
    with a bias (its docstring documents both), a -inf bias row gives 0 where a mask row gives mean(v),
    and it passes a bias with is_causal=True to torch SDPA, which torch's math backend refuses and
    the CPU flash kernel takes (NaN for scale 0, as is_causal alone: torch's dispatch picks that
    kernel)."""
    _require("keras", "torch")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(KERAS_TORCH_FINDINGS)], capture_output=True,
                         text=True, env={**os.environ, "KERAS_BACKEND": "torch"}, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert lines["mask with bias"] == "Only one of `bias` and `mask` can be provided. Received both."
    assert lines["mask row is mean(v)"] == "True"
    assert float(lines["-inf bias row"]) == 0.0
    assert lines["causal, scale 0"] == "nan"
    assert lines.get("bias with causal, scale 0") == "nan" or "is_causal" in lines.get("bias with causal", "")


def test_crosscheck_plots_its_failures_and_matrix_and_writes_reports(tmp_path: Any) -> None:
    """``plot_dir``: the unscaled kernel's FAIL gets its picture (made in its worker) and the matrix
    its PNG; the JSON document of the same run validates and names the picture."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("matplotlib")
    from attention_ref.testing.crosscheck import crosscheck
    from attention_ref.testing.report_files import schema

    report = crosscheck(builders=(BROKEN,), max_examples=5, only=("numpy.unscaled",), workers=1,
                        properties=("matches_float64_oracle",), plot_dir=tmp_path)
    failed = _outcome(report, "numpy.unscaled", "matches_float64_oracle")
    assert failed.status == "FAIL" and failed.picture is not None
    assert Path(failed.picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"picture: {failed.picture}" in report.render()
    assert (tmp_path / "crosscheck-kernels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = report.document()
    jsonschema.validate(document, schema())
    assert document["command"] == "crosscheck" and document["counts"]["fail"] == 1
    assert document["suites"][0]["properties"][0]["picture"] == failed.picture
