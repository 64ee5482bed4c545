"""Int8 for CPU sampling (`sample.py --int8`): every nn.Linear, the output head included, becomes PyTorch's
dynamically quantized Linear (fbgemm / x86 engine): int8 weights with one scale per output row (symmetric),
and each call quantizes its input to uint8 on the fly (one scale per call) so the matmul runs in integer
arithmetic with int32 accumulation. At batch 1 that reads a quarter of fp32's weight bytes through a fast
integer kernel: faster than fp32 (bench/generate.py prints the ratio), where the weight-only kernel this
replaced (int8 weights, fp32 activations, aten._weight_int8pack_mm) ran at 0.4x of fp32 on an AVX2 CPU.

The tied head: the head gets its own int8 copy of the shared matrix while the token embedding keeps the
fp32 Parameter it always had (lookups stay exact; nothing is untied in the fp32 model, which is not
modified: quantize a copy to keep both). Where PyTorch has no fbgemm/x86 quantized engine (or no longer
ships torch.ao.quantization), the weight-only Int8Linear below is used instead.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn


class Int8Linear(nn.Module):
    """The fallback: int8 weights with per-row fp32 scales, fp32 activations (aten._weight_int8pack_mm)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float().contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale)
        y = y.reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def dynamic_engine() -> str | None:
    """The quantized engine that runs dynamic int8 Linear on this CPU, or None."""
    engines = torch.backends.quantized.supported_engines
    for engine in ("x86", "fbgemm"):
        if engine in engines:
            return engine
    return None


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` (in place; the model must be on the CPU) by an int8 one; returns
    the model. Embeddings and LayerNorms stay fp32."""
    engine = dynamic_engine()
    try:
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:
        engine = None
    if engine is None:
        return _quantize_weight_only(model)
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        # per-row weight scales, as the fallback's (per_channel_dynamic_qconfig: symmetric int8)
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def _quantize_weight_only(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear(child))
    return model
