"""Stages about the machine and our Triton kernels: env, kernel_check, attention_speed, layernorm_speed.

Each stage is a generator of rows (dicts); a row holding "note" is printed under the table instead of
in it. On --smoke the same code runs on the CPU at toy sizes, the kernels through Triton's interpreter.
"""
from __future__ import annotations

import math
import os
import platform
import subprocess
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from _gpu.measure import (Ctx, attention_flops, gbs, layer_norm_bytes, median_ms, peak_bf16, ratio,
                          short_error, tflops)

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---------------------------------------------------------------- env

def env(ctx: Ctx):
    """Versions, the device, lm.training.metrics' peak for it, and two measured ceilings: a bf16 matmul and a
    device copy (the references for MFU-style and bandwidth figures). Also checks our timer against
    triton.testing.do_bench where a GPU lets do_bench run."""
    import numpy
    import triton

    from lm.kernels._triton import interpreting

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
    yield dict(key="peak bf16 (lm.training.metrics.PEAK_FLOPS)", value=peak / 1e12 if peak else "no entry", unit="TFLOP/s")

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

@dataclass(frozen=True)
class AttnCase:
    """One attention check: dtype, head dim, causal, dropout p, kv heads (of H query heads), documents
    packed per row (0: no segments), and whether the autotuner picks the configs (at a T that is a
    multiple of every block) or they are pinned: case i runs config i % len of each kernel's shipped
    list for its dtype and head dim, so every shipped config is checked."""
    dtype: torch.dtype
    D: int
    causal: bool
    p: float = 0.0
    group: int = 1  # query heads per kv head
    docs: int = 0
    tuned: bool = False

    def name(self) -> str:
        return ("attention" + (" tuned" if self.tuned else "") + (" gqa" if self.group > 1 else "")
                + (f" docs={self.docs}" if self.docs else "") + (f" p={self.p}" if self.p else ""))


# In the order they run: the modern options first (grouped K/V heads, packed documents, dropout), so a
# stage cut short still reports them; then dtype x head dim x causal; then the autotuned path.
ATTN_CASES = [
    AttnCase(torch.bfloat16, 128, True, group=4),
    AttnCase(torch.bfloat16, 64, True, group=4, docs=5),
    AttnCase(torch.float32, 64, False, p=0.3, docs=3),
    AttnCase(torch.float32, 64, True, p=0.3),
    AttnCase(torch.bfloat16, 64, True), AttnCase(torch.bfloat16, 128, True),
    AttnCase(torch.float16, 64, True), AttnCase(torch.float16, 128, True),
    AttnCase(torch.float32, 64, True), AttnCase(torch.float32, 128, True),
    AttnCase(torch.bfloat16, 64, False), AttnCase(torch.float16, 128, False),
    AttnCase(torch.bfloat16, 64, True, tuned=True), AttnCase(torch.bfloat16, 128, True, tuned=True),
]


