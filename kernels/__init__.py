"""Triton kernels (fused attention, fused LayerNorm): selected from the model config."""
