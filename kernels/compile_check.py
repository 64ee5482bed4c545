"""Compile our Triton kernels for a GPU this machine does not have, and read what the GPU would get.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs Triton's whole pipeline down
to a cubin with the ptxas inside the Triton wheel; `cuobjdump --dump-resource-usage` (also in the
wheel) reads registers and stack (spilled registers) per thread from it. The signature, constexprs
and divisibility hints come from the kernel's own argument binder, fed the arguments a real launch
passes (`launch`), so what compiles here is what a launch on the GPU would compile. On a GPU machine
the same `launch` tuple goes to `JITFunction.warmup`, which fills Triton's cache for the real run.

A `Spec` names one compile: kernel, dtype, head dim (attention) or row width (norms), feature
(causal, full, gqa, docs, dropout; layer or rms for norms) and config. `shipped_specs` lists every
config we ship for each (dtype, head dim); `compile_spec` compiles one and returns a table row.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import triton

LOG2E = 1.4426950408889634
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTN_KERNELS = ("fwd", "dkdv", "dq")
FEATURES = ("causal", "full", "gqa", "docs", "dropout")
NORM_N = (768, 1024, 2048, 4096, 8192, 16384)
# Shared memory one block may use (the opt-in maximum): H100 227 KB, A100 163 KB.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@dataclass(frozen=True)
class Spec:
    kernel: str  # fwd | dkdv | dq | delta | keep_mask | ln_fwd | ln_bwd
    dtype: str  # bf16 | fp16 | fp32
    dim: int  # head dim; the row width N for the norm kernels
    config: tuple = ()  # attention: (BLOCK_M, BLOCK_N, num_warps, num_stages)
    causal: bool = True
    group: int = 1  # query heads per kv head
    docs: bool = False  # document segments
    dropout: bool = False
    rms: bool = False  # the norm kernels: RMSNorm, else LayerNorm
    T: int = 1024  # sequence length (rows M for the norms): only its divisibility reaches the compiler
    H: int = 16  # query heads

    @property
    def feature(self) -> str:
        if self.kernel.startswith("ln_"):
            return "rms" if self.rms else "layer"
        parts = [name for name, on in (("full", not self.causal), ("gqa", self.group > 1 and not self.docs),
                                       ("docs", self.docs), ("dropout", self.dropout)) if on]
        return "+".join(parts) or "causal"

    @property
    def config_name(self) -> str:
        if len(self.config) == 4:
            m, n, w, s = self.config
            return f"{m}x{n}w{w}s{s}"
        return "-"


FEATURE_FLAGS = {"causal": {}, "full": dict(causal=False), "gqa": dict(group=4), "docs": dict(group=4, docs=True),
                 "dropout": dict(dropout=True)}


def config_tuple(c: dict) -> tuple:
    return c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]


def shipped_specs(dtypes=("bf16", "fp16", "fp32"), dims=(64, 128, 256), features=FEATURES,
                  kernels=ATTN_KERNELS + ("norm",), norm_n=NORM_N) -> list[Spec]:
    """Every config the kernels ship for each dtype and head dim (flash_attention.shipped_configs), in
    each feature; the norm kernels at each width; the small helper kernels once per dtype."""
    from . import flash_attention as fa

    specs = []
    for dtype in dtypes:
        for dim in dims:
            if not fa.runs_on_gpu(DTYPES[dtype], dim):
                continue  # handed to SDPA on a GPU: nothing of ours to compile
            for kernel in ATTN_KERNELS:
                if kernel in kernels:
                    for f in features:
                        configs = fa.shipped_configs(kernel, DTYPES[dtype], dim, dropout=f == "dropout")
                        specs += [Spec(kernel, dtype, dim, config_tuple(c), **FEATURE_FLAGS[f]) for c in configs]
            if "delta" in kernels:
                specs.append(Spec("delta", dtype, dim))
        if "norm" in kernels:
            from .layer_norm import MAX_FUSED_BWD_N

            specs += [Spec(k, dtype, n, rms=rms, T=16384) for k in ("ln_fwd", "ln_bwd") for n in norm_n
                      for rms in (False, True) if k == "ln_fwd" or n <= MAX_FUSED_BWD_N]
    return specs


# ---------------------------------------------------------------- the arguments a launch passes

def launch(spec: Spec, interpret: bool = False, sms: int = 132):
    """(jit function, positional args, keyword args) of the launch `spec` describes. Pointers are
    torch dtypes (Triton's warmup and binder take them for tensors, 16-byte aligned as our buffers
    are); strides are those of contiguous (B, H, T, D) tensors."""
    from . import flash_attention as fa
    from . import layer_norm as ln

    dt = DTYPES[spec.dtype]
    f32, i32 = torch.float32, torch.int32
    if spec.kernel in ("ln_fwd", "ln_bwd"):
        N, M = spec.dim, spec.T
        block = triton.next_power_of_2(N)
        meta = dict(HAS_BIAS=not spec.rms, IS_RMS=spec.rms, BLOCK=block, num_warps=ln._num_warps(block))
        if spec.kernel == "ln_fwd":
            return ln._ln_fwd, (dt, dt, dt, dt, f32, f32, N, 1e-5), meta
        rows = triton.cdiv(M, min(M, 4 * sms))  # as _Norm.backward splits the rows
        return ln._ln_bwd, (dt, dt, dt, dt, f32, f32, f32, f32, M, N, rows), meta
    T, H, D = spec.T, spec.H, spec.dim
    if spec.kernel == "delta":
        return fa._attn_bwd_delta, (dt, dt, f32, H * T * D, T * D, D, H, T), dict(HEAD_DIM=D, BLOCK_M=64)
    if spec.kernel == "keep_mask":
        return fa._keep_mask_kernel, (torch.int8, T, 1234, 0.1), dict(BLOCK=64)
    kv_heads = H // spec.group
    dropout = 0.1 if spec.dropout else 0.0
    seg = i32 if spec.docs else f32  # unsegmented launches pass the lse buffer for all three
    q_strides = (H * T * D, T * D, D)
    kv_strides = (kv_heads * T * D, T * D, D)
    sm_scale = D ** -0.5
    m, n, warps, stages = spec.config
    meta = dict(CAUSAL=spec.causal, SEGMENTED=spec.docs, DROPOUT=spec.dropout, UPCAST=interpret,
                PRECISION=fa._precision(dt, interpret), HEAD_DIM=D, BLOCK_M=m, BLOCK_N=n,
                num_warps=warps, num_stages=stages)
    tail = (H, spec.group, T)
    if spec.kernel == "fwd":
        args = (dt, dt, dt, dt, f32, seg, seg, seg, *q_strides, *kv_strides, *tail, sm_scale * LOG2E, dropout, 1234)
        return fa._attn_fwd.fn, args, meta
    head = (dt, dt, dt, dt, f32, f32) + ((dt, dt) if spec.kernel == "dkdv" else (dt,))
    args = (*head, seg, seg, seg, *q_strides, *kv_strides, *q_strides, *tail, sm_scale, sm_scale * LOG2E,
            dropout, 1234)
    return (fa._attn_bwd_dkdv if spec.kernel == "dkdv" else fa._attn_bwd_dq).fn, args, meta


# ---------------------------------------------------------------- compiling for a target

def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def toolchain_missing() -> str | None:
    """Why this Triton cannot compile for NVIDIA here (None when it can): the CUDA backend, ptxas and
    cuobjdump ship inside the Triton wheel."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        return f"Triton has no CUDA backend ({e})"
    for tool in ("ptxas", "cuobjdump"):
        if not os.access(_tool(tool), os.X_OK):
            return f"no {tool} in the Triton wheel ({_tool(tool)})"
    return None


