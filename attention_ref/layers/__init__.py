"""The multi-head attention layer: its parameters (:class:`MHAParams`), the head-averaged weights
torch returns, and exact converters from and to the layers of torch, flax, keras and Hugging Face.

``attention_ref.multi_head_attention`` runs the layer. Importing this package imports no framework;
each converter imports its framework when called.

Converters (each exact, both ways; anything a target cannot hold raises :class:`ConversionError`):
``from_torch``/``to_torch`` and ``from_torch_masks`` (torch ``nn.MultiheadAttention``),
``from_flax``/``to_flax`` (flax nnx and linen), ``from_keras``/``to_keras`` (keras
``MultiHeadAttention``, ``GroupQueryAttention``), ``from_hf``/``to_hf`` (Hugging Face Llama-style
attention).
"""

from __future__ import annotations

from .conversion import ConversionError
from .flax_mha import from_flax, to_flax
from .hf_attention import from_hf, to_hf
from .keras_mha import from_keras, to_keras
from .params import MHAParams, average_weights
from .torch_mha import from_torch, from_torch_masks, to_torch

__all__ = [
    "ConversionError",
    "MHAParams",
    "average_weights",
    "from_flax",
    "from_hf",
    "from_keras",
    "from_torch",
    "from_torch_masks",
    "to_flax",
    "to_hf",
    "to_keras",
    "to_torch",
]
