"""Fused flash attention in Triton: forward, backward and attention dropout, any sequence length,
grouped K/V heads and document-masked packing.

Forward: one program per (query block, batch*head); online softmax in fp32 with exp2 and
sm_scale*log2(e); the log-sum-exp (log2 units, fp32) is saved for backward. Backward: a preprocess
kernel computes delta = rowsum(O * dO), then one kernel accumulates dK/dV per key block (looping
over query blocks) and another dQ per query block (looping over key blocks), so there are no atomics
and gradients are bit-identical run to run. That is 7 matrix products per block pair, against
FlashAttention-2's 5 (one pass adding each key block's dQ share with fp32 atomics, whose order, and
so whose rounding, changes run to run; a deterministic reduction instead stores a T x D partial per
key block: T/BLOCK_N times dQ's size in memory). Causal grids launch the heaviest blocks first (the
last query blocks; key block 0), so the long programs do not form the tail.

On a GPU, fp32 and head dims above 128 go to PyTorch (sdpa_fallback; see MAX_GPU_HEAD_DIM for why):
the interpreter runs every dtype and head dim, which is how the tests check the kernels on a CPU.

Grouped-query attention: q has H heads, k and v have Hkv (H % Hkv == 0); query head h reads kv head
h // (H // Hkv) by pointer arithmetic, so K/V are never repeated in memory. A dK/dV program owns one
kv head's key block and loops over its group's query heads, so the group's sum forms in registers.

Document masking: with `segments` (B, T) int32, non-decreasing along T, query i sees key j only when
segments[i] == segments[j] (and j <= i when causal). The host turns segments into each position's
document start and end; a program visits only the blocks from the start of its first row's document
to the end of its last row's, so blocks holding only other documents are never loaded. Blocks in that
range are masked element by element.

Every key (query) loop runs in two kinds of stage: blocks that need no bounds/causal mask, and the
blocks that touch the causal diagonal or the ragged end of the sequence. Dropout keeps an element
when tl.rand(seed, ((b*H + h)*T + i)*T + j) >= p, h the query head, so backward regenerates the mask.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton import INTERPRET, check_device, configs

HEAD_DIMS = (16, 32, 64, 128, 256)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634

# Tests set this to fill every output buffer with NaN first, so an element a kernel forgets to write
# shows up.
POISON_OUTPUTS = False

# Forward and dQ need BLOCK_M % BLOCK_N == 0 (the diagonal stage starts on a key-block boundary);
# dK/dV needs BLOCK_N % BLOCK_M == 0 for the same reason along queries.
_INTERP_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64)


def _c(m, n, w, s):
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)


# The configs each kernel ships for bf16/fp16, per head dim (and dropout); the autotuner picks among
# them. Each compiles for sm_90 without spilling registers and within shared memory in every feature
# (causal, full, grouped K/V, documents, dropout) with Triton 3.6 (the GPU machines') and 3.9:
# `python bench/compile.py` lists them, tests/test_compile.py checks them. Configs at 250+ registers
# on one version can spill on the other (dK/dV 32x128w8s2 at D=128: 252 on 3.9, 16 B spilled on
# 3.6), so none such is kept. Dropout's random numbers take ~40 registers a thread: it gets smaller
# blocks where the plain configs would spill. Head dims 16 and 32 use the 64 lists.
_GPU_CONFIGS = {
    "fwd": {
        64: [_c(128, 64, 8, 3), _c(64, 64, 4, 3)],
        128: [_c(128, 64, 8, 3), _c(64, 64, 4, 3)],
        (128, "dropout"): [_c(128, 32, 8, 2), _c(64, 32, 4, 2)],
    },
    "dkdv": {
        64: [_c(32, 128, 8, 3), _c(64, 128, 8, 2), _c(32, 64, 4, 2)],
        (64, "dropout"): [_c(32, 128, 8, 3), _c(32, 64, 4, 2)],
        128: [_c(32, 64, 8, 2), _c(16, 128, 8, 2)],
        (128, "dropout"): [_c(16, 128, 8, 2)],
    },
    "dq": {
        64: [_c(128, 64, 8, 2), _c(128, 32, 8, 3), _c(64, 64, 4, 2)],
        (64, "dropout"): [_c(128, 32, 8, 3), _c(64, 64, 4, 2)],
        128: [_c(128, 64, 8, 2), _c(128, 32, 8, 3)],
        (128, "dropout"): [_c(128, 32, 8, 3)],
    },
}
# Above this head dim dK/dV cannot hold its accumulators without spilling (bf16 D=256: 1.1-1.4 KB a
# thread in every config); fp32 as 3xTF32 spills in dK/dV already at D=64 (200 B; 816 B at 128), and
# as plain fp32 ("ieee") it is FMA loops: minutes to compile, 10-20 KB spilled. Both go to PyTorch.
MAX_GPU_HEAD_DIM = 128


def shipped_configs(kernel: str, dtype: torch.dtype, head_dim: int, dropout: bool = False) -> list[dict]:
    """The GPU configs `kernel` (fwd, dkdv, dq) ships for this head dim (bf16/fp16; D=256 and fp32 run
    in PyTorch on a GPU, so their lists are the D=128 ones, used only if such a launch is forced)."""
    table = _GPU_CONFIGS[kernel]
    key = min(max(head_dim, 64), MAX_GPU_HEAD_DIM)
    return (dropout and table.get((key, "dropout"))) or table[key]


def runs_on_gpu(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a CUDA launch of this dtype and head dim runs our kernels; else flash_attention hands it
    to PyTorch (sdpa_fallback). The interpreter runs every head dim."""
    return head_dim <= MAX_GPU_HEAD_DIM and dtype != torch.float32


