"""The framework layers that ``attention-ref crosscheck`` checks with ``check_layer``, as crosscheck
targets (:class:`LayerTarget`, a :class:`~attention_ref.testing.adapters.Target` whose ``kernel``
builds the layer): each runs in a worker process like the kernels and gets its own matrix, a row per
layer property.

Targets (``layer_targets(device)``, CPU only, each when its framework is installed), small layers
(8 features, 2 or 4 heads) so that the whole default crosscheck stays within its time:

* ``torch nn.MultiheadAttention``: eval mode, called as people call it (the fast path, the
  ``need_weights`` path and the SDPA path, whichever torch takes; the path is named in the evidence);
* ``torch MHA is_causal hint``: a layer that passes its mask as ``attn_mask`` *and*
  ``is_causal=True`` with ``need_weights=False``, as the argument's name invites: torch then replaces
  the mask by a causal one (a documented hint, reported as found);
* ``flax nnx.MultiHeadAttention`` (GQA, ``num_kv_heads=1``) and ``flax linen
  MultiHeadDotProductAttention``;
* ``keras MultiHeadAttention`` and ``keras GroupQueryAttention`` on keras' jax backend (their own
  worker: ``KERAS_BACKEND`` is read once, at import);
* ``HF LlamaAttention[eager]`` and ``[sdpa]`` (GQA; identity RoPE).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..layers.params import MHAParams
from .adapters import Target
from .report import PropertyOutcome, Status

#: The layer dims of the built-in instances.
FEATURES, HEADS = 8, 2


@dataclass(frozen=True)
class LayerTarget(Target):
    """A framework layer: ``kernel()`` builds the instance (or, with ``declarations``, ``kernel`` is a
    factory ``make(params)`` and ``declarations`` are ``check_layer``'s keywords for it)."""

    declarations: tuple[tuple[str, Any], ...] = ()

    def plan(self, dtypes: Sequence[str], properties: Sequence[str] | None = None) -> list[PropertyOutcome]:
        """Every layer property, ERROR until it has run (applicability is known once the layer is
        built, in the worker), or "not run"."""
        from .layer_properties import LAYER_PROPERTIES

        return [PropertyOutcome(prop.name, prop.rules,
                                Status.NOT_RUN if properties is not None and prop.name not in properties
                                else Status.ERROR) for prop in LAYER_PROPERTIES]

    def run(self, *, dtypes: Sequence[str], max_examples: int, seed: int | None,
            properties: Sequence[str] | None = None, plot_dir: str | None = None) -> Any:
        """``check_layer`` of the layer (a ``CheckReport``); ``plot_dir`` is ignored (a layer case has
        no picture)."""
        from .layer_check import check_layer

        if self.declarations:
            return check_layer(self.kernel, framework=self.framework, dtypes=dtypes, max_examples=max_examples,
                               seed=seed, properties=properties, name=self.name, **dict(self.declarations))
        return check_layer(self.kernel(), dtypes=dtypes, max_examples=max_examples, seed=seed,
                           properties=properties, name=self.name)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# ---- torch -----------------------------------------------------------------------------------------


def torch_mha() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.MultiheadAttention(FEATURES, HEADS, batch_first=True).eval()


def torch_mha_is_causal_hint(params: MHAParams) -> Any:
    """torch MHA called with the mask as ``attn_mask`` and ``is_causal=True`` for a causal call
    (``need_weights=False``); without a mask, the causal mask itself (torch requires one)."""
    import torch

    from ..layers.torch_mha import to_torch

    module = to_torch(params, batch_first=True).eval()

    def layer(query: Any, key: Any, value: Any, *, mask: Any = None, causal: bool = False) -> Any:
        if causal and mask is None:
            mask = torch.ones(query.shape[1], key.shape[1], dtype=torch.bool).triu(1)  # True = masked out
        return module(query, key, value, attn_mask=mask, is_causal=causal, need_weights=False)[0]

    return layer


def torch_layer_targets(device: str) -> list[Target]:
    if device != "cpu" or not _installed("torch"):
        return []
    targets: list[Target] = [
        LayerTarget("torch nn.MultiheadAttention", "torch", torch_mha, (), dtypes=("float16", "bfloat16", "float32",
                                                                                 "float64"), cost=30.0),
        LayerTarget("torch MHA is_causal hint", "torch", torch_mha_is_causal_hint, ("mask", "causal"), cost=10.0,
                    declarations=(("supports", ("mask", "causal")), ("mask_polarity", "ignore"),
                                  ("mask_layout", "torch")),
                    notes=("attn_mask=the mask, is_causal=True, need_weights=False: torch's SDPA path replaces "
                           "the mask by the causal one",)),
    ]
    if _installed("transformers"):
        targets += [LayerTarget(f"HF LlamaAttention[{implementation}]", "torch", builder, (), cost=20.0,
                                dtypes=("float16", "bfloat16", "float32", "float64"))
                    for implementation, builder in (("eager", hf_llama_eager), ("sdpa", hf_llama_sdpa))]
    return targets


def _hf_llama(implementation: str) -> Any:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=FEATURES, num_attention_heads=4, num_key_value_heads=2, head_dim=2,
                         attn_implementation=implementation)
    return LlamaAttention(config, layer_idx=0)


