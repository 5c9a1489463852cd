"""Rule 12 beyond the catalogue of bad inputs (whose every entry the property
``bad_inputs_raise_the_spec_errors`` raises on every backend, with the front door's message): arrays of
mixed frameworks and devices, messages that name the shapes, dtype objects as compute dtypes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import attention_ref as ar

from .conftest import TESTED_BACKEND_NAMES, import_or_skip


def test_mixed_frameworks_are_refused() -> None:
    x = np.ones((3, 4), np.float32)
    for first, second in itertools.permutations(TESTED_BACKEND_NAMES, 2):
        a, b = ar.get_backend(first), ar.get_backend(second)
        with pytest.raises(TypeError) as info:
            a.attention(a.asarray(x), b.asarray(x), a.asarray(x))
        assert str(info.value) == (f"all arrays must come from one framework, got q is {first}, k is {second}, "
                                   f"v is {first}")
        with pytest.raises(TypeError, match=f"the {first} backend takes {first} arrays, got {second} arrays"):
            a.attention(*(b.asarray(x) for _ in range(3)))
        mask = b.asarray(np.ones((3, 3), bool))
        with pytest.raises(TypeError, match=f"mask is {second}"):
            a.attention(*(a.asarray(x) for _ in range(3)), mask=mask)


def test_messages_name_the_shapes() -> None:
    x = np.ones((2, 3, 8), np.float32)
    with pytest.raises(ValueError, match=r"mask of shape \(4, 5\) is not broadcastable to the logits shape "
                                         r"\(\.\.\., Hq, L, S\) = \(2, 3, 3\)"):
        ar.attention(x, x, x, mask=np.ones((4, 5), bool))


def test_arrays_on_different_devices_are_refused() -> None:
    torch = import_or_skip("torch")
    q = torch.ones(3, 4)
    with pytest.raises(ValueError, match="all arrays must be on one device, got q on cpu, k on meta, v on cpu"):
        ar.attention(q, q.to("meta"), q)


def test_dtype_objects_are_accepted_as_compute_dtype(backend: object) -> None:
    float64 = {"numpy": lambda: np.float64, "jax": lambda: import_or_skip("jax.numpy").float64,
               "torch": lambda: import_or_skip("torch").float64}[backend.name]()
    x = backend.asarray(np.ones((3, 4), np.float32))
    for compute_dtype in (np.float64, np.dtype("float64"), float64):
        result = backend.attention(x, x, x, return_lse=True, compute_dtype=compute_dtype)
        assert str(result.lse.dtype).endswith("float64")
