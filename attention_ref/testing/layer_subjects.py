"""How ``check_layer`` calls a layer: one :class:`LayerSubject` per kind of layer, each taking a
:class:`LayerCall` (NumPy inputs and params in the reference's conventions) and returning the layer's
:class:`RawResult` as NumPy arrays.

Shape letters: B batch, L queries, S keys, d_q, d_k, d_v the input features, H query heads, Hkv kv
heads, hd the q/k head dim, hd_v the value head dim, d_out the output features.

A layer is either

* a **factory** ``make(params) -> layer`` for a layer someone wrote (:class:`FactorySubject`):
  ``params`` is an :class:`~attention_ref.layers.MHAParams` of the framework's arrays, drawn by the
  properties within the declared ``supports``, and the layer is called as
  ``layer(query, key, value, **keywords)`` with query ``(B, L, d_q)``, key ``(B, S, d_k)``, value
  ``(B, S, d_v)`` and only the keywords it supports (``mask``, ``key_padding_mask``, ``causal``,
  ``dropout_p`` with ``dropout_mask``, ``return_weights``); or
* an **instance** of a framework layer, read with that framework's converter and called through an
  adapter that only maps arguments (layout, mask polarity and shape, argument order): torch
  ``nn.MultiheadAttention`` (:class:`TorchMHASubject`), flax ``nnx.MultiHeadAttention`` and linen
  ``MultiHeadDotProductAttention`` with its variables (:class:`FlaxSubject`), keras
  ``MultiHeadAttention`` / ``GroupQueryAttention`` (:class:`KerasSubject`) and Hugging Face
  ``LlamaAttention`` (:class:`HFAttentionSubject`). An instance keeps its dimensions; properties that
  draw parameters load them into a copy of it (the converter builds the weights, the copy keeps the
  instance's class and settings), and the instance itself is never changed.

Each subject declares its conventions, which the properties verify and report as "convention
differs": the weights it returns (per head or averaged over heads, before or after dropout) and what
a fully masked query row gives (``"zero"``: the reference, out = bo; ``"nan"``; ``"mean_v"``: the mean
of the row's projected values, a finite mask fill; ``"skip"``), which may depend on the path the
framework takes for a call (``RawResult.path``).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from ..frameworks import numpy_dtype
from ..layers.params import MHAParams
from ..registry import get_backend
from .layer_cases import LayerCase

#: Feature -> what a layer that declares it does (``check_layer(..., supports=...)``).
LAYER_FEATURE_HELP = {
    "mask": "takes mask= (bool, per mask_layout and mask_polarity)",
    "key_padding_mask": "takes key_padding_mask= (bool (B, S): True = a real token, or padding with "
                        "mask_polarity='ignore')",
    "causal": "takes causal=True (top-left: query i attends keys j <= i)",
    "dropout": "takes dropout_p= and dropout_mask= (bool keep-mask (B, H, L, S), True = keep)",
    "weights": "returns the attention weights (with return_weights=True, or always with returns=)",
    "gqa": "handles Hkv < H (query head h uses kv head h // (H // Hkv))",
    "kv_features": "key and value features d_k, d_v may differ from d_q and from each other",
    "head_dim": "H * hd may differ from d_q",
    "value_head_dim": "hd_v may differ from hd",
    "out_features": "d_out may differ from d_q",
    "partial_biases": "any subset of bq, bk, bv, bo may be None (otherwise all or none)",
}
LAYER_FEATURES = tuple(LAYER_FEATURE_HELP)
#: What a layer returns as weights: per head ``(B, H, L, S)`` (the reference) or their mean over the
#: heads ``(B, L, S)`` (torch ``nn.MultiheadAttention``'s default).
WEIGHTS_VIEWS = ("per_head", "averaged")
#: Whether the returned weights are the probabilities before dropout (the reference) or after
#: (``P * keep / (1 - p)``, torch's and Hugging Face eager's).
WEIGHTS_DROPOUT = ("before", "after")
#: What a fully masked query row gives: the reference's zeros (per head o = 0, so out = bo), NaN, the
#: mean of the head's projected values over all keys (a finite mask fill), or "skip" (not compared).
LAYER_FULLY_MASKED = ("zero", "nan", "mean_v", "skip")
#: How a layer takes ``mask``: ``"bhls"`` a 4-D array ``(B or 1, H or 1, L, S)`` broadcastable to the
#: logits; ``"bls"`` a 3-D ``(B, L, S)`` (the same for every head: keras); ``"torch"`` torch
#: ``nn.MultiheadAttention``'s ``(L, S)`` when the same for every batch element and head, else
#: ``(B * H, L, S)`` batch-major (row ``b * H + h``).
MASK_LAYOUTS = ("bhls", "bls", "torch")
#: The mask polarities: True = may attend (the reference) or True = masked out (torch MHA's masks).
LAYER_MASK_POLARITIES = ("attend", "ignore")


class LayerError(Exception):
    """The layer raised on an input within its declared features, or returned something outside its
    calling convention: the property could not run (reported ERROR, never FAIL)."""


class ParamDims(NamedTuple):
    """The sizes of one layer's parameters."""

    d_q: int
    d_k: int
    d_v: int
    d_out: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int

    @staticmethod
    def of(params: MHAParams) -> ParamDims:
        (d_q, heads, head_dim), (d_k, kv_heads, _) = params.wq.shape, params.wk.shape
        d_v, value_dim, d_out = params.wv.shape[0], params.wv.shape[2], params.wo.shape[2]
        return ParamDims(d_q, d_k, d_v, d_out, heads, kv_heads, head_dim, value_dim)


def biases_of(params: MHAParams) -> tuple[bool, bool, bool, bool]:
    return (params.bq is not None, params.bk is not None, params.bv is not None, params.bo is not None)


