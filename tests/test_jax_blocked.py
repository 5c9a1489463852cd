"""The JAX backend's blocked algorithm (rule 19, ``attention_ref/backends/jax_blocked.py``): its custom_vjp
under a user's jit and grad, one program per plan and tile, the padded bucket programs, exact values,
dtypes, and memory bounded by the tile (no (L, S) intermediate anywhere, backward included).

Tolerances are SPEC.md's derived bounds with rule 19's terms (``key_block``); two blocked results that
must agree are compared within the sum of their bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from .conftest import import_or_skip

jax = import_or_skip("jax")
import jax.extend as jex  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import attention_ref as ar  # noqa: E402
from attention_ref.backends import jax as jax_backend  # noqa: E402
from attention_ref.backends import jax_blocked  # noqa: E402
from attention_ref.result import AttentionOutput, Gradients  # noqa: E402
from attention_ref.testing import AttentionCase, assert_attention_close, assert_gradients_close  # noqa: E402
from attention_ref.testing.assertions import assert_same_gradients  # noqa: E402
from attention_ref.testing.cases import call, call_vjp, random_cotangent  # noqa: E402
from attention_ref.tolerance import GradientBounds  # noqa: E402

#: Blocks that divide neither L = 11 nor S = 13 (the last tiles are moved back and partly excluded).
BLOCK_Q, BLOCK_K = 4, 5


def _direct() -> jax_backend.JaxBackend:
    """The unpadded programs (accelerators, jit, large problems): the blocked module itself."""
    return jax_backend.JaxBackend(bucket_shapes=False)


def _rich_case(dtype: str = "float32") -> AttentionCase:
    """GQA (Hq = 4, Hkv = 2), a bias broadcast over batch and queries with a -inf entry, a mask with a
    fully excluded row, softcap, a bottom-right window with causal, dropout; L = 11, S = 13, E != Ev."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 11, 8)).astype(dtype)
    k = rng.standard_normal((2, 2, 13, 8)).astype(dtype)
    v = rng.standard_normal((2, 2, 13, 6)).astype(dtype)
    bias = rng.standard_normal((4, 1, 13)).astype(dtype)
    bias[1, 0, 9] = -np.inf  # rule 8: excludes key 9 for every query of head 1
    mask = rng.random((2, 1, 11, 13)) > 0.2
    mask[1, 0, 3] = False  # rule 8: query 3 of batch 1 attends nothing
    keep = ar.dropout_mask((11, 13), 0.25, seed=3)
    return AttentionCase(q, k, v, mask=mask, bias=bias, softcap=4.0, causal=True, alignment="bottom_right",
                         window=(6, None), dropout_p=0.25, dropout_mask=keep)


def _numpy(result: tuple) -> tuple:
    return tuple(None if x is None else np.asarray(x) for x in result)


def test_grad_under_a_user_jit_is_the_blocked_backward() -> None:
    """jax.grad of ``ar.attention`` under the user's jit (tracers: the unpadded custom_vjp) equals
    ``attention_vjp`` on the same blocked plan and the dense gradients, all within the oracle's
    gradient bound; exactly 0 where SPEC.md fixes it (fully excluded row, -inf bias entry)."""
    case = _rich_case()
    d_out = random_cotangent(case, 1)
    jnp_args = [jnp.asarray(x) for x in (case.q, case.k, case.v, case.bias, case.mask, case.dropout_mask, d_out)]
    options = dict(softcap=4.0, causal=True, alignment="bottom_right", window=(6, None), dropout_p=0.25)

    @jax.jit
    def grads(q, k, v, bias, mask, keep, d):
        def loss(q, k, v, bias):
            out = ar.attention(q, k, v, mask=mask, bias=bias, dropout_mask=keep, block_q=BLOCK_Q, block_k=BLOCK_K,
                               **options)
            return jnp.sum(out * d)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

    through_grad = Gradients(*_numpy(grads(*jnp_args)))
    through_vjp = call_vjp(_direct(), case, d_out, block_q=BLOCK_Q, block_k=BLOCK_K)
    dense = call_vjp(ar.get_backend("jax"), case, d_out, dense=True)
    for grads_ in (through_grad, through_vjp):
        assert_gradients_close(grads_, case, d_out, calibrated=False, key_block=BLOCK_K)
        assert all(g.dtype == np.float32 for g in grads_)
    assert_gradients_close(dense, case, d_out, calibrated=False)
    blocked_bound = case.gradient_bounds(d_out, case.oracle_gradients(d_out), key_block=BLOCK_K)
    dense_bound = case.gradient_bounds(d_out, case.oracle_gradients(d_out))
    assert_same_gradients(through_grad, through_vjp, 2 * blocked_bound, case, "jax.grad vs attention_vjp")
    summed = GradientBounds(*(getattr(blocked_bound, n) + getattr(dense_bound, n) for n in ("dq", "dk", "dv", "dbias")),
                            "the blocked bound plus the dense bound")
    assert_same_gradients(through_grad, dense, summed, case, "jax.grad vs dense")


