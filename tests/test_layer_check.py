"""check_layer (attention_ref.testing.layer_check): the classic torch example against the reference
layer, the one-line check of framework layers (torch nn.MultiheadAttention in eval and train mode,
flax nnx and linen, keras, Hugging Face), factories with their declarations, and FAIL vs ERROR."""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.layers import MHAParams, average_weights, from_torch
from attention_ref.testing import check_layer
from attention_ref.testing.layer_cases import LayerCase
from attention_ref.testing.layer_properties import _unit, layer_bounds, weights_view
from attention_ref.testing.report import Status

from .conftest import import_or_skip

torch = import_or_skip("torch")

from .zoo.layer_bugs import LAYER_DECLARATIONS, LAYER_SUPPORTS, make_layer  # noqa: E402


def _statuses(report: Any) -> dict[str, Status]:
    return {o.name: o.status for o in report.outcomes}


def _classic() -> Any:
    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(512, 8, dropout=0.1, batch_first=True)


def test_classic_example_matches_the_reference_layer() -> None:
    """torch's nn.MultiheadAttention(512, 8, dropout=0.1, batch_first=True) in eval mode on x (4, 20,
    512): ar.multi_head_attention on its from_torch weights gives torch's out and, head-averaged, its
    weights, within the layer rule (the reference's bound plus torch's, each against the float64
    oracle, which both also meet)."""
    mha = _classic().eval()
    x = torch.randn(4, 20, 512)
    with torch.no_grad():
        want, want_weights = mha(x, x, x)
    params = from_torch(mha)
    got = ar.multi_head_attention(x, x, x, params, return_weights=True)
    averaged = average_weights(got.weights)
    assert got.out.shape == (4, 20, 512) and averaged.shape == want_weights.shape == (4, 20, 20)
    xn = x.numpy()
    case = LayerCase(query=xn, key=xn, value=xn, params=params.map(lambda t: t.numpy()))
    oracle, reference, framework = case.oracle(), case.bounds(), layer_bounds(case)
    out, torch_out = got.out.numpy().astype(np.float64), want.numpy().astype(np.float64)
    assert np.all(np.abs(out - oracle.out) <= reference.out)
    assert np.all(np.abs(torch_out - oracle.out) <= framework.out)
    assert np.all(np.abs(out - torch_out) <= reference.out + framework.out)
    expected, bound = weights_view("averaged", "before", case, oracle.weights, reference.weights,
                                   _unit(averaged.numpy()))
    _, torch_bound = weights_view("averaged", "before", case, oracle.weights, framework.weights,
                                  _unit(want_weights.numpy()))
    assert np.all(np.abs(averaged.numpy() - expected) <= bound)
    assert np.all(np.abs(want_weights.numpy() - expected) <= torch_bound)
    assert np.all(np.abs(averaged.numpy() - want_weights.numpy()) <= bound + torch_bound)


def test_torch_paths_and_their_fully_masked_rows() -> None:
    """torch MHA's fully masked rows: NaN on the fast path and where it computes the weights (verified,
    convention differs), SDPA's zeros (out = bo, the reference) otherwise; float64 and bfloat16 too,
    with kdim/vdim and sequence-first inputs."""
    torch.manual_seed(1)
    mha = torch.nn.MultiheadAttention(8, 2, kdim=3, vdim=5)
    report = check_layer(mha, max_examples=10, seed=0, dtypes=("float64", "bfloat16"),
                         properties=("fully_masked_rows_follow_declared_convention", "layer_matches_reference"))
    assert report.passed, str(report)
    assert _statuses(report)["fully_masked_rows_follow_declared_convention"] == Status.CONVENTION_DIFFERS
    assert "fully masked rows (torch need_weights path): NaN" in report.render()
    fast = check_layer(torch.nn.MultiheadAttention(8, 2, batch_first=True), max_examples=10, seed=0,
                       properties=("fully_masked_rows_follow_declared_convention",))
    assert fast.passed and "fully masked rows (torch fast path): NaN" in fast.render(), str(fast)


class _DrawsFirst(torch.nn.MultiheadAttention):  # type: ignore[name-defined]
    """Draws a random number before torch's dropout does: its keep-mask is not the one the seed gives."""

    def forward(self, *args: Any, **keywords: Any) -> Any:
        if self.training:
            torch.rand(7)
        return super().forward(*args, **keywords)


