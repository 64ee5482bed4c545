"""The kernels `model.attention` and `model.layernorm` select, and where each can run.

Attention functions share one interface, fn(q, k, v, *, causal, dropout_p, mask=None), over (B, H, T, D)
tensors. Triton and our kernels are imported only when selected, so a PyTorch-only run never needs them.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm.config import ModelConfig


def sdpa_attention(q, k, v, *, causal: bool, dropout_p: float, mask=None):
    """(B, H, T, D) queries against (B, H, S, D) keys/values; with causal and S > T the queries are the
    last T positions (a KV cache prefix sits before them). `mask` (bool, True = attend), when given,
    already holds the causal structure (batched generation with padding)."""
    T, S = q.size(-2), k.size(-2)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if not causal or T == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def triton_attention(q, k, v, *, causal: bool, dropout_p: float, mask=None):
    """Our fused flash-attention kernel (kernels/); generation with a KV cache or padding uses SDPA."""
    if q.size(-2) != k.size(-2) or mask is not None:
        return sdpa_attention(q, k, v, causal=causal, dropout_p=dropout_p, mask=mask)
    from kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, causal=causal, dropout_p=dropout_p)


# name -> attention function, chosen by model.attention.
ATTENTION = {"sdpa": sdpa_attention, "triton": triton_attention}


def make_layernorm(cfg: ModelConfig) -> nn.Module:
    """nn.LayerNorm, or our fused Triton LayerNorm (same parameter names, so checkpoints interchange)."""
    if cfg.layernorm == "triton":
        from kernels.layer_norm import TritonLayerNorm

        return TritonLayerNorm(cfg.n_embd, bias=cfg.bias)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


def triton_runs_on(device: torch.device) -> bool:
    """Triton compiles for CUDA (and ROCm, which torch also calls cuda); a CPU runs its kernels only in
    the interpreter, which must be switched on before triton is imported."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def inference_backends(cfg: ModelConfig, device: torch.device | str) -> ModelConfig:
    """`cfg` for a model that will run on `device`: where Triton cannot run, a copy with the PyTorch
    attention and LayerNorm (their parameters are the same, so the weights load and the logits agree),
    said in one line on stderr."""
    wanted = {key: value for key, value in (("attention", "sdpa"), ("layernorm", "torch"))
              if getattr(cfg, key) == "triton"}
    device = torch.device(device)
    if not wanted or triton_runs_on(device):
        return cfg
    keys = " and ".join(f"model.{key} = 'triton'" for key in wanted)
    instead = " and ".join(repr(value) for value in wanted.values())
    print(f"note: {keys} cannot run on {device.type} here (Triton needs CUDA, or "
          f"TRITON_INTERPRET=1 on a CPU); using {instead} instead, with the same weights", file=sys.stderr)
    return dataclasses.replace(cfg, **wanted)