def test_blocked_forward_and_vjp_match_the_oracle_unpadded() -> None:
    """The unpadded blocked programs on the rich case: out and lse within rule 19's bound, the fully
    excluded row exactly 0 / -inf, no NaN; jax.vjp outside jit (JVP tracers) takes the custom_vjp."""
    case = _rich_case()
    result = call(_direct(), case, return_lse=True, block_q=BLOCK_Q, block_k=BLOCK_K)
    assert_attention_close(result, case, calibrated=False, key_block=BLOCK_K)
    assert np.all(result.out[1, :, 3] == 0) and np.all(result.lse[1, :, 3] == -np.inf)
    d_out = random_cotangent(case, 2)
    arrays = [jnp.asarray(x) for x in (case.q, case.k, case.v, case.bias)]

    def out_of(q, k, v, bias):
        return ar.attention(q, k, v, bias=bias, mask=jnp.asarray(case.mask),
                            dropout_mask=jnp.asarray(case.dropout_mask), softcap=4.0, causal=True,
                            alignment="bottom_right", window=(6, None), dropout_p=0.25, block_q=BLOCK_Q,
                            block_k=BLOCK_K)

    out, pullback = jax.vjp(out_of, *arrays)
    assert_attention_close(np.asarray(out), case, calibrated=False, key_block=BLOCK_K)
    grads = Gradients(*_numpy(pullback(jnp.asarray(d_out))))
    assert_gradients_close(grads, case, d_out, calibrated=False, key_block=BLOCK_K)


def test_gradient_of_lse_through_the_custom_vjp() -> None:
    """lse's cotangent (rule 11's lse differentiated) enters the blocked backward: jax.grad of
    sum(lse * w) matches the dense program's jax.grad."""
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in ((2, 9, 8), (2, 12, 8), (2, 12, 8)))
    w = jnp.asarray(rng.standard_normal((2, 9)).astype(np.float32))

    def loss(q, k, **blocks):
        return jnp.sum(ar.attention(q, k, v, return_lse=True, causal=True, **blocks).lse * w)

    blocked = jax.jit(jax.grad(lambda q, k: loss(q, k, block_q=4, block_k=5), argnums=(0, 1)))(q, k)
    dense = jax.jit(jax.grad(lambda q, k: loss(q, k, dense=True), argnums=(0, 1)))(q, k)
    for a, b in zip(blocked, dense, strict=True):
        # float32 sums of <= 12 terms of size <= |w| |k|: 1e-5 is far below their magnitude (~1)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_one_program_per_plan_and_tile() -> None:
    """The unpadded program compiles once per (plan, tile): new values and a new scale reuse it, a new
    block size is a new program; the padded bucket program serves every block size and shape of its
    bucket."""
    backend = _direct()
    rng = np.random.default_rng(5)

    def run(seed: int, **keywords):
        arrays = [backend.asarray(np.random.default_rng(seed).standard_normal(s).astype(np.float32))
                  for s in ((3, 10, 8), (3, 14, 8), (3, 14, 8))]
        return backend.attention(*arrays, **keywords)

    program = jax_blocked.blocked_attention_jit
    run(0, block_q=3, block_k=4, scale=0.5)
    size = program._cache_size()
    run(1, block_q=3, block_k=4, scale=0.25)
    assert program._cache_size() == size
    run(1, block_q=3, block_k=5)
    assert program._cache_size() == size + 1

    bucketed = ar.get_backend("jax")
    before = jax_blocked.bucket_forward_jit._cache_size()
    for length, blocks in zip(range(2, 10), ((1, 1), (2, 3), (None, None), (5, 2), (3, 7), (64, 64), (4, 1), (2, 2)),
                              strict=True):
        q, k, v = (bucketed.asarray(rng.standard_normal((2, 3, n, 4)).astype(np.float32)) for n in (length,) * 3)
        bucketed.attention(q, k, v, causal=True, block_q=blocks[0], block_k=blocks[1],
                           softcap=None if length % 2 else 2.0)
    assert jax_blocked.bucket_forward_jit._cache_size() - before <= 1


