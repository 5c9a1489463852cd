"""The layer converters (attention_ref.layers: torch, flax, keras, HF) are exact both ways, reject
what a target cannot hold, and reproduce the framework layer: its output lies within the layer rule's
bound (attention_ref.tolerance.layer, via LayerCase) of the float64 oracle of the converted params.

Exact means bit-identical: ``framework -> params -> framework`` gives the same weights and the same
output for the same input; ``params -> framework -> params`` the same arrays, dtype included.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # keras reads it once, at its first import

import contextlib
import itertools
import warnings
from typing import Any

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.frameworks import dtype_name, numpy_dtype
from attention_ref.layers import (
    ConversionError,
    MHAParams,
    from_flax,
    from_hf,
    from_keras,
    from_torch,
    from_torch_masks,
    to_flax,
    to_hf,
    to_keras,
    to_torch,
)
from attention_ref.layers.conversion import to_numpy
from attention_ref.testing.layer_cases import LayerCase

from .conftest import import_or_skip

HALF_AND_SINGLE = ("bfloat16", "float16", "float32")


# ---------------------------------------------------------------------------------------------- helpers


def random_params(seed: int, *, d_q: int, heads: int, head_dim: int, kv_heads: int | None = None,
                  d_k: int | None = None, d_v: int | None = None, d_out: int | None = None,
                  value_dim: int | None = None, biases: str = "qkvo", dtype: str = "float32") -> MHAParams:
    """NumPy params of distinct values; ``biases`` names the projections that have one."""
    rng = np.random.default_rng(seed)
    kv_heads, value_dim = kv_heads or heads, value_dim or head_dim
    d_k, d_v, d_out = d_k or d_q, d_v or d_q, d_out or d_q
    shapes = {"wq": (d_q, heads, head_dim), "wk": (d_k, kv_heads, head_dim), "wv": (d_v, kv_heads, value_dim),
              "wo": (heads, value_dim, d_out), "bq": (heads, head_dim), "bk": (kv_heads, head_dim),
              "bv": (kv_heads, value_dim), "bo": (d_out,)}
    arrays = {name: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(numpy_dtype(dtype))
              for name, shape in shapes.items() if name[0] == "w" or name[1] in biases}
    return MHAParams(**arrays)


def bits(x: Any) -> tuple[str, tuple[int, ...], bytes]:
    """An array's dtype, shape and bytes: equal bits means the same array exactly (-0.0 and NaN too)."""
    a = np.ascontiguousarray(to_numpy(x))
    return dtype_name(a), a.shape, a.tobytes()


def assert_same_params(got: MHAParams, want: MHAParams) -> None:
    __tracebackhide__ = True
    for name, x, y in zip(MHAParams._fields, got, want, strict=True):
        assert (x is None) == (y is None), f"params.{name}: {x is None=} but {y is None=}"
        if x is not None:
            assert bits(x) == bits(y), f"params.{name} differs"


def assert_within_layer_bound(out: Any, weights: Any, case: LayerCase, dtype: str, *,
                              compute_dtype: str | None = None) -> None:
    """A framework layer's out (and per-head weights, unless None) computed in ``compute_dtype``
    (default ``dtype``), its intermediates stored in ``dtype``, are within the layer rule's bound of
    the float64 oracle of ``case``."""
    __tracebackhide__ = True
    bounds = case.bounds(compute_dtype=compute_dtype or dtype, intermediate_dtype=dtype, out_dtype=dtype)
    oracle = case.oracle()
    for name, got, want, bound in (("out", out, oracle.out, bounds.out),
                                   ("weights", weights, oracle.weights, bounds.weights)):
        if got is None:
            continue
        error = np.abs(np.asarray(to_numpy(got), np.float64) - want)
        assert np.all(error <= bound), (f"{name}: max error {error.max():.3g}, max error/bound "
                                        f"{np.max(error / bound):.3g} ({bounds.derivation})")


