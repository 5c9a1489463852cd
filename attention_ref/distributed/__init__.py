"""Attention across devices (issue 14): sequence layouts as permutations with global positions
(``layouts``). Importing this package imports neither jax nor torch."""

from __future__ import annotations

from . import layouts

__all__ = ["layouts"]
