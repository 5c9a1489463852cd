"""The bug zoo: attention kernels in PyTorch, correct ones and deliberately buggy ones.

The zoo exists to prove that the kernel checker (``attention_ref.testing.check``) does its job: it
must accept the correct kernels (``CORRECT_KERNELS``: the reference kernel and the tiled kernel at
tiles of 1, 16, 32 and 64 keys) and catch every bug of ``BUGS`` with the property the table names.
There is one code path per kernel: ``make_kernel`` (``kernel.py``, every feature and its own
``torch.autograd.Function`` backward) and ``tiled_kernel`` (``tiled.py``, an online softmax over key
tiles); each bug is a keyword switch planted in that path (``make_kernel(causal_strict=True)``), so
a rejection can only come from that bug. The table (``bugs.py``) maps each bug to a one-line
description, the ``supports`` it is checked with and the property that must catch it.

Calling convention (the keyword names of SPEC.md)::

    kernel(q, k, v, *, mask=None, bias=None, scale=None, causal=False, alignment="top_left",
           softcap=None, window=None, dropout_p=0.0, dropout_mask=None,
           return_weights=False, return_lse=False)

* q ``(B, Hq, L, E)``, k ``(B, Hkv, S, E)``, v ``(B, Hkv, S, Ev)``: torch tensors of one dtype among
  float16, bfloat16, float32 and float64; ``Hq % Hkv == 0`` (query head h uses kv head
  ``h // (Hq // Hkv)``).
* mask: bool, broadcastable to ``(B, Hq, L, S)``, True = may attend. bias: floating, broadcastable to
  ``(B, Hq, L, S)``, may hold -inf.
* ``scale=None`` means ``1/sqrt(E)``; ``softcap=c`` caps the scaled logits ``c * tanh(x / c)``
  before the bias; ``causal`` keeps key j for query i iff ``j <= i + offset``, offset 0
  (``"top_left"``) or ``S - L`` (``"bottom_right"``); ``window=(left, right)`` (None: unbounded)
  keeps ``i + offset - left <= j <= i + offset + right`` at the same alignment.
* ``dropout_mask``: bool keep-mask broadcastable to ``(B, Hq, L, S)``; the weights are multiplied by
  ``keep / (1 - dropout_p)`` before P·V, and the returned weights are those before dropout.
* Computed in float32 for float16/bfloat16 inputs (float64 for float64). Excluded keys get weight
  exactly 0; a fully excluded row (``S = 0`` included) gives out 0, weights 0 and lse -inf.
* Returns ``out`` ``(B, Hq, L, Ev)`` in the input dtype when no return flag is set, else the tuple
  ``(out, weights, lse)`` with None for what was not requested; weights ``(B, Hq, L, S)`` and lse
  ``(B, Hq, L)`` in the compute dtype.
* Gradients (dq, dk, dv and the bias's) by autograd: ``make_kernel``'s through its own backward,
  ``tiled_kernel``'s (not part of its features) through the loop.
"""

from .bugs import (
    ALL_DTYPES,
    ALL_FEATURES,
    BUGGY_TILE_SIZE,
    BUGS,
    BUGS_BY_NAME,
    CORRECT_KERNELS,
    TILED_FEATURES,
    Bug,
    CorrectKernel,
    buggy_kernel,
    markdown_table,
)
from .kernel import KERNEL_BUGS, Kernel, make_kernel, reference_kernel
from .tiled import TILED_BUGS, tiled_kernel

__all__ = [
    "ALL_DTYPES",
    "ALL_FEATURES",
    "BUGGY_TILE_SIZE",
    "BUGS",
    "BUGS_BY_NAME",
    "CORRECT_KERNELS",
    "KERNEL_BUGS",
    "TILED_BUGS",
    "TILED_FEATURES",
    "Bug",
    "CorrectKernel",
    "Kernel",
    "buggy_kernel",
    "make_kernel",
    "markdown_table",
    "reference_kernel",
    "tiled_kernel",
]