def x64(dtype: str) -> Any:
    import jax

    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def numpy_initializer(seed: int, framework: str) -> Any:
    """A flax (``(key, shape, dtype)``) or keras (an ``Initializer``) initializer drawing distinct
    values from NumPy, without jax.random, which compiles once per shape and dtype."""
    calls = itertools.count()

    def values(shape: Any) -> np.ndarray:
        rng = np.random.default_rng([seed, next(calls)])
        return rng.standard_normal(tuple(shape)) / np.sqrt(shape[0])

    if framework == "flax":
        import jax.numpy as jnp

        return lambda key, shape, dtype=jnp.float32: jnp.asarray(values(shape), dtype)
    import keras

    class NumpyNormal(keras.initializers.Initializer):  # an Initializer: keras layers rebuild it from its config
        def __call__(self, shape: Any, dtype: Any = None) -> Any:
            return keras.ops.convert_to_tensor(values(shape), dtype)

    return NumpyNormal()


def inputs(seed: int, *shapes: tuple[int, ...], dtype: str) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype) for shape in shapes]


# ------------------------------------------------------------------------------------------------ torch


def randomized(module: Any, seed: int) -> Any:
    """The module with every parameter drawn afresh (the default biases are zeros: they would not
    show a misplaced bias)."""
    torch = import_or_skip("torch")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) / p.shape[-1] ** 0.5)
    return module


TORCH_MODULES = [
    pytest.param(dict(embed_dim=8, num_heads=2), "float32", id="packed-bias-f32"),
    pytest.param(dict(embed_dim=8, num_heads=2, kdim=5, vdim=6), "float64", id="kdim-vdim-bias-f64"),
    pytest.param(dict(embed_dim=12, num_heads=3, bias=False, batch_first=True), "float32", id="nobias-batchfirst-f32"),
    pytest.param(dict(embed_dim=8, num_heads=4, vdim=3, bias=False), "float64", id="vdim-nobias-f64"),
]


@pytest.mark.parametrize(("options", "dtype"), TORCH_MODULES)
def test_torch_module_round_trip(options: dict[str, Any], dtype: str) -> None:
    torch = import_or_skip("torch")
    module = randomized(torch.nn.MultiheadAttention(**options, dtype=getattr(torch, dtype)), seed=1).eval()
    params = from_torch(module)
    rebuilt = to_torch(params, batch_first=module.batch_first).eval()
    assert rebuilt.in_proj_weight is None if "kdim" in options or "vdim" in options else rebuilt.q_proj_weight is None
    want, got = module.state_dict(), rebuilt.state_dict()
    assert list(got) == list(want)
    assert all(bits(got[name]) == bits(want[name]) for name in want)
    assert_same_params(from_torch(rebuilt), params)

    batch, q_len, kv_len = 2, 3, 5
    query, key, value = inputs(2, (batch, q_len, module.embed_dim), (batch, kv_len, module.kdim),
                               (batch, kv_len, module.vdim), dtype=dtype)
    layout = (lambda x: torch.from_numpy(x)) if module.batch_first else (lambda x: torch.from_numpy(x).transpose(0, 1))
    with torch.no_grad():
        results = [m(layout(query), layout(key), layout(value), average_attn_weights=False)
                   for m in (module, rebuilt)]
    assert bits(results[0][0]) == bits(results[1][0]) and bits(results[0][1]) == bits(results[1][1])
    out = results[0][0] if module.batch_first else results[0][0].transpose(0, 1)
    case = LayerCase(query=query, key=key, value=value, params=params.map(to_numpy))
    assert_within_layer_bound(out, results[0][1], case, dtype)


@pytest.mark.parametrize("dtype", [*HALF_AND_SINGLE, "float64"])
@pytest.mark.parametrize(("shape", "biases"), [(dict(d_q=8, heads=2, head_dim=4), "qkvo"),
                                               (dict(d_q=6, heads=3, head_dim=2, d_k=5, d_v=7), "")])
def test_torch_params_round_trip(shape: dict[str, int], biases: str, dtype: str) -> None:
    torch = import_or_skip("torch")
    params = random_params(3, **shape, biases=biases, dtype=dtype)
    module = to_torch(params)  # from NumPy arrays, converted exactly
    assert module.out_proj.weight.dtype == getattr(torch, dtype)
    back = from_torch(module)
    assert all(x is None or isinstance(x, torch.Tensor) for x in back)
    assert_same_params(back, params)
    assert_same_params(from_torch(to_torch(back)), params)  # from torch tensors