@pytest.mark.usefixtures("without_shrinking")
def test_an_unreproducible_dropout_draw_is_an_error_not_a_fail() -> None:
    torch.manual_seed(0)
    report = check_layer(_DrawsFirst(8, 2, dropout=0.5, batch_first=True), max_examples=5, seed=0,
                         properties=("dropout_matches_explicit_mask",))
    assert _statuses(report)["dropout_matches_explicit_mask"] == Status.ERROR, str(report)
    assert "could not be reproduced" in report.render()


class _DropoutWithoutRescale(torch.nn.MultiheadAttention):  # type: ignore[name-defined]
    """torch's own dropout draw (the same RNG calls), without its 1 / (1 - p) rescale."""

    def forward(self, *args: Any, **keywords: Any) -> Any:
        functional = torch.nn.functional
        original = functional.dropout

        def unscaled(x: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
            return original(x, p, training, inplace) * (1 - p)

        functional.dropout = unscaled
        try:
            return super().forward(*args, **keywords)
        finally:
            functional.dropout = original


@pytest.mark.usefixtures("without_shrinking")
def test_train_mode_dropout_is_checked() -> None:
    """The keep-mask is reproduced (so the zeros agree) and out is compared on it: a missing rescale FAILs."""
    torch.manual_seed(0)
    report = check_layer(_DropoutWithoutRescale(8, 2, dropout=0.5, batch_first=True), max_examples=20, seed=0,
                         properties=("dropout_matches_explicit_mask",))
    assert _statuses(report)["dropout_matches_explicit_mask"] == Status.FAIL, str(report)


@pytest.mark.usefixtures("without_shrinking")
def test_declarations_are_applied_and_checked() -> None:
    """The zoo layer takes torch MHA's masks (True = masked out): declared as True = attend, it FAILs."""
    wrong = dict(LAYER_DECLARATIONS, mask_polarity="attend")
    report = check_layer(make_layer(), framework="torch", supports=("mask",), **wrong, seed=0, max_examples=50,
                         properties=("layer_matches_reference",))
    assert _statuses(report)["layer_matches_reference"] == Status.FAIL, str(report)
    nan = dict(LAYER_DECLARATIONS, fully_masked="nan")  # it gives the reference's zeros, not NaN
    report = check_layer(make_layer(), framework="torch", supports=("mask",), **nan, seed=0, max_examples=50,
                         properties=("fully_masked_rows_follow_declared_convention",))
    assert _statuses(report)["fully_masked_rows_follow_declared_convention"] == Status.FAIL, str(report)
    report = check_layer(make_layer(nan_on_fully_masked_rows=True), framework="torch", supports=("mask",), **nan,
                         seed=0, max_examples=20, properties=("fully_masked_rows_follow_declared_convention",))
    assert _statuses(report)["fully_masked_rows_follow_declared_convention"] == Status.CONVENTION_DIFFERS
    skip = dict(LAYER_DECLARATIONS, fully_masked="skip")
    report = check_layer(make_layer(nan_on_fully_masked_rows=True), framework="torch", supports=("mask",), **skip,
                         seed=0, max_examples=20, properties=("fully_masked_rows_follow_declared_convention",))
    assert "NOT verified" in report.render() and report.passed, str(report)


def _finite_fill(params: MHAParams) -> Any:
    """A NumPy layer that masks with a finite fill (-1e9, as many layers do): mean_v on fully masked rows."""

    def layer(query: np.ndarray, key: np.ndarray, value: np.ndarray, mask: np.ndarray | None = None) -> Any:
        bias = None if mask is None else np.where(mask, 0.0, -1e9).astype(np.float32)
        return ar.multi_head_attention(query, key, value, params, bias=bias)

    return layer


@pytest.mark.usefixtures("without_shrinking")
def test_mean_v_is_verified() -> None:
    declared = check_layer(_finite_fill, framework="numpy", supports=("mask",), fully_masked="mean_v", seed=0,
                           max_examples=30, properties=("fully_masked_rows_follow_declared_convention",))
    assert _statuses(declared)["fully_masked_rows_follow_declared_convention"] == Status.CONVENTION_DIFFERS, \
        str(declared)
    assert "mean of its projected values" in declared.render()
    zero = check_layer(_finite_fill, framework="numpy", supports=("mask",), seed=0, max_examples=30,
                       properties=("fully_masked_rows_follow_declared_convention",))
    assert _statuses(zero)["fully_masked_rows_follow_declared_convention"] == Status.FAIL, str(zero)


def _raises(params: MHAParams) -> Any:
    def layer(query: Any, key: Any, value: Any) -> Any:
        raise RuntimeError("this layer does not run")

    return layer


def _wrong_shape(params: MHAParams) -> Any:
    def layer(query: Any, key: Any, value: Any) -> Any:
        return torch.zeros(query.shape[0], query.shape[1] + 1, query.shape[2])  # one query too many

    return layer


def _tuple_without_flag(params: MHAParams) -> Any:
    def layer(query: Any, key: Any, value: Any) -> Any:
        return query, None

    return layer


@pytest.mark.usefixtures("without_shrinking")
def test_fail_and_error_are_distinct() -> None:
    one = ("layer_matches_reference",)
    raising = check_layer(_raises, framework="torch", seed=0, max_examples=5, properties=one)
    assert _statuses(raising)["layer_matches_reference"] == Status.ERROR
    assert "this layer does not run" in raising.render()
    tuple_out = check_layer(_tuple_without_flag, framework="torch", seed=0, max_examples=5, properties=one)
    assert _statuses(tuple_out)["layer_matches_reference"] == Status.ERROR
    assert "returns=('out', 'weights')" in tuple_out.render()
    shape = check_layer(_wrong_shape, framework="torch", seed=0, max_examples=5, properties=one)
    assert _statuses(shape)["layer_matches_reference"] == Status.FAIL
    assert "(B, L, d_out)" in shape.render()


def test_usage_errors() -> None:
    with pytest.raises(ValueError, match="factories only"):
        check_layer(_classic(), supports=("mask",))
    with pytest.raises(ValueError, match="not jax"):
        check_layer(_classic(), framework="jax")
    with pytest.raises(ValueError, match="needs framework"):
        check_layer(make_layer())
    with pytest.raises(ValueError, match="unknown supports"):
        check_layer(make_layer(), framework="torch", supports=("bias",))
    with pytest.raises(ValueError, match="unknown layer properties"):
        check_layer(make_layer(), framework="torch", properties=("no_such_property",))
    with pytest.raises(TypeError, match="factory make"):
        check_layer(42, framework="torch")


def test_the_zoo_layer_declared_in_full_reports_every_property() -> None:
    report = check_layer(make_layer(), framework="torch", supports=LAYER_SUPPORTS, **LAYER_DECLARATIONS, seed=0,
                         max_examples=3)
    assert report.passed
    assert [o.name for o in report.outcomes if o.status == Status.NOT_APPLICABLE] == ["converters_round_trip"]


def test_hugging_face_llama_attention() -> None:
    """eager: a finfo.min mask fill gives the mean of the values on fully masked rows (convention
    differs); sdpa: SDPA's zeros, and causal when no mask is given (the checker always passes one)."""
    import_or_skip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    torch.manual_seed(0)
    for implementation, fully_masked in (("eager", Status.CONVENTION_DIFFERS), ("sdpa", Status.PASS)):
        config = LlamaConfig(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, head_dim=2,
                             attn_implementation=implementation)
        report = check_layer(LlamaAttention(config, layer_idx=0), max_examples=4, seed=0)
        assert report.passed, str(report)
        statuses = _statuses(report)
        assert statuses["gqa_equals_repeated_kv_heads"] in (Status.PASS, Status.CONVENTION_DIFFERS)
        assert statuses["fully_masked_rows_follow_declared_convention"] == fully_masked, str(report)


def test_flax_nnx_and_linen() -> None:
    import_or_skip("flax")
    import jax
    from flax import linen, nnx

    properties = ("layer_matches_reference", "fully_masked_rows_follow_declared_convention")
    module = nnx.MultiHeadAttention(num_heads=2, in_features=4, num_kv_heads=1, decode=False, rngs=nnx.Rngs(0))
    report = check_layer(module, max_examples=2, seed=0, properties=(*properties, "gqa_equals_repeated_kv_heads"))
    assert report.passed, str(report)
    assert _statuses(report)["fully_masked_rows_follow_declared_convention"] == Status.CONVENTION_DIFFERS
    assert "mean of its projected values" in report.render()
    linen_module = linen.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)
    variables = linen_module.init(jax.random.key(0), jax.numpy.ones((1, 1, 4)))
    report = check_layer((linen_module, variables), max_examples=2, seed=0, properties=properties[:1])
    assert report.passed, str(report)