@dataclass(frozen=True, eq=False)
class LayerCall:
    """One call of a layer, in the reference's conventions (NumPy): ``case`` holds query ``(B, L, d_q)``,
    key, value, params (one dtype), the mask ``(B or 1, H or 1, L, S)`` (True = may attend), the key
    padding mask ``(B, S)`` (True = a real token), ``causal`` (top-left) and the dropout keep-mask
    ``(B, H, L, S)``. ``self_attention``: key and value are query itself (one array, as torch's fast
    path wants); ``need_weights``: the weights are asked for; ``dropout_seed``: the seed of a layer
    that draws its own dropout (torch), which then reports the keep-mask it used."""

    case: LayerCase
    self_attention: bool = False
    need_weights: bool = False
    dropout_seed: int = 0

    @property
    def dims(self) -> ParamDims:
        return ParamDims.of(self.case.params)

    @property
    def dtype(self) -> str:
        return self.case.dtype

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints the failing call with this repr (not field by field: a large layer's
        params would fill pages)."""
        printer.text(repr(self))

    def __repr__(self) -> str:
        c = self.case
        small = c.query.size + c.key.size + c.value.size + sum(x.size for x in c.params if x is not None) <= 400

        def show(x: np.ndarray | None) -> str:
            if x is None:
                return "None"
            if small:
                values = np.asarray(x, np.float64) if x.dtype != bool else x
                return np.array2string(values, separator=", ", threshold=10**6, max_line_width=10**6)
            return f"<{x.dtype.name} {x.shape}>"

        params = ", ".join(f"{n}={show(x)}" for n, x in c.params._asdict().items())
        options = [f"causal={c.causal}"] + ([f"dropout_p={c.dropout_p}"] if c.dropout_mask is not None else [])
        return (f"LayerCall({self.dims}, biases={biases_of(c.params)}, {c.dtype}, query={show(c.query)}, "
                f"key={'query' if self.self_attention else show(c.key)}, "
                f"value={'query' if self.self_attention else show(c.value)}, mask={show(c.mask)}, "
                f"key_padding_mask={show(c.key_padding_mask)}, dropout_mask={show(c.dropout_mask)}, "
                f"{', '.join(options)}, need_weights={self.need_weights}, params=MHAParams({params}))"
                f"  # query {c.query.shape}, key {c.key.shape}, value {c.value.shape}")


@dataclass(frozen=True)
class RawResult:
    """What the layer returned, as NumPy: out ``(B, L, d_out)``, weights (or None) in the layer's
    view, the keep-mask ``(B, H, L, S)`` it applied (None without dropout), the path it took and the
    fully-masked convention that path declares."""

    out: np.ndarray
    weights: np.ndarray | None
    dropout_mask: np.ndarray | None
    path: str
    fully_masked: str


def _layout_mask(mask: np.ndarray, layout: str, batch: int, heads: int) -> np.ndarray:
    """A reference mask ``(B or 1, H or 1, L, S)`` in ``layout`` (``MASK_LAYOUTS``), same polarity."""
    length, keys = mask.shape[-2:]
    if layout == "bhls":
        return mask
    if layout == "bls":
        if mask.shape[1] != 1:
            raise ValueError("a 'bls' mask is the same for every head")  # the strategies never draw one
        return np.ascontiguousarray(np.broadcast_to(mask[:, 0], (batch, length, keys)))
    if mask.shape[0] == 1 and mask.shape[1] == 1:
        return np.ascontiguousarray(mask[0, 0])
    return np.ascontiguousarray(np.broadcast_to(mask, (batch, heads, length, keys))).reshape(batch * heads, length,
                                                                                            keys)


def _framework_call(framework: str, dtype: str) -> contextlib.AbstractContextManager[Any]:
    """No autograd (torch) or x64 scoped to a float64 call (jax)."""
    if framework == "torch":
        import torch

        return torch.no_grad()
    if framework == "jax" and dtype == "float64":
        import jax

        return jax.enable_x64(True)
    return contextlib.nullcontext()


class LayerSubject:
    """What the layer properties call. Subclasses set the attributes and implement ``run``."""

    name: str
    framework: str
    #: "factory" or the instance's kind ("torch nn.MultiheadAttention instance", ...).
    kind: str
    supports: frozenset[str]
    #: The returned weights' view and dropout convention (``WEIGHTS_VIEWS``, ``WEIGHTS_DROPOUT``).
    weights_view: str = "per_head"
    weights_dropout: str = "before"
    #: How the layer takes masks (``MASK_LAYOUTS``); False when a mask is the same for every head.
    mask_layout: str = "bhls"
    #: Instances: their dims and biases (properties keep them); None for factories.
    dims: ParamDims | None = None
    biases: tuple[bool, bool, bool, bool] | None = None
    #: A layer that draws its own dropout has one probability (its setting); None: drawn.
    dropout_p: float | None = None
    #: Whether ``converted`` exists (instances: the converter's round trip).
    converts: bool = False
    #: Draw sizes from a small menu (layers that compile once per shape: jax).
    few_shapes: bool = False
    #: The layer takes one input (key and value are the query: Hugging Face attention).
    self_attention_only: bool = False
    #: One line per declared convention, for the report's title.
    declared: tuple[str, ...] = ()

    @property
    def is_instance(self) -> bool:
        return self.dims is not None

    @property
    def mask_per_head(self) -> bool:
        return self.mask_layout != "bls"

    def own_params(self, dtype: str) -> MHAParams | None:
        """An instance's own parameters in ``dtype`` (NumPy); None for a factory."""
        return None

    def run(self, call: LayerCall, *, converted: bool = False) -> RawResult:
        """Call the layer (with ``converted``: the layer the converter rebuilds from its params)."""
        raise NotImplementedError

    def round_trip_params(self, dtype: str) -> tuple[MHAParams, MHAParams]:
        """``(from_X(layer), from_X(to_X(from_X(layer))))`` as NumPy (instances)."""
        raise NotImplementedError

    def describe(self) -> str:
        return ", ".join([self.kind, *self.declared])


