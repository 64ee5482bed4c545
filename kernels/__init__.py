"""Triton kernels (fused attention, fused LayerNorm): selected from the model config.

Import from the submodules (`kernels.flash_attention`, `kernels.layer_norm`): they import Triton, this
package does not, so the rest of lm/ works without it.
"""
