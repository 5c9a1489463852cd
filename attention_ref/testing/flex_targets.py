"""Built-in crosscheck targets for torch's FlexAttention (``torch.nn.attention.flex_attention``), with
the checker's dense calling convention: q ``(B, Hq, L, E)``, k ``(B, Hkv, S, E)``, v ``(B, Hkv, S, Ev)``
(inputs of rank 2 or with more batch dims are folded to that and back), out ``(B, Hq, L, Ev)``, and
``(out, None, lse)`` with ``return_lse`` (lse ``(B, Hq, L)``, float32 for half-precision inputs).

The adapter maps the spec's keywords onto flex's two hooks and computes nothing of the answer:

* ``mask`` (bool, True = may attend, broadcast to ``(B, Hq, L, S)``), ``causal`` (``alignment``
  top_left: ``kv_idx <= q_idx``, bottom_right: ``kv_idx <= q_idx + S - L``) and ``window=(left,
  right)`` (``q_idx + offset - left <= kv_idx <= q_idx + offset + right``) become one ``mask_mod``,
  and ``create_block_mask(mask_mod, B, Hq, L, S, device=q.device)`` (default BLOCK_SIZE 128; L and S
  need not be multiples of it); no block mask when none of them is given;
* ``softcap`` (``c * tanh(score / c)``) and then ``bias`` (``+ bias[b, h, q_idx, kv_idx]``) become one
  ``score_mod``, in SPEC.md's order (rule 4, then rule 5); flex hands score_mod the scaled logit;
* ``scale`` as ``scale=``, GQA as ``enable_gqa=True``, lse as ``return_aux=AuxRequest(lse=True)``.

Targets (builder ``flex_targets``):

* ``torch flex_attention[eager]``: flex_attention called eagerly (its unfused implementation, which
  materialises the scores): float16, bfloat16, float32 and float64. Flex refuses empty sequences
  (``EMPTY_NOTE``), so sizes come from the small menu, which has no 0.
* ``torch flex_attention[compiled]``: the same call inside ``torch.compile(fullgraph=True,
  dynamic=False)`` (fullgraph: a graph break raises instead of running eager). On the CPU: float32
  and bfloat16 only, no lse, no backward (torch raises NotImplementedError for each). One
  compilation per shape and per value of scale, softcap, alignment and window (dynamic=False
  specialises them; ``dynamic=None`` fails to lower, "unbacked_bindings"), so sizes come from the
  small menu and dynamo's cache is reset before it reaches its recompile limit.
* On CUDA the same two (the Triton kernels when compiled), with gradients, declared from flex's
  documentation and not yet run (``verified=False``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from .adapters import HALF_AND_SINGLE, Target, _cuda_in_torch, _installed

FLEX_EAGER = "torch flex_attention[eager]"
FLEX_COMPILED = "torch flex_attention[compiled]"
#: What flex does with empty sequences (torch 2.13, CPU), why the eager target also draws its sizes from the menu.
EMPTY_NOTE = ("empty sequences: flex_attention raises IndexError for S = 0 (max() of an empty reduction), "
              "create_block_mask for L = 0 or S = 0, and with L = 0 return_aux gives lse None; so sizes come from "
              "the small menu (no 0), and the properties that build an S = 0 case themselves report ERROR")


def _flex_call(q: Any, k: Any, v: Any, mask: Any, bias: Any, scale: float | None, softcap: float | None,
               causal: bool, offset: int, window: tuple[int | None, int | None] | None, return_lse: bool,
               user_score_mod: Any = None, user_mask_mod: Any = None) -> Any:
    """flex_attention on 4-D q, k, v with the spec's mask (broadcast to (B, Hq, L, S)), causal and window
    as a block mask and softcap then bias as a score_mod; ``offset``: 0 (top_left) or S - L (bottom_right).
    The caller's own programs (rule 22) are passed to flex as they are: ``user_mask_mod`` joins the block
    mask's mask_mod, ``user_score_mod`` runs first in the score_mod (on the scaled score).
    Traceable by dynamo as a whole (the closures are built inside it)."""
    import torch
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    batch, heads, length, keys = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    masked = mask is not None or causal or window is not None or user_mask_mod is not None
    if mask is not None:
        mask = mask.expand(batch, heads, length, keys)
    if bias is not None:
        bias = bias.expand(batch, heads, length, keys)

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        keep = q_idx >= 0  # a bool tensor of the index's shape, all True
        if user_mask_mod is not None:
            keep = keep & user_mask_mod(b, h, q_idx, kv_idx)
        if mask is not None:
            keep = keep & mask[b, h, q_idx, kv_idx]
        if causal:
            keep = keep & (kv_idx <= q_idx + offset)
        if window is not None and window[0] is not None:
            keep = keep & (kv_idx >= q_idx + offset - window[0])
        if window is not None and window[1] is not None:
            keep = keep & (kv_idx <= q_idx + offset + window[1])
        return keep

    def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        if user_score_mod is not None:  # rule 22: on the scaled score, before the softcap and the bias
            score = user_score_mod(score, b, h, q_idx, kv_idx)
        if softcap is not None:  # rule 4, before the bias (rule 5)
            score = softcap * torch.tanh(score / softcap)
        if bias is not None:
            score = score + bias[b, h, q_idx, kv_idx]
        return score

    block_mask = (create_block_mask(mask_mod, batch, heads, length, keys, device=q.device) if masked else None)
    scored = softcap is not None or bias is not None or user_score_mod is not None
    return flex_attention(q, k, v, score_mod=score_mod if scored else None,
                          block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                          return_aux=AuxRequest(lse=True) if return_lse else None)


class _Compiled:
    """``torch.compile(_flex_call, fullgraph=True, dynamic=False)``, with dynamo's cache reset before a
    new specialisation would pass its recompile limit, or when it did (with fullgraph, that raises)."""

    def __init__(self) -> None:
        self.function: Callable[..., Any] | None = None
        self.seen: set[Any] = set()

    def __call__(self, *arguments: Any) -> Any:
        import torch

        key = tuple((tuple(x.shape), tuple(x.stride()), x.dtype) if isinstance(x, torch.Tensor) else x
                    for x in arguments)
        function = self.function
        if function is None or (key not in self.seen and len(self.seen) >= torch._dynamo.config.recompile_limit):
            function = self._reset()
        self.seen.add(key)
        try:
            return function(*arguments)
        except Exception as error:  # a guard this key does not see (dynamo guards more): reset, compile again
            if "recompile limit" not in str(error):
                raise
        function = self._reset()
        self.seen.add(key)
        return function(*arguments)

    def _reset(self) -> Callable[..., Any]:
        import torch

        torch._dynamo.reset()
        self.seen = set()
        function: Callable[..., Any] = torch.compile(_flex_call, fullgraph=True, dynamic=False)
        self.function = function
        return function


_COMPILED = _Compiled()


def _as_4d(x: Any, lead: tuple[int, ...]) -> Any:
    """x ``(*lead, H, L, E)`` (or ``(L, E)`` when lead is empty and x is 2-D) as ``(prod(lead), H, L, E)``."""
    if x.dim() == 2:
        return x[None, None]
    return x.reshape(math.prod(lead), *x.shape[len(lead):])


def flex_kernel(compiled: bool) -> Callable[..., Any]:
    """The adapter: flex_attention eagerly, or the compiled call (see the module docstring)."""

    def kernel(q: Any, k: Any, v: Any, *, mask: Any = None, bias: Any = None, scale: float | None = None,
               causal: bool = False, alignment: str = "top_left", window: Any = None, softcap: float | None = None,
               return_lse: bool = False, score_mod: Any = None, mask_mod: Any = None) -> Any:
        import torch

        if compiled and (score_mod is not None or mask_mod is not None):
            raise ValueError("the compiled flex target does not declare score_mod or mask_mod")

        lead = tuple(q.shape[:-3]) if q.dim() >= 3 else ()
        full = (*lead, q.shape[-3] if q.dim() >= 3 else 1, q.shape[-2], k.shape[-2])
        q4, k4, v4 = (_as_4d(x, lead) for x in (q, k, v))
        mask4, bias4 = (None if x is None else x.expand(full).reshape(math.prod(lead), *full[-3:])
                        for x in (mask, bias))
        offset = k.shape[-2] - q.shape[-2] if alignment == "bottom_right" else 0
        arguments = (q4, k4, v4, mask4, bias4, None if scale is None else float(scale),
                     None if softcap is None else float(softcap), bool(causal), offset,
                     None if window is None else tuple(window), return_lse)
        if compiled:
            result = _COMPILED(*arguments)
        else:
            with warnings.catch_warnings():  # torch's advice to compile, once per process
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                result = _flex_call(*arguments, score_mod, mask_mod)
        out, lse = (result[0], result[1].lse) if return_lse else (result, None)
        out = out.reshape(*q.shape[:-1], v.shape[-1])
        if lse is None:
            return out
        return out, None, lse.reshape(q.shape[:-1]).to(torch.promote_types(lse.dtype, q.dtype))

    kernel.__name__ = f"flex_attention_{'compiled' if compiled else 'eager'}"
    return kernel


def flex_targets(device: str) -> list[Target]:
    """FlexAttention, eager and compiled (torch is imported only to ask for CUDA)."""
    if not _installed("torch") or (device != "cpu" and not _cuda_in_torch()):
        return []
    common = ("scale", "causal", "bottom_right", "gqa", "value_dim", "mask", "bias", "softcap", "window")
    adapter = ("adapter: mask, causal (alignment as an offset S - L) and window as one mask_mod -> "
               "create_block_mask(B, Hq, L, S) (BLOCK_SIZE 128); softcap then bias as one score_mod (SPEC.md's "
               "order); scale=, enable_gqa=True",)
    if device == "cpu":
        return [
            Target(FLEX_EAGER, "torch", flex_kernel(False), (*common, "lse", "mask_mod", "score_mod"), device=device,
                   few_shapes=True, opt_in=True,
                   cost=120,
                   notes=(*adapter, EMPTY_NOTE, "eager: flex's unfused implementation; lse through "
                          "return_aux=AuxRequest(lse=True), float32 for half-precision inputs (returned in q's "
                          "dtype or wider); no backward on the CPU (NotImplementedError), so no grad")),
            Target(FLEX_COMPILED, "torch", flex_kernel(True), common, dtypes=("bfloat16", "float32"), device=device,
                   few_shapes=True, cost=400, opt_in=True,
                   notes=(*adapter, "torch.compile(fullgraph=True, dynamic=False): one compilation per shape and "
                          "per value of scale, softcap and window (1-5 s each on 2 cores), so sizes come from a small "
                          "menu; on the CPU no float64, no return_lse and no backward (NotImplementedError)",
                          "inductor bugs (torch 2.13 CPU): a bias of shape (1, 1) in the score_mod fails to lower "
                          "(LoweringException 'All the buffers in the score and mask subgraph should be in "
                          "kernel_group.args.input_buffers'); a case of default_scale_is_inverse_sqrt_head_dim fails "
                          "in g++ (CppCompileError)")),
        ]
    cuda_notes = ("declared from flex's documentation, not yet run on a GPU; gradients through torch.autograd "
                  "(flex's backward); dbias not declared (gradients of captured score_mod buffers)",)
    return [
        Target(FLEX_EAGER, "torch", flex_kernel(False), (*common, "lse", "grad"), dtypes=HALF_AND_SINGLE,
               device=device, verified=False, notes=(*adapter, *cuda_notes)),
        Target(FLEX_COMPILED, "torch", flex_kernel(True), (*common, "lse", "grad"), dtypes=HALF_AND_SINGLE,
               device=device, few_shapes=True, verified=False, cost=400,
               notes=(*adapter, "torch.compile(fullgraph=True, dynamic=False): the Triton kernels", *cuda_notes)),
    ]