def test_keras_multi_head_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """keras' (query, value, key) order, its (B, L, S) mask and value_mask; fully masked rows: mean(v)
    on the fused path, zeros (out = the output bias) when the scores are returned."""
    if "keras" not in sys.modules and "KERAS_BACKEND" not in os.environ:
        monkeypatch.setenv("KERAS_BACKEND", "torch")
    keras = import_or_skip("keras")
    if keras.backend.backend() not in ("jax", "torch"):
        pytest.skip(f"keras on the {keras.backend.backend()} backend")
    layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2)
    layer.build((None, None, 4), (None, None, 4))
    report = check_layer(layer, max_examples=3, seed=0,
                         properties=("layer_matches_reference", "key_padding_equals_mask"))
    assert report.passed, str(report)



def test_classic_example_in_one_line() -> None:
    """check_layer(mha): eval mode, and train mode with torch's own dropout draw for the dropout
    properties; every declared convention verified and reported; the module left as it was; and
    README's "Checking a layer" shows what it really prints."""
    import pathlib
    import re

    mha = _classic()
    before = {name: p.detach().clone() for name, p in mha.state_dict().items()}
    report = check_layer(mha, max_examples=3, seed=0)
    assert report.passed, str(report)
    statuses = _statuses(report)
    assert statuses["gqa_equals_repeated_kv_heads"] == Status.NOT_APPLICABLE  # torch MHA has no GQA
    assert statuses["dropout_matches_explicit_mask"] == Status.CONVENTION_DIFFERS
    assert statuses["weights_follow_declared_convention"] == Status.CONVENTION_DIFFERS
    text = report.render()
    assert "weights: averaged over the heads" in text and "weights: after dropout" in text
    assert mha.training and all(torch.equal(before[n], p) for n, p in mha.state_dict().items())
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Checking a layer", 1)[1].split("\n## ", 1)[0]
    call, shown = re.search(r"```python\n.*?print\((check_layer\(mha.*?\))\).*?```\n\n```text\n(.*?)```",
                            section, flags=re.DOTALL).groups()  # type: ignore[union-attr]
    assert call == "check_layer(mha, max_examples=3, seed=0)"
    # The README shows a fresh interpreter's run, as a reader makes it; this process's run, after
    # whatever tests ran before in it, must be the same (draws depend only on the seed: testing/draws.py).
    import subprocess

    fresh = subprocess.run([sys.executable, "-c", "from tests.test_layer_check import _classic\n"
                            "from attention_ref.testing import check_layer\n"
                            "print(check_layer(_classic(), max_examples=3, seed=0))"],
                           cwd=pathlib.Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                           check=True).stdout
    assert fresh.rstrip("\n") == shown.rstrip("\n"), "README.md's one-line check output differs from check_layer's"
    assert text == fresh.rstrip("\n"), "check_layer's report depends on what ran before it in this process"


