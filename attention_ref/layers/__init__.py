"""The multi-head attention layer: its parameters (:class:`MHAParams`), the head-averaged weights
torch returns, and exact converters from and to the layers of torch, flax, keras and Hugging Face.

``attention_ref.multi_head_attention`` runs the layer. Importing this package imports no framework;
each converter imports its framework when called.
"""

from __future__ import annotations

from .params import MHAParams, average_weights

__all__ = ["MHAParams", "average_weights"]
