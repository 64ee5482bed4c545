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

from data_prep import DataError
from lm.files import expect_tensor


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


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


# ---- quantized checkpoints for storage and serving: `python -m lm.quantize RUN --bits 8|4 OUT` ---------
# Every matrix (Linear weights, the token embedding that is also the head, the position table) is stored as
# symmetric integers with fp scales; vectors (norm gains, biases) stay fp32. int8: one fp32 scale per row
# (output channel). int4: one fp16 scale per row and group of `group_size` input columns, two values per
# byte. Loading dequantizes into an ordinary fp32 model, so sample.py, lm.eval and init.from read it as
# they read `lm.export --format safetensors`.
QUANT_KEY = "lmforge_quantized"


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scale per row) with w ~= values * scale[:, None]; |error| <= scale / 2."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.float()


# fp16 scales: at least its smallest normal (a zero or subnormal scale made an all-zero group 0 / 0, and
# lost every value of a tiny one); at most its largest finite value, so |w| up to 7 x 65504.
FP16_TINY, FP16_MAX = torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max
INT4_LIMIT = 7 * FP16_MAX


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 holding two 4-bit values per byte, fp16 scale per row and group); the columns are padded
    with zeros to a multiple of group_size. Values are in [-7, 7]: |error| <= scale / 2 (scale: group
    max / 7, rounded to fp16 before use so the bound holds for the stored scale). |w| must stay within
    INT4_LIMIT (quantized_state checks it)."""
    rows, cols = w.shape
    padded = -(-cols // group_size) * group_size
    w = torch.nn.functional.pad(w.float(), (0, padded - cols)).view(rows, padded // group_size, group_size)
    scale = (w.abs().amax(dim=2) / 7.0).clamp(FP16_TINY, FP16_MAX).half()
    q = torch.round(w / scale.float()[..., None]).clamp(-7, 7).to(torch.int8).view(rows, padded)
    nibbles = (q + 8).to(torch.uint8)  # 1..15
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scale


def dequantize_int4_groups(packed: torch.Tensor, scale: torch.Tensor, cols: int) -> torch.Tensor:
    rows, groups = scale.shape
    q = torch.empty(rows, packed.shape[1] * 2, dtype=torch.int8)
    q[:, 0::2] = (packed & 0xF).to(torch.int8) - 8
    q[:, 1::2] = (packed >> 4).to(torch.int8) - 8
    w = q.view(rows, groups, -1).float() * scale.float()[..., None]
    return w.view(rows, -1)[:, :cols]


def stored_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state a quantized checkpoint holds, in fp32: all but a head tied to the embedding (stored once)."""
    tied = model.lm_head.weight is model.transformer.wte.weight
    return {k: v.detach().float() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def check_group_size(model: nn.Module, group_size: int):
    """An int4 group must fit in every matrix's rows: a wider one would pad each row up to it (a 0.16 MB
    model became 528 MB at 1,000,000)."""
    if group_size < 2 or group_size % 2:
        raise DataError(f"--group-size {group_size}: must be an even number >= 2")
    name, width = min(((k, v.shape[1]) for k, v in stored_state(model).items() if v.dim() == 2),
                      key=lambda kv: kv[1])
    if group_size > width:
        raise DataError(f"--group-size {group_size}: wider than {name}'s {width} input columns (the narrowest "
                        f"matrix); use at most {width}, ideally a divisor of the widths")


def quantized_state(model: nn.Module, bits: int, group_size: int = 64) -> dict[str, torch.Tensor]:
    """The tensors of a quantized checkpoint (a tied head is stored once, as the embedding)."""
    out = {}
    for key, value in stored_state(model).items():
        if value.dim() != 2:
            out[key] = value.contiguous()
        elif bits == 8:
            out[f"{key}.int8"], out[f"{key}.scale"] = quantize_int8_rows(value)
        else:
            top = float(value.abs().max())
            if not top <= INT4_LIMIT:  # (NaN too) an infinite fp16 scale would dequantize to NaN
                raise DataError(f"{key}: |w| reaches {top:.4g}, beyond int4's fp16 scales ({INT4_LIMIT:.4g}); "
                                "quantize with --bits 8")
            out[f"{key}.int4"], out[f"{key}.scale"] = quantize_int4_groups(value, group_size)
    return {k: v.contiguous() for k, v in out.items()}


def dequantized_state(path, stored: dict[str, torch.Tensor], metadata: dict[str, str],
                      shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """fp32 tensors for a model whose state_dict has `shapes`, from the tensors and metadata of quantized
    checkpoint `path` (already read and checked finite): each tensor's presence, dtype and shape first."""
    kind = metadata[QUANT_KEY]
    if kind not in ("int8", "int4"):
        raise DataError(f"{path}: {QUANT_KEY} = {kind!r}: expected int8 or int4 (written by lm.quantize)")
    group = metadata.get("group_size", "")
    if kind == "int4" and not (group.isdigit() and int(group) >= 2 and int(group) % 2 == 0):
        raise DataError(f"{path}: metadata group_size = {group!r}: expected an even number >= 2")
    state = {}
    for key, shape in shapes.items():
        if key in stored or len(shape) != 2:  # vectors (and any matrix) stored as they are
            state[key] = expect_tensor(stored, key, path, shape, FLOATS)
        elif kind == "int8":
            q = expect_tensor(stored, f"{key}.int8", path, shape, (torch.int8,))
            scale = expect_tensor(stored, f"{key}.scale", path, shape[:1], (torch.float32,))
            state[key] = q.float() * scale[:, None]
        else:
            groups = -(-shape[1] // int(group))
            packed = expect_tensor(stored, f"{key}.int4", path, (shape[0], groups * int(group) // 2), (torch.uint8,))
            scale = expect_tensor(stored, f"{key}.scale", path, (shape[0], groups), (torch.float16,))
            state[key] = dequantize_int4_groups(packed, scale, shape[1])
    return state
