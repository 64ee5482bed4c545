"""The first stage of `bench/gpu.py`: every Triton kernel the later stages launch, compiled in parallel on
all cores into Triton's on-disk cache, so the measuring stages load kernels instead of compiling them.

`needed_specs` lists the launches (kernels.compile_check.Spec: kernel, dtype, head dim, flags, config
and the T and H whose divisibility the compiler sees); `precompile` warms them in worker processes
(JITFunction.warmup: the launch's own binder, options and cache key, nothing runs). On --smoke there is
no GPU: a few of them compile for sm_90 through bench/compile.py instead, which checks the same plumbing.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _gpu.measure import ROOT, Ctx, short_error

DTYPE = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def _attention_specs(dtype, D, causal, group, docs, dropout, T, H, configs):
    from lm.kernels.compile_check import Spec, config_tuple

    specs = [Spec(k, dtype, D, config_tuple(c[k]), causal=causal, group=group, docs=docs, dropout=dropout,
                  T=T, H=H) for c in configs for k in ("fwd", "dkdv", "dq")]
    return specs + [Spec("delta", dtype, D, T=T, H=H)]


def _tuned(dtype, D):
    """Each config set the autotuner tries for this dtype and head dim (all it ships)."""
    from lm.kernels.compile_check import DTYPES
    from lm.kernels.flash_attention import shipped_configs

    lists = {k: shipped_configs(k, DTYPES[dtype], D) for k in ("fwd", "dkdv", "dq")}
    n = max(len(v) for v in lists.values())
    return [{k: v[i % len(v)] for k, v in lists.items()} for i in range(n)]


def needed_specs(ctx: Ctx) -> dict[str, list]:
    """stage name -> the kernel launches it makes (GPU sizes), deduplicated across stages."""
    from _gpu import kernel_stages as ks
    from lm.kernels.compile_check import Spec

    out = {"kernel_check": [], "attention_speed": [], "layernorm_speed": [], "e2e": []}  # e2e: the training stages
    from lm.kernels.flash_attention import runs_on_gpu

    for i, case in enumerate(ks.ATTN_CASES):
        dtype = DTYPE[str(case.dtype)]
        s = ks.attention_shape(Ctx(smoke=False, work=ctx.work), case)
        group = s["H"] // s["kv_heads"]
        if case.p:
            out["kernel_check"].append(Spec("keep_mask", dtype, case.D, T=s["T"], H=s["H"]))
        if not runs_on_gpu(case.dtype, case.D):
            continue  # PyTorch runs it on a GPU
        if case.tuned:
            configs = _tuned(dtype, case.D)
        else:
            pick = ks.pinned_choice(i, case)
            configs = [{"fwd": pick["f"], "dkdv": pick["kv"], "dq": pick["q"]}]
        out["kernel_check"] += _attention_specs(dtype, case.D, case.causal, group, bool(case.docs), case.p > 0,
                                                s["T"], s["H"], configs)
    for dtype in ("bf16", "fp16", "fp32"):
        for N in ks.LN_CASES_N:
            out["kernel_check"] += [Spec(k, dtype, N, T=2048) for k in ("ln_fwd", "ln_bwd")]
        out["kernel_check"] += [Spec(k, dtype, ks.LN_CASES_N[1], rms=True, T=2048) for k in ("ln_fwd", "ln_bwd")]
    for D in (64, 128):
        for group, docs in ks.SPEED_VARIANTS:
            out["attention_speed"] += _attention_specs("bf16", D, True, group, docs, False, 1024, 2048 // D,
                                                       _tuned("bf16", D))
    for N in (768, 1024, 2048, 4096, 8192):
        out["layernorm_speed"] += [Spec(k, "bf16", N, T=16384) for k in ("ln_fwd", "ln_bwd")]
    # e2e: gpt2-124m (12 heads of 64, block 1024) under bf16 autocast: bf16 attention, fp32 residual stream
    out["e2e"] += _attention_specs("bf16", 64, True, 1, False, False, 1024, 12, _tuned("bf16", 64))
    out["e2e"] += [Spec(k, dt, 768, T=16384) for k in ("ln_fwd", "ln_bwd") for dt in ("bf16", "fp32")]
    # quickstart_200: configs/quickstart.toml (6 heads of 32, block 256, width 192, micro-batch 8), bf16
    out["e2e"] += _attention_specs("bf16", 32, True, 1, False, False, 256, 6, _tuned("bf16", 32))
    out["e2e"] += [Spec(k, dt, 192, T=2048) for k in ("ln_fwd", "ln_bwd") for dt in ("bf16", "fp32")]
    seen, unique = set(), {}
    for stage, specs in out.items():
        unique[stage] = [s for s in specs if not (s in seen or seen.add(s))]
    return unique


def _warm(spec):
    from lm.kernels.compile_check import warm

    try:
        return spec, warm(spec, sms=_warm.sms), None
    except Exception as e:  # noqa: BLE001  (reported as a row: the stage goes on)
        return spec, 0.0, short_error(e)


def _init_worker(sms):
    _warm.sms = sms


def precompile(ctx: Ctx):
    """Compile every launch the later stages need, one process per core; a row per (stage, kernel)."""
    if ctx.smoke:
        yield from _smoke(ctx)
        return
    ctx.require_gpu()
    import concurrent.futures as cf
    import multiprocessing as mp

    import torch

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    needed = needed_specs(ctx)
    owner = {s: stage for stage, specs in needed.items() for s in specs}
    jobs = os.cpu_count() or 1
    yield dict(note=f"{len(owner)} launches compiled into {os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')} "
                    f"by {jobs} processes; autotune results shared (TRITON_CACHE_AUTOTUNING="
                    f"{os.environ.get('TRITON_CACHE_AUTOTUNING', '')})")
    start = time.perf_counter()
    seconds, counts, errors = Counter(), Counter(), {}
    # spawn: workers initialize CUDA themselves (a forked CUDA context is unusable)
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                initargs=(sms,)) as pool:
        for spec, secs, error in pool.map(_warm, list(owner)):
            key = (owner[spec], spec.kernel, spec.dtype)
            seconds[key] += secs
            counts[key] += 1
            if error:
                errors[key] = error
    for (stage, kernel, dtype), n in counts.items():
        yield dict(stage=stage, kernel=kernel, dtype=dtype, launches=n, compile_s=seconds[(stage, kernel, dtype)],
                   error=errors.get((stage, kernel, dtype)))
    yield dict(stage="all", launches=sum(counts.values()), compile_s=sum(seconds.values()),
               wall_s=time.perf_counter() - start)


def _smoke(ctx: Ctx):
    """No GPU: the bf16 D=64 forward configs and the norm kernels compiled for sm_90 by bench/compile.py
    (the interpreter this process runs under cannot compile), and the launch list counted."""
    needed = needed_specs(ctx)
    counts = ", ".join(f"{k} {len(v)}" for k, v in needed.items())
    yield dict(note="smoke: a sm_90 compile of a few kernels through bench/compile.py; the GPU run warms "
                    f"{sum(map(len, needed.values()))} launches: {counts}")
    out = Path(tempfile.mkdtemp(prefix="compile-", dir=ctx.work)) / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "bench" / "compile.py"), "--dtypes", "bf16", "--dims", "64", "--features",
           "causal", "--kernels", "fwd,norm", "--norm-n", "768", "--jobs", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if not out.exists():
        raise RuntimeError(f"bench/compile.py exited {proc.returncode}: {(proc.stderr or proc.stdout)[-300:]}")
    for r in json.loads(out.read_text())["rows"]:
        yield dict(stage="smoke", kernel=r["kernel"], dtype=r["dtype"], launches=1, compile_s=r["seconds"],
                   regs=r.get("regs"), spill=r.get("spill"), error=r.get("error"))
