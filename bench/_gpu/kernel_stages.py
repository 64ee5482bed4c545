"""Stages about the machine and our Triton kernels: env, kernel_check, attention_speed, layernorm_speed.

Each stage is a generator of rows (dicts); a row holding "note" is printed under the table instead of
in it. On --smoke the same code runs on the CPU at toy sizes, the kernels through Triton's interpreter.
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from _gpu.measure import (Ctx, attention_flops, gbs, layer_norm_bytes, median_ms, peak_bf16, ratio,
                          short_error, tflops)

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------- env

def env(ctx: Ctx):
    """Versions, the device, lm.metrics' peak for it, and two measured ceilings: a bf16 matmul and a
    device copy (the references for MFU-style and bandwidth figures). Also checks our timer against
    triton.testing.do_bench where a GPU lets do_bench run."""
    import numpy
    import triton

    from kernels._triton import interpreting

    dev = ctx.device
    cuda = dev.type == "cuda"
    yield dict(key="device", value=torch.cuda.get_device_name(dev) if cuda else f"cpu ({os.cpu_count()} cores)")
    if cuda:
        props = torch.cuda.get_device_properties(dev)
        yield dict(key="multiprocessors", value=props.multi_processor_count)
        yield dict(key="memory", value=props.total_memory / 1e9, unit="GB")
        yield dict(key="compute capability", value=f"{props.major}.{props.minor}")
        yield dict(key="driver", value=_nvidia_smi("driver_version"))
    yield dict(key="torch", value=torch.__version__)
    yield dict(key="triton", value=triton.__version__)
    yield dict(key="cuda (torch build)", value=torch.version.cuda or "none")
    yield dict(key="cudnn", value=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none")
    yield dict(key="python", value=platform.python_version())
    yield dict(key="numpy", value=numpy.__version__)
    yield dict(key="triton interpreter", value="on" if interpreting() else "off")
    has_do_bench = hasattr(getattr(triton, "testing", None), "do_bench")
    yield dict(key="triton.testing.do_bench", value="present" if has_do_bench else "missing")
    peak = peak_bf16(dev)
    yield dict(key="peak bf16 (lm.metrics.PEAK_FLOPS)", value=peak / 1e12 if peak else "no entry", unit="TFLOP/s")

    n, dtype = (8192, torch.bfloat16) if cuda else (256, torch.float32)
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, dev, warmup=5 if cuda else 1, reps=20 if cuda else 3)
    yield dict(key=f"matmul {n}^3 {DTYPE_NAMES[dtype]} (measured)", value=tflops(2 * n**3, ms), unit="TFLOP/s")
    if cuda and has_do_bench:
        from triton.testing import do_bench

        theirs = do_bench(lambda: a @ b, warmup=25, rep=100)
        yield dict(key="same matmul timed by triton do_bench (mean)", value=tflops(2 * n**3, theirs),
                   unit="TFLOP/s")
    yield dict(key="device copy (measured)", value=copy_gbs(dev), unit="GB/s")


def _nvidia_smi(field: str) -> str:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def copy_gbs(device: torch.device) -> float:
    """Device-to-device copy bandwidth of 1 GiB (8 MiB on a CPU), counting bytes read plus written."""
    cuda = device.type == "cuda"
    x = torch.empty(2**30 if cuda else 2**23, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), device, warmup=3 if cuda else 1, reps=20 if cuda else 3, flush_l2=False)
    return gbs(2 * x.numel(), ms)


# ---------------------------------------------------------------- kernel correctness

# dtype, head dim, causal, dropout p. Case i runs fwd config i % 5, dK/dV and dQ configs i % 4 of the
# kernels' autotune lists (pinned), so every config is checked once; the last two rows run the
# autotuner itself on the kernels' production path.
ATTN_CASES = [
    (torch.bfloat16, 64, True, 0.0), (torch.bfloat16, 128, True, 0.0),
    (torch.float16, 64, True, 0.0), (torch.float16, 128, True, 0.0),
    (torch.float32, 64, True, 0.0), (torch.float32, 128, True, 0.0),
    (torch.bfloat16, 64, False, 0.0), (torch.float16, 128, False, 0.0),
    (torch.float32, 64, True, 0.3),
]
AUTOTUNED_CASES = [(torch.bfloat16, 64, True, 0.0), (torch.bfloat16, 128, True, 0.0)]
# The modern options: dtype, head dim, causal, dropout p, kv heads of GQA_HEADS query heads,
# documents packed per row (0: no segments). Pinned to configs after ATTN_CASES' in each list.
GQA_HEADS = 8
MODERN_ATTN_CASES = [
    (torch.bfloat16, 128, True, 0.0, 2, 0),  # grouped-query attention
    (torch.bfloat16, 64, True, 0.0, 2, 5),  # grouped + document-masked packing
    (torch.float32, 64, False, 0.3, 8, 3),  # documents, not causal, dropout
]
LN_CASES_N = (768, 1000, 8192)

# Tolerances on max|ours - fp64| / max|fp64| (out; the worst of dq, dk, dv or dx, dw, db for grads).
# fp32 against fixed bounds; bf16/fp16 against PyTorch's own error in the same dtype, as
# tests/test_kernels.py does: attention <= 2x SDPA's (out), 3x (grads); LayerNorm <= 2x F.layer_norm's.
FP32_TOL = {"attention": (1e-5, 1e-4), "layernorm": (1e-5, 1e-4)}
LOW_PRECISION_FACTOR = {"attention": (2.0, 3.0), "layernorm": (2.0, 2.0)}


def _errors(ours, ref):
    """(max abs error, that over max |ref|) against an fp64 reference."""
    diff = (ours.double() - ref).abs().max().item()
    return diff, diff / max(ref.abs().max().item(), 1e-30)


def _worst(pairs):
    return max(pairs, key=lambda p: p[1]) if pairs else (float("nan"), float("nan"))


def reference_attention(q, k, v, causal, keep=None, p=0.0, segments=None):
    """softmax(QKᵀ/sqrt(D) + mask) [* keep / (1-p)] @ V in the inputs' dtype (fp64 here); each query
    head uses its group's kv head, and sees only keys of its own document (segments)."""
    k, v = _repeat_kv(q, k, v)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    allowed = _allowed(q.size(-2), causal, segments, q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    a = s.softmax(-1)
    if keep is not None:
        a = a * keep / (1 - p)
    return a @ v


def _repeat_kv(q, k, v):
    """K/V with each kv head repeated for the query heads of its group (references only)."""
    group = q.size(1) // k.size(1)
    return k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)


