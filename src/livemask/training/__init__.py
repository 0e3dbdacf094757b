"""Synthetic training data and training loops (needs the ``train`` extra: torch, onnx)."""