def test_torch_masks_polarity_and_layouts() -> None:
    """from_torch_masks turns torch MHA's masks into the spec's (mask, bias): torch's module with its
    masks and the reference layer with the converted ones agree within the layer bound (both
    float64), for bool and float masks, (L, S) and per-head (N * H, L, S) ones, unbatched too."""
    torch = import_or_skip("torch")
    batch, heads, q_len, kv_len, embed = 2, 2, 3, 5, 8
    module = randomized(torch.nn.MultiheadAttention(embed, heads, batch_first=True, dtype=torch.float64), 4).eval()
    params = from_torch(module)
    query, key, value = (torch.from_numpy(x) for x in inputs(5, (batch, q_len, embed), (batch, kv_len, embed),
                                                                  (batch, kv_len, embed), dtype="float64"))
    rng = np.random.default_rng(6)
    blocked = rng.random((batch * heads, q_len, kv_len)) < 0.4  # torch polarity: True = do not attend
    blocked[..., 0] = False  # every row attends key 0: no fully masked row (torch gives NaN there)
    padded = np.array([[False, False, True, False, True], [False, True, False, False, False]])
    additive = np.where(blocked, -np.inf, rng.standard_normal(blocked.shape))
    cases = {
        "bool (L, S) + bool padding": (blocked[0], padded),
        "bool (N*H, L, S) per head": (blocked, None),
        "float (N*H, L, S) per head + float padding": (additive, np.where(padded, -np.inf, 0.5)),
        "float (L, S) + bool padding": (additive[1], padded),  # torch warns: mismatched mask types
    }
    for attn_mask, padding_mask in cases.values():
        attn_t, padding_t = (None if m is None else torch.from_numpy(m) for m in (attn_mask, padding_mask))
        mask, bias = from_torch_masks(attn_t, padding_t, heads, batch)
        assert mask is None or mask.dtype == torch.bool
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Support for mismatched key_padding_mask", UserWarning)
            with torch.no_grad():
                out, weights = module(query, key, value, attn_mask=attn_t, key_padding_mask=padding_t,
                                      average_attn_weights=False)
                sdpa_out, _ = module(query, key, value, attn_mask=attn_t, key_padding_mask=padding_t,
                                     need_weights=False)
        ours = ar.multi_head_attention(query, key, value, params, mask=mask, bias=bias, return_weights=True)
        case = LayerCase(query=query.numpy(), key=key.numpy(), value=value.numpy(), params=params.map(to_numpy),
                         mask=None if mask is None else mask.numpy(), bias=None if bias is None else bias.numpy())
        for got_out, got_weights in ((out, weights), (sdpa_out, None), (ours.out, ours.weights)):
            assert_within_layer_bound(got_out, got_weights, case, "float64")

    # Unbatched torch inputs: (L, E), attn_mask (H, L, S), key_padding_mask (S,).
    mask, bias = from_torch_masks(torch.from_numpy(blocked[:heads]), torch.from_numpy(padded[0]), heads, None)
    assert bias is None and tuple(mask.shape) == (heads, q_len, kv_len)
    with torch.no_grad():
        out, _ = module(query[0], key[0], value[0], attn_mask=torch.from_numpy(blocked[:heads]),
                        key_padding_mask=torch.from_numpy(padded[0]))
    case = LayerCase(query=query[0].numpy(), key=key[0].numpy(), value=value[0].numpy(),
                     params=params.map(to_numpy), mask=mask.numpy())
    assert_within_layer_bound(out, None, case, "float64")


def test_torch_mask_head_major_trap() -> None:
    """A per-head (N * H, L, S) mask is batch-major (row n * H + h): converted, it is exactly the
    spec's per-head mask, and torch agrees; the head-major tensor of the same shape does not."""
    torch = import_or_skip("torch")
    batch, heads, q_len, kv_len, embed = 2, 2, 4, 6, 8
    module = randomized(torch.nn.MultiheadAttention(embed, heads, batch_first=True, dtype=torch.float64), 7).eval()
    query, key, value = (torch.from_numpy(x) for x in inputs(8, (batch, q_len, embed), (batch, kv_len, embed),
                                                                  (batch, kv_len, embed), dtype="float64"))
    allowed = np.random.default_rng(9).random((batch, heads, q_len, kv_len)) < 0.5  # the spec's polarity
    allowed[..., 0] = True
    allowed[0, 1], allowed[1, 0] = np.tril(np.ones((q_len, kv_len), bool)), True  # (n, h) = (0, 1) != (1, 0)
    batch_major = torch.from_numpy(~allowed.reshape(batch * heads, q_len, kv_len))
    head_major = torch.from_numpy(~allowed.transpose(1, 0, 2, 3).reshape(heads * batch, q_len, kv_len))
    mask, bias = from_torch_masks(batch_major, None, heads, batch)
    assert bias is None and np.array_equal(mask.numpy(), allowed)
    case = LayerCase(query=query.numpy(), key=key.numpy(), value=value.numpy(),
                     params=from_torch(module).map(to_numpy), mask=allowed)
    bound, oracle = case.bounds(compute_dtype="float64").out, case.oracle().out
    with torch.no_grad():
        right, _ = module(query, key, value, attn_mask=batch_major)
        wrong, _ = module(query, key, value, attn_mask=head_major)
    assert np.all(np.abs(right.numpy() - oracle) <= bound)
    assert not np.all(np.abs(wrong.numpy() - oracle) <= bound)


