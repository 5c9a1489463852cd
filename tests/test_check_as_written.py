"""``attention-ref check`` on code as people write it: a module file in the current directory, a torch
``nn.Module`` (instance or class) or a plain function with its own argument names, that always returns
``(out, weights)``, masks with ``mask == 0`` and gives NaN on fully masked rows; the declarations that
describe such a kernel (``--returns``, ``--mask-polarity``, ``--fully-masked nan``, ``--out-dtype``)
and the result contract every kernel is held to (out's dtype and shape)."""

from __future__ import annotations

import math
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from attention_ref.cli import main
from attention_ref.testing.check import check
from attention_ref.testing.targets import load_target

from .conftest import import_or_skip

torch = import_or_skip("torch")

#: The textbook module of the issue, as a new user writes it.
TEXTBOOK = '''
import math, torch
from torch import nn
class ScaledDotProductAttention(nn.Module):
    def forward(self, Q, K, V, mask=None):
        d_k = Q.shape[-1]
        scores = (Q @ K.transpose(-2, -1)) / math.sqrt(d_k)
        if mask is not None:
            scores = scores.masked_fill(mask == 0, float('-inf'))
        weights = torch.softmax(scores, dim=-1)
        return weights @ V, weights
sdpa = ScaledDotProductAttention()
'''

#: The flags that describe it: takes a mask, always returns (out, weights), NaN on fully masked rows.
TEXTBOOK_FLAGS = ["--framework", "torch", "--supports", "mask", "--returns", "out,weights", "--fully-masked", "nan"]


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], None]]:
    """``write(module_name, source)`` puts a module file in a fresh current directory (not on sys.path);
    the modules written are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    written: list[str] = []

    def write(name: str, source: str) -> None:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)

    yield write
    for name in written:
        sys.modules.pop(name, None)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["check", *argv])
    return status, capsys.readouterr().out


def statuses(out: str) -> dict[str, str]:
    """The status column of a printed report, by property."""
    rows = {}
    for line in out.splitlines():
        match = re.fullmatch(r"(\w+)\s+[\d,]+\s+(.+)", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_textbook_module_passes_as_written(user_dir: Callable[[str, str], None],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    user_dir("mymod", TEXTBOOK)
    path_before = list(sys.path)
    assert str(Path.cwd()) not in sys.path and "" not in sys.path  # found only because check searches the cwd
    status, out = run(["mymod:sdpa", *TEXTBOOK_FLAGS, "--max-examples", "10", "--seed", "0"], capsys)
    assert status == 0, out
    assert sys.path == path_before
    assert re.fullmatch(r"\d+ passed, [1-9]\d* convention differs, 0 failed, 0 errors", out.splitlines()[-1]), out
    found = statuses(out)
    # weights are checked (declared by --returns), and the NaN rows are verified on out and weights.
    assert found["weights_rows_sum_to_one"] in ("pass", "convention differs")
    assert found["fully_excluded_rows_are_zero"] == "convention differs"
    assert "fully excluded rows: out is NaN" in out and "fully excluded rows: weights are NaN (verified)" in out
    assert "causal_equals_explicit_mask" not in found  # needs causal: listed n/a under the table
    not_applicable = out[out.index("n/a (a feature they need is not declared): "):].split("\n\n")[0]
    assert "causal_equals_explicit_mask" in not_applicable


def test_readme_shows_this_module_and_command() -> None:
    """The README's example is the module and the flags tested here, and its output ends as a passing
    report does."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert TEXTBOOK.strip() in readme
    command = re.search(r"\$ (attention-ref check mymod:sdpa .*)\n((?:.*\n)+?)```", readme)
    assert command is not None
    assert command.group(1).split()[3:3 + len(TEXTBOOK_FLAGS)] == TEXTBOOK_FLAGS
    assert re.fullmatch(r"0 passed, [1-9]\d* convention differs, 0 failed, 0 errors",
                        command.group(2).splitlines()[-1])


