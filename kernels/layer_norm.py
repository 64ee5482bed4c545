"""Fused LayerNorm and RMSNorm in Triton: fp32 statistics, one row per program, deterministic dW/dB.

One pair of kernels serves both norms: IS_RMS (a compile-time flag) drops the mean subtraction and
the bias, y = x * rsqrt(mean(x^2) + eps) * w. Forward keeps mean (LayerNorm only) and rstd in fp32
for backward. Backward (rows up to MAX_FUSED_BWD_N; wider ones in PyTorch) computes dx in the same
pass and writes
per-program fp32 partial sums of dW/dB (each program owns a contiguous group of rows), which torch
reduces with `.sum(0)`: no atomics, so gradients are bit-identical run to run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import INTERPRET, check_device

MAX_N = 16384  # one row must fit in one program's registers
# The fused backward holds x, dy, w and the dW/dB sums of a row in registers: past 8192 columns that is
# more than 128 registers a thread can hold (Hopper, 16 warps: 176-336 B spilled at 16384), so wider
# rows take the backward in PyTorch from the saved statistics (same formulas, fp32, deterministic).
MAX_FUSED_BWD_N = 8192


@triton.jit
def _ln_fwd(X, Y, W, B, Mean, Rstd, N, eps, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x  # masked columns loaded as 0, so they add nothing to the sum of squares
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        tl.store(Mean + row, mean)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / N + eps)
    y = xc * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)


@triton.jit
def _ln_bwd(X, DY, DX, W, Mean, Rstd, DW, DB, M, N, rows_per_program,
            HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_program  # int64: M * N may exceed 2**31
    end = tl.minimum(start + rows_per_program, M)
    X += start * N
    DY += start * N
    DX += start * N
    for row in range(start, end):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        if IS_RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
        wdy = w * dy
        # LayerNorm: dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)); RMSNorm has no mean
        # to differentiate through, so the mean(w*dy) term drops out.
        c1 = tl.sum(wdy * xhat, axis=0) / N
        if IS_RMS:
            dx = (wdy - xhat * c1) * rstd
        else:
            dx = (wdy - (xhat * c1 + tl.sum(wdy, axis=0) / N)) * rstd
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
        X += N
        DY += N
        DX += N
    tl.store(DW + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB + pid * N + cols, db, mask=mask)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _num_partials(x: torch.Tensor, rows: int) -> int:
    """How many programs share the dW/dB reduction: enough to fill the GPU, few in the interpreter."""
    if INTERPRET or x.device.type != "cuda":
        return max(1, min(rows, 4))
    return max(1, min(rows, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count))


class _Norm(torch.autograd.Function):
    """LayerNorm (rms=False, optional bias) or RMSNorm (rms=True, no bias) over the last dimension."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        N = x.shape[-1]
        if N > MAX_N:
            raise ValueError(f"{'rms' if rms else 'layer'}_norm supports hidden sizes up to {MAX_N}, got {N}")
        if weight.shape != (N,):
            raise ValueError(f"weight must have shape ({N},), got {tuple(weight.shape)}")
        check_device(x, weight)
        x2 = x.reshape(-1, N).contiguous()
        M = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        # RMSNorm keeps no mean: rstd stands in for the pointer, as weight does for a missing bias.
        mean = rstd if rms else torch.empty(M, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(N)
        if M > 0:
            _ln_fwd[(M,)](x2, y, weight, bias if bias is not None else weight, mean, rstd, N, eps,
                          HAS_BIAS=bias is not None, IS_RMS=rms, BLOCK=block, num_warps=_num_warps(block))
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias, ctx.rms, ctx.shape = bias is not None, rms, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = dy.reshape(-1, N).contiguous()
        if N > MAX_FUSED_BWD_N:
            return (*_wide_backward(ctx, x2, dy2, weight, mean, rstd), None, None)
        dx = torch.empty_like(x2)
        groups = _num_partials(x2, M)
        rows_per_program = triton.cdiv(M, groups) if M > 0 else 1
        groups = triton.cdiv(M, rows_per_program) if M > 0 else 1
        dw = torch.zeros(groups, N, dtype=torch.float32, device=x2.device)
        db = torch.zeros_like(dw) if ctx.has_bias else dw
        block = triton.next_power_of_2(N)
        if M > 0:
            _ln_bwd[(groups,)](x2, dy2, dx, weight, mean, rstd, dw, db, M, N, rows_per_program,
                               HAS_BIAS=ctx.has_bias, IS_RMS=ctx.rms, BLOCK=block,
                               num_warps=_num_warps(block))
        dbias = db.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx.view(ctx.shape), dw.sum(0).to(weight.dtype), dbias, None, None


def _wide_backward(ctx, x2, dy2, weight, mean, rstd):
    """dx, dW, dB of rows wider than MAX_FUSED_BWD_N, in fp32 PyTorch: _ln_bwd's formulas."""
    x, dy, w = x2.float(), dy2.float(), weight.float()
    xhat = x * rstd[:, None] if ctx.rms else (x - mean[:, None]) * rstd[:, None]
    wdy = w * dy
    c1 = (wdy * xhat).mean(1, keepdim=True)
    dx = (wdy - xhat * c1) if ctx.rms else (wdy - (xhat * c1 + wdy.mean(1, keepdim=True)))
    dx = (dx * rstd[:, None]).to(x2.dtype)
    dbias = dy.sum(0).to(weight.dtype) if ctx.has_bias else None
    return dx.view(ctx.shape), (dy * xhat).sum(0).to(weight.dtype), dbias


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5):
    """LayerNorm over the last dimension of x (hidden size up to 16384); fp32/fp16/bf16."""
    return _Norm.apply(x, weight, bias, eps, False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5):
    """RMSNorm over the last dimension of x: x * rsqrt(mean(x^2) + eps) * weight (hidden size up to
    16384); fp32/fp16/bf16."""
    return _Norm.apply(x, weight, None, eps, True)


class TritonLayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm with the fused kernel: same parameters and init, so checkpoints interchange."""

    def __init__(self, normalized_shape, eps: float = 1e-5, bias: bool = True):
        super().__init__(normalized_shape, eps=eps, bias=bias)
        if len(self.normalized_shape) != 1:
            raise ValueError("TritonLayerNorm normalizes over the last dimension only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


class TritonRMSNorm(torch.nn.Module):
    """RMSNorm with the fused kernel. Its one parameter, `weight` (init ones), matches
    torch.nn.RMSNorm(n, eps=1e-5), so state_dicts interchange."""

    def __init__(self, n: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (n,)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(n, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"