@pytest.mark.parametrize(("change", "message"), [
    (dict(kv_heads=1), "no grouped-query attention"),
    (dict(value_dim=2), "hd_v = hd"),
    (dict(d_out=6), "one width E"),
    (dict(d_q=9), "one width E"),
    (dict(biases="qkv"), "all present or all absent"),
])
def test_to_torch_rejects(change: dict[str, Any], message: str) -> None:
    import_or_skip("torch")
    options = {"d_q": 8, "heads": 2, "head_dim": 4, **change}
    options.setdefault("d_out", options["d_q"])
    with pytest.raises(ConversionError, match=message):
        to_torch(random_params(0, **options))


def test_torch_rejects_extra_tokens_mixed_dtypes_and_bad_masks() -> None:
    torch = import_or_skip("torch")
    for flag in ("add_bias_kv", "add_zero_attn"):
        with pytest.raises(ConversionError, match=f"{flag}=True appends .* \\(S \\+ 1 keys\\)"):
            from_torch(torch.nn.MultiheadAttention(8, 2, **{flag: True}))
    params = random_params(0, d_q=8, heads=2, head_dim=4)
    with pytest.raises(ConversionError, match="torch nn.MultiheadAttention holds its parameters in one dtype"):
        to_torch(params._replace(bo=params.bo.astype(np.float64)))
    with pytest.raises(ConversionError, match=r"\(N \* H, L, S\) = \(6, L, S\) with row n \* H \+ h"):
        from_torch_masks(torch.zeros(4, 3, 5, dtype=torch.bool), None, 2, 3)
    with pytest.raises(ConversionError, match="attn_mask must be bool .* or float .*, got uint8"):
        from_torch_masks(torch.zeros(3, 5, dtype=torch.uint8), None, 2, 3)
    with pytest.raises(ConversionError, match=r"key_padding_mask must be \(N, S\) = \(3, S\)"):
        from_torch_masks(None, torch.zeros(2, 5, dtype=torch.bool), 2, 3)


# ------------------------------------------------------------------------------------------------- flax


NNX_MODULES = [
    pytest.param(dict(num_heads=4, in_features=8, qkv_features=12, out_features=7, num_kv_heads=2, in_kv_features=5),
                 "float32", id="gqa-bias-f32"),
    pytest.param(dict(num_heads=2, in_features=6, qkv_features=6, use_bias=False), "float64", id="nobias-f64"),
]


