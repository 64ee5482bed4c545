"""Stages that train: data, e2e_eager, e2e_compiled, train_1p3b, quickstart_200.

Data: the quickstart corpus (configs/quickstart.toml's inputs: the Python standard library, no download)
is prepared once per run into the scratch directory with `python -m data_prep prepare --workers
<cores>`; the smoke run prepares three stdlib packages with a 320-token vocabulary instead. The e2e
stages time synthetic token batches (speed does not depend on the text).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from _gpu.measure import (ROOT, Ctx, child_env, flops_per_token, kill_tree, last_line, mfu, peak_bf16,
                          python_cmd, ratio, read_jsonl, short_error, sync)

QUICKSTART = ROOT / "configs" / "quickstart.toml"
GPT_1P3B = ROOT / "configs" / "gpt-1.3b.toml"
SMOKE_INPUTS = ["${stdlib}/json/*.py", "${stdlib}/email/*.py", "${stdlib}/asyncio/*.py"]
SMOKE_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.dropout=0.0"]


def data_dir(ctx: Ctx) -> Path:
    return ctx.work / "data" / "python_stdlib"


def run_logged(ctx: Ctx, cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as f:
        out = subprocess.run(cmd, cwd=ROOT, env=child_env(ctx.smoke), stdout=f, stderr=subprocess.STDOUT)
    if out.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[1:4]))} ... exited {out.returncode}: {last_line(log)}")
    return out


# ---------------------------------------------------------------- data

def data(ctx: Ctx):
    """Prepare the quickstart data (or the smoke subset) into the scratch directory."""
    from lm.config.load import load_config

    d = load_config(QUICKSTART, []).data
    out = data_dir(ctx)
    out.parent.mkdir(parents=True, exist_ok=True)
    inputs, vocab = ctx.pick((d.inputs, d.vocab_size), (SMOKE_INPUTS, 320))
    workers = max(1, min(16, os.cpu_count() or 1))
    cmd = python_cmd("-m", "data_prep", "prepare", *inputs, "--out", out, "--tokenizer", d.tokenizer,
                     "--vocab-size", vocab, "--val-fraction", d.val_fraction, "--workers", workers, "--quiet")
    if d.exclude:
        cmd += ["--exclude", *d.exclude]
    start = time.perf_counter()
    run_logged(ctx, cmd, ctx.work / "data_prep.log")
    seconds = time.perf_counter() - start
    meta = json.loads((out / "meta.json").read_text())
    yield dict(note=f"inputs {' '.join(inputs)}; bpe vocab {vocab}; {workers} workers; {seconds:.1f} s",
               seconds=seconds)
    for split, info in meta["splits"].items():
        yield dict(split=split, documents=info["docs"], tokens=info["tokens"], bytes=info.get("bytes"))


def ensure_data(ctx: Ctx) -> Path:
    """The prepared data: made by the data stage, or here when a stage runs alone (--only)."""
    if not (data_dir(ctx) / "meta.json").exists():
        for _ in data(ctx):
            pass
    return data_dir(ctx)


# ---------------------------------------------------------------- end to end, in process

E2E_EAGER = [("sdpa", "torch"), ("sdpa", "triton"), ("triton", "torch"), ("triton", "triton")]
E2E_COMPILED = [("sdpa", "torch"), ("triton", "triton")]


def e2e_overrides(ctx: Ctx) -> list[str]:
    """gpt2-124m at block 1024 with the vocabulary padded to 50304 (a multiple of 64, as nanoGPT does);
    16 sequences = 16k tokens per step. Smoke: 2 layers, width 64, block 16, one sequence (the
    interpreter pays per program)."""
    gpu = ["model.preset=gpt2-124m", "model.vocab_size=50304", "model.dropout=0.0", "train.batch_size=16"]
    smoke = [*SMOKE_MODEL, "model.block_size=16", "model.vocab_size=256", "train.batch_size=1"]
    return ctx.pick(gpu, smoke)


@contextlib.contextmanager
def cheap_compile(ctx: Ctx):
    """On --smoke, nn.Module.compile uses the aot_eager backend: dynamo and AOT autograd run, inductor's
    C++ build (minutes on a 2-core CPU) does not. On the GPU: inductor, unchanged."""
    if not ctx.smoke:
        yield
        return
    original = torch.nn.Module.compile
    torch.nn.Module.compile = functools.partialmethod(original, backend="aot_eager")
    try:
        yield
    finally:
        torch.nn.Module.compile = original


def train_speed(ctx: Ctx, attention: str, layernorm: str, compiled: bool) -> dict:
    """Tokens/s and MFU of full training steps (forward, backward, clip, AdamW) on synthetic tokens;
    bf16 autocast on the GPU, fp32 on the smoke CPU."""
    from lm.config.load import load_config
    from lm.training.optim import build_optimizer
    from lm.training.parallel import World, build_model

    dev = ctx.device
    cfg = load_config(None, [*e2e_overrides(ctx), f"model.attention={attention}", f"model.layernorm={layernorm}",
                             f"parallel.compile={'blocks' if compiled else 'none'}", f"train.device={dev.type}"])
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with cheap_compile(ctx):
        model = build_model(cfg, World(), dev)
    opt = build_optimizer(model, cfg.optim, dev)
    B, T, V = cfg.train.batch_size, cfg.model.block_size, cfg.model.vocab_size
    tokens = torch.randint(0, V, (B, T + 1), device=dev)
    x, y = tokens[:, :-1], tokens[:, 1:]
    cuda = dev.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def step():
        with autocast():
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    step()
    sync(dev)
    first = time.perf_counter() - start  # compilation, autotuning, allocator warm-up
    for _ in range(ctx.pick(2, 0)):
        step()
    n = ctx.pick(15, 1)
    sync(dev)
    start = time.perf_counter()
    for _ in range(n):
        loss = step()
    sync(dev)
    seconds = (time.perf_counter() - start) / n
    tok_s = B * T / seconds
    fpt = flops_per_token(model.num_params(), cfg.model.n_layer, cfg.model.n_embd, T)
    row = dict(mode="compiled" if compiled else "eager", attention=attention, layernorm=layernorm,
               tokens_per_s=tok_s, mfu=mfu(tok_s, fpt, peak_bf16(dev)), step_ms=seconds * 1e3, first_step_s=first,
               peak_mem_gb=torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
               loss=loss.item())
    del model, opt
    return row


def _e2e(ctx: Ctx, variants, compiled: bool):
    yield dict(note=f"{' '.join(e2e_overrides(ctx))}; MFU = tokens/s x (6N + 12·L·h·s) / lm.training.metrics peak; "
                    f"vs_base = tokens/s over the first row's")
    base = None
    for attention, layernorm in variants:
        try:
            row = train_speed(ctx, attention, layernorm, compiled)
        except Exception as e:  # noqa: BLE001  (one variant failing, e.g. to compile, is a result too)
            row = dict(note=f"{attention}+{layernorm} failed: {short_error(e)}", error=short_error(e))
        torch._dynamo.reset()  # the next variant compiles afresh
        if "error" not in row:
            base = base or row["tokens_per_s"]
            row["vs_base"] = ratio(row["tokens_per_s"], base)
        yield row


def e2e_eager(ctx: Ctx):
    """gpt2-124m training steps, eager: SDPA vs our attention, torch vs our LayerNorm."""
    ctx.require_gpu()
    yield from _e2e(ctx, E2E_EAGER, compiled=False)


def e2e_compiled(ctx: Ctx):
    """The same with parallel.compile (each block torch.compile'd): PyTorch kernels vs ours."""
    ctx.require_gpu()
    if ctx.smoke:  # dynamo cannot trace the Triton interpreter's kernels: PyTorch's kernels only
        yield dict(note="smoke: compiled triton variants skipped (dynamo cannot trace the Triton interpreter)")
        yield from _e2e(ctx, E2E_COMPILED[:1], compiled=True)
        return
    yield from _e2e(ctx, E2E_COMPILED, compiled=True)


# ---------------------------------------------------------------- through train.py

def launch_train(ctx: Ctx, config: Path, overrides: list[str], log: Path, nproc: int | None = None):
    """`python train.py` (or `torchrun --nproc_per_node=N train.py`) as a child process, output to `log`."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    with open(log, "w") as f:
        return subprocess.Popen(python_cmd(*launcher, ROOT / "train.py", config, *overrides), cwd=ROOT,
                                env=child_env(ctx.smoke), stdout=f, stderr=subprocess.STDOUT)


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r and "val_loss" not in r]


def _gpu_key(device: torch.device) -> str:
    """The lm.training.metrics.PEAK_FLOPS device name for this GPU (the most specific match), H100 on a CPU."""
    from lm.training.metrics import PEAK_FLOPS

    if device.type != "cuda":
        return "H100"
    name = torch.cuda.get_device_name(device)
    matches = [key for key, _ in PEAK_FLOPS if key in name]
    return max(matches, key=len) if matches else "H100"


def train_1p3b(ctx: Ctx):
    """configs/gpt-1.3b.toml's shape (24 x 2048, 16 heads, block 2048, vocab 50304) for a few steps through
    `torchrun --nproc_per_node=1 train.py`, full activation checkpointing, micro-batch 8, on the quickstart
    data: tokens/s, MFU and peak memory from its metrics.jsonl beside lm.training.plan.plan for the same config.
    Stopped once the last step's record is written (its final evaluation and 16 GB checkpoint are not
    what is measured). Smoke: the same command on the CPU with a 2-layer model."""
    from lm.config.load import load_config
    from lm.training.plan import plan

    ctx.require_gpu()
    steps = ctx.pick(8, 3)
    run_dir = ctx.work / "run_1p3b"
    overrides = [f"data.dir={ensure_data(ctx)}", f"train.out_dir={run_dir}", f"train.max_steps={steps}",
                 "train.grad_accum=1", "parallel.activation_checkpointing=full", "train.eval_sequences=8",
                 "train.eval_interval=1000", "train.checkpoint_interval=1000", "log.interval=1", "log.progress=false",
                 "optim.warmup_steps=2"]
    overrides += ctx.pick(["train.batch_size=8"],
                          [*SMOKE_MODEL, "model.block_size=64", "model.vocab_size=512", "train.batch_size=2",
                           "train.device=cpu", "train.dtype=float32"])
    log = ctx.work / "train_1p3b.log"
    proc = launch_train(ctx, GPT_1P3B, overrides, log, nproc=1)
    while proc.poll() is None:
        if any(r["step"] == steps for r in step_records(run_dir)):
            kill_tree(proc)  # the last step is logged: its final evaluation and checkpoint are not needed
            break
        time.sleep(0.5)
    records = step_records(run_dir)
    if not any(r["step"] == steps for r in records):
        raise RuntimeError(f"torchrun train.py exited {proc.returncode} before step {steps}: {last_line(log)}")
    steady = [r for r in records if r["step"] > 2] or records  # the first steps carry CUDA/cuBLAS warm-up
    tok_s = statistics.median(r["tokens_per_s"] for r in steady)
    mfus = [r["mfu"] for r in steady if r.get("mfu")]
    peak_mem = max(r["peak_mem_gb"] for r in records)

    cfg = load_config(GPT_1P3B, overrides)
    dev = ctx.device
    memory = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else 80e9
    p = plan(cfg, world_size=1, gpu=_gpu_key(dev), gpu_memory=memory, mfu=0.4)
    yield dict(note=f"torchrun --nproc_per_node=1 train.py configs/gpt-1.3b.toml {' '.join(overrides)}")
    yield dict(note="world size 1 under torchrun: FSDP2 with one shard (bf16 mixed-precision policy), as on N GPUs")
    yield dict(source="measured (metrics.jsonl)", params=p.params, micro_batch=cfg.train.batch_size,
               tokens_per_s=tok_s, mfu=statistics.median(mfus) if mfus else None, peak_mem_gb=peak_mem,
               step_s=p.tokens_per_step / tok_s, loss=records[-1]["loss"])
    yield dict(source=f"planner (lm.training.plan, {p.gpu}, MFU {p.mfu:.0%})", params=p.params, micro_batch=p.micro_batch,
               tokens_per_s=p.tokens_per_s, mfu=p.mfu, peak_mem_gb=p.mem_total / 1e9, step_s=p.step_time_s)
    yield dict(source="measured / planner", tokens_per_s=ratio(tok_s, p.tokens_per_s),
               mfu=ratio(statistics.median(mfus), p.mfu) if mfus else None,
               peak_mem_gb=ratio(peak_mem, p.mem_total / 1e9))


def quickstart_200(ctx: Ctx):
    """configs/quickstart.toml for 200 steps with our kernels (attention + LayerNorm triton) and with
    PyTorch's (sdpa + torch), same seed, both runs at once on the one GPU: the loss curves must track.
    Pass: mean |loss difference| over the last 50 steps < 0.05 nats and final val loss within 2%.
    Smoke: 5 steps of a 2-layer model on the smoke data, the kernels through the interpreter."""
    ctx.require_gpu()
    steps = ctx.pick(200, 5)
    common = [f"data.dir={ensure_data(ctx)}", f"train.max_steps={steps}", f"train.eval_interval={steps}",
              "log.interval=1", "log.progress=false"]
    common += ctx.pick([], [*SMOKE_MODEL, "model.block_size=16", "train.batch_size=1", "train.eval_sequences=1",
                            "train.device=cpu", f"data.inputs={json.dumps(SMOKE_INPUTS)}", "data.vocab_size=320"])
    paths = {"triton": ["model.attention=triton", "model.layernorm=triton"],
             "sdpa": ["model.attention=sdpa", "model.layernorm=torch"]}
    procs = {name: launch_train(ctx, QUICKSTART, [*common, *extra, f"train.out_dir={ctx.work / ('qs_' + name)}"],
                                ctx.work / f"quickstart_{name}.log")
             for name, extra in paths.items()}
    yield from _progress(ctx, procs, every=ctx.pick(25, 1))
    for name, proc in procs.items():
        if proc.wait():
            raise RuntimeError(f"train.py ({name}) exited {proc.returncode}: "
                               f"{last_line(ctx.work / f'quickstart_{name}.log')}")
    losses, vals = {}, {}
    for name in paths:
        records = read_jsonl(ctx.work / f"qs_{name}" / "metrics.jsonl")
        losses[name] = {r["step"]: r["loss"] for r in records if "loss" in r and "val_loss" not in r}
        vals[name] = [r["val_loss"] for r in records if "val_loss" in r][-1]
    common_steps = sorted(set(losses["triton"]) & set(losses["sdpa"]))
    tail = common_steps[-50:]
    diffs = [abs(losses["triton"][s] - losses["sdpa"][s]) for s in tail]
    mean_diff = sum(diffs) / len(diffs)
    val_rel = abs(vals["triton"] - vals["sdpa"]) / vals["sdpa"]
    for name in paths:
        yield dict(path=name, steps=len(losses[name]), first_loss=losses[name][common_steps[0]],
                   last50_mean_loss=sum(losses[name][s] for s in tail) / len(tail), final_val_loss=vals[name])
    yield {"path": "|triton - sdpa|", "steps": len(common_steps),
           "first_loss": abs(losses["triton"][common_steps[0]] - losses["sdpa"][common_steps[0]]),
           "last50_mean_loss": mean_diff, "final_val_loss": abs(vals["triton"] - vals["sdpa"]),
           "val_rel": val_rel, "tol": f"last-{len(tail)} mean |diff| < 0.05 nats, val within 2%",
           "pass": mean_diff < 0.05 and val_rel < 0.02}


def _progress(ctx: Ctx, procs: dict, every: int):
    """While the quickstart runs train, a note row each `every` steps both have logged (their losses),
    so a stage cut before the end still reports how far the curves agreed."""
    shown = 0
    while True:
        running = any(p.poll() is None for p in procs.values())
        losses = {name: {r["step"]: r["loss"] for r in step_records(ctx.work / f"qs_{name}")} for name in procs}
        both = sorted(set(losses["triton"]) & set(losses["sdpa"]))
        for step in [s for s in both if s > shown and s % every == 0]:
            a, b = losses["triton"][step], losses["sdpa"][step]
            yield dict(note=f"step {step}: loss triton {a:.4f}, sdpa {b:.4f}", step=step, triton_loss=a,
                       sdpa_loss=b)
            shown = step
        if not running:
            return
        time.sleep(1.0)