def _numpy_params(params: MHAParams) -> MHAParams:
    from ..layers.conversion import to_numpy

    return params.map(lambda x: np.array(to_numpy(x)))


def _cast_params(params: MHAParams, dtype: str) -> MHAParams:
    return params.map(lambda x: np.asarray(x).astype(numpy_dtype(dtype)))


# ---- factories --------------------------------------------------------------------------------------


class FactorySubject(LayerSubject):
    """A layer someone wrote, built by ``make(params)`` from drawn parameters."""

    def __init__(self, make: Callable[[MHAParams], Callable[..., Any]], *, framework: str,
                 supports: Sequence[str], returns: Sequence[str] | None, weights: str, weights_dropout: str,
                 fully_masked: str, mask_polarity: str, mask_layout: str, name: str | None = None) -> None:
        unknown = set(supports) - set(LAYER_FEATURES)
        if unknown:
            raise ValueError(f"unknown supports {sorted(unknown)}; choose from {', '.join(LAYER_FEATURES)}")
        for value, allowed, what in ((weights, WEIGHTS_VIEWS, "weights"),
                                     (weights_dropout, WEIGHTS_DROPOUT, "weights_dropout"),
                                     (fully_masked, LAYER_FULLY_MASKED, "fully_masked"),
                                     (mask_polarity, LAYER_MASK_POLARITIES, "mask_polarity"),
                                     (mask_layout, MASK_LAYOUTS, "mask_layout")):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
        self.returns = None if returns is None else tuple(returns)
        if self.returns is not None and self.returns not in (("out",), ("out", "weights")):
            raise ValueError(f"returns must be ('out',) or ('out', 'weights'), got {self.returns}")
        features = set(supports) | ({"weights"} if self.returns == ("out", "weights") else set())
        if "weights" in features and self.returns == ("out",):
            raise ValueError("supports 'weights' but returns=('out',) does not include it")
        self.make, self.framework, self.supports = make, framework, frozenset(features)
        self.backend = get_backend(framework)
        self.weights_view, self.weights_dropout, self.fully_masked = weights, weights_dropout, fully_masked
        self.mask_polarity, self.mask_layout = mask_polarity, mask_layout
        self.name = name or getattr(make, "__name__", None) or repr(make)
        self.kind = "factory"
        declared = [f"supports: {', '.join(sorted(self.supports)) or 'none'}"]
        if "weights" in self.supports:
            declared.append(f"weights: {weights}, {weights_dropout} dropout")
        if self.returns is not None:
            declared.append(f"returns: {','.join(self.returns)}")
        if {"mask", "key_padding_mask"} & self.supports:
            declared.append(f"masks: True = {mask_polarity}" + (f", {mask_layout}" if "mask" in self.supports else ""))
        declared.append(f"fully masked rows: {fully_masked}")
        self.declared = tuple(declared)

    def _array(self, x: np.ndarray) -> Any:
        return self.backend.asarray(np.ascontiguousarray(x))

    def run(self, call: LayerCall, *, converted: bool = False) -> RawResult:
        case = call.case
        with _framework_call(self.framework, case.dtype):
            params = case.params.map(self._array)
            try:
                layer = self.make(params)
            except Exception as error:
                raise LayerError(f"{self.name}(params) raised {type(error).__name__}: {error}\n  call: {call!r}") \
                    from error
            query = self._array(case.query)
            key, value = (query, query) if call.self_attention else (self._array(case.key), self._array(case.value))
            keywords = self._keywords(call)
            try:
                result = layer(query, key, value, **keywords)
            except Exception as error:
                raise LayerError(f"{self.name} raised {type(error).__name__}: {error}\n  call: {call!r}") from error
            out, weights = self._unpack(result, call)
            try:
                out_np = self.backend.to_numpy(out)
                weights_np = None if weights is None else self.backend.to_numpy(weights)
            except Exception as error:
                raise LayerError(f"{self.name} returned {type(out).__name__}, not {self.framework} arrays "
                                 f"({type(error).__name__}: {error})\n  call: {call!r}") from error
        return RawResult(out_np, weights_np, case.dropout_mask, "", self.fully_masked)

    def _keywords(self, call: LayerCall) -> dict[str, Any]:
        case, keywords = call.case, {}
        polarity = (lambda m: ~m) if self.mask_polarity == "ignore" else (lambda m: m)
        batch, heads = case.query.shape[0], case.params.wq.shape[1]
        if case.mask is not None:
            keywords["mask"] = self._array(polarity(_layout_mask(case.mask, self.mask_layout, batch, heads)))
        if case.key_padding_mask is not None:
            keywords["key_padding_mask"] = self._array(polarity(case.key_padding_mask))
        if case.causal:
            keywords["causal"] = True
        if case.dropout_mask is not None:
            keywords.update(dropout_p=case.dropout_p, dropout_mask=self._array(case.dropout_mask))
        if call.need_weights and self.returns is None:
            keywords["return_weights"] = True
        return keywords

    def _unpack(self, result: Any, call: LayerCall) -> tuple[Any, Any]:
        if self.returns is not None:
            values = tuple(result) if isinstance(result, tuple | list) else (result,)
            if len(values) != len(self.returns):
                raise LayerError(f"{self.name} returned {len(values)} values; it declares returns="
                                 f"{','.join(self.returns)}\n  call: {call!r}")
            out, weights = values[0], (values[1] if len(values) > 1 else None)
        elif call.need_weights:
            if not isinstance(result, tuple | list) or len(result) != 2:
                raise LayerError(f"{self.name} was asked for weights (return_weights=True) and returned "
                                 f"{type(result).__name__}, not (out, weights)\n  call: {call!r}")
            out, weights = result
        else:
            if isinstance(result, tuple | list):
                raise LayerError(f"{self.name} returned a {type(result).__name__} without return_weights; "
                                 f"declare returns=('out', 'weights') if it always does\n  call: {call!r}")
            out, weights = result, None
        if out is None:
            raise LayerError(f"{self.name} returned no out\n  call: {call!r}")
        if call.need_weights and weights is None:
            raise LayerError(f"{self.name} declares 'weights' but returned None for them\n  call: {call!r}")
        return out, (weights if call.need_weights else None)