def compile_for(fn, args, kwargs, arch: int):
    """Compile `fn(*args, **kwargs)` for sm_<arch> as a launch would: the kernel's binder gives the
    signature, constexprs and divisibility hints. Returns Triton's CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    options, signature, constexprs, attrs = bind(fn, args, kwargs, arch)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def bind(fn, args, kwargs, arch: int = 90):
    """(options, signature, constexprs, attrs) that `fn(*args, **kwargs)` compiles with for sm_<arch>:
    the kernel's own binder, as JITFunction.run calls it (torch dtypes stand for tensors)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*map(MockTensor.wrap_dtype, args), **kwargs)
    return fn._pack_args(backend, kwargs, bound, specialization, options)


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack (spill) and static shared bytes per thread/block, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k: int(v) for k, v in fields.items()}


def matrix_units(ptx: str) -> tuple[str, int]:
    """Which matrix instructions the kernel uses and how many sites: wgmma (Hopper tensor cores),
    mma (Ampere-style tensor cores), or none (FMA loops, or a kernel with no matrix product)."""
    wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    if wgmma:
        return "wgmma", wgmma
    mma = len(re.findall(r"\bmma\.sync", ptx))
    return ("mma", mma) if mma else ("none", 0)


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas): a compile's cost, unlike its
    wall time, does not grow when other work shares the cores."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_spec(spec: Spec, arch: int = 90) -> dict:
    """One row of the compile table: the spec, registers, spill bytes, shared memory, compile seconds
    (wall and CPU), the matrix instructions; `error` instead when Triton or ptxas refused it."""
    row = dict(asdict(spec), feature=spec.feature, config=spec.config_name, arch=arch)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    try:
        fn, args, kwargs = launch(spec)
        compiled = compile_for(fn, args, kwargs, arch)
    except Exception as e:  # noqa: BLE001  (a config ptxas rejects is a row, not a crash)
        row.update(seconds=round(time.perf_counter() - start, 2), error=f"{type(e).__name__}: "
                   + (str(e).strip().splitlines() or [""])[0][:200])
        return row
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    usage = resource_usage(compiled.asm["cubin"])
    units, sites = matrix_units(compiled.asm["ptx"])
    shared = compiled.metadata.shared + usage.get("SHARED", 0)
    row.update(regs=usage.get("REG"), spill=usage.get("STACK", 0) + usage.get("LOCAL", 0), shared=shared,
               seconds=round(seconds, 2), cpu_s=round(cpu, 2), mma=units, mma_sites=sites,
               ok=usage.get("STACK", 0) + usage.get("LOCAL", 0) == 0 and shared <= SHARED_LIMIT.get(arch, 0))
    return row


def _compile_in_worker(job):
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # Triton 3.9's notice, per process
    spec, arch = job
    return compile_spec(spec, arch)


def compile_all(specs, arch: int = 90, jobs: int | None = None, on_row=None) -> list[dict]:
    """compile_spec over every spec in `jobs` processes (compiling is CPU-bound and holds the GIL in
    places); rows in the order of `specs`. `on_row(row)` sees each as it finishes."""
    import concurrent.futures as cf
    import multiprocessing as mp

    jobs = jobs or os.cpu_count() or 1
    rows = [None] * len(specs)
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as pool:
        futures = {pool.submit(_compile_in_worker, (s, arch)): i for i, s in enumerate(specs)}
        for future in cf.as_completed(futures):
            rows[futures[future]] = future.result()
            if on_row:
                on_row(rows[futures[future]])
    return rows


def warm(spec: Spec, sms: int = 132) -> float:
    """On a GPU machine: compile `spec` for its GPU into Triton's cache exactly as its launch will
    (same binder, options and cache key), without running it. Returns the seconds it took."""
    fn, args, kwargs = launch(spec, sms=sms)
    start = time.perf_counter()
    fn.warmup(*args, grid=(1,), **kwargs)
    return time.perf_counter() - start