def _allowed(T, causal, segments, device):
    """Boolean (B|1, 1, T, T) mask of the keys each query may see, or None for all of them."""
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril() if causal else None
    if segments is not None:
        same = segments[:, None, :, None] == segments[:, None, None, :]
        allowed = same if allowed is None else same & allowed
    return allowed


def document_ids(B, T, docs, seed):
    """(B, T) int32 segments: each row cut at docs - 1 distinct random points into contiguous documents."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        starts = torch.zeros(T, dtype=torch.int32)
        starts[torch.randperm(T - 1, generator=g)[:docs - 1] + 1] = 1
        rows.append(starts.cumsum(0, dtype=torch.int32))
    return torch.stack(rows)


def torch_attention(q, k, v, causal, segments=None):
    """PyTorch's SDPA on the same problem (K/V repeated, the document mask as attn_mask)."""
    if k.size(1) == q.size(1) and segments is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    k, v = _repeat_kv(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(q.size(-2), causal, segments, q.device))


def nan_padded(x, pad=7):
    """x as a view into a NaN-filled buffer longer along T: a read past T turns the result into NaN."""
    B, H, T, D = x.shape
    buf = torch.full((B, H, T + pad, D), float("nan"), dtype=x.dtype, device=x.device)
    buf[:, :, :T] = x
    return buf[:, :, :T]