# ---- torch nn.MultiheadAttention ------------------------------------------------------------------


#: torch ``nn.MultiheadAttention``'s paths (``forward``): the native fast path (eval, self-attention,
#: batch_first, no grad...), the explicit softmax when the weights are asked for, and
#: ``scaled_dot_product_attention`` otherwise; and what a fully masked row gives on each (torch 2.13,
#: CPU: NaN, NaN, and SDPA's zeros).
TORCH_MHA_PATHS = {"torch fast path": "nan", "torch need_weights path": "nan", "torch SDPA path": "zero"}


@contextlib.contextmanager
def _spy(owner: Any, name: str, calls: list[str]) -> Iterator[None]:
    """Record each call of ``owner.name`` (the original still runs and its result is returned)."""
    original = getattr(owner, name)

    def spy(*args: Any, **keywords: Any) -> Any:
        calls.append(name)
        return original(*args, **keywords)

    setattr(owner, name, spy)
    try:
        yield
    finally:
        setattr(owner, name, original)


class TorchMHASubject(LayerSubject):
    """A torch ``nn.MultiheadAttention`` instance (``attention_ref.layers.from_torch`` /
    ``to_torch``), called as people call it: ``attn_mask`` bool True = masked out, ``(L, S)`` or
    ``(N * H, L, S)`` batch-major; ``key_padding_mask`` True = padding; ``is_causal=True`` only as
    the hint it is, together with the exact causal ``attn_mask``; sequence-first unless
    ``batch_first``; ``need_weights`` as asked (weights head-averaged, after dropout); under
    ``torch.no_grad()`` so that the fast path can run (the path taken is recorded).

    Dropout: in eval mode dropout is off. With a dropout probability, the dropout properties run the
    module in train mode with ``need_weights=True`` (the path where torch applies ``F.dropout`` to
    the weights): torch draws its own keep-mask, so the checker seeds torch's generator (forked, the
    caller's RNG state is restored), reads the mask ``F.dropout`` draws from that seed for a tensor
    of the weights' shape and dtype ``(N * H, L, S)``, reseeds and calls the module; the mask is
    verified against the zeros of the per-head weights torch returns from the same seed (a mismatch
    is a checker ERROR, never a FAIL). The SDPA path's dropout (``need_weights=False``) returns no
    weights to verify a mask against and is checked in eval mode only.
    """

    converts = True

    def __init__(self, module: Any, name: str | None = None) -> None:
        from ..layers.torch_mha import from_torch

        self.module = module
        params = _numpy_params(from_torch(module))  # ConversionError for add_bias_kv, add_zero_attn
        self.dims, self.biases = ParamDims.of(params), biases_of(params)
        self.dtype = params.wq.dtype.name
        self.framework, self.mask_layout = "torch", "torch"
        self.weights_view, self.weights_dropout = "averaged", "after"
        self.dropout_p = float(module.dropout) if module.dropout > 0 else None
        self.supports = frozenset({"mask", "key_padding_mask", "causal", "weights"}
                                  | ({"dropout"} if self.dropout_p else set()))
        self.name = name or (f"nn.MultiheadAttention({module.embed_dim}, {module.num_heads}, dropout={module.dropout}, "
                             f"bias={module.in_proj_bias is not None}, batch_first={module.batch_first}"
                             + ("" if module._qkv_same_embed_dim else f", kdim={module.kdim}, vdim={module.vdim}")
                             + ")")
        self.kind = ("torch nn.MultiheadAttention instance" if type(module).__name__ == "MultiheadAttention"
                     else f"{type(module).__name__} instance (a torch nn.MultiheadAttention)")
        paths = ", ".join(f"{convention} ({path})" for path, convention in TORCH_MHA_PATHS.items())
        self.declared = ("weights: averaged, after dropout", f"fully masked rows: {paths}",
                         "train mode: dropout with torch's own draw, reproduced from a seed" if self.dropout_p
                         else "eval mode")
        self._copies: dict[str, Any] = {}

    def _copy(self, dtype: str) -> Any:
        """The module in ``dtype``: a deep copy (the instance given is never changed)."""
        if dtype not in self._copies:
            import torch

            self._copies[dtype] = copy.deepcopy(self.module).to(getattr(torch, dtype))
        return self._copies[dtype]

    def own_params(self, dtype: str) -> MHAParams:
        from ..layers.torch_mha import from_torch

        return _numpy_params(from_torch(self._copy(dtype)))

    def _loaded(self, params: MHAParams) -> Any:
        """A copy of the module holding ``params`` (built by ``to_torch``, loaded into the copy)."""
        from ..layers.torch_mha import to_torch

        module = copy.deepcopy(self._copy(params.wq.dtype.name))
        module.load_state_dict(to_torch(params, batch_first=module.batch_first).state_dict())
        return module

    def _converted(self, params: MHAParams) -> Any:
        from ..layers.torch_mha import to_torch

        return to_torch(params, batch_first=self.module.batch_first, dropout=self.module.dropout)

    def round_trip_params(self, dtype: str) -> tuple[MHAParams, MHAParams]:
        from ..layers.torch_mha import from_torch

        own = self.own_params(dtype)
        return own, _numpy_params(from_torch(self._converted(own)))

    def run(self, call: LayerCall, *, converted: bool = False) -> RawResult:
        import torch

        case = call.case
        own = self.own_params(case.dtype)
        same = all(np.array_equal(a, b) for a, b in zip(own, case.params, strict=True) if a is not None)
        if converted:
            module = self._converted(case.params)
        else:
            module = self._copy(case.dtype) if same else self._loaded(case.params)
        backend = get_backend("torch")
        query = backend.asarray(case.query)
        key, value = (query, query) if call.self_attention else (backend.asarray(case.key),
                                                                  backend.asarray(case.value))
        batch, heads = case.query.shape[0], case.params.wq.shape[1]
        keywords: dict[str, Any] = {}
        if case.mask is not None or case.causal:
            allowed = np.ones((1, 1, case.query.shape[1], case.key.shape[1]), bool) if case.mask is None else case.mask
            if case.causal:
                allowed = allowed & case.attention_case().positional_pattern()
                keywords["is_causal"] = case.mask is None  # the hint, with the exact causal mask
            keywords["attn_mask"] = backend.asarray(~_layout_mask(allowed, "torch", batch, heads))
        if case.key_padding_mask is not None:
            keywords["key_padding_mask"] = backend.asarray(~case.key_padding_mask)
        if not module.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
            if call.self_attention:
                key = value = query
        training = case.dropout_mask is not None
        if training and case.dropout_p != module.dropout:
            raise ValueError(f"the module's dropout is {module.dropout}, not {case.dropout_p}")  # a checker bug
        module.train(training)
        calls: list[str] = []
        keep = None
        try:
            with torch.no_grad(), _spy(torch, "_native_multi_head_attention", calls):
                if training:
                    out, weights, keep = self._train_call(module, query, key, value, keywords, call)
                else:
                    out, weights = module(query, key, value, need_weights=call.need_weights, **keywords)
        except Exception as error:
            raise LayerError(f"{self.name} raised {type(error).__name__}: {error}\n  call: {call!r}") from error
        finally:
            module.eval()
        if not module.batch_first:
            out = out.transpose(0, 1)
        path = "torch fast path" if calls else ("torch need_weights path" if call.need_weights or training
                                                else "torch SDPA path")
        return RawResult(backend.to_numpy(out), None if weights is None or not call.need_weights
                         else backend.to_numpy(weights), keep, path, TORCH_MHA_PATHS[path])

    def _train_call(self, module: Any, query: Any, key: Any, value: Any, keywords: dict[str, Any],
                    call: LayerCall) -> tuple[Any, Any, np.ndarray]:
        """Train mode: torch's own dropout draw, reproduced from a seed and verified (class docstring)."""
        import torch

        from .runner import CheckerError

        case = call.case
        batch, length, keys = case.query.shape[0], case.query.shape[1], case.key.shape[1]
        heads, p = case.params.wq.shape[1], module.dropout
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(call.dropout_seed)
            ones = torch.ones(batch * heads, length, keys, dtype=module.out_proj.weight.dtype)
            keep = (torch.nn.functional.dropout(ones, p=p) != 0).reshape(batch, heads, length, keys).numpy()
            torch.manual_seed(call.dropout_seed)
            _, per_head = module(query, key, value, need_weights=True, average_attn_weights=False, **keywords)
            torch.manual_seed(call.dropout_seed)
            out, weights = module(query, key, value, need_weights=True, **keywords)
        seen = get_backend("torch").to_numpy(per_head).astype(np.float64)
        with np.errstate(invalid="ignore"):
            wrong = ~np.isnan(seen) & (((seen != 0) & ~keep) | ((seen == 0) & keep & (case.oracle().weights > 0.5)))
        if wrong.any():
            raise CheckerError(f"torch's dropout draw could not be reproduced from the seed ({int(wrong.sum())} of "
                               f"{wrong.size} weights disagree with the keep-mask F.dropout draws)\n  call: {call!r}")
        return out, weights, keep