def attention_shape(ctx: Ctx, case: AttnCase) -> dict:
    """B, H, kv heads and T of a case: T=1000 is a multiple of no block size; tuned cases use 1024."""
    H = ctx.pick(8, 4) if case.group > 1 else ctx.pick(4, 2)
    T = ctx.pick(1024, 64) if case.tuned else ctx.pick(1000, 40)
    return dict(B=ctx.pick(2, 1), H=H, kv_heads=H // min(case.group, H), T=T)


def pinned_choice(case_index: int, case: AttnCase, shift: int = 0) -> dict:
    """name -> the config dict case `case_index` pins for each attention kernel (see AttnCase)."""
    from lm.kernels.flash_attention import shipped_configs

    choice = {}
    for name, kernel in (("f", "fwd"), ("kv", "dkdv"), ("q", "dq")):
        cs = shipped_configs(kernel, case.dtype, case.D, dropout=case.p > 0)
        choice[name] = cs[(case_index + shift) % len(cs)]
    return choice


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
    from lm.kernels import flash_attention as fa

    return {"f": fa._attn_fwd, "kv": fa._attn_bwd_dkdv, "q": fa._attn_bwd_dq}


def _config_name(c) -> str:
    """A config dict or triton.Config as BLOCK_MxBLOCK_N w<warps> s<stages>."""
    if isinstance(c, dict):
        return f"{c['BLOCK_M']}x{c['BLOCK_N']}w{c['num_warps']}s{c['num_stages']}"
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"


def triton_configs(choice: dict) -> dict:
    """name -> triton.Config of config dicts (the interpreter's own blocks under --smoke: the
    interpreter runs one config and pinning a GPU one would only slow it)."""
    from lm.kernels._triton import INTERPRET, configs

    if INTERPRET:
        return {name: kernel.configs[0] for name, kernel in _attention_kernels().items()}
    return {name: configs([c], {})[0] for name, c in choice.items()}


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
    from lm.kernels.flash_attention import dropout_keep_mask, flash_attention

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
    checks under the interpreter): grouped K/V heads, document-masked packing and dropout first, then
    bf16/fp16/fp32, head dims 64 and 128, causal and not, T not a multiple of any block size, dropout
    against the explicit keep-mask, determinism per seed; the autotuner's picks; LayerNorm, RMSNorm."""
    ctx.require_gpu()
    from lm.kernels import flash_attention as fa
    from lm.kernels.flash_attention import runs_on_gpu

    fa.POISON_OUTPUTS = True  # every output buffer starts as NaN: an unwritten element fails the check
    yield dict(note="*_abs = max|ours - fp64|; *_rel = that / max|fp64|; grad: the worst of dq,dk,dv (dx,dw,db); "
                    "torch_*: PyTorch's *_rel in the same dtype (SDPA, F.layer_norm, F.rms_norm); config: "
                    "f=fwd kv=dK/dV q=dQ, BLOCK_MxBLOCK_N w warps s stages; 'tuned': the autotuner's pick")
    for i, case in enumerate(ATTN_CASES):
        shape = attention_shape(ctx, case)
        run = lambda: attention_case(ctx, case.dtype, case.D, case.causal, case.p, shape["T"], shape["B"],  # noqa: E731
                                     shape["H"], seed=i, kv_heads=shape["kv_heads"], docs=case.docs)
        if ctx.device.type == "cuda" and not runs_on_gpu(case.dtype, case.D):
            errs, choice = run(), None  # flash_attention hands these to PyTorch on a GPU
            used = "pytorch (sdpa_fallback)"
        elif case.tuned:
            errs = run()
            used = " ".join(f"{n}={_config_name(k.best_config)}" for n, k in _attention_kernels().items()
                            if getattr(k, "best_config", None) is not None)
        else:
            errs, choice = _pinned_run(i, case, run)
            used = " ".join(f"{n}={_config_name(c)}" for n, c in triton_configs(choice).items())
        tol, ok = _verdict("attention", case.dtype, errs)
        kv = f" Hkv{shape['kv_heads']}" if case.group > 1 else ""
        yield _error_row(case.name(), case.dtype, errs, tol, ok, causal=case.causal, config=used,
                         shape=f"B{shape['B']} H{shape['H']}{kv} T{shape['T']} D{case.D}")
        if case.p and not case.docs:
            with pinned_configs(triton_configs(choice)) if choice else nullcontext():
                yield _dropout_determinism(ctx, case.dtype, case.D, case.p, shape["T"], shape["B"], shape["H"])
            yield _dropout_rate(ctx, case.p, shape["T"], shape["B"], shape["H"])
    yield from layer_norm_checks(ctx)
    yield from rms_norm_checks(ctx)


def _pinned_run(i, case, run):
    """run() with each attention kernel pinned to case i's configs (the next ones where the GPU
    cannot fit them); returns (its result, the configs used)."""
    for shift in range(4):
        choice = pinned_choice(i, case, shift)
        try:
            with pinned_configs(triton_configs(choice)):
                return run(), choice
        except Exception as e:  # noqa: BLE001
            if not _out_of_resources(e):
                raise
    raise RuntimeError(f"no attention config fits {DTYPE_NAMES[case.dtype]} D={case.D} on this GPU")


def _dropout_determinism(ctx, dtype, D, p, T, B, H):
    from lm.kernels.flash_attention import flash_attention

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
    from lm.kernels.flash_attention import dropout_keep_mask

    keep = dropout_keep_mask(3, B, H, T, p, ctx.device)
    kept = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    return dict(check=f"dropout keep rate {1 - p:g}", shape=f"B{B} H{H} T{T}", out_abs=abs(kept - (1 - p)),
                tol=f"<{5 * sigma:.1e} (5 sigma)", **{"pass": abs(kept - (1 - p)) < 5 * sigma})


def layer_norm_checks(ctx: Ctx):
    from lm.kernels.layer_norm import layer_norm

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
    from lm.kernels.layer_norm import rms_norm

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


# (query heads per kv head, documents): plain multi-head, grouped-query (4 per kv head), and grouped with
# packed documents (DOCS_PER_ROW per row).
SPEED_VARIANTS = [(1, False), (4, False), (4, True)]
DOCS_PER_ROW = 4