class _ModelDimScale(torch.nn.MultiheadAttention):  # type: ignore[name-defined]
    """A 1/sqrt(d_model) scale instead of 1/sqrt(hd), planted in a subclass (its q bias zeroed, so that
    scaling the query input scales q)."""

    def forward(self, query: Any, key: Any, value: Any, **keywords: Any) -> Any:
        return super().forward(query / self.num_heads**0.5, key, value, **keywords)


@pytest.mark.usefixtures("without_shrinking")
def test_a_planted_scale_bug_fails_at_the_classic_width() -> None:
    """At d = 512 the layer rule is loose (README), yet the shrunk calls still expose a wrong scale."""
    torch.manual_seed(0)
    mha = _ModelDimScale(512, 8, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.zero_()
    report = check_layer(mha, max_examples=10, seed=0, properties=("layer_matches_reference",))
    assert _statuses(report)["layer_matches_reference"] == Status.FAIL, str(report)
    assert "_ModelDimScale instance (a torch nn.MultiheadAttention)" in report.render()


@pytest.mark.usefixtures("without_shrinking")
def test_hugging_face_eager_precision_findings() -> None:
    """Findings: HF's eager attention runs its softmax in float32 for a float64 layer (out errors of
    about 1e-9 where float64 allows 1e-15), and in float16 its finfo.min mask plus a logit below
    -16 overflows to -inf, so a fully masked row gives NaN (or the mean over some keys), not the mean
    of the values it gives in float32: both FAIL. Its sdpa path passes both."""
    import_or_skip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    modules = {}
    for implementation in ("eager", "sdpa"):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, head_dim=3,
                             attn_implementation=implementation)
        modules[implementation] = LlamaAttention(config, layer_idx=0)
    # (layer, dtype, property, status); seed 0 reaches a fully masked row with logits below -16 in float16
    for implementation, dtype, prop, status in (
            ("eager", "float64", "layer_matches_reference", Status.FAIL),
            ("sdpa", "float64", "layer_matches_reference", Status.PASS),
            ("eager", "float16", "fully_masked_rows_follow_declared_convention", Status.FAIL)):
        report = check_layer(modules[implementation], dtypes=(dtype,), max_examples=40, seed=0, properties=(prop,))
        assert _statuses(report)[prop] == status, f"{implementation} {dtype}:\n{report}"