def _attention_kernels():
    from kernels import flash_attention as fa

    return {"f": fa._attn_fwd, "kv": fa._attn_bwd_dkdv, "q": fa._attn_bwd_dq}


def _config_name(c) -> str:
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"


@contextmanager
def pinned_configs(choice: dict):
    """Each attention kernel's autotuner reduced to one config (an Autotuner with one config runs it
    without benchmarking); restored afterwards."""
    kernels = _attention_kernels()
    saved = {name: kernel.configs for name, kernel in kernels.items()}
    try:
        for name, kernel in kernels.items():
            kernel.configs = [choice[name]]
        yield
    finally:
        for name, kernel in kernels.items():
            kernel.configs = saved[name]


def _out_of_resources(e: Exception) -> bool:
    return type(e).__name__ in ("OutOfResources", "PTXASError") or "out of resource" in str(e).lower()


def attention_case(ctx: Ctx, dtype, D, causal, p, T, B, H, seed=0, kv_heads=None, docs=0):
    """Our kernel (NaN-padded inputs, NaN-poisoned outputs) and SDPA in `dtype` against fp64; with
    kv_heads < H grouped-query attention, with docs > 0 that many documents packed per row."""
    from kernels.flash_attention import dropout_keep_mask, flash_attention

    dev = ctx.device
    kv_heads = kv_heads or H
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, D), (B, kv_heads, T, D), (B, kv_heads, T, D), (B, H, T, D)]
    q, k, v, do = (torch.randn(*shape, dtype=torch.float64, generator=g).to(dev) for shape in shapes)
    segments = document_ids(B, T, docs, seed).to(dev) if docs else None
    keep = dropout_keep_mask(1234, B, H, T, p, dev) if p else None
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, causal, keep, p, segments)
    ref.backward(do)
    xs = [nan_padded(t.to(dtype)).requires_grad_() for t in (q, k, v)]
    out = flash_attention(*xs, causal=causal, dropout_p=p, seed=1234, segments=segments)
    out.backward(nan_padded(do.to(dtype)))
    row = dict(out=_errors(out, ref), grad=_worst([_errors(x.grad, r.grad) for x, r in zip(xs, ref_in)]))
    if not p:
        theirs_in = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        theirs = torch_attention(*theirs_in, causal, segments)
        theirs.backward(do.to(dtype))
        row["ref_out"] = _errors(theirs, ref)
        row["ref_grad"] = _worst([_errors(x.grad, r.grad) for x, r in zip(theirs_in, ref_in)])
    return row


def _verdict(kind: str, dtype, errs: dict):
    """(tolerance text, pass) for a kernel's errors (see FP32_TOL / LOW_PRECISION_FACTOR)."""
    out_rel, grad_rel = errs["out"][1], errs["grad"][1]
    if dtype == torch.float32 or "ref_out" not in errs:
        tol_out, tol_grad = FP32_TOL[kind]
        if dtype != torch.float32:  # no PyTorch counterpart (dropout): bounds scaled to the dtype
            scale = torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
            tol_out, tol_grad = tol_out * scale, tol_grad * scale
        return f"<={tol_out:.0e}/{tol_grad:.0e}", out_rel <= tol_out and grad_rel <= tol_grad
    f_out, f_grad = LOW_PRECISION_FACTOR[kind]
    ok = out_rel <= f_out * errs["ref_out"][1] and grad_rel <= f_grad * errs["ref_grad"][1]
    return f"<={f_out:g}x/{f_grad:g}x torch", ok


def _error_row(check, dtype, errs, tol, ok, shape, causal=None, config=None):
    row = dict(check=check, dtype=DTYPE_NAMES[dtype], shape=shape, causal=causal, config=config,
               out_abs=errs["out"][0], out_rel=errs["out"][1], grad_abs=errs["grad"][0], grad_rel=errs["grad"][1],
               torch_out=errs.get("ref_out", (None, None))[1], torch_grad=errs.get("ref_grad", (None, None))[1],
               tol=tol)
    row["pass"] = bool(ok)
    return row


