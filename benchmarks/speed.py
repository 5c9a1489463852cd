"""Time each backend at realistic sizes (median wall time per call, after a warm-up call).

    python -m benchmarks.speed [--repeats 5]

torch SDPA (math backend, bottom-right causal) and jax.nn.dot_product_attention (causal when
L == S) are timed alongside for scale; they are yardsticks, not references.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import attention_ref as ar

SIZES = [  # (batch, Hq, Hkv, L, S, E)
    (1, 8, 8, 512, 512, 64),
    (2, 16, 4, 1024, 1024, 64),
    (1, 32, 8, 1, 4096, 128),  # one decode step against a KV cache
]


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed_call(backend: Any, arrays: list[Any], block: Callable[[Any], Any]) -> object:
    """One bottom-right causal call, waited for (``block``)."""
    return block(backend.attention(*arrays, causal=True, alignment="bottom_right"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for batch, hq, hkv, length, keys, head_dim in SIZES:
        for dtype in ("float32", "float16"):
            q = rng.standard_normal((batch, hq, length, head_dim)).astype(dtype)
            k = rng.standard_normal((batch, hkv, keys, head_dim)).astype(dtype)
            v = rng.standard_normal((batch, hkv, keys, head_dim)).astype(dtype)
            label = f"B={batch} Hq={hq} Hkv={hkv} L={length} S={keys} E={head_dim} {dtype}"
            for name in ar.available_backends():
                backend = ar.get_backend(name)
                arrays = [backend.asarray(x) for x in (q, k, v)]
                block = (lambda x: x.block_until_ready()) if name == "jax" else (lambda x: x)
                seconds = median_seconds(functools.partial(_timed_call, backend, arrays, block), args.repeats)
                print(f"{label:52} {name:8} {seconds * 1e3:9.1f} ms", flush=True)
            yardsticks(q, k, v, label, args.repeats)


def yardsticks(q: np.ndarray, k: np.ndarray, v: np.ndarray, label: str, repeats: int) -> None:
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
        bias = causal_lower_right(q.shape[2], k.shape[2])

        def sdpa() -> object:
            with sdpa_kernel(SDPBackend.MATH):
                return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=bias, enable_gqa=True)

        print(f"{label:52} {'sdpa-math':8} {median_seconds(sdpa, repeats) * 1e3:9.1f} ms", flush=True)
    except ImportError:
        pass
    try:
        import jax
    except ImportError:
        return
    jq, jk, jv = (jax.device_put(np.swapaxes(x, 1, 2)) for x in (q, k, v))  # (B, T, N, H)
    run = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, is_causal=q.shape[2] == k.shape[2]))
    try:
        seconds = median_seconds(lambda: run(jq, jk, jv).block_until_ready(), repeats)
    except ValueError as error:  # e.g. float16 dots are not supported on the CPU
        print(f"{label:52} {'jax.nn':8} unsupported: {str(error).splitlines()[0]}", flush=True)
        return
    print(f"{label:52} {'jax.nn':8} {seconds * 1e3:9.1f} ms", flush=True)


if __name__ == "__main__":
    main()
