"""Growing a trained model against training the grown shape from scratch, at equal compute.

    python bench/grow.py [--text ../shared/data/tinyshakespeare.txt] [--small-steps 1000] [--grown-steps 300]
                         [--work /tmp/lmforge-grow] [--json bench/results/grow.json]

A small GPT (2 layers x 64, characters of tinyshakespeare) trains N steps; `lm.grow` makes it 2x deeper
(new zero blocks, and stacked copies), 2x wider (HyperCloning), and both; each grown model trains M more
steps (a new run from init.from: fresh AdamW, the schedule warms up again). Each grown shape is also
trained from scratch for as many FLOPs as the small run plus its continuation used together. FLOPs are
the planner's (lm.training.plan.flops_per_token x tokens). Reported: the validation loss right after growing (the
jump), the loss of both at half and all of the budget, and the FLOPs the grown path needs to reach the
scratch run's final loss, as a fraction of the scratch run's (linear interpolation between evaluations).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import is_prepared, prepare  # noqa: E402
from lm.config.load import load_config  # noqa: E402
from lm.grow import GrowSpec  # noqa: E402
from lm.grow.run import grow  # noqa: E402
from lm.training.plan import flops_per_token  # noqa: E402
from lm.training.trainer import Trainer  # noqa: E402

COMMON = ["model.block_size=64", "model.dropout=0.0", "model.bias=false", "train.batch_size=16",
          "train.device=cpu", "train.dtype=float32", "train.eval_sequences=64", "train.keep_checkpoints=1",
          "log.progress=false", "optim.lr=2e-3", "optim.min_lr=2e-4", "optim.warmup_steps=30",
          "optim.weight_decay=0.1"]
SMALL = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4"]
# variant -> (lm.grow spec, the grown shape as overrides for its from-scratch twin)
DEEP, WIDE, BOTH = (["model.n_layer=4", "model.n_embd=64", "model.n_head=4"],
                    ["model.n_layer=2", "model.n_embd=128", "model.n_head=8"],
                    ["model.n_layer=4", "model.n_embd=128", "model.n_head=8"])
# variant -> (directory name, lm.grow spec, the grown shape as overrides for its from-scratch twin)
VARIANTS = {
    "2x depth (zero blocks)": ("depth_zero", GrowSpec(n_layer=4), DEEP),
    "2x depth (stacked)": ("depth_stack", GrowSpec(n_layer=4, depth="stack"), DEEP),
    "2x width": ("width", GrowSpec(n_embd=128), WIDE),
    "2x depth + 2x width": ("depth_width", GrowSpec(n_layer=4, n_embd=128), BOTH),
}


def train(overrides: list[str]) -> tuple[list[tuple[int, float]], float, object]:
    """Run the trainer; returns (step, val loss) at each evaluation, the wall time, and the config."""
    cfg = load_config(ROOT / "configs/shakespeare_char.toml", overrides)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r], time.perf_counter() - start, cfg


def flops_per_step(cfg) -> float:
    return flops_per_token(cfg.model) * cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size


def curve(evals, per_step: float, offset: float = 0.0) -> list[tuple[float, float]]:
    return [(offset + step * per_step, loss) for step, loss in evals]


def loss_at(points: list[tuple[float, float]], flops: float) -> float:
    """The validation loss at `flops`, linearly interpolated between evaluations."""
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if f0 <= flops <= f1:
            return l0 + (l1 - l0) * (flops - f0) / (f1 - f0) if f1 > f0 else l1
    return points[-1][1] if flops >= points[-1][0] else math.nan


def flops_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """The first FLOPs at which the interpolated loss falls to `target`; None when it never does."""
    if points[0][1] <= target:
        return points[0][0]
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if l1 <= target < l0:
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", type=Path, default=ROOT.parent / "shared/data/tinyshakespeare.txt")
    p.add_argument("--small-steps", type=int, default=1000)
    p.add_argument("--grown-steps", type=int, default=300)
    p.add_argument("--eval-interval", type=int, default=25)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine others are using)")
    p.add_argument("--work", type=Path, default=Path("/tmp/lmforge-grow"))
    p.add_argument("--json", type=Path, default=ROOT / "bench/results/grow.json")
    args = p.parse_args(argv)
    started = time.perf_counter()
    data = args.work / "data"
    if not is_prepared(data):
        prepare([str(args.text)], data, tokenizer="char", show_progress=False)
    runs = args.work / f"runs-{int(time.time())}"
    common = [*COMMON, f"data.dir={data}", f"train.eval_interval={args.eval_interval}",
              f"train.threads={args.threads}"]

    def steps(n):
        return [f"train.max_steps={n}", f"train.checkpoint_interval={n}"]

    small_evals, small_wall, small_cfg = train([*common, *SMALL, *steps(args.small_steps),
                                                f"train.out_dir={runs / 'small'}"])
    small_flops = args.small_steps * flops_per_step(small_cfg)
    small_curve = curve(small_evals, flops_per_step(small_cfg))
    print(f"small: val {small_evals[-1][1]:.4f} after {args.small_steps} steps ({small_wall:.0f} s)", flush=True)
    scratch: dict[tuple, tuple] = {}  # one from-scratch run per grown shape

    def compare(name, slug, spec, shape) -> dict:
        out = runs / slug
        grow(str(runs / "small"), out, spec)
        evals, wall, cfg = train([f"init.from={out}", *common, *shape, *steps(args.grown_steps),
                                  f"train.out_dir={out}-continued"])
        per_step = flops_per_step(cfg)
        grown_curve = small_curve + curve(evals, per_step, small_flops)[1:]  # its step 0 is the small's end
        budget = small_flops + args.grown_steps * per_step
        if tuple(shape) not in scratch:  # the same FLOPs as the small run and the continuation together
            n = math.ceil(budget / per_step)
            s_evals, s_wall, _ = train([*common, *shape, *steps(n), f"train.out_dir={runs / ('scratch_' + slug)}"])
            scratch[tuple(shape)] = (curve(s_evals, per_step), n, s_wall)
        scratch_curve, scratch_steps, scratch_wall = scratch[tuple(shape)]
        target = scratch_curve[-1][1]
        reach = flops_to_reach(grown_curve, target)
        # the small model alone may get there first: then growing was not what reached it
        reached_in = None if reach is None else "small" if reach <= small_flops else "grown"
        return {"variant": name, "shape": shape, "small_final_val": small_evals[-1][1],
                "val_after_growth": evals[0][1], "jump": evals[0][1] - small_evals[-1][1],
                "budget_flops": budget, "scratch_steps": scratch_steps,
                "grown_val_half": loss_at(grown_curve, budget / 2),
                "scratch_val_half": loss_at(scratch_curve, budget / 2),
                "grown_val_end": loss_at(grown_curve, budget), "scratch_val_end": target,
                "flops_to_scratch_final": reach, "reached_in": reached_in,
                "fraction_of_scratch_flops": reach / scratch_curve[-1][0] if reach else None,
                "grown_curve": grown_curve, "scratch_curve": scratch_curve, "wall_s": wall,
                "scratch_wall_s": scratch_wall}

    results = []
    for name, (slug, spec, shape) in VARIANTS.items():
        row = compare(name, slug, spec, shape)
        results.append(row)
        reached = row["fraction_of_scratch_flops"]
        print(f"{name}: after growth {row['val_after_growth']:.4f} (jump {row['jump']:+.4f}), "
              f"end {row['grown_val_end']:.4f} vs scratch {row['scratch_val_end']:.4f}; reaches it at "
              + (f"{reached:.2f}x the FLOPs" if reached else "never"), flush=True)
    table = format_table(results, args)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"small_steps": args.small_steps, "grown_steps": args.grown_steps,
                                     "small_flops": small_flops, "small_curve": small_curve, "results": results,
                                     "table": table, "wall_s": time.perf_counter() - started}, indent=2) + "\n")
    print(f"wrote {args.json} ({time.perf_counter() - started:.0f} s)")
    return 0


def format_table(results: list[dict], args) -> str:
    lines = [f"small 2x64 trained {args.small_steps} steps (val {results[0]['small_final_val']:.3f}), grown, trained "
             f"{args.grown_steps} more; scratch: the grown shape, the same FLOPs in total. Val loss (nats/char).",
             "| variant | after growth (jump) | grown @ 1/2 budget | scratch @ 1/2 | grown @ budget | scratch @ budget "
             "| FLOPs to scratch's final loss |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        reach = (f"{r['fraction_of_scratch_flops']:.2f}x" + (" (before growing)" if r["reached_in"] == "small" else "")
                 if r["fraction_of_scratch_flops"] else "not reached")
        lines.append(f"| {r['variant']} | {r['val_after_growth']:.3f} ({r['jump']:+.3f}) | "
                     f"{r['grown_val_half']:.3f} | {r['scratch_val_half']:.3f} | {r['grown_val_end']:.3f} | "
                     f"{r['scratch_val_end']:.3f} | {reach} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