def kernel_check(ctx: Ctx):
    """Our attention and LayerNorm on the device against fp64 references (what tests/test_kernels.py
    checks under the interpreter): bf16/fp16/fp32, head dims 64 and 128, causal and not, T not a
    multiple of any block size, dropout against the explicit keep-mask, determinism per seed; grouped
    K/V heads and document-masked packing (segments); RMSNorm."""
    ctx.require_gpu()
    from kernels import flash_attention as fa

    fa.POISON_OUTPUTS = True  # every output buffer starts as NaN: an unwritten element fails the check
    T, B, H = ctx.pick(1000, 40), ctx.pick(2, 1), ctx.pick(4, 2)
    lists = {name: kernel.configs for name, kernel in _attention_kernels().items()}
    yield dict(note="attention configs (pinned by index): " + "; ".join(
        f"{name}: " + " ".join(f"{i}={_config_name(c)}" for i, c in enumerate(cs)) for name, cs in lists.items()))
    yield dict(note="*_abs = max|ours - fp64|; *_rel = that / max|fp64|; grad: the worst of dq,dk,dv (dx,dw,db); "
                    "torch_*: PyTorch's *_rel in the same dtype (SDPA, F.layer_norm, F.rms_norm); 'tuned': the autotuner's pick")
    yield from layer_norm_checks(ctx)
    yield from rms_norm_checks(ctx)
    for i, (dtype, D, causal, p) in enumerate(ATTN_CASES):
        errs, choice = _pinned_run(lists, i, lambda: attention_case(ctx, dtype, D, causal, p, T, B, H, seed=i),
                                   f"{DTYPE_NAMES[dtype]} D={D}")
        used = " ".join(f"{name}{lists[name].index(c)}" for name, c in choice.items())
        tol, ok = _verdict("attention", dtype, errs)
        yield _error_row("attention" + (f" p={p}" if p else ""), dtype, errs, tol, ok,
                         shape=f"B{B} H{H} T{T} D{D}", causal=causal, config=used)
        if p:
            with pinned_configs(choice):
                determinism = _dropout_determinism(ctx, dtype, D, p, T, B, H)
            yield determinism
            yield _dropout_rate(ctx, p, T, B, H)
    yield from modern_attention_checks(ctx, lists, T, B)
    for dtype, D, causal, p in AUTOTUNED_CASES:
        t_aligned = ctx.pick(1024, 64)
        errs = attention_case(ctx, dtype, D, causal, p, t_aligned, B, H, seed=100 + D)
        best = " ".join(f"{n}{lists[n].index(k.best_config)}" for n, k in _attention_kernels().items()
                        if getattr(k, "best_config", None) in lists[n])
        tol, ok = _verdict("attention", dtype, errs)
        yield _error_row("attention tuned", dtype, errs, tol, ok, shape=f"B{B} H{H} T{t_aligned} D{D}",
                         causal=causal, config=best or "autotuned")


def _pinned_run(lists, i, run, what):
    """run() with each attention kernel pinned to config i of its list (the next one where the GPU
    cannot fit it); returns (its result, the configs used)."""
    for shift in range(max(len(c) for c in lists.values())):
        choice = {name: cs[(i + shift) % len(cs)] for name, cs in lists.items()}
        try:
            with pinned_configs(choice):
                return run(), choice
        except Exception as e:  # noqa: BLE001
            if not _out_of_resources(e):
                raise
    raise RuntimeError(f"no attention config fits {what} on this GPU")