def hf_llama_eager() -> Any:
    return _hf_llama("eager")


def hf_llama_sdpa() -> Any:
    return _hf_llama("sdpa")


# ---- flax --------------------------------------------------------------------------------------------


def flax_nnx() -> Any:
    from flax import nnx

    return nnx.MultiHeadAttention(num_heads=HEADS, in_features=FEATURES, num_kv_heads=1, decode=False,
                                  rngs=nnx.Rngs(0))


def flax_linen() -> Any:
    import jax
    from flax import linen

    module = linen.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=FEATURES)
    return module, module.init(jax.random.key(0), jax.numpy.ones((1, 1, FEATURES)))


def flax_layer_targets(device: str) -> list[Target]:
    if device != "cpu" or not _installed("flax"):
        return []
    return [LayerTarget("flax nnx.MultiHeadAttention", "jax", flax_nnx, (), cost=40.0,
                        dtypes=("float16", "bfloat16", "float32", "float64")),
            LayerTarget("flax linen MultiHeadDotProductAttention", "jax", flax_linen, (), cost=40.0,
                        dtypes=("float16", "bfloat16", "float32", "float64"))]


# ---- keras -------------------------------------------------------------------------------------------


def keras_mha() -> Any:
    import keras

    keras.utils.set_random_seed(0)
    layer = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=FEATURES // HEADS)
    layer.build((None, None, FEATURES), (None, None, FEATURES))
    return layer


def keras_gqa() -> Any:
    import keras

    keras.utils.set_random_seed(0)
    layer = keras.layers.GroupQueryAttention(head_dim=2, num_query_heads=4, num_key_value_heads=2)
    layer.build((None, None, FEATURES), (None, None, FEATURES))
    return layer


def keras_layer_targets(device: str) -> list[Target]:
    if device != "cpu" or not (_installed("keras") and _installed("jax")):
        return []
    environment = (("KERAS_BACKEND", "jax"),)
    return [LayerTarget(f"keras {name}[jax]", "jax", builder, (), cost=40.0, environment=environment,
                        dtypes=("float16", "bfloat16", "float32", "float64"))
            for name, builder in (("MultiHeadAttention", keras_mha), ("GroupQueryAttention", keras_gqa))]


#: The builders of the layer targets, in the crosscheck's column order.
LAYER_TARGET_BUILDERS = (
    "attention_ref.testing.layer_targets:torch_layer_targets",
    "attention_ref.testing.layer_targets:flax_layer_targets",
    "attention_ref.testing.layer_targets:keras_layer_targets",
)