# ---- flax -----------------------------------------------------------------------------------------


class FlaxSubject(LayerSubject):
    """A flax ``nnx.MultiHeadAttention`` instance, or a linen ``MultiHeadDotProductAttention`` given as
    ``(module, variables)`` (``attention_ref.layers.from_flax`` / ``to_flax``). Called with
    ``deterministic=True`` (eval: flax draws its own dropout from its rngs, which the checker does not
    reproduce); ``mask`` is flax's own (bool, True = attend, broadcast to ``(B, H, L, S)``); causal is
    nnx's ``is_causal=True`` (linen has none: the causal pattern is ANDed into the mask, as
    ``nn.make_causal_mask`` would); weights through ``sow_weights=True`` (per head, before dropout).
    No key padding mask (flax takes none). A fully masked row gives the mean of the values (flax fills
    masked logits with a finite value). float64 runs under a scoped ``jax.enable_x64``."""

    converts = True
    few_shapes = True

    def __init__(self, layer: Any, name: str | None = None) -> None:
        from ..layers.flax_mha import from_flax

        self.linen = isinstance(layer, tuple)
        self.module: Any = layer[0] if self.linen else layer
        self.variables: Any = layer[1] if self.linen else None
        params = _numpy_params(from_flax(self.variables if self.linen else self.module))
        self.params = params
        self.dims, self.biases = ParamDims.of(params), biases_of(params)
        self.framework, self.mask_layout = "jax", "bhls"
        self.supports = frozenset({"mask", "causal", "weights"})
        self.fully_masked = "mean_v"
        kind = "linen MultiHeadDotProductAttention" if self.linen else "nnx.MultiHeadAttention"
        d = self.dims
        self.name = name or f"{kind}(num_heads={d.heads}, qkv_features={d.heads * d.head_dim}, in={d.d_q})"
        self.kind = f"flax {kind} {'(module, variables)' if self.linen else 'instance'}"
        self.declared = ("weights: per head, before dropout (sow_weights)", "fully masked rows: mean_v",
                         "eval mode (deterministic=True)")

    def own_params(self, dtype: str) -> MHAParams:
        return _cast_params(self.params, dtype)

    def round_trip_params(self, dtype: str) -> tuple[MHAParams, MHAParams]:
        from ..layers.flax_mha import from_flax, to_flax

        own = self.own_params(dtype)
        with _framework_call("jax", dtype):
            if self.linen:
                return own, _numpy_params(from_flax(to_flax(own, kind="linen")[1]))
            return own, _numpy_params(from_flax(to_flax(own, kind="nnx")))

    def _layer(self, params: MHAParams, converted: bool) -> tuple[Any, Any]:
        """``(module, variables)`` holding params: the converter's layer, or (nnx) a clone of the
        instance with the converter's parameters loaded."""
        from flax import nnx

        from ..layers.flax_mha import to_flax

        if self.linen:
            module, variables = to_flax(params, kind="linen")
            return (module if converted else self.module), variables
        fresh = to_flax(params, kind="nnx")
        if converted:
            return fresh, None
        clone = nnx.clone(self.module)
        nnx.update(clone, nnx.state(fresh, nnx.Param))
        return clone, None

    def run(self, call: LayerCall, *, converted: bool = False) -> RawResult:
        import jax.numpy as jnp

        case = call.case
        backend = get_backend("jax")
        with _framework_call("jax", case.dtype):
            module, variables = self._layer(case.params, converted)
            query = backend.asarray(case.query)
            key, value = (query, query) if call.self_attention else (backend.asarray(case.key),
                                                                      backend.asarray(case.value))
            mask = case.mask
            keywords: dict[str, Any] = {"deterministic": True, "sow_weights": call.need_weights}
            if case.causal and self.linen:
                pattern = case.attention_case().positional_pattern()
                mask = pattern[None, None] if mask is None else mask & pattern
            elif case.causal:
                keywords["is_causal"] = True
            if mask is not None:
                keywords["mask"] = jnp.asarray(mask)
            try:
                weights = None
                if self.linen:
                    with warnings.catch_warnings():  # linen's guess that a value with S == d_v is a mask
                        warnings.filterwarnings("ignore", message="You are passing an array of shape",
                                                category=DeprecationWarning)
                        out, state = module.apply(variables, query, key, value, mutable=["intermediates"], **keywords)
                    if call.need_weights:
                        weights = _find(state, "attention_weights")
                elif call.need_weights:
                    from flax import nnx

                    if hasattr(nnx, "capture"):  # flax >= 0.12.7: sow outside capture is deprecated
                        out, intermediates = nnx.capture(module, nnx.Intermediate)(query, key, value, **keywords)
                    else:  # pragma: no cover - older flax
                        out = module(query, key, value, **keywords)
                        intermediates = nnx.pop(module, nnx.Intermediate)
                    weights = _find(intermediates, "attention_weights")
                else:
                    out = module(query, key, value, **keywords)
            except Exception as error:
                raise LayerError(f"{self.name} raised {type(error).__name__}: {error}\n  call: {call!r}") from error
            return RawResult(backend.to_numpy(out), None if weights is None else backend.to_numpy(weights), None,
                             "", self.fully_masked)