def modern_attention_checks(ctx: Ctx, lists, T, B):
    """MODERN_ATTN_CASES: grouped K/V heads and packed documents, against the masked fp64 reference."""
    H = ctx.pick(GQA_HEADS, GQA_HEADS // 2)
    for j, (dtype, D, causal, p, kv_heads, docs) in enumerate(MODERN_ATTN_CASES):
        i, kv_heads = len(ATTN_CASES) + j, min(kv_heads, H)
        errs, choice = _pinned_run(
            lists, i, lambda: attention_case(ctx, dtype, D, causal, p, T, B, H, seed=i, kv_heads=kv_heads,
                                             docs=docs), f"{DTYPE_NAMES[dtype]} D={D}")
        used = " ".join(f"{name}{lists[name].index(c)}" for name, c in choice.items())
        tol, ok = _verdict("attention", dtype, errs)
        check = "attention" + (" gqa" if kv_heads < H else "") + (f" docs={docs}" if docs else "") + (
            f" p={p}" if p else "")
        yield _error_row(check, dtype, errs, tol, ok, shape=f"B{B} H{H} Hkv{kv_heads} T{T} D{D}",
                         causal=causal, config=used)


def _dropout_determinism(ctx, dtype, D, p, T, B, H):
    from kernels.flash_attention import flash_attention

    g = torch.Generator().manual_seed(4)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g).to(ctx.device, dtype) for _ in range(4))

    def run(seed):
        xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_attention(*xs, causal=True, dropout_p=p, seed=seed)
        out.backward(do)
        return [out, *(x.grad for x in xs)]

    a, b, c = run(7), run(7), run(8)
    same = all(torch.equal(x, y) for x, y in zip(a, b))
    differs = not torch.equal(a[0], c[0])
    return dict(check="dropout determinism", dtype=DTYPE_NAMES[dtype],
                shape=f"B{B} H{H} T{T} D{D}", tol="seed equal, other differs", **{"pass": same and differs})


def _dropout_rate(ctx, p, T, B, H):
    from kernels.flash_attention import dropout_keep_mask

    keep = dropout_keep_mask(3, B, H, T, p, ctx.device)
    kept = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    return dict(check=f"dropout keep rate {1 - p:g}", shape=f"B{B} H{H} T{T}", out_abs=abs(kept - (1 - p)),
                tol=f"<{5 * sigma:.1e} (5 sigma)", **{"pass": abs(kept - (1 - p)) < 5 * sigma})


def layer_norm_checks(ctx: Ctx):
    from kernels.layer_norm import layer_norm

    M = ctx.pick(2048, 6)
    Ns = ctx.pick(LN_CASES_N, (64, 100))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for N in Ns:
            errs = _layer_norm_case(ctx, layer_norm, dtype, M, N)
            tol, ok = _verdict("layernorm", dtype, errs)
            yield _error_row("layernorm", dtype, errs, tol, ok, shape=f"M{M} N{N}")
    x, w, b, dy = _ln_inputs(ctx, M, Ns[-1], seed=9)
    first = _ln_grads(lambda x, w, b: layer_norm(x, w, b, 1e-5), x, w, b, dy, torch.bfloat16)[1]
    second = _ln_grads(lambda x, w, b: layer_norm(x, w, b, 1e-5), x, w, b, dy, torch.bfloat16)[1]
    same = all(torch.equal(u, v) for u, v in zip(first, second))
    yield dict(check="layernorm bwd determinism", dtype="bf16", shape=f"M{M} N{Ns[-1]}", tol="bitwise equal",
               **{"pass": same})


def rms_norm_checks(ctx: Ctx):
    """RMSNorm (the same fused kernels, IS_RMS) against fp64, and PyTorch's RMSNorm in the same dtype."""
    from kernels.layer_norm import rms_norm

    M, N = ctx.pick(2048, 6), ctx.pick(LN_CASES_N, (64, 100))[1]  # N not a power of two
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x, w, _, dy = _ln_inputs(ctx, M, N)
        torch_rms = lambda x, w, b: F.rms_norm(x, (N,), w, 1e-5)  # noqa: E731
        ref, ref_grads = _ln_grads(torch_rms, x, w, None, dy, torch.float64)
        out, grads = _ln_grads(lambda x, w, b: rms_norm(x, w, 1e-5), x, w, None, dy, dtype)
        theirs, their_grads = _ln_grads(torch_rms, x, w, None, dy, dtype)
        errs = dict(out=_errors(out, ref), grad=_worst([_errors(g, r) for g, r in zip(grads, ref_grads)]),
                    ref_out=_errors(theirs, ref),
                    ref_grad=_worst([_errors(g, r) for g, r in zip(their_grads, ref_grads)]))
        tol, ok = _verdict("layernorm", dtype, errs)
        yield _error_row("rmsnorm", dtype, errs, tol, ok, shape=f"M{M} N{N}")


