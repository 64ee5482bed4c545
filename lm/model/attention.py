"""The kernels `model.attention` and `model.layernorm` select, and where each can run.

Attention functions share one interface, fn(q, k, v, *, causal, dropout_p, mask=None, segments=None), over
(B, H, T, D) queries and (B, Hkv, S, D) keys and values. Triton and our kernels are imported only when selected, so a PyTorch-only run never needs them.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm.config.schema import ModelConfig


def sdpa_attention(q, k, v, *, causal: bool, dropout_p: float, mask=None, segments=None):
    """(B, H, T, D) queries against (B, Hkv, S, D) keys/values (Hkv divides H: grouped-query attention);
    with causal and S > T the queries are the last T positions (a KV cache prefix sits before them).
    `mask` (bool, True = attend), when given, already holds the causal structure (batched generation with
    padding). `segments` (B, T) document ids: a token attends only inside its own document."""
    T, S = q.size(-2), k.size(-2)
    gqa = {"enable_gqa": True} if k.size(1) != q.size(1) else {}
    if segments is not None:
        same = segments[:, None, :, None] == segments[:, None, None, :]
        mask = same & torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)
    if not causal or T == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **gqa)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, **gqa)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)


def triton_attention(q, k, v, *, causal: bool, dropout_p: float, mask=None, segments=None):
    """Our fused flash-attention kernel (kernels/), grouped K/V heads and document segments included;
    generation with a KV cache or padding uses SDPA."""
    if q.size(-2) != k.size(-2) or mask is not None:
        return sdpa_attention(q, k, v, causal=causal, dropout_p=dropout_p, mask=mask)
    from lm.kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, segments=segments)


# name -> attention function, chosen by model.attention.
ATTENTION = {"sdpa": sdpa_attention, "triton": triton_attention}


def make_norm(cfg: ModelConfig, size: int | None = None, kind: str | None = None) -> nn.Module:
    """A `kind` norm (default model.norm) over `size` features (default n_embd): LayerNorm or RMSNorm, from
    torch or our fused Triton kernel (model.layernorm); parameter names match across kernels, so
    checkpoints interchange."""
    size = size or cfg.n_embd
    if (kind or cfg.norm) == "rmsnorm":
        if cfg.layernorm == "triton":
            from lm.kernels.layer_norm import TritonRMSNorm

            return TritonRMSNorm(size, eps=cfg.norm_eps)
        return nn.RMSNorm(size, eps=cfg.norm_eps)
    if cfg.layernorm == "triton":
        from lm.kernels.layer_norm import TritonLayerNorm

        return TritonLayerNorm(size, eps=cfg.norm_eps, bias=cfg.bias)
    return nn.LayerNorm(size, eps=cfg.norm_eps, bias=cfg.bias)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm and RMSNorm of either kernel (the Triton ones subclass or mirror torch's)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__ == "TritonRMSNorm"


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
