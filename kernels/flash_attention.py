"""Fused flash attention in Triton: forward, backward and attention dropout, any sequence length.

Forward: one program per (query block, batch*head); online softmax in fp32 with exp2 and
sm_scale*log2(e); the log-sum-exp (log2 units, fp32) is saved for backward. Backward: a preprocess
kernel computes delta = rowsum(O * dO), then one kernel accumulates dK/dV per key block (looping
over query blocks) and another dQ per query block (looping over key blocks), so there are no atomics.

Every key (query) loop runs in two kinds of stage: blocks that need no masking, and the blocks that
touch the causal diagonal or the ragged end of the sequence, which are masked. Dropout keeps an
element when tl.rand(seed, ((b*H + h)*T + i)*T + j) >= p, so backward regenerates the same mask.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._triton import INTERPRET, check_device, configs

HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634

# Tests set this to fill every output buffer with NaN first, so an element a kernel forgets to write
# shows up.
POISON_OUTPUTS = False

# Forward and dQ need BLOCK_M % BLOCK_N == 0 (the diagonal stage starts on a key-block boundary);
# dK/dV needs BLOCK_N % BLOCK_M == 0 for the same reason along queries.
_INTERP_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64)
_FWD_CONFIGS = configs([
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
], _INTERP_BLOCKS)
_DKDV_CONFIGS = configs([
    dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
], _INTERP_BLOCKS)
_DQ_CONFIGS = configs([
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
], _INTERP_BLOCKS)
_KEY = ["T", "HEAD_DIM", "CAUSAL", "DROPOUT"]


@triton.jit
def _keep(seed, bh, T, rows, cols, dropout_p):
    """Dropout keep-mask for score elements (rows, cols) of head bh: a unique index per element."""
    idx = (bh.to(tl.int64) * T + rows) * T + cols
    return tl.rand(seed, idx) >= dropout_p


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_t, bh, seed, offs_m, lo, hi, T, qk_scale, dropout_p,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv = offs_n[:, None] * stride_t + offs_d[None, :]
        if MASKED:
            k = tl.load(K + kv, mask=offs_n[:, None] < T, other=0.0)
            v = tl.load(V + kv, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(K + kv)
            v = tl.load(V + kv)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            valid = offs_n[None, :] < T
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer counts dropped elements too
        if DROPOUT:
            p = tl.where(_keep(seed, bh, T, offs_m[:, None], offs_n[None, :], dropout_p), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY)
@triton.jit(do_not_specialize=["seed"])
def _attn_fwd(Q, K, V, O, LSE, stride_b, stride_h, stride_t, H, T, qk_scale, dropout_p, seed,
              CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    in_off = (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    Q += in_off
    K += in_off
    V += in_off
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_t + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        diag_lo = start_m * BLOCK_M
        hi = tl.minimum(diag_lo + BLOCK_M, T)
    else:
        diag_lo = T // BLOCK_N * BLOCK_N
        hi = T
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_t, bh, seed, offs_m, 0, diag_lo, T,
                               qk_scale, dropout_p, False, CAUSAL, DROPOUT, UPCAST, PRECISION,
                               HEAD_DIM, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_t, bh, seed, offs_m, diag_lo, hi, T,
                               qk_scale, dropout_p, True, CAUSAL, DROPOUT, UPCAST, PRECISION,
                               HEAD_DIM, BLOCK_N)
    o = acc / l_i[:, None]
    if DROPOUT:
        o = o / (1.0 - dropout_p)
    out_off = bh.to(tl.int64) * T
    rows = offs_m < T
    tl.store(O + (out_off + offs_m[:, None]) * HEAD_DIM + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=rows[:, None])
    tl.store(LSE + out_off + offs_m, m_i + tl.log2(l_i), mask=rows)


@triton.jit
def _attn_bwd_delta(O, DO, Delta, stride_b, stride_h, stride_t, H, T,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < T
    o_ptr = O + (bh.to(tl.int64) * T + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    do_off = (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    do_ptr = DO + do_off + offs_m[:, None] * stride_t + offs_d[None, :]
    o = tl.load(o_ptr, mask=rows[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr, mask=rows[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=rows)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, Delta, stride_t, stride_dt, bh, seed, offs_n, lo, hi, T,
                qk_scale, dropout_p, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # Works on transposed scores (keys x queries) so the dK/dV products need no transposes.
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptr = Q + offs_m[:, None] * stride_t + offs_d[None, :]
        do_ptr = DO + offs_m[:, None] * stride_dt + offs_d[None, :]
        if MASKED:
            rows = offs_m < T
            q = tl.load(q_ptr, mask=rows[:, None], other=0.0)
            do = tl.load(do_ptr, mask=rows[:, None], other=0.0)
            lse = tl.load(LSE + offs_m, mask=rows, other=0.0)
            delta = tl.load(Delta + offs_m, mask=rows, other=0.0)
        else:
            q = tl.load(q_ptr)
            do = tl.load(do_ptr)
            lse = tl.load(LSE + offs_m)
            delta = tl.load(Delta + offs_m)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            valid = offs_m[None, :] < T
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(valid, p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, bh, T, offs_m[None, :], offs_n[:, None], dropout_p)
            scale = 1.0 / (1.0 - dropout_p)
            z_t = tl.where(keep, p_t * scale, 0.0)
            dp_t = tl.where(keep, dp_t * scale, 0.0)
        else:
            z_t = p_t
        dv += tl.dot(z_t.to(do.dtype), do, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY)
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, stride_b, stride_h, stride_t,
                   stride_db, stride_dh, stride_dt, H, T, sm_scale, qk_scale, dropout_p, seed,
                   CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    in_off = (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    Q += in_off
    K += in_off
    V += in_off
    DO += (bh // H).to(tl.int64) * stride_db + (bh % H).to(tl.int64) * stride_dh
    LSE += bh.to(tl.int64) * T
    Delta += bh.to(tl.int64) * T
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = offs_n[:, None] < T
    k = tl.load(K + offs_n[:, None] * stride_t + offs_d[None, :], mask=cols, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_t + offs_d[None, :], mask=cols, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    t_floor = T // BLOCK_M * BLOCK_M
    if CAUSAL:
        # Queries before this key block see none of it; the next BLOCK_N queries cross the diagonal.
        diag_end = start_n * BLOCK_N + BLOCK_N
        dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, Delta, stride_t, stride_dt, bh, seed, offs_n,
                             start_n * BLOCK_N, tl.minimum(diag_end, T), T, qk_scale, dropout_p,
                             True, CAUSAL, DROPOUT, UPCAST, PRECISION, HEAD_DIM, BLOCK_M)
    else:
        diag_end = 0
    dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, Delta, stride_t, stride_dt, bh, seed, offs_n,
                         diag_end, t_floor, T, qk_scale, dropout_p,
                         False, CAUSAL, DROPOUT, UPCAST, PRECISION, HEAD_DIM, BLOCK_M)
    dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, Delta, stride_t, stride_dt, bh, seed, offs_n,
                         tl.maximum(diag_end, t_floor), T, T, qk_scale, dropout_p,
                         True, CAUSAL, DROPOUT, UPCAST, PRECISION, HEAD_DIM, BLOCK_M)
    out = (bh.to(tl.int64) * T + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=cols)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=cols)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_t, bh, seed, offs_m, lo, hi, T, qk_scale, dropout_p,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_N: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv = offs_n[:, None] * stride_t + offs_d[None, :]
        if MASKED:
            k = tl.load(K + kv, mask=offs_n[:, None] < T, other=0.0)
            v = tl.load(V + kv, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(K + kv)
            v = tl.load(V + kv)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            valid = offs_n[None, :] < T
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, bh, T, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY)
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq(Q, K, V, DO, LSE, Delta, DQ, stride_b, stride_h, stride_t,
                 stride_db, stride_dh, stride_dt, H, T, sm_scale, qk_scale, dropout_p, seed,
                 CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    in_off = (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    K += in_off
    V += in_off
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < T
    q = tl.load(Q + in_off + offs_m[:, None] * stride_t + offs_d[None, :], mask=rows[:, None], other=0.0)
    do_off = (bh // H).to(tl.int64) * stride_db + (bh % H).to(tl.int64) * stride_dh
    do = tl.load(DO + do_off + offs_m[:, None] * stride_dt + offs_d[None, :], mask=rows[:, None],
                 other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=rows, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=rows, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        diag_lo = start_m * BLOCK_M
        hi = tl.minimum(diag_lo + BLOCK_M, T)
    else:
        diag_lo = T // BLOCK_N * BLOCK_N
        hi = T
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_t, bh, seed, offs_m, 0, diag_lo, T, qk_scale,
                   dropout_p, False, CAUSAL, DROPOUT, UPCAST, PRECISION, HEAD_DIM, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_t, bh, seed, offs_m, diag_lo, hi, T, qk_scale,
                   dropout_p, True, CAUSAL, DROPOUT, UPCAST, PRECISION, HEAD_DIM, BLOCK_N)
    out = (bh.to(tl.int64) * T + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None])


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(Out, T, seed, dropout_p, BLOCK: tl.constexpr):
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(seed, bh, T, offs_m[:, None], offs_n[None, :], dropout_p)
    ptr = Out + (bh.to(tl.int64) * T + offs_m[:, None]) * T + offs_n[None, :]
    tl.store(ptr, keep.to(tl.int8), mask=(offs_m[:, None] < T) & (offs_n[None, :] < T))


def dropout_keep_mask(seed: int, B: int, H: int, T: int, p: float, device) -> torch.Tensor:
    """The (B, H, T, T) boolean keep-mask flash_attention uses for this seed and dropout rate."""
    out = torch.empty(B, H, T, T, dtype=torch.int8, device=device)
    check_device(out)
    block = 64
    _keep_mask_kernel[(triton.cdiv(T, block), triton.cdiv(T, block), B * H)](out, T, seed, p, BLOCK=block)
    return out.bool()


def _empty(*shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any batch/head/time strides but need the head dimension contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _precision(dtype: torch.dtype) -> str:
    # fp32 dots would default to tf32 on the GPU; the interpreter computes everything in fp32.
    return "ieee" if dtype == torch.float32 or INTERPRET else "tf32"


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, dropout_p, sm_scale, seed):
        if not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1):
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        o = _empty(B, H, T, D, dtype=q.dtype, device=q.device)
        lse = _empty(B, H, T, dtype=torch.float32, device=q.device)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_fwd[grid](q, k, v, o, lse, q.stride(0), q.stride(1), q.stride(2), H, T,
                        sm_scale * LOG2E, dropout_p, seed, CAUSAL=causal, DROPOUT=dropout_p > 0,
                        UPCAST=INTERPRET, PRECISION=_precision(q.dtype), HEAD_DIM=D)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.dropout_p, ctx.sm_scale, ctx.seed = causal, dropout_p, sm_scale, seed
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = _strided(do)
        B, H, T, D = q.shape
        delta = _empty(B, H, T, dtype=torch.float32, device=q.device)
        _attn_bwd_delta[(triton.cdiv(T, 64), B * H)](
            o, do, delta, do.stride(0), do.stride(1), do.stride(2), H, T, HEAD_DIM=D, BLOCK_M=64)
        dq, dk, dv = (_empty(B, H, T, D, dtype=q.dtype, device=q.device) for _ in range(3))
        args = (q.stride(0), q.stride(1), q.stride(2), do.stride(0), do.stride(1), do.stride(2), H, T,
                ctx.sm_scale, ctx.sm_scale * LOG2E, ctx.dropout_p, ctx.seed)
        meta = dict(CAUSAL=ctx.causal, DROPOUT=ctx.dropout_p > 0, UPCAST=INTERPRET,
                    PRECISION=_precision(q.dtype), HEAD_DIM=D)
        _attn_bwd_dkdv[lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dk, dv, *args, **meta)
        _attn_bwd_dq[lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, *args, **meta)
        return dq, dk, dv, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    dropout_p: float = 0.0, softmax_scale: float | None = None,
                    seed: int | None = None) -> torch.Tensor:
    """Attention of (B, H, T, D) queries over keys/values of the same shape; returns (B, H, T, D).

    D must be a power of two in 16..256; fp32/fp16/bf16. With dropout_p > 0 and no seed, the seed is
    drawn from torch's CPU generator, so dropout follows torch.manual_seed.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, T, D) shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.size(-1) not in HEAD_DIMS:
        raise ValueError(f"head dimension must be a power of two in {HEAD_DIMS}, got {q.size(-1)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among {DTYPES}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    check_device(q, k, v)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.size(-1))
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return _FlashAttention.apply(q, k, v, causal, float(dropout_p), float(softmax_scale),
                                 int(seed or 0))
