"""Peak memory of training steps with and without activation checkpointing, for one model and batch:
process RSS growth on CPU (each mode in a fresh process), CUDA max allocated on a GPU.

    python bench/memory.py [--device cpu|cuda] [--out bench/results/memory.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["model.n_layer=8", "model.n_head=8", "model.n_embd=512", "model.block_size=512", "model.vocab_size=8192",
         "train.batch_size=8", "train.dtype=float32", "model.dropout=0.0"]


def measure(mode: str, device: str, steps: int = 3) -> dict:
    """Runs in a child process: memory growth from after the model and optimizer exist to the peak."""
    import torch

    from lm.config import load_config
    from lm.optim import build_optimizer
    from lm.parallel import World, build_model

    cfg = load_config(None, [*SHAPE, f"parallel.activation_checkpointing={mode}", f"train.device={device}"])
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
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    for _ in range(steps):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "device": device, "peak_growth_gb": (peak - base) / 1e9,
            "s_per_step": (time.perf_counter() - start) / steps, "loss": loss.item()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.device)))
        return
    rows = []
    for mode in ("none", "full"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--device", args.device],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratio = rows[0]["peak_growth_gb"] / rows[1]["peak_growth_gb"]
    print(f"{'activation ckpt':16} {'peak growth GB':>15} {'s/step':>8}")
    for r in rows:
        print(f"{r['mode']:16} {r['peak_growth_gb']:15.3f} {r['s_per_step']:8.2f}")
    print(f"peak memory without / with full activation checkpointing: {ratio:.2f}x ({' '.join(SHAPE)})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"shape": SHAPE, "rows": rows, "ratio": ratio}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
