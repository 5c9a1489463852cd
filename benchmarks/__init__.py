"""Measurements of attention_ref (agreement, gradients, speed, the checker), each run from the
repository root as ``python -m benchmarks.NAME``."""