def _ln_inputs(ctx, M, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, N, dtype=torch.float64, generator=g) * 2 + 0.5
    w, b = torch.randn(N, dtype=torch.float64, generator=g), torch.randn(N, dtype=torch.float64, generator=g)
    dy = torch.randn(M, N, dtype=torch.float64, generator=g)
    return (t.to(ctx.device) for t in (x, w, b, dy))


def _ln_grads(fn, x, w, b, dy, dtype):
    """Output and gradients of fn(x, w, b) on copies in dtype; b may be None (RMSNorm)."""
    params = [t.to(dtype, copy=True).requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*params)
    y.backward(dy.to(dtype))
    return y, [t.grad for t in params if t is not None]


def _layer_norm_case(ctx, layer_norm, dtype, M, N):
    x, w, b, dy = _ln_inputs(ctx, M, N)
    torch_ln = lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5)  # noqa: E731
    ref, ref_grads = _ln_grads(torch_ln, x, w, b, dy, torch.float64)
    out, grads = _ln_grads(lambda x, w, b: layer_norm(x, w, b, 1e-5), x, w, b, dy, dtype)
    theirs, their_grads = _ln_grads(torch_ln, x, w, b, dy, dtype)
    return dict(out=_errors(out, ref), grad=_worst([_errors(g, r) for g, r in zip(grads, ref_grads)]),
                ref_out=_errors(theirs, ref),
                ref_grad=_worst([_errors(g, r) for g, r in zip(their_grads, ref_grads)]))


# ---------------------------------------------------------------- kernel speed

ATTN_PASSES = ("fwd", "bwd", "fwd+bwd")