def _find(tree: Any, name: str) -> Any:
    """The first array sown under ``name`` in a (nested) flax state or dict of intermediates."""
    items = tree.items() if hasattr(tree, "items") else ()
    for key, value in items:
        if key == name:
            found = value.get_value() if hasattr(value, "get_value") else value  # an nnx Variable, or linen's tuple
            return found[0] if isinstance(found, tuple | list) else found
        inner = _find(value, name)
        if inner is not None:
            return inner
    return None


# ---- keras ----------------------------------------------------------------------------------------


#: keras' paths: the fused ``ops.dot_product_attention`` (no scores asked, no dropout) and the
#: explicit softmax when the scores are returned; what a fully masked row gives on each.
KERAS_PATHS = {"keras fused path": "mean_v", "keras scores path": "zero"}


class KerasSubject(LayerSubject):
    """A keras ``MultiHeadAttention`` or ``GroupQueryAttention`` (``attention_ref.layers.from_keras``
    / ``to_keras``), on its backend (jax or torch), called in keras' order ``layer(query, value,
    key)`` with ``attention_mask`` ``(B, L, S)`` (True = attend; one mask for every head),
    ``value_mask`` ``(B, S)`` (the key padding, True = a real token), ``use_causal_mask`` and
    ``return_attention_scores`` (per-head scores, before dropout), ``training=False`` (keras draws its
    own dropout). Copies are rebuilt from the layer's config (its class and settings) with the
    converter's weights."""

    converts = True

    def __init__(self, layer: Any, name: str | None = None) -> None:
        import keras

        from ..layers.keras_mha import from_keras

        params = _numpy_params(from_keras(layer))
        self.layer, self.params = layer, params
        self.dims, self.biases = ParamDims.of(params), biases_of(params)
        self.framework = keras.backend.backend()
        if self.framework not in ("jax", "torch"):
            raise ValueError(f"keras on the {self.framework} backend: check_layer runs keras on jax or torch")
        self.few_shapes = self.framework == "jax"
        self.mask_layout = "bls"
        self.supports = frozenset({"mask", "key_padding_mask", "causal", "weights"})
        d = self.dims
        self.name = name or f"keras {type(layer).__name__}(heads={d.heads}, kv_heads={d.kv_heads}, hd={d.head_dim})"
        self.kind = f"keras {type(layer).__name__} instance ({self.framework} backend)"
        paths = ", ".join(f"{convention} ({path})" for path, convention in KERAS_PATHS.items())
        self.declared = ("weights: per head, before dropout", f"fully masked rows: {paths}",
                         "inference (training=False)")

    def own_params(self, dtype: str) -> MHAParams:
        return _cast_params(self.params, dtype)

    def round_trip_params(self, dtype: str) -> tuple[MHAParams, MHAParams]:
        from ..layers.keras_mha import from_keras, to_keras

        own = self.own_params(dtype)
        with _framework_call(self.framework, dtype):
            return own, _numpy_params(from_keras(to_keras(own)))

    def _layer(self, params: MHAParams, converted: bool) -> Any:
        from ..layers.keras_mha import to_keras

        fresh = to_keras(params, dropout=float(self.layer.get_config().get("dropout", 0.0)))
        if converted:
            return fresh
        config = dict(self.layer.get_config(), dtype=params.wq.dtype.name)
        clone = type(self.layer).from_config(config)
        d = ParamDims.of(params)
        clone.build((None, None, d.d_q), (None, None, d.d_v), (None, None, d.d_k))
        from ..layers.conversion import to_numpy

        clone.set_weights([np.array(to_numpy(w.value)) for w in fresh.weights])
        return clone

    def run(self, call: LayerCall, *, converted: bool = False) -> RawResult:
        case = call.case
        backend = get_backend(self.framework)
        with _framework_call(self.framework, case.dtype):
            layer = self._layer(case.params, converted)
            query = backend.asarray(case.query)
            key, value = (query, query) if call.self_attention else (backend.asarray(case.key),
                                                                      backend.asarray(case.value))
            keywords: dict[str, Any] = {"training": False, "use_causal_mask": case.causal,
                                        "return_attention_scores": call.need_weights}
            batch = case.query.shape[0]
            if case.mask is not None:
                keywords["attention_mask"] = backend.asarray(_layout_mask(case.mask, "bls", batch, 1))
            if case.key_padding_mask is not None:
                keywords["value_mask"] = backend.asarray(case.key_padding_mask)
            try:
                with warnings.catch_warnings():  # keras warns of its own softmax over one key (S = 1)
                    warnings.filterwarnings("ignore", message="You are using a softmax over axis", category=UserWarning)
                    result = layer(query, value, key, **keywords)  # keras' order: (query, value, key)
            except Exception as error:
                raise LayerError(f"{self.name} raised {type(error).__name__}: {error}\n  call: {call!r}") from error
            out, weights = result if call.need_weights else (result, None)
            path = "keras scores path" if call.need_weights else "keras fused path"
            return RawResult(backend.to_numpy(out), None if weights is None else backend.to_numpy(weights), None,
                             path, KERAS_PATHS[path])


