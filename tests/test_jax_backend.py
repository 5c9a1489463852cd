"""JAX specifics: jit reuse, shape buckets, calls under jax.jit, scoped x64 (rule 10)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from .conftest import import_or_skip

jax = import_or_skip("jax")
import jax.numpy as jnp  # noqa: E402
from hypothesis import settings  # noqa: E402

import attention_ref as ar  # noqa: E402
from attention_ref.backends import jax as jax_backend  # noqa: E402
from attention_ref.result import AttentionOutput  # noqa: E402
from attention_ref.testing import AttentionCase, assert_attention_close, call, get_property, run_property  # noqa: E402
from attention_ref.testing.assertions import assert_same_results  # noqa: E402


def _inputs(dtype: str = "float32", shape_q=(2, 4, 5, 8), shape_kv=(2, 2, 7, 8), seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape_q).astype(dtype), rng.standard_normal(shape_kv).astype(dtype),
            rng.standard_normal(shape_kv).astype(dtype))


#: Examples for the unpadded program, which compiles once per drawn shape (the padded one, which
#: every other property runs through, shares a program per bucket).
UNBUCKETED_EXAMPLES = 30


def test_unbucketed_backend_matches_the_oracle() -> None:
    run_property(get_property("matches_float64_oracle"), jax_backend.JaxBackend(bucket_shapes=False),
                 settings(max_examples=UNBUCKETED_EXAMPLES))


def test_bucketed_and_unbucketed_agree() -> None:
    q, k, v = _inputs()
    case = AttentionCase(q, k, v, causal=True, alignment="bottom_right", softcap=3.0)
    bucketed = call(jax_backend.JaxBackend(), case, return_weights=True, return_lse=True)
    direct = call(jax_backend.JaxBackend(bucket_shapes=False), case, return_weights=True, return_lse=True)
    assert_same_results(bucketed, direct, 2 * case.bounds(), case, "bucketed vs unbucketed")


#: The program each path's calls compile, per (bucketed, dense): the dense path (weights returned)
#: and the blocked one (rule 19, the default without weights).
_PROGRAMS = {(True, True): "_bucket_attention", (True, False): "bucket_forward_jit",
             (False, True): "_direct_attention", (False, False): "blocked_attention_jit"}


def _program(bucketed: bool, dense: bool) -> Any:
    from attention_ref.backends import jax_blocked

    name = _PROGRAMS[bucketed, dense]
    return getattr(jax_backend if dense else jax_blocked, name)


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "blocked"])
def test_one_compilation_serves_a_bucket_of_shapes(dense: bool) -> None:
    """Eight query lengths and eight key lengths, all in one bucket (at most BUCKET_MIN_LENGTH), compile
    exactly one program (a head dim of 7 that no other test uses, so that the first call compiles)."""
    backend = jax_backend.JaxBackend()
    program = _program(True, dense)
    before = program._cache_size()
    for length in range(1, 9):
        q, k, v = _inputs(shape_q=(1, 2, length, 7), shape_kv=(1, 2, length + 2, 7), seed=length)
        backend.attention(*map(backend.asarray, (q, k, v)), causal=True, return_weights=dense)
    assert program._cache_size() - before == 1


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "blocked"])
def test_unbucketed_program_is_reused_for_a_shape(dense: bool) -> None:
    backend = jax_backend.JaxBackend(bucket_shapes=False)
    program = _program(False, dense)
    before = program._cache_size()
    q, k, v = _inputs(shape_q=(3, 5, 11), shape_kv=(3, 9, 11))  # a head dim no other test uses
    backend.attention(*map(backend.asarray, (q, k, v)), scale=0.5, return_weights=dense)
    assert program._cache_size() == before + 1
    q2, k2, v2 = _inputs(shape_q=(3, 5, 11), shape_kv=(3, 9, 11), seed=1)
    backend.attention(*map(backend.asarray, (q2, k2, v2)), scale=0.25, return_weights=dense)  # a new scale: same
    assert program._cache_size() == before + 1


def test_runs_under_a_user_jit() -> None:
    backend = ar.get_backend("jax")
    case = AttentionCase(*_inputs(), causal=True, softcap=5.0)

    @jax.jit
    def user_function(q, k, v):
        return backend.attention(q, k, v, causal=True, softcap=5.0, return_weights=True, return_lse=True)

    jitted = user_function(*map(backend.asarray, (case.q, case.k, case.v)))
    assert_attention_close(AttentionOutput(*map(np.asarray, jitted)), case, calibrated=False)


def test_float64_is_computed_in_float64_and_x64_stays_off() -> None:
    assert not jax.config.jax_enable_x64
    backend = ar.get_backend("jax")
    case = AttentionCase(*_inputs("float64"))
    assert backend.asarray(case.q).dtype == jnp.float64
    result = call(backend, case, return_weights=True, return_lse=True)
    assert result.out.dtype == np.float64 and result.weights.dtype == np.float64
    assert_attention_close(result, case, calibrated=False)  # float64 bounds: float32 compute would fail
    assert not jax.config.jax_enable_x64


def test_compute_dtype_float64_for_float32_inputs() -> None:
    backend = ar.get_backend("jax")
    q, k, v = _inputs("float32")
    result = backend.attention(*map(backend.asarray, (q, k, v)), return_lse=True, compute_dtype="float64")
    assert result.out.dtype == jnp.float32 and result.lse.dtype == jnp.float64
    assert not jax.config.jax_enable_x64


def test_unbucketed_gradients_match_the_oracle() -> None:
    """The unpadded program's vjp (used on accelerators, under jit and for large problems): narrow
    biases are summed in the compute dtype, with GQA, windows and dropout."""
    from attention_ref.testing import assert_gradients_close
    from attention_ref.testing.cases import call_vjp

    direct = jax_backend.JaxBackend(bucket_shapes=False)
    q, k, v = _inputs(shape_q=(3, 4, 9, 8), shape_kv=(3, 2, 9, 8))
    rng = np.random.default_rng(1)
    for bias_dtype in ("float16", "bfloat16", "float32"):
        bias = rng.standard_normal((9, 9)).astype(np.float32).astype(jnp.dtype(bias_dtype))
        case = AttentionCase(q, k, v, bias=bias, window=(2, 1), alignment="bottom_right", softcap=5.0,
                             dropout_p=0.25, dropout_mask=ar.dropout_mask((4, 9, 9), 0.25, seed=2))
        d_out = rng.standard_normal(q.shape).astype(np.float32)
        assert_gradients_close(call_vjp(direct, case, d_out), case, d_out, calibrated=False)
