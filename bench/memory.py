"""Peak memory of training steps with and without activation checkpointing, and with the whole fp32 logits
(model.loss_chunk = 0) against the chunked loss (lm/model/loss.py, the default model.loss_chunk), for one model
and batch: on CPU the peak of live tensor bytes in the profiler's allocation record (each case in a fresh
process; RSS would also count the C heap's fragmentation), CUDA max allocated on a GPU; beside each,
lm/training/plan.py's prediction.

    python bench/memory.py [--device cpu|cuda] [--out bench/results/memory.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["model.n_layer=8", "model.n_head=8", "model.n_embd=512", "model.block_size=512", "model.vocab_size=8192",
         "train.batch_size=8", "train.dtype=float32", "model.dropout=0.0"]


def cpu_peak_growth(fn) -> tuple[int, object]:
    """(peak live tensor bytes allocated while fn() runs, fn's result), from the profiler's record of every
    allocation (+) and free (-) in order."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, result


def measure(mode: str, loss_chunk: int, device: str, steps: int = 3) -> dict:
    """Runs in a child process: memory growth from after the model and optimizer exist to the peak."""
    import torch

    from lm.config.load import load_config
    from lm.training.optim import build_optimizer
    from lm.training.parallel import World, build_model
    from lm.training.plan import plan

    cfg = load_config(None, [*SHAPE, f"parallel.activation_checkpointing={mode}", f"train.device={device}",
                             f"model.loss_chunk={loss_chunk}"])
    p = plan(cfg, world_size=1, dtype=cfg.train.dtype)
    dev = torch.device(device)
    model = build_model(cfg, World(), dev)
    opt = build_optimizer(model, cfg.optim, dev)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.model.block_size), device=dev)
    for param in model.parameters():  # gradients and optimizer state exist before the baseline, so the
        param.grad = torch.zeros_like(param)  # growth measured below is activations and temporaries
    lr = opt.param_groups[0]["lr"]
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    for group in opt.param_groups:
        group["lr"] = lr

    def train_steps():
        for _ in range(steps):
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        return loss

    start = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = train_steps()
        growth = torch.cuda.max_memory_allocated() - base
    else:
        growth, loss = cpu_peak_growth(train_steps)
    return {"mode": mode, "loss_chunk": loss_chunk, "device": device, "peak_growth_gb": growth / 1e9,
            # the gradients and optimizer state exist before the baseline: the rest of the planned peak
            "planned_gb": (p.mem_activations + p.mem_logits + p.mem_temporaries) / 1e9,
            "planned_logits_gb": p.mem_logits / 1e9,
            "s_per_step": (time.perf_counter() - start) / steps, "loss": loss.item()}


def main():
    from lm.config.schema import ModelConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--loss-chunk", type=int, default=ModelConfig.loss_chunk,
                   help="the chunked case's model.loss_chunk (default: the config default)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, chunk = args.child.split(":")
        print(json.dumps(measure(mode, int(chunk), args.device)))
        return
    rows = []
    for mode in ("none", "full"):
        for chunk in (0, args.loss_chunk):
            out = subprocess.run([sys.executable, __file__, "--child", f"{mode}:{chunk}", "--device", args.device],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    by = {(r["mode"], r["loss_chunk"]): r for r in rows}
    print(f"{'activation ckpt':16} {'loss_chunk':>10} {'peak growth GB':>15} {'planned GB':>11} "
          f"{'(logits)':>9} {'s/step':>8} {'loss':>8}")
    for r in rows:
        print(f"{r['mode']:16} {r['loss_chunk']:10d} {r['peak_growth_gb']:15.3f} {r['planned_gb']:11.3f} "
              f"{r['planned_logits_gb']:9.3f} {r['s_per_step']:8.2f} {r['loss']:8.4f}")
    ratio = by["none", 0]["peak_growth_gb"] / by["full", 0]["peak_growth_gb"]
    print(f"peak memory without / with full activation checkpointing (whole logits): {ratio:.2f}x")
    chunked = {}
    for mode in ("none", "full"):
        before, after = by[mode, 0]["peak_growth_gb"], by[mode, args.loss_chunk]["peak_growth_gb"]
        chunked[mode] = {"whole_gb": before, "chunked_gb": after, "saved_gb": before - after}
        print(f"activation checkpointing {mode}: whole logits {before:.3f} GB -> chunked loss "
              f"(model.loss_chunk = {args.loss_chunk}) {after:.3f} GB, {before - after:.3f} GB less "
              f"({before / after:.2f}x)")
    print(" ".join(SHAPE))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shape": SHAPE, "rows": rows, "ratio": ratio, "chunked_loss": chunked},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