def _all_configs(kernel: str) -> list[dict]:
    seen = []
    for cs in _GPU_CONFIGS[kernel].values():
        seen += [c for c in cs if c not in seen]
    return seen


def _prune(kernel: str):
    """early_config_prune: only the configs shipped for the launch's dtype and head dim (all of the
    list when none of them is there: bench/gpu.py pins one config to check it)."""
    def prune(configs, nargs, **kwargs):
        shipped = shipped_configs(kernel, nargs["Q"].dtype, kwargs["HEAD_DIM"], kwargs["DROPOUT"])
        wanted = [config_key(c) for c in shipped]
        return [c for c in configs if _config_key(c) in wanted] or configs
    return prune


def _config_key(c: triton.Config) -> tuple:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def config_key(c: dict) -> tuple:
    return c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]


_FWD_CONFIGS = configs(_all_configs("fwd"), _INTERP_BLOCKS)
_DKDV_CONFIGS = configs(_all_configs("dkdv"), _INTERP_BLOCKS)
_DQ_CONFIGS = configs(_all_configs("dq"), _INTERP_BLOCKS)
_KEY = ["T", "HEAD_DIM", "GROUP", "CAUSAL", "SEGMENTED", "DROPOUT"]


@triton.jit
def _keep(seed, bh, T, rows, cols, dropout_p):
    """Dropout keep-mask for score elements (rows, cols) of query head bh: a unique index per element."""
    idx = (bh.to(tl.int64) * T + rows) * T + cols
    return tl.rand(seed, idx) >= dropout_p


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, seg_q, K, V, SEG, stride_t, bh, seed, offs_m, lo, hi, T, qk_scale,
               dropout_p, MASKED: tl.constexpr, CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr,
               DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
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
        if SEGMENTED:
            seg_k = tl.load(SEG + offs_n, mask=offs_n < T, other=-2)
            s = tl.where(seg_k[None, :] == seg_q[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if SEGMENTED:
            # A row whose document starts after this block has seen no key yet (m_new = -inf):
            # subtract 0 instead, so its p and alpha are 0 rather than exp2(-inf + inf) = NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normalizer counts dropped elements too
        if DROPOUT:
            p = tl.where(_keep(seed, bh, T, offs_m[:, None], offs_n[None, :], dropout_p), p, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune("fwd")})
@triton.jit(do_not_specialize=["seed"])
def _attn_fwd(Q, K, V, O, LSE, SEG, DocStart, DocEnd, stride_qb, stride_qh, stride_qt,
              stride_kb, stride_kh, stride_kt, H, GROUP, T, qk_scale, dropout_p, seed,
              CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr, DROPOUT: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if CAUSAL:  # the last query blocks see the most keys: launched first, they do not form the tail
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    kv_off = b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh  # the group's kv head
    K += kv_off
    V += kv_off
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Key blocks [lo, mid) need no bounds/causal mask, [mid, hi) do. With segments, blocks before the
    # first row's document (and, non-causal, after the last row's) hold only other documents: skipped.
    first = start_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, T) - 1
    if SEGMENTED:
        seg_off = b.to(tl.int64) * T
        SEG += seg_off
        # Rows past T (never stored) take the last row's document, so no row is fully masked.
        seg_q = tl.load(SEG + tl.minimum(offs_m, T - 1))
        lo = tl.load(DocStart + seg_off + first) // BLOCK_N * BLOCK_N
    else:
        seg_q = offs_m  # unused
        lo = 0
    if CAUSAL:
        mid = first
        hi = last + 1
    else:
        if SEGMENTED:
            hi = tl.load(DocEnd + seg_off + last)
        else:
            hi = T
        mid = hi // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, seg_q, K, V, SEG, stride_kt, bh, seed, offs_m, lo, mid,
                               T, qk_scale, dropout_p, False, CAUSAL, SEGMENTED, DROPOUT, UPCAST,
                               PRECISION, HEAD_DIM, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, seg_q, K, V, SEG, stride_kt, bh, seed, offs_m, mid, hi,
                               T, qk_scale, dropout_p, True, CAUSAL, SEGMENTED, DROPOUT, UPCAST,
                               PRECISION, HEAD_DIM, BLOCK_N)
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
def _dkdv_inner(dk, dv, k, v, seg_k, Q, DO, LSE, Delta, SEG, stride_qh, stride_qt, stride_dh, stride_dt,
                bh0, GROUP, seed, offs_n, lo, hi, T, qk_scale, dropout_p, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # Query blocks [lo, hi) of each of the GROUP query heads bh0, bh0 + 1, ... (Q, DO at the first), as
    # one flat loop over (head, block) pairs: a loop over heads around a loop over blocks carries dk/dv
    # through two loop levels, which cost Hopper up to 400 B of spills per thread at D=128.
    # Works on transposed scores (keys x queries) so the dK/dV products need no transposes.
    offs_d = tl.arange(0, HEAD_DIM)
    blocks = (tl.maximum(hi - lo, 0) + BLOCK_M - 1) // BLOCK_M
    for it in range(0, GROUP * blocks):
        g = it // blocks
        start_m = lo + (it - g * blocks) * BLOCK_M
        bh = bh0 + g
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptr = Q + g.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
        do_ptr = DO + g.to(tl.int64) * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :]
        rows_ptr = bh.to(tl.int64) * T + offs_m
        if MASKED:
            rows = offs_m < T
            q = tl.load(q_ptr, mask=rows[:, None], other=0.0)
            do = tl.load(do_ptr, mask=rows[:, None], other=0.0)
            lse = tl.load(LSE + rows_ptr, mask=rows, other=0.0)
            delta = tl.load(Delta + rows_ptr, mask=rows, other=0.0)
        else:
            q = tl.load(q_ptr)
            do = tl.load(do_ptr)
            lse = tl.load(LSE + rows_ptr)
            delta = tl.load(Delta + rows_ptr)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            valid = offs_m[None, :] < T
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(valid, p_t, 0.0)
        if SEGMENTED:
            seg_q = tl.load(SEG + offs_m, mask=offs_m < T, other=-1)
            p_t = tl.where(seg_k[:, None] == seg_q[None, :], p_t, 0.0)
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


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune("dkdv")})
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, SEG, DocStart, DocEnd,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_db, stride_dh, stride_dt, H, GROUP, T, sm_scale, qk_scale, dropout_p, seed,
                   CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr, DROPOUT: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per (key block, batch * kv head); it loops over the GROUP query heads that share
    # this kv head, so their dK/dV contributions sum in registers (no atomics, no per-head copies).
    # Causal: key block 0 sees the most queries and program 0 starts first, so the heaviest lead.
    start_n = tl.program_id(0)
    bkv = tl.program_id(1)
    kv_heads = H // GROUP
    b = bkv // kv_heads
    kv_head = bkv % kv_heads
    kv_off = b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = offs_n[:, None] < T
    k = tl.load(K + kv_off + offs_n[:, None] * stride_kt + offs_d[None, :], mask=cols, other=0.0)
    v = tl.load(V + kv_off + offs_n[:, None] * stride_kt + offs_d[None, :], mask=cols, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    # Query blocks: causal [first, diag_end) cross the diagonal (masked), then [diag_end, hi_floor)
    # need no bounds/causal mask, then the ragged tail up to hi. With segments, queries of other
    # documents (before this block's first key's document, after its last key's) are skipped.
    first = start_n * BLOCK_N
    last = tl.minimum(first + BLOCK_N, T) - 1
    if SEGMENTED:
        seg_off = b.to(tl.int64) * T
        SEG += seg_off
        seg_k = tl.load(SEG + offs_n, mask=offs_n < T, other=-2)
        lo = tl.load(DocStart + seg_off + first) // BLOCK_M * BLOCK_M
        hi = tl.load(DocEnd + seg_off + last)
    else:
        seg_k = offs_n  # unused
        lo = 0
        hi = T
    hi_floor = hi // BLOCK_M * BLOCK_M
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    h0 = kv_head * GROUP  # the group's first query head
    bh0 = b * H + h0
    Q += b.to(tl.int64) * stride_qb + h0.to(tl.int64) * stride_qh
    DO += b.to(tl.int64) * stride_db + h0.to(tl.int64) * stride_dh
    if CAUSAL:
        diag_end = first + BLOCK_N
        dk, dv = _dkdv_inner(dk, dv, k, v, seg_k, Q, DO, LSE, Delta, SEG, stride_qh, stride_qt, stride_dh,
                             stride_dt, bh0, GROUP, seed, offs_n, first, tl.minimum(diag_end, hi), T, qk_scale,
                             dropout_p, True, CAUSAL, SEGMENTED, DROPOUT, UPCAST, PRECISION, HEAD_DIM, BLOCK_M)
        tail = tl.maximum(diag_end, hi_floor)
    else:
        diag_end = lo
        tail = hi_floor  # lo <= hi_floor: both round down, and lo's document starts before hi
    dk, dv = _dkdv_inner(dk, dv, k, v, seg_k, Q, DO, LSE, Delta, SEG, stride_qh, stride_qt, stride_dh, stride_dt,
                         bh0, GROUP, seed, offs_n, diag_end, hi_floor, T, qk_scale, dropout_p,
                         False, CAUSAL, SEGMENTED, DROPOUT, UPCAST, PRECISION, HEAD_DIM, BLOCK_M)
    dk, dv = _dkdv_inner(dk, dv, k, v, seg_k, Q, DO, LSE, Delta, SEG, stride_qh, stride_qt, stride_dh, stride_dt,
                         bh0, GROUP, seed, offs_n, tail, hi, T, qk_scale, dropout_p,
                         True, CAUSAL, SEGMENTED, DROPOUT, UPCAST, PRECISION, HEAD_DIM, BLOCK_M)
    out = (bkv.to(tl.int64) * T + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=cols)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=cols)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, seg_q, K, V, SEG, stride_t, bh, seed, offs_m, lo, hi, T, qk_scale,
              dropout_p, MASKED: tl.constexpr, CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr,
              DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
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
        if SEGMENTED:
            seg_k = tl.load(SEG + offs_n, mask=offs_n < T, other=-2)
            p = tl.where(seg_k[None, :] == seg_q[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = _keep(seed, bh, T, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune("dq")})
@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq(Q, K, V, DO, LSE, Delta, DQ, SEG, DocStart, DocEnd,
                 stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                 stride_db, stride_dh, stride_dt, H, GROUP, T, sm_scale, qk_scale, dropout_p, seed,
                 CAUSAL: tl.constexpr, SEGMENTED: tl.constexpr, DROPOUT: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    if CAUSAL:  # the last query blocks see the most keys: launched first, they do not form the tail
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv_off = b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
    K += kv_off
    V += kv_off
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < T
    q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(Q + q_off + offs_m[:, None] * stride_qt + offs_d[None, :], mask=rows[:, None], other=0.0)
    do_off = b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
    do = tl.load(DO + do_off + offs_m[:, None] * stride_dt + offs_d[None, :], mask=rows[:, None],
                 other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=rows, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=rows, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # The same key blocks as the forward pass visits (see _attn_fwd).
    first = start_m * BLOCK_M
    last = tl.minimum(first + BLOCK_M, T) - 1
    if SEGMENTED:
        seg_off = b.to(tl.int64) * T
        SEG += seg_off
        seg_q = tl.load(SEG + tl.minimum(offs_m, T - 1))  # rows past T: as in _attn_fwd
        lo = tl.load(DocStart + seg_off + first) // BLOCK_N * BLOCK_N
    else:
        seg_q = offs_m  # unused
        lo = 0
    if CAUSAL:
        mid = first
        hi = last + 1
    else:
        if SEGMENTED:
            hi = tl.load(DocEnd + seg_off + last)
        else:
            hi = T
        mid = hi // BLOCK_N * BLOCK_N
    dq = _dq_inner(dq, q, do, lse, delta, seg_q, K, V, SEG, stride_kt, bh, seed, offs_m, lo, mid, T,
                   qk_scale, dropout_p, False, CAUSAL, SEGMENTED, DROPOUT, UPCAST, PRECISION,
                   HEAD_DIM, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, seg_q, K, V, SEG, stride_kt, bh, seed, offs_m, mid, hi, T,
                   qk_scale, dropout_p, True, CAUSAL, SEGMENTED, DROPOUT, UPCAST, PRECISION,
                   HEAD_DIM, BLOCK_N)
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


def _precision(dtype: torch.dtype, interpret: bool = INTERPRET) -> str:
    """The interpreter computes in fp32. On a GPU fp32 goes to PyTorch (runs_on_gpu); were it forced
    through here, 3xTF32 keeps it on tensor cores at about fp32's accuracy. fp16/bf16 ignore it."""
    return "ieee" if interpret else "tf32x3" if dtype == torch.float32 else "tf32"


def _document_bounds(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position of non-decreasing (B, T) segments: the first index of its document and one
    past its last, as contiguous (B, T) int32 tensors. The kernels' block skipping reads these."""
    B, T = segments.shape
    pos = torch.arange(T, dtype=torch.int32, device=segments.device).expand(B, T)
    starts = torch.ones(B, T, dtype=torch.bool, device=segments.device)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    doc_start = torch.where(starts, pos, 0).cummax(1).values
    doc_end = torch.where(ends, pos + 1, T).flip(1).cummin(1).values.flip(1)
    return doc_start.to(torch.int32).contiguous(), doc_end.to(torch.int32).contiguous()


def _strides(q, k, do=None):
    """Strides the kernels take: q's, k's (v shares them), and dO's when given."""
    strides = [*q.stride()[:3], *k.stride()[:3]]
    if do is not None:
        strides += do.stride()[:3]
    return strides


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, segments, causal, dropout_p, sm_scale, seed):
        q = _strided(q)
        if not (k.stride() == v.stride() and k.stride(-1) == 1):  # k and v share one set of strides
            k, v = k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        group = H // k.size(1)
        o = _empty(B, H, T, D, dtype=q.dtype, device=q.device)
        lse = _empty(B, H, T, dtype=torch.float32, device=q.device)
        if segments is None:
            seg = doc_start = doc_end = lse  # never read: SEGMENTED=False
        else:
            seg = segments.contiguous()
            doc_start, doc_end = _document_bounds(seg)
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_fwd[grid](q, k, v, o, lse, seg, doc_start, doc_end, *_strides(q, k), H, group, T,
                        sm_scale * LOG2E, dropout_p, seed, CAUSAL=causal, SEGMENTED=segments is not None,
                        DROPOUT=dropout_p > 0, UPCAST=INTERPRET, PRECISION=_precision(q.dtype), HEAD_DIM=D)
        ctx.save_for_backward(q, k, v, o, lse, seg, doc_start, doc_end)
        ctx.causal, ctx.segmented = causal, segments is not None
        ctx.dropout_p, ctx.sm_scale, ctx.seed = dropout_p, sm_scale, seed
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seg, doc_start, doc_end = ctx.saved_tensors
        do = _strided(do)
        B, H, T, D = q.shape
        kv_heads = k.size(1)
        delta = _empty(B, H, T, dtype=torch.float32, device=q.device)
        _attn_bwd_delta[(triton.cdiv(T, 64), B * H)](
            o, do, delta, do.stride(0), do.stride(1), do.stride(2), H, T, HEAD_DIM=D, BLOCK_M=64)
        dq = _empty(B, H, T, D, dtype=q.dtype, device=q.device)
        dk, dv = (_empty(B, kv_heads, T, D, dtype=k.dtype, device=k.device) for _ in range(2))
        args = (seg, doc_start, doc_end, *_strides(q, k, do), H, H // kv_heads, T,
                ctx.sm_scale, ctx.sm_scale * LOG2E, ctx.dropout_p, ctx.seed)
        meta = dict(CAUSAL=ctx.causal, SEGMENTED=ctx.segmented, DROPOUT=ctx.dropout_p > 0,
                    UPCAST=INTERPRET, PRECISION=_precision(q.dtype), HEAD_DIM=D)
        _attn_bwd_dkdv[lambda m: (triton.cdiv(T, m["BLOCK_N"]), B * kv_heads)](
            q, k, v, do, lse, delta, dk, dv, *args, **meta)
        _attn_bwd_dq[lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, *args, **meta)
        return dq, dk, dv, None, None, None, None, None


def sdpa_fallback(q, k, v, *, causal: bool, dropout_p: float, softmax_scale: float, seed: int,
                  segments: torch.Tensor | None) -> torch.Tensor:
    """The same attention through PyTorch, for the launches runs_on_gpu() hands over: SDPA (its fused
    kernels where they take the shape), or, with dropout, the explicit softmax times our keep-mask for
    `seed`, so dropout_keep_mask still describes what was dropped."""
    import torch.nn.functional as F

    B, H, T, _ = q.shape
    mask = None
    if segments is not None:
        mask = (segments[:, None, :, None] == segments[:, None, None, :])
        if causal:
            mask = mask & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if dropout_p == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=softmax_scale, enable_gqa=k.size(1) != H)
    group = H // k.size(1)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)).float() * softmax_scale
    if mask is None and causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    keep = dropout_keep_mask(seed, B, H, T, dropout_p, q.device)
    a = s.softmax(-1) * keep / (1.0 - dropout_p)
    return a.to(v.dtype) @ v


def _check_shapes(q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be (B, H, T, D) and k, v one (B, Hkv, T, D) shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.size(0) != B or k.shape[2:] != (T, D):
        raise ValueError(f"k, v shape {tuple(k.shape)} must match q's batch, length and head dimension: "
                         f"({B}, Hkv, {T}, {D})")
    if k.size(1) == 0 or H % k.size(1):
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({k.size(1)})")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dimension must be a power of two in {HEAD_DIMS}, got {D}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among {DTYPES}")


def _check_segments(segments, q) -> None:
    B, _, T, _ = q.shape
    if not isinstance(segments, torch.Tensor) or segments.shape != (B, T):
        got = tuple(segments.shape) if isinstance(segments, torch.Tensor) else type(segments).__name__
        raise ValueError(f"segments must be a (B, T) = ({B}, {T}) tensor of document ids, got {got}")
    if segments.dtype != torch.int32:
        raise ValueError(f"segments must be int32, got {segments.dtype}")
    if segments.device != q.device:
        raise ValueError(f"segments must be on q's device ({q.device}), got {segments.device}")
    # Block skipping assumes each document is one contiguous run. Checked on a CPU only: on a GPU the check
    # would sync with the device in every layer; there the caller's ids (lm.model.position.document_segments,
    # a cumulative sum) are non-decreasing by construction.
    if not segments.is_cuda and T > 1 and bool((segments[:, 1:] < segments[:, :-1]).any()):
        raise ValueError("segments must be non-decreasing along T (each document one contiguous run)")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                    dropout_p: float = 0.0, softmax_scale: float | None = None,
                    seed: int | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of (B, H, T, D) queries over (B, Hkv, T, D) keys/values; returns (B, H, T, D).

    H % Hkv == 0: query head h uses kv head h // (H // Hkv) (Hkv == H is plain multi-head attention,
    Hkv == 1 multi-query). `segments`, an int32 (B, T) tensor of document ids non-decreasing along T,
    restricts each query to keys of its own document (packed sequences). D must be a power of two in
    16..256; fp32/fp16/bf16. With dropout_p > 0 and no seed, the seed is drawn from torch's CPU
    generator, so dropout follows torch.manual_seed; dropout_keep_mask(seed, B, H, T, p, device) gives
    the mask used.
    """
    _check_shapes(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if segments is not None:
        _check_segments(segments, q)
        check_device(segments)
    check_device(q, k, v)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.size(-1))
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if q.is_cuda and not runs_on_gpu(q.dtype, q.size(-1)):
        return sdpa_fallback(q, k, v, causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale,
                             seed=int(seed or 0), segments=segments)
    return _FlashAttention.apply(q, k, v, segments, causal, float(dropout_p), float(softmax_scale),
                                 int(seed or 0))