def attention_impls():
    """name -> fn(q, k, v): ours, and SDPA pinned to its flash and cuDNN backends."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.flash_attention import flash_attention

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return run

    return {"ours": lambda q, k, v: flash_attention(q, k, v, causal=True),
            "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}


def time_attention(ctx: Ctx, fn, q, k, v, do) -> dict:
    """Milliseconds of the forward, the backward alone (over a retained graph) and both."""
    dev = ctx.device
    warmup, reps = ctx.pick(3, 1), ctx.pick(10, 1)

    def clear():
        q.grad = k.grad = v.grad = None

    def both():
        clear()
        fn(q, k, v).backward(do)

    ms = {"fwd": median_ms(lambda: fn(q, k, v), dev, warmup, reps)}
    out = fn(q, k, v)

    def bwd():
        clear()
        out.backward(do, retain_graph=True)

    ms["bwd"] = median_ms(bwd, dev, warmup, reps)
    ms["fwd+bwd"] = median_ms(both, dev, warmup, reps)
    return ms


def attention_speed(ctx: Ctx):
    """Causal bf16 attention, 16k tokens per batch (B = 16384 / T), H·D = 2048: TFLOP/s of ours, SDPA's
    flash backend and SDPA's cuDNN backend, and our ratios to each. A backend that raises is reported
    as unavailable with its error."""
    ctx.require_gpu()
    tokens, width = ctx.pick(16384, 64), ctx.pick(2048, 128)
    impls = attention_impls()
    yield dict(note="TFLOP/s = 4·B·H·T²·D · 0.5 (causal) · {fwd 1, bwd 2.5, fwd+bwd 3.5} / time; "
                    "time = median of CUDA-event timings after warm-up, L2 flushed before each")
    for D in ctx.pick((64, 128), (64,)):
        for T in ctx.pick((1024, 2048, 4096, 8192), (32, 64)):
            B, H = tokens // T, width // D
            q, k, v = (torch.randn(B, H, T, D, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn_like(q)
            times, errors = {}, {}
            for name, fn in impls.items():
                try:
                    times[name] = time_attention(ctx, fn, q, k, v, do)
                except Exception as e:  # noqa: BLE001  (a backend without a kernel for this GPU/shape)
                    errors[name] = ("failed: " if name == "ours" else "unavailable: ") + short_error(e)
            for mode in ATTN_PASSES:
                flops = attention_flops(B, H, T, D, True, mode)
                tf = {name: tflops(flops, t[mode]) for name, t in times.items()}
                yield dict(D=D, T=T, B=B, H=H, mode=mode, ours=tf.get("ours"), sdpa_flash=tf.get("sdpa_flash"),
                           sdpa_cudnn=tf.get("sdpa_cudnn"), ours_vs_flash=ratio(tf.get("ours"), tf.get("sdpa_flash")),
                           ours_vs_cudnn=ratio(tf.get("ours"), tf.get("sdpa_cudnn")),
                           ours_ms=times.get("ours", {}).get(mode))
            for name, why in errors.items():
                yield dict(note=f"D={D} T={T} {name}: {why}", impl=name, D=D, T=T, error=why)
            del q, k, v, do


def layernorm_speed(ctx: Ctx):
    """LayerNorm bf16 over 16k rows: GB/s of ours, F.layer_norm and torch.compile(F.layer_norm), the
    ratios, and ours as a fraction of the measured device copy."""
    ctx.require_gpu()
    from kernels.layer_norm import layer_norm

    copy = copy_gbs(ctx.device)
    yield dict(note=f"device copy {copy:.0f} GB/s (read + write); GB/s = (fwd: x, y; fwd+bwd: + x, dy, dx) "
                    f"bytes / median time", copy_gbs=copy)
    # the smoke run checks the plumbing: inductor's C++ build takes minutes on a 2-core CPU
    compiled = torch.compile(F.layer_norm, dynamic=False, backend=ctx.pick("inductor", "aot_eager"))
    impls = {"ours": lambda x, w, b: layer_norm(x, w, b, 1e-5),
             "torch": lambda x, w, b: F.layer_norm(x, (x.size(-1),), w, b, 1e-5),
             "compiled": lambda x, w, b: compiled(x, (x.size(-1),), w, b, 1e-5)}
    M = ctx.pick(16384, 8)
    warmup, reps = ctx.pick(3, 1), ctx.pick(10, 1)
    for N in ctx.pick((768, 1024, 2048, 4096, 8192), (100,)):
        x = torch.randn(M, N, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(N, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(N, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        speeds, errors = {}, {}
        for name, fn in impls.items():
            def both(fn=fn):
                x.grad = w.grad = b.grad = None
                fn(x, w, b).backward(dy)
            try:
                fwd_ms = median_ms(lambda: fn(x, w, b), ctx.device, warmup, reps)
                both_ms = median_ms(both, ctx.device, warmup, reps)
                speeds[name] = {"fwd": gbs(layer_norm_bytes(M, N, 2, "fwd"), fwd_ms),
                                "fwd+bwd": gbs(layer_norm_bytes(M, N, 2, "fwd+bwd"), both_ms)}
            except Exception as e:  # noqa: BLE001
                errors[name] = short_error(e)
        for mode in ("fwd", "fwd+bwd"):
            s = {name: v[mode] for name, v in speeds.items()}
            yield dict(N=N, M=M, mode=mode, ours=s.get("ours"), torch=s.get("torch"), compiled=s.get("compiled"),
                       ours_vs_torch=ratio(s.get("ours"), s.get("torch")),
                       ours_vs_compiled=ratio(s.get("ours"), s.get("compiled")),
                       ours_vs_copy=ratio(s.get("ours"), copy))
        for name, why in errors.items():
            yield dict(note=f"N={N} {name}: {why}", impl=name, N=N, error=why)