# ---- Hugging Face ---------------------------------------------------------------------------------


#: What a fully masked row gives per attention implementation: eager adds a finfo.min mask (a finite
#: fill: the mean of the values), sdpa takes a bool mask (SDPA's zeros).
HF_FULLY_MASKED = {"eager": "mean_v", "sdpa": "zero"}


class HFAttentionSubject(LayerSubject):
    """A Hugging Face Llama-style attention module (``LlamaAttention``, ``Qwen2Attention``;
    ``attention_ref.layers.from_hf`` / ``to_hf``): self-attention only (key = value = query), called
    as ``module(hidden_states, position_embeddings=(ones, zeros), attention_mask=...)`` with identity
    RoPE (cos = 1, sin = 0) in eval mode. The 4-D mask the layer receives is what HF's mask
    utilities build: for ``eager`` an additive float mask (0 where attended, ``finfo(dtype).min``
    elsewhere), for ``sdpa`` a bool mask (True = attend); causal is folded into it, as HF does. An
    explicit mask is always passed: with ``attention_mask=None`` the sdpa path is causal (SDPA's
    ``is_causal`` from ``module.is_causal``) and eager is not. Weights (eager only): per head, after
    dropout."""

    converts = True
    self_attention_only = True

    def __init__(self, module: Any, name: str | None = None) -> None:
        from ..layers.hf_attention import from_hf

        params = _numpy_params(from_hf(module))
        self.module, self.params = module, params
        self.dims, self.biases = ParamDims.of(params), biases_of(params)
        self.implementation = module.config._attn_implementation or "eager"
        if self.implementation not in HF_FULLY_MASKED:
            raise ValueError(f"{type(module).__name__} with attn_implementation={self.implementation!r}: check_layer "
                             f"takes eager or sdpa")
        self.framework, self.mask_layout = "torch", "bhls"
        self.supports = frozenset({"mask", "causal"} | ({"weights"} if self.implementation == "eager" else set()))
        self.weights_dropout = "after"
        d = self.dims
        self.name = name or (f"{type(module).__name__}(hidden={d.d_q}, heads={d.heads}, kv_heads={d.kv_heads}, "
                             f"head_dim={d.head_dim}, {self.implementation})")
        self.kind = f"Hugging Face {type(module).__name__} instance ({self.implementation})"
        self.declared = (f"fully masked rows: {HF_FULLY_MASKED[self.implementation]}",
                         "an explicit attention_mask on every call (sdpa is causal without one)",
                         "identity RoPE, eval mode")
        self._copies: dict[str, Any] = {}

    def own_params(self, dtype: str) -> MHAParams:
        return _cast_params(self.params, dtype)

    def _copy(self, dtype: str) -> Any:
        if dtype not in self._copies:
            import torch

            self._copies[dtype] = copy.deepcopy(self.module).to(getattr(torch, dtype)).eval()
        return self._copies[dtype]

    def _converted(self, params: MHAParams) -> Any:
        from ..layers.hf_attention import to_hf

        return to_hf(params, config_class=type(self.module.config), attn_implementation=self.implementation).eval()

    def round_trip_params(self, dtype: str) -> tuple[MHAParams, MHAParams]:
        from ..layers.hf_attention import from_hf

        own = self.own_params(dtype)
        return own, _numpy_params(from_hf(self._converted(own)))

    def run(self, call: LayerCall, *, converted: bool = False) -> RawResult:
        import torch

        case = call.case
        if not call.self_attention:
            raise ValueError("HF attention is self-attention: the call must be one")  # a checker bug
        if converted:
            module = self._converted(case.params)
        else:
            module = copy.deepcopy(self._copy(case.dtype))
            module.load_state_dict(self._converted(case.params).state_dict())
        backend = get_backend("torch")
        hidden = backend.asarray(case.query)
        batch, length = case.query.shape[:2]
        head_dim = case.params.wq.shape[2]
        dtype = hidden.dtype
        identity = (torch.ones(batch, length, head_dim, dtype=dtype), torch.zeros(batch, length, head_dim, dtype=dtype))
        allowed = np.ones((batch, 1, length, length), bool) if case.mask is None else case.mask
        if case.causal:
            allowed = allowed & case.attention_case().positional_pattern()
        mask = torch.from_numpy(np.ascontiguousarray(allowed))
        if self.implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        try:
            with torch.no_grad():
                out, weights = module(hidden, position_embeddings=identity, attention_mask=mask)
        except Exception as error:
            raise LayerError(f"{self.name} raised {type(error).__name__}: {error}\n  call: {call!r}") from error
        return RawResult(backend.to_numpy(out), None if weights is None or not call.need_weights
                         else backend.to_numpy(weights), None, f"HF {self.implementation}",
                         HF_FULLY_MASKED[self.implementation])