@pytest.mark.parametrize(("options", "dtype"), NNX_MODULES)
def test_nnx_module_round_trip(options: dict[str, Any], dtype: str) -> None:
    import_or_skip("flax")
    import jax
    from flax import nnx

    with x64(dtype):
        module = nnx.MultiHeadAttention(**options, param_dtype=dtype, decode=False, rngs=nnx.Rngs(1),
                                        kernel_init=numpy_initializer(1, "flax"),
                                        bias_init=numpy_initializer(2, "flax"))
        params = from_flax(module)
        assert all(x is None or isinstance(x, jax.Array) for x in params)
        rebuilt = to_flax(params, rngs=nnx.Rngs(2))
        assert rebuilt.num_kv_heads == module.num_kv_heads
        assert_same_params(from_flax(rebuilt), params)
        d_kv = options.get("in_kv_features", options["in_features"])
        query, key, value = inputs(3, (2, 3, options["in_features"]), (2, 5, d_kv), (2, 5, d_kv), dtype=dtype)
        out, again = module(query, key, value), rebuilt(query, key, value)
        assert bits(out) == bits(again)
    case = LayerCase(query=query, key=key, value=value, params=params.map(to_numpy))
    # nnx's attention calls jax.nn.dot_product_attention, whose softmax runs in float32 for float64
    # inputs (SPEC.md, "Found so far"): float64 layers get the float32 computation's bound.
    assert_within_layer_bound(out, None, case, dtype, compute_dtype="float32")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_linen_round_trip(dtype: str) -> None:
    """linen infers key and value features separately (d_k != d_v); biases only with float32."""
    import_or_skip("flax")
    import jax
    from flax import linen

    use_bias = dtype == "float32"
    with x64(dtype):
        module = linen.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=6, use_bias=use_bias,
                                                    param_dtype=dtype, kernel_init=numpy_initializer(1, "flax"),
                                                    bias_init=numpy_initializer(2, "flax"))
        query, key, value = inputs(4, (2, 3, 5), (2, 4, 7), (2, 4, 9), dtype=dtype)
        variables = module.init(jax.random.key(0), query, key, value)
        params = from_flax(variables)
        assert_same_params(from_flax(variables["params"]), params)
        rebuilt, rebuilt_variables = to_flax(params, kind="linen")
        assert jax.tree.structure(rebuilt_variables) == jax.tree.structure(variables)
        assert_same_params(from_flax(rebuilt_variables), params)
        out = module.apply(variables, query, key, value)
        assert bits(out) == bits(rebuilt.apply(rebuilt_variables, query, key, value))
    case = LayerCase(query=query, key=key, value=value, params=params.map(to_numpy))
    assert_within_layer_bound(out, None, case, dtype)


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_flax_params_round_trip(kind: str, dtype: str) -> None:
    import_or_skip("flax")
    kv_heads, d_v = (2, 5) if kind == "nnx" else (4, 7)  # nnx: GQA, d_k = d_v; linen: no GQA, d_k != d_v
    params = random_params(5, d_q=8, heads=4, head_dim=3, kv_heads=kv_heads, d_k=5, d_v=d_v, d_out=6, dtype=dtype)

    def round_trip(p: MHAParams) -> MHAParams:
        built = to_flax(p, kind=kind)
        return from_flax(built if kind == "nnx" else built[1])

    back = round_trip(params)  # from NumPy arrays, converted exactly
    assert_same_params(back, params)
    assert_same_params(round_trip(back), params)  # from jax arrays


@pytest.mark.parametrize(("kind", "change", "message"), [
    ("nnx", dict(value_dim=2), "needs hd_v = hd"),
    ("nnx", dict(d_v=6), "one in_kv_features for key and value: it needs d_k = d_v"),
    ("linen", dict(kv_heads=2), "has no num_kv_heads"),
    ("linen", dict(biases="qkv"), "all present or all absent"),
])
def test_to_flax_rejects(kind: str, change: dict[str, Any], message: str) -> None:
    import_or_skip("flax")
    with pytest.raises(ConversionError, match=message):
        to_flax(random_params(0, **{"d_q": 8, "heads": 4, "head_dim": 3, **change}), kind=kind)


def test_from_flax_rejects_normalize_qk() -> None:
    import_or_skip("flax")
    from flax import nnx

    module = nnx.MultiHeadAttention(num_heads=2, in_features=4, normalize_qk=True, decode=False, rngs=nnx.Rngs(0),
                                    kernel_init=nnx.initializers.zeros_init())
    with pytest.raises(ConversionError, match="normalize_qk=True applies a LayerNorm"):
        from_flax(module)
    variables = {"params": {**to_flax(random_params(0, d_q=4, heads=2, head_dim=2), kind="linen")[1]["params"],
                            "query_ln": {"scale": np.ones(2)}, "key_ln": {"scale": np.ones(2)}}}
    with pytest.raises(ConversionError, match="query_ln/key_ln come from normalize_qk=True"):
        from_flax(variables)


# ------------------------------------------------------------------------------------------------ keras