def test_missteps_of_the_issue_are_errors_that_say_what_to_declare(user_dir: Callable[[str, str], None],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Without --returns the (out, weights) tuple breaks the calling convention; declaring weights
    instead makes the checker pass return_weights, which the module refuses. Both are ERRORs (the
    property could not run), never FAILs, and the message names the declaration that fits."""
    user_dir("mymod_missteps", TEXTBOOK)
    common = ["--framework", "torch", "--max-examples", "3", "--seed", "0", "--property", "matches_float64_oracle"]
    status, out = run(["mymod_missteps:sdpa", "--supports", "mask", *common], capsys)
    assert status == 1 and statuses(out)["matches_float64_oracle"] == "ERROR", out
    assert "returned a tuple of 2 values" in out and "--returns out,weights" in out
    status, out = run(["mymod_missteps:sdpa", "--supports", "mask,weights", *common], capsys)
    assert status == 1 and statuses(out)["matches_float64_oracle"] == "ERROR", out
    assert "unexpected keyword argument 'return_weights'" in out and "--returns out,weights" in out


def test_missing_scale_fails_with_a_shrunk_case(user_dir: Callable[[str, str], None],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    user_dir("mymod_unscaled", TEXTBOOK.replace(" / math.sqrt(d_k)", ""))
    status, out = run(["mymod_unscaled:sdpa", *TEXTBOOK_FLAGS, "--max-examples", "20", "--seed", "0",
                       "--property", "matches_float64_oracle"], capsys)
    assert status == 1 and statuses(out)["matches_float64_oracle"] == "FAIL", out
    assert "FAIL matches_float64_oracle:" in out and "AttentionCase(" in out
    # Shrunk: the scale shows only with E >= 2 and S >= 2 keys; Hypothesis gets near that minimum.
    q_shape = [int(n) for n in re.search(r"# q \(([\d, ]+)\)", out).group(1).split(",")]
    k_shape = [int(n) for n in re.search(r"k \(([\d, ]+)\)", out).group(1).split(",")]
    assert q_shape[-1] >= 2 and k_shape[-2] >= 2 and math.prod(q_shape) <= 8 and math.prod(k_shape) <= 16, out


FORMS = {
    "class": ("mymod_forms:ScaledDotProductAttention", "torch nn.Module class, instantiated with no arguments"),
    "function": ("mymod_forms:attention", None),
}


@pytest.mark.parametrize("form", FORMS)
def test_module_class_and_function_forms(form: str, user_dir: Callable[[str, str], None],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    user_dir("mymod_forms", TEXTBOOK + '''
def attention(query, key, value, mask=None):
    return ScaledDotProductAttention()(query, key, value, mask)
''')
    target, kind = FORMS[form]
    status, out = run([target, *TEXTBOOK_FLAGS, "--max-examples", "5", "--seed", "0"], capsys)
    assert status == 0, out
    header = out.splitlines()[0]
    assert header.startswith(target) and (kind is None or kind in header), header


DROPOUT_MODULE = '''
import torch
from torch import nn
class DropsWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(0.5)
    def forward(self, q, k, v):
        weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return self.dropout(weights) @ v
'''


def test_a_module_is_checked_in_eval_mode_and_left_as_it_was(user_dir: Callable[[str, str], None]) -> None:
    user_dir("mymod_dropout", DROPOUT_MODULE)
    module = load_target("mymod_dropout:DropsWeights")()
    assert module.training
    chosen = ("matches_float64_oracle",)
    report = check(module, framework="torch", max_examples=10, seed=0, properties=chosen)
    assert report.passed, str(report)
    assert module.training and module.dropout.training  # each submodule's flag restored

    def in_training_mode(q, k, v):
        return module.train()(q, k, v)

    training = check(in_training_mode, framework="torch", max_examples=10, seed=0, properties=chosen)
    assert not training.passed  # the control: the same module with dropout on is wrong


def upcasts(q, k, v):
    """Correct attention computed in float32 and returned in float32 whatever the input dtype."""
    weights = torch.softmax(q.float() @ k.float().transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v.float()


def downcasts(q, k, v):
    """Correct attention computed and returned in float32: float64 inputs are silently downcast."""
    return upcasts(q, k, v)


def test_wrong_out_dtype_fails() -> None:
    chosen = ("matches_float64_oracle",)
    half = check(upcasts, framework="torch", dtypes=("float16",), max_examples=5, seed=0, properties=chosen)
    outcome = next(o for o in half.outcomes if o.name == "matches_float64_oracle")
    assert outcome.status == "FAIL", str(half)
    assert "out: dtype float32, expected float16" in outcome.detail and "declares out_dtype" in outcome.detail
    wide = check(downcasts, framework="torch", dtypes=("float64",), max_examples=5, seed=0, properties=chosen)
    outcome = next(o for o in wide.outcomes if o.name == "matches_float64_oracle")
    assert outcome.status == "FAIL" and "out: dtype float32, expected float64" in outcome.detail, str(wide)


def test_declared_out_dtype_is_verified_and_reported(user_dir: Callable[[str, str], None],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    user_dir("mymod_upcasts", '''
    import torch
    def upcasts(q, k, v):
        weights = torch.softmax(q.float() @ k.float().transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
        return weights @ v.float()
    ''')
    flags = ["--framework", "torch", "--dtype", "float16", "--dtype", "float32", "--out-dtype", "float32",
             "--max-examples", "10", "--seed", "0", "--property", "matches_float64_oracle"]
    status, out = run(["mymod_upcasts:upcasts", *flags], capsys)
    assert status == 0, out
    assert statuses(out)["matches_float64_oracle"] == "convention differs"
    assert "out returned in float32 for float16 inputs (declared out_dtype; verified" in out
    # A declared out_dtype that the kernel does not follow: float16 out for float16 inputs.
    report = check(lambda q, k, v: upcasts(q, k, v).to(q.dtype), framework="torch", dtypes=("float16",),
                   out_dtype="float32", max_examples=5, seed=0, properties=("matches_float64_oracle",))
    outcome = next(o for o in report.outcomes if o.name == "matches_float64_oracle")
    assert outcome.status == "FAIL" and "expected float32 (the declared out_dtype" in outcome.detail, str(report)


def ignores_true(q, k, v, mask=None):
    """A mask read as True = masked out, as torch nn.MultiheadAttention's, NaN on fully masked rows."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def test_mask_polarity() -> None:
    chosen = ("excluded_keys_get_zero_weight",)
    declared = check(ignores_true, framework="torch", supports=("mask",), mask_polarity="ignore", fully_masked="nan",
                     max_examples=10, seed=0, properties=chosen)
    assert declared.passed, str(declared)
    undeclared = check(ignores_true, framework="torch", supports=("mask",), fully_masked="nan", max_examples=10,
                       seed=0, properties=chosen)
    assert {o.name: o.status for o in undeclared.outcomes}["excluded_keys_get_zero_weight"] == "FAIL"


def nan_out_zero_weights(q, k, v, mask=None):
    """NaN out on fully masked rows, but zero weights there: not the declared NaN convention."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, torch.nan_to_num(weights, nan=0.0)


def test_nan_convention_is_verified_on_the_weights_too() -> None:
    report = check(nan_out_zero_weights, framework="torch", supports=("mask",), returns=("out", "weights"),
                   fully_masked="nan", max_examples=25, seed=0, properties=("fully_excluded_rows_are_zero",))
    outcome = next(o for o in report.outcomes if o.name == "fully_excluded_rows_are_zero")
    assert outcome.status == "FAIL" and "their weights are NaN" in outcome.detail, str(report)


def returns_three(q, k, v):
    weights = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v, weights, None


def test_returns_declaration() -> None:
    with pytest.raises(ValueError, match="returns must be out followed by"):
        check(returns_three, framework="torch", returns=("weights", "out"))
    with pytest.raises(ValueError, match="supports lse but returns=out,weights does not include it"):
        check(returns_three, framework="torch", supports=("lse",), returns=("out", "weights"))
    report = check(returns_three, framework="torch", returns=("out", "weights"), max_examples=3, seed=0,
                   properties=("matches_float64_oracle",))
    outcome = next(o for o in report.outcomes if o.name == "matches_float64_oracle")
    assert outcome.status == "ERROR" and "returned 3 values; it declares returns=out,weights" in outcome.detail


def test_targets_that_are_not_kernels_are_command_line_errors(user_dir: Callable[[str, str], None]) -> None:
    user_dir("mymod_bad", TEXTBOOK + '''
heads = 8
class NeedsHeads(nn.Module):
    def __init__(self, heads):
        super().__init__()
''')
    cases = {
        "mymod_bad:heads": "mymod_bad:heads is a 'int' object, not a kernel: the checker takes a function",
        "mymod_bad:NeedsHeads": "instantiates a class with no arguments: NeedsHeads() raised TypeError",
        "mymod_bad:nothing": "has no attribute 'nothing'",
        "no_such_module_here:sdpa": "cannot import 'no_such_module_here'",
        "mymod_bad": "expected MODULE:NAME",
    }
    for target, message in cases.items():
        with pytest.raises(SystemExit, match=re.escape(message)):
            main(["check", target, "--framework", "torch"])
    with pytest.raises(SystemExit, match=re.escape("is a torch kernel: check it with framework 'torch'")):
        main(["check", "mymod_bad:sdpa", "--framework", "jax"])


def _flax_source() -> str:
    return '''
    import jax, jax.numpy as jnp
    import flax.linen as linen
    from flax import nnx

    def attention(q, k, v, mask=None):
        scores = q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
        if mask is not None:
            scores = jnp.where(mask, scores, -jnp.inf)
        return jax.nn.softmax(scores, axis=-1) @ v

    class NnxAttention(nnx.Module):
        def __init__(self):
            self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(0))
        def __call__(self, q, k, v, mask=None):
            return attention(q, k, v, mask) if self.dropout.deterministic else self.dropout(q)

    class LinenAttention(linen.Module):
        @linen.compact
        def __call__(self, q, k, v, mask=None):
            return attention(q, k, v, mask)

    nnx_attention = NnxAttention()
    '''


@pytest.mark.parametrize("target", ["mymod_flax:nnx_attention", "mymod_flax:LinenAttention"])
def test_flax_modules(target: str, user_dir: Callable[[str, str], None], capsys: pytest.CaptureFixture[str]) -> None:
    """An nnx module is called in eval mode (its dropout deterministic; the module given is left as it
    was); a parameterless linen module through ``apply({}, ...)``."""
    import_or_skip("flax")
    user_dir("mymod_flax", _flax_source())
    status, out = run([target, "--framework", "jax", "--supports", "mask", "--fully-masked", "nan",
                       "--max-examples", "5", "--seed", "0", "--property", "matches_float64_oracle"], capsys)
    assert status == 0 and statuses(out)["matches_float64_oracle"] == "convention differs", out
    assert sys.modules["mymod_flax"].nnx_attention.dropout.deterministic is False


def test_keras_layer(user_dir: Callable[[str, str], None], monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    if "keras" not in sys.modules:
        monkeypatch.setenv("KERAS_BACKEND", "torch")
    keras = import_or_skip("keras")
    framework = keras.backend.backend()
    if framework not in ("torch", "jax"):
        pytest.skip(f"keras on the {framework} backend")
    user_dir("mymod_keras", '''
    import keras
    from keras import ops

    class Attention(keras.layers.Layer):
        def call(self, q, k, v):
            scores = ops.matmul(q, ops.swapaxes(k, -1, -2)) / ops.sqrt(ops.cast(ops.shape(q)[-1], q.dtype))
            return ops.matmul(ops.softmax(scores, axis=-1), v)
    ''')
    status, out = run(["mymod_keras:Attention", "--framework", framework, "--max-examples", "5", "--seed", "0",
                       "--property", "matches_float64_oracle"], capsys)
    assert status == 0 and statuses(out)["matches_float64_oracle"] == "pass", out
    assert "keras Layer class, instantiated with no arguments" in out.splitlines()[0]