# ---- dispatch -------------------------------------------------------------------------------------


def _loaded_type(module: str, *names: str) -> type | None:
    value: Any = sys.modules.get(module)
    for name in names:
        value = getattr(value, name, None)
    return value if isinstance(value, type) else None


@dataclass
class SubjectOptions:
    """``check_layer``'s declarations for a factory (instances declare their own)."""

    framework: str | None = None
    supports: Sequence[str] | None = None
    returns: Sequence[str] | None = None
    weights: str | None = None
    weights_dropout: str | None = None
    fully_masked: str | None = None
    mask_polarity: str | None = None
    mask_layout: str | None = None
    name: str | None = None
    given: dict[str, Any] = field(default_factory=dict)


def layer_subject(layer: Any, options: SubjectOptions) -> LayerSubject:
    """The subject for ``layer``: an instance of a framework layer the checker knows (its adapter
    declares everything: declaring conventions for it is a ValueError), else a factory ``make(params)``
    (``framework`` required)."""
    instance = _instance_subject(layer, options.name)
    if instance is not None:
        if options.given:
            raise ValueError(f"{instance.name} is a {instance.kind}: its adapter declares its features and "
                             f"conventions; {', '.join(sorted(options.given))} apply to factories only")
        if options.framework is not None and options.framework != instance.framework:
            raise ValueError(f"{instance.name} is a {instance.framework} layer, not {options.framework}")
        return instance
    if options.framework is None:
        raise ValueError("a layer factory make(params) needs framework= ('torch', 'jax' or 'numpy')")
    if not callable(layer):
        raise TypeError(f"check_layer takes a layer instance (torch nn.MultiheadAttention, flax nnx or linen "
                        f"MultiHeadAttention, keras MultiHeadAttention or GroupQueryAttention, Hugging Face "
                        f"LlamaAttention) or a factory make(params), got {type(layer).__name__}")
    return FactorySubject(layer, framework=options.framework, supports=options.supports or (),
                          returns=options.returns, weights=options.weights or "per_head",
                          weights_dropout=options.weights_dropout or "before",
                          fully_masked=options.fully_masked or "zero", mask_polarity=options.mask_polarity or "attend",
                          mask_layout=options.mask_layout or "bhls", name=options.name)


def _instance_subject(layer: Any, name: str | None) -> LayerSubject | None:
    """The adapter of a framework layer the checker knows; frameworks are looked up in
    ``sys.modules``, never imported."""
    torch_mha = _loaded_type("torch", "nn", "MultiheadAttention")
    if torch_mha is not None and isinstance(layer, torch_mha):
        return TorchMHASubject(layer, name)
    nnx_mha = _loaded_type("flax.nnx", "MultiHeadAttention")
    if nnx_mha is not None and isinstance(layer, nnx_mha):
        return FlaxSubject(layer, name)
    linen_mha = _loaded_type("flax.linen", "MultiHeadDotProductAttention")
    if linen_mha is not None and isinstance(layer, tuple) and len(layer) == 2 and isinstance(layer[0], linen_mha):
        return FlaxSubject(layer, name)
    keras_layers = [_loaded_type("keras", "layers", n) for n in ("MultiHeadAttention", "GroupQueryAttention")]
    if any(t is not None and isinstance(layer, t) for t in keras_layers):
        return KerasSubject(layer, name)
    torch_module = _loaded_type("torch", "nn", "Module")
    if (torch_module is not None and isinstance(layer, torch_module) and "transformers" in sys.modules
            and all(hasattr(layer, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "config"))):
        return HFAttentionSubject(layer, name)
    return None