def attention_impls(group: int = 1, segments=None):
    """name -> fn(q, k, v): ours, and SDPA pinned to its flash and cuDNN backends (plain multi-head),
    or SDPA as it chooses with enable_gqa / the document mask (the others)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lm.kernels.flash_attention import flash_attention

    ours = lambda q, k, v: flash_attention(q, k, v, causal=True, segments=segments)  # noqa: E731
    if group > 1 or segments is not None:
        def sdpa_any(q, k, v):
            if segments is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return torch_attention(q, k, v, True, segments)
        return {"ours": ours, "sdpa": sdpa_any}

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return run

    return {"ours": ours, "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
            "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}


def time_attention(ctx: Ctx, fn, q, k, v, do) -> dict:
    """Milliseconds of the forward, the backward alone (over a retained graph) and both."""
    dev = ctx.device
    warmup, reps = ctx.pick(3, 1), ctx.pick(10, 1)
    leaves = (q, k, v)

    def clear():
        for t in leaves:
            t.grad = None

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


def tuned_configs() -> str:
    """The configs the autotuner picked at the last launch of each attention kernel."""
    return " ".join(f"{n}={_config_name(k.best_config)}" for n, k in _attention_kernels().items()
                    if getattr(k, "best_config", None) is not None)


def attention_speed(ctx: Ctx):
    """Causal bf16 attention, 16k tokens per batch (B = 16384 / T), H·D = 2048: TFLOP/s of ours, SDPA's
    flash backend and SDPA's cuDNN backend, and our ratios to each; then grouped-query attention (4 query
    heads per kv head) and grouped with packed documents against SDPA's own choice. A backend that raises
    is reported as unavailable with its error. `tuned`: the autotuner's pick for our kernels."""
    ctx.require_gpu()
    tokens, width = ctx.pick(16384, 64), ctx.pick(2048, 128)
    yield dict(note="TFLOP/s = 4·B·H·T²·D · 0.5 (causal) · {fwd 1, bwd 2.5, fwd+bwd 3.5} / time (documents: "
                    "counted as one causal sequence, so their TFLOP/s understate); time = median of CUDA-event "
                    "timings after warm-up, L2 flushed before each")
    for group, docs in SPEED_VARIANTS:
        for D in ctx.pick((64, 128), (64,)):
            for T in ctx.pick((1024, 2048, 4096, 8192), (32, 64)) if group == 1 else ctx.pick((2048, 8192), (64,)):
                H = width // D
                yield from _attention_speed_rows(ctx, min(group, H), docs, D, T, tokens // T, H)


def _attention_speed_rows(ctx, group, docs, D, T, B, H):
    dev = ctx.device
    q = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, H // group, T, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    segments = document_ids(B, T, DOCS_PER_ROW, seed=0).to(dev) if docs else None
    times, errors, tuned = {}, {}, None
    for name, fn in attention_impls(group, segments).items():
        try:
            times[name] = time_attention(ctx, fn, q, k, v, do)
            if name == "ours":
                tuned = tuned_configs()
        except Exception as e:  # noqa: BLE001  (a backend without a kernel for this GPU/shape)
            errors[name] = ("failed: " if name == "ours" else "unavailable: ") + short_error(e)
    variant = "mha" if group == 1 else f"gqa{group}" + (f" docs={DOCS_PER_ROW}" if docs else "")
    for mode in ATTN_PASSES:
        flops = attention_flops(B, H, T, D, True, mode)
        tf = {name: tflops(flops, t[mode]) for name, t in times.items()}
        row = dict(variant=variant, D=D, T=T, B=B, H=H, mode=mode, ours=tf.get("ours"))
        if group == 1 and not docs:
            row.update(sdpa_flash=tf.get("sdpa_flash"), sdpa_cudnn=tf.get("sdpa_cudnn"),
                       ours_vs_flash=ratio(tf.get("ours"), tf.get("sdpa_flash")),
                       ours_vs_cudnn=ratio(tf.get("ours"), tf.get("sdpa_cudnn")))
        else:
            row.update(sdpa=tf.get("sdpa"), ours_vs_sdpa=ratio(tf.get("ours"), tf.get("sdpa")))
        row.update(ours_ms=times.get("ours", {}).get(mode), tuned=tuned)
        yield row
    for name, why in errors.items():
        yield dict(note=f"{variant} D={D} T={T} {name}: {why}", impl=name, D=D, T=T, error=why)


def layernorm_speed(ctx: Ctx):
    """LayerNorm bf16 over 16k rows: GB/s of ours, F.layer_norm and torch.compile(F.layer_norm), the
    ratios, and ours as a fraction of the measured device copy."""
    ctx.require_gpu()
    from lm.kernels.layer_norm import layer_norm

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