KERAS_LAYERS = [
    # value_dim != key_dim: keras 3.15's fused jax path fails on it (jax.nn wants one head dim), so the
    # layer is called with return_attention_scores=True (its einsum path) in this case.
    pytest.param("MultiHeadAttention", dict(num_heads=2, key_dim=3, value_dim=4, output_shape=7), (8, 9, 10),
                 "float32", id="mha-value_dim-output_shape-bias-f32"),
    pytest.param("MultiHeadAttention", dict(num_heads=2, key_dim=3, use_bias=False), (6, 6, 6), "float64",
                 id="mha-nobias-f64"),
    pytest.param("GroupQueryAttention", dict(head_dim=3, num_query_heads=4, num_key_value_heads=2), (8, 9, 10),
                 "float32", id="gqa-bias-f32"),
]


@pytest.mark.parametrize(("layer_class", "options", "features", "dtype"), KERAS_LAYERS)
def test_keras_layer_round_trip(layer_class: str, options: dict[str, Any], features: tuple[int, int, int],
                                dtype: str) -> None:
    keras = import_or_skip("keras")
    d_q, d_v, d_k = features  # keras' order: query, value, key
    with x64(dtype):
        layer = getattr(keras.layers, layer_class)(**options, dtype=dtype,
                                                   kernel_initializer=numpy_initializer(1, "keras"),
                                                   bias_initializer=numpy_initializer(2, "keras"))
        layer.build((None, None, d_q), (None, None, d_v), (None, None, d_k))
        params = from_keras(layer)
        assert all(x is None or isinstance(x, np.ndarray) for x in params)
        rebuilt = to_keras(params)
        assert type(rebuilt) is type(layer)
        assert_same_params(from_keras(rebuilt), params)
        query, value, key = inputs(6, (2, 3, d_q), (2, 5, d_v), (2, 5, d_k), dtype=dtype)
        scores = "value_dim" in options
        out, again = (m(query, value, key, return_attention_scores=scores) for m in (layer, rebuilt))
        out, weights = out if scores else (out, None)
        assert bits(out) == bits(again[0] if scores else again)
    case = LayerCase(query=query, key=key, value=value, params=params)
    # keras' fused jax path is jax.nn.dot_product_attention, whose softmax runs in float32 for float64
    # inputs (SPEC.md, "Found so far"): float64 layers get the float32 computation's bound.
    assert_within_layer_bound(out, weights, case, dtype, compute_dtype="float32")


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_keras_params_round_trip(kv_heads: int, dtype: str) -> None:
    keras = import_or_skip("keras")
    mha = kv_heads == 4
    params = random_params(7, d_q=8, heads=4, head_dim=3, kv_heads=kv_heads, d_k=5, d_v=6,
                           value_dim=2 if mha else 3, d_out=7 if mha else 8, dtype=dtype)
    layer = to_keras(params)
    assert isinstance(layer, keras.layers.MultiHeadAttention if mha else keras.layers.GroupQueryAttention)
    assert_same_params(from_keras(layer), params)


def test_keras_rejects() -> None:
    keras = import_or_skip("keras")
    unbuilt = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)
    with pytest.raises(ConversionError, match="is not built"):
        from_keras(unbuilt)
    for options, shape, message in (
        (dict(use_gate=True), (1, 3, 4), "use_gate=True multiplies each head's output by a gate"),
        (dict(sliding_window=2), (1, 3, 4), "sliding_window=2 masks keys outside"),
        ({}, (1, 2, 3, 4), r"attention_axes=\(1, 2\) attends over several axes"),
    ):
        layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, kernel_initializer="zeros", **options)
        layer.build(shape, shape)
        with pytest.raises(ConversionError, match=message):
            from_keras(layer)
    gqa = {"d_q": 8, "heads": 4, "head_dim": 3, "kv_heads": 2}
    for change, message in ((dict(value_dim=2), r"GroupQueryAttention \(Hkv < H\) has one head_dim"),
                            (dict(d_out=6), r"outputs the query's width: it needs d_out = d_q"),
                            (dict(biases="q"), "all present or all absent")):
        with pytest.raises(ConversionError, match=message):
            to_keras(random_params(0, **{**gqa, **change}))


# --------------------------------------------------------------------------------------------------- HF


HF_MODULES = [
    pytest.param("llama", dict(num_key_value_heads=2, attention_bias=False), "float32", id="llama-gqa-f32"),
    pytest.param("llama", dict(num_key_value_heads=4, attention_bias=True), "float64", id="llama-bias-f64"),
    pytest.param("qwen2", dict(num_key_value_heads=2), "float32", id="qwen2-qkv-bias-f32"),
]


