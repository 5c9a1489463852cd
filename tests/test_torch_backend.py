"""PyTorch specifics: the device of the inputs, TF32 off for the call, autograd passes through."""

from __future__ import annotations

import numpy as np

from .conftest import import_or_skip

torch = import_or_skip("torch")

import attention_ref as ar  # noqa: E402
from attention_ref.backends.torch import ieee_float32_matmul  # noqa: E402


def test_results_stay_on_the_input_device_and_dtype() -> None:
    q = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    result = ar.attention(q, q, q, return_weights=True, return_lse=True)
    assert result.out.device == q.device and result.out.dtype == torch.bfloat16
    assert result.weights.dtype == torch.float32 and result.lse.dtype == torch.float32


def test_tf32_is_off_during_a_cuda_call_and_restored_after() -> None:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        setting, tf32, ieee = "fp32_precision", "tf32", "ieee"
    else:
        setting, tf32, ieee = "allow_tf32", True, False
    original = getattr(matmul, setting)
    setattr(matmul, setting, tf32)  # a user who turned TF32 on
    try:
        with ieee_float32_matmul(torch.device("cpu")):
            assert getattr(matmul, setting) == tf32  # CPU calls leave the setting alone
        with ieee_float32_matmul(torch.device("cuda")):
            assert getattr(matmul, setting) == ieee
        assert getattr(matmul, setting) == tf32
    finally:
        setattr(matmul, setting, original)


def test_gradients_flow_through_fully_masked_rows_without_nan() -> None:
    q = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False
    out = ar.attention(q, q, q, mask=mask)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    np.testing.assert_array_equal(out[1].detach().numpy(), 0)
