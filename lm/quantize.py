"""Int8 weight-only quantization for CPU sampling: every Linear keeps int8 weights with one fp32 scale per
output row (symmetric, absmax / 127) and multiplies through torch's int8-weight matmul kernel. The tied
head is untied first: the embedding lookup stays fp32, the head becomes int8."""
from __future__ import annotations

import torch
import torch.nn as nn


class Int8Linear(nn.Module):
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


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by Int8Linear; returns the model."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untie
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return model