def hf_module(family: str, options: dict[str, Any], dtype: str) -> Any:
    torch = import_or_skip("torch")
    import_or_skip("transformers")
    from transformers import LlamaConfig, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    config_class, attention_class = (LlamaConfig, LlamaAttention) if family == "llama" else (Qwen2Config,
                                                                                             Qwen2Attention)
    config = config_class(hidden_size=8, num_attention_heads=4, head_dim=3, attn_implementation="eager", **options)
    return randomized(attention_class(config, layer_idx=0).to(getattr(torch, dtype)), seed=8).eval()


@pytest.mark.parametrize(("family", "options", "dtype"), HF_MODULES)
def test_hf_module_round_trip(family: str, options: dict[str, Any], dtype: str) -> None:
    """With identity RoPE (cos = 1, sin = 0) and HF's additive causal mask as the spec's causal mask."""
    torch = import_or_skip("torch")
    module = hf_module(family, options, dtype)
    params = from_hf(module)
    rebuilt = to_hf(params).eval()
    assert type(rebuilt) is type(module)
    want, got = module.state_dict(), rebuilt.state_dict()
    assert list(got) == list(want) and all(bits(got[name]) == bits(want[name]) for name in want)
    assert_same_params(from_hf(rebuilt), params)

    batch, length = 2, 5
    (hidden,) = inputs(9, (batch, length, 8), dtype=dtype)
    identity_rope = (torch.ones(batch, length, 3, dtype=getattr(torch, dtype)),
                     torch.zeros(batch, length, 3, dtype=getattr(torch, dtype)))
    causal = np.tril(np.ones((length, length), bool))
    additive = torch.from_numpy(np.where(causal, 0.0, np.finfo(dtype).min).astype(dtype))[None, None]
    with torch.no_grad():
        (out, weights), (again, _) = (m(torch.from_numpy(hidden), identity_rope, additive) for m in (module, rebuilt))
    assert bits(out) == bits(again)
    case = LayerCase(query=hidden, key=hidden, value=hidden, params=params.map(to_numpy), causal=True)
    # HF's eager attention runs its softmax in float32 whatever the dtype: float64 layers get the
    # float32 computation's bound (which covers every float64 step too).
    assert_within_layer_bound(out, weights, case, dtype, compute_dtype="float32")


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.parametrize(("biases", "attention_class"), [("", "LlamaAttention"), ("qkvo", "LlamaAttention"),
                                                         ("qkv", "Qwen2Attention")])
def test_hf_params_round_trip(biases: str, attention_class: str, dtype: str) -> None:
    import_or_skip("torch")
    import_or_skip("transformers")
    params = random_params(10, d_q=8, heads=4, head_dim=3, kv_heads=2, biases=biases, dtype=dtype)
    module = to_hf(params)
    assert type(module).__name__ == attention_class
    assert_same_params(from_hf(module), params)


def test_hf_rejects() -> None:
    import_or_skip("torch")
    import_or_skip("transformers")
    from transformers import Qwen2Config

    base = {"d_q": 8, "heads": 4, "head_dim": 3, "kv_heads": 2}
    for change, message in ((dict(d_k=6), "self-attention with one hidden_size: it needs d_q = d_k = d_v = d_out"),
                            (dict(d_out=6), "d_q = d_k = d_v = d_out"),
                            (dict(value_dim=2), "one head_dim for q, k and v"),
                            (dict(biases="qo"), "no HF attention class holds biases on bq, bo")):
        with pytest.raises(ConversionError, match=message):
            to_hf(random_params(0, **{**base, **change}))
    with pytest.raises(ConversionError, match="Qwen2Attention holds biases on q, k and v only, got biases on none"):
        to_hf(random_params(0, **base, biases=""), config_class=Qwen2Config)
    module = hf_module("llama", {"num_key_value_heads": 2}, "float32")
    module.scaling = 0.25
    with pytest.raises(ConversionError, match="scales scores by 0.25, not head_dim"):
        from_hf(module)
    module = hf_module("llama", {"num_key_value_heads": 2}, "float32")
    module.q_norm = import_or_skip("torch").nn.Identity()
    with pytest.raises(ConversionError, match="has q_norm"):
        from_hf(module)
