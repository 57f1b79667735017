"""Fused compute kernels for the pruning hot path (the torch path in `select.py` is the reference)."""