@pytest.mark.parametrize("blocks", [(1, 1), (3, 2), (16, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bucketed_blocked_matches_the_oracle(blocks: tuple[int, int]) -> None:
    """The padded bucket program (traced blocks) with tiles of 1, non-divisors and the whole problem:
    out, lse and the gradients within rule 19's bound, exact zeros where SPEC.md fixes them."""
    case = _rich_case()
    backend = ar.get_backend("jax")
    result = call(backend, case, return_lse=True, block_q=blocks[0], block_k=blocks[1])
    assert_attention_close(result, case, calibrated=False, key_block=blocks[1])
    d_out = random_cotangent(case, 6)
    grads = call_vjp(backend, case, d_out, block_q=blocks[0], block_k=blocks[1])
    assert_gradients_close(grads, case, d_out, calibrated=False, key_block=blocks[1])


@pytest.mark.parametrize("per_step", [None, 1, 2], ids=["every_head", "one_query_head", "one_kv_head"])
def test_head_loops(per_step: int | None) -> None:
    """Every way of stepping over the heads gives the oracle's results within rule 19's bound, forward
    and backward: all heads in each tile (accelerators), one query head a step, one kv head's G = 2
    query heads stacked (the CPU's two choices, ``heads_per_step``)."""
    case = _rich_case()
    plan = ar.validation.validate_attention_args(
        case.q, case.k, case.v, ar.AttentionOptions(**case.as_keywords()), return_lse=True, block_q=BLOCK_Q,
        block_k=BLOCK_K, default_blocks=jax_backend.JaxBackend.default_blocks, backend_framework="numpy")
    static = jax_backend.JaxBackend._static_plan(plan)
    scalars = jax_backend.JaxBackend._traced_scalars(plan)
    arrays = [jnp.asarray(x) for x in (case.q, case.k, case.v, case.mask, case.bias, case.dropout_mask)]
    d_out = random_cotangent(case, 7)
    out, lse = jax_blocked.blocked_attention_jit(static, per_step, *arrays, *scalars)
    assert_attention_close(AttentionOutput(np.asarray(out), None, np.asarray(lse)), case, calibrated=False,
                           key_block=BLOCK_K)
    grads = jax_blocked.blocked_vjp_jit(static, per_step, *arrays, jnp.asarray(d_out), *scalars)
    assert_gradients_close(Gradients(*_numpy(grads)), case, d_out, calibrated=False, key_block=BLOCK_K)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_input_dtypes(dtype: str) -> None:
    """Half-precision inputs are computed in float32 (out in the input dtype, lse float32); float64
    stays float64 (its bounds fail at float32 accuracy) with x64 off outside the call."""
    import ml_dtypes

    rng = np.random.default_rng(8)
    numpy_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    q, k, v = (rng.standard_normal(s).astype(numpy_dtype) for s in ((2, 3, 7, 4), (2, 3, 9, 4), (2, 3, 9, 4)))
    case = AttentionCase(q, k, v, causal=True)
    d_out = random_cotangent(case, 9)
    compute = "float64" if dtype == "float64" else "float32"
    for backend in (_direct(), ar.get_backend("jax")):
        result = call(backend, case, return_lse=True, block_q=3, block_k=2)
        assert result.out.dtype == numpy_dtype and result.lse.dtype == np.dtype(compute)
        assert_attention_close(result, case, calibrated=False, key_block=2)
        grads = call_vjp(backend, case, d_out, block_q=3, block_k=2)
        assert all(g.dtype == numpy_dtype for g in grads[:3])
        assert_gradients_close(grads, case, d_out, calibrated=False, key_block=2)
    if dtype == "float64":  # jax.vjp's pullback, traced after the forward's x64 scope has closed
        backend = ar.get_backend("jax")
        arrays = [backend.asarray(x) for x in (q, k, v, d_out)]
        _, pullback = jax.vjp(lambda q, k, v: ar.attention(q, k, v, causal=True, block_q=3, block_k=2), *arrays[:3])
        grads = Gradients(*_numpy(pullback(arrays[3])), None)
        assert all(g.dtype == np.float64 for g in grads[:3])
        assert_gradients_close(grads, case, d_out, calibrated=False, key_block=2)
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("backend_kind", ["direct", "bucketed"])
def test_rank_2_and_empty_shapes(backend_kind: str) -> None:
    """Rank-2 inputs (one head, no head axis), L = 0 and S = 0: results and gradients of the right
    shapes; with S = 0 every row is fully excluded (out 0, lse -inf, gradients 0)."""
    backend = _direct() if backend_kind == "direct" else ar.get_backend("jax")
    rng = np.random.default_rng(10)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((7, 4), (9, 4), (9, 3)))
    case = AttentionCase(q, k, v, bias=rng.standard_normal((7, 9)).astype(np.float32), window=(1, 2))
    assert_attention_close(call(backend, case, return_lse=True, block_q=2, block_k=4), case, calibrated=False,
                           key_block=4)
    d_out = random_cotangent(case, 11)
    assert_gradients_close(call_vjp(backend, case, d_out, block_q=2, block_k=4), case, d_out, calibrated=False,
                           key_block=4)
    for length, keys in ((0, 5), (4, 0)):
        q, k, v = (np.ones(s, np.float32) for s in ((2, length, 3), (2, keys, 3), (2, keys, 2)))
        empty = AttentionCase(q, k, v, bias=np.ones((length, keys), np.float32))
        result = call(backend, empty, return_lse=True, block_q=2, block_k=2)
        assert result.out.shape == (2, length, 2) and np.all(result.out == 0)
        assert result.lse.shape == (2, length) and np.all(result.lse == -np.inf)
        grads = call_vjp(backend, empty, np.ones((2, length, 2), np.float32), block_q=2, block_k=2)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, (length, keys)]
        assert all(np.all(g == 0) for g in grads)


def _largest_intermediate(jaxpr: jex.core.Jaxpr) -> int:
    """The largest number of elements of any value a jaxpr (and every jaxpr nested in it) computes."""
    sizes = [math.prod(getattr(var.aval, "shape", ())) for eqn in jaxpr.eqns for var in eqn.outvars]
    return max([0, *sizes, *map(_largest_intermediate, jex.core.subjaxprs(jaxpr))])


@pytest.mark.parametrize("per_step", [1, None], ids=["one_query_head", "every_head"])
def test_no_intermediate_of_the_logits_size(per_step: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """jax.grad of a blocked call under jit (forward, custom_vjp residuals, backward) computes nothing
    larger than a tile (times the heads processed together) or an input: traced, not compiled."""
    monkeypatch.setattr(jax_blocked, "heads_per_step", lambda plan, arrays: per_step)
    heads, length, dim, block = 4, 1024, 16, 64
    shape = jax.ShapeDtypeStruct((1, heads, length, dim), jnp.float32)
    bias = jax.ShapeDtypeStruct((heads, 1, length), jnp.float32)  # broadcast over the queries

    def loss(q, k, v, bias):
        out = ar.attention(q, k, v, bias=bias, causal=True, block_q=block, block_k=block)
        return jnp.sum(out * out)

    jaxpr = jax.make_jaxpr(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))))(shape, shape, shape, bias)
    tile = block * block * (heads if per_step is None else 1)
    largest = _largest_intermediate(jaxpr.jaxpr)
    assert largest <= max(tile, heads * length * dim), largest
    assert largest < length * length
