"""AdamW, SGD, RMSprop and Muon side by side on shakespeare_char: configs/shakespeare_char.toml (nanoGPT's CPU
baby GPT) for N steps, each optimizer at a few learning rates, the best of each reported with its lr.

    python bench/optimizers.py ../shared/data/tinyshakespeare.txt        (2000 steps, 3 lrs each: 12 runs)
    python bench/optimizers.py TEXT --steps 500 --lrs sgd=0.03,0.1,0.3 --only sgd,muon
    python bench/optimizers.py TEXT --set sgd:optim.weight_decay=1e-4 train.device=cuda
    python bench/optimizers.py TEXT --smoke        (a tiny model, 3 steps, one lr each: the wiring only)

What is swept: optim.lr for AdamW, SGD and RMSprop; optim.muon_lr (the blocks' matrices) for Muon, whose
AdamW part (embeddings, norms, biases) keeps the config's optim.lr. Everything else is the config's: the
same model, data order, warmup and cosine schedule, gradient clipping, for every run. Weight decay: the
config's 0.1 for AdamW and Muon (decoupled; Muon's update is scaled to AdamW's RMS, so it means the same);
0 for SGD and RMSprop, whose torch weight decay is an L2 term added to the gradient: at SGD's lr it would
shrink the weights ~100x faster than AdamW's, and RMSprop divides it by the gradient's RMS (--set changes
it). A run's score is its lowest validation loss over the evaluations (every train.eval_interval steps);
a best lr at the edge of its sweep is flagged: widen the sweep there.

The runs go one after another in this process (train.py's Trainer, without its progress bar) on data
prepared once from TEXT (characters, the last 10% for validation); results go to
bench/results/optimizers.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "shakespeare_char.toml"

NAMES = ("adamw", "sgd", "rmsprop", "muon")
# the key each optimizer's sweep sets, and its values (the middle one is --smoke's)
SWEEP = {
    # centred on the best of a wider sweep at 2000 steps (2026-11-29, val loss): AdamW 5e-4 1.988, 1e-3 1.897,
    # 2e-3 1.797, 4e-3 1.766, 8e-3 1.746, 1.6e-2 1.819; RMSprop 3e-4 2.096, 1e-3 1.878, 3e-3 1.803, 1e-2 2.545,
    # 3e-2 2.839; Muon 1e-3 1.734, 3e-3 1.624, 1e-2 1.613, 3e-2 1.731, 1e-1 2.223; SGD 0.1 1.945, 0.3 1.883, 1 1.913
    "adamw": ("optim.lr", [4e-3, 8e-3, 1.6e-2]),
    "sgd": ("optim.lr", [0.1, 0.3, 1.0]),  # Nesterov momentum 0.9, gradients clipped to norm 1
    "rmsprop": ("optim.lr", [1e-3, 3e-3, 1e-2]),
    # Muon's update has AdamW's RMS (0.2 per element); Keller Jordan's lr 0.02 (with his max(1, rows/cols)**0.5
    # scale) is about 1e-2 here for the width-128 matrices of this model
    "muon": ("optim.muon_lr", [3e-3, 1e-2, 3e-2]),
}
PER_OPTIMIZER = {"sgd": ["optim.weight_decay=0.0"], "rmsprop": ["optim.weight_decay=0.0"]}
SMOKE = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.max_steps=3",
         "train.eval_interval=3", "train.eval_sequences=8", "train.batch_size=4", "optim.warmup_steps=1"]


def run_one(data: Path, run_dir: Path, overrides: list[str]) -> dict:
    """One training run; its final and lowest validation loss."""
    from lm.config.load import load_config
    from lm.training.trainer import Trainer

    cfg = load_config(CONFIG, [f"data.dir={data}", f"train.out_dir={run_dir}", "log.progress=false",
                               "train.keep_checkpoints=1", *overrides])
    start = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    final = result["val_loss"]
    return {"val_loss": final if final is not None and math.isfinite(final) else None,
            "best_val_loss": min((v for v in vals if math.isfinite(v)), default=None),
            "train_loss": result["train_loss"], "skipped_steps": result["skipped"],
            "wall_s": time.perf_counter() - start}


def parse_lrs(entries: list[str]) -> dict[str, list[float]]:
    out = {}
    for entry in entries:
        name, _, values = entry.partition("=")
        if name not in SWEEP or not values:
            raise SystemExit(f"error: --lrs '{entry}' must be NAME=V1,V2,... with NAME one of {', '.join(NAMES)}")
        out[name] = [float(v) for v in values.split(",")]
    return out


def parse_set(entries: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for entry in entries:
        name, _, override = entry.partition(":")
        if name not in SWEEP or "=" not in override:
            raise SystemExit(f"error: --set '{entry}' must be NAME:section.key=value with NAME one of "
                             f"{', '.join(NAMES)}")
        out.setdefault(name, []).append(override)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("text", type=Path, help="tinyshakespeare.txt (or any text file)")
    p.add_argument("--steps", type=int, default=2000, help="train.max_steps of every run")
    p.add_argument("--lrs", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="this optimizer's sweep instead of the default (optim.lr; optim.muon_lr for muon)")
    p.add_argument("--only", default=",".join(NAMES), help="comma-separated optimizers to run")
    p.add_argument("--set", action="append", default=[], metavar="NAME:section.key=value",
                   help="an override for one optimizer's runs (after the bench's own, so it wins)")
    p.add_argument("--smoke", action="store_true", help="a tiny model, 3 steps, the middle lr of each sweep")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "optimizers.json")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides applied to every run")
    args = p.parse_intermixed_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    if not only or any(n not in NAMES for n in only):
        raise SystemExit(f"error: --only '{args.only}': choose from {', '.join(NAMES)}")
    if not args.text.is_file():
        raise SystemExit(f"error: {args.text}: no such file")
    lrs, extra = parse_lrs(args.lrs), parse_set(args.set)
    steps = 3 if args.smoke else args.steps
    common = [*(SMOKE if args.smoke else []), f"train.max_steps={steps}", *args.overrides]

    from data_prep import prepare

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare([str(args.text.resolve())], data, tokenizer="char", val_fraction=0.1, show_progress=False)
        for name in only:
            key, values = SWEEP[name]
            values = lrs.get(name, values)
            if args.smoke:
                values = [values[len(values) // 2]]
            for value in values:
                overrides = [*common, f"optim.name={name}", *PER_OPTIMIZER.get(name, []), f"{key}={value!r}",
                             *extra.get(name, [])]
                print(f"{name} {key}={value:g} ...", flush=True)
                row = {"optimizer": name, "lr_key": key, "lr": value,
                       **run_one(data, Path(tmp) / f"{name}_{len(runs)}", overrides),
                       "overrides": overrides[len(common):]}
                runs.append(row)
                shown = "diverged" if row["best_val_loss"] is None else f"{row['best_val_loss']:.4f}"
                print(f"  best val loss {shown} ({row['wall_s']:.0f} s)", flush=True)

    best = []
    for name in only:
        mine = [r for r in runs if r["optimizer"] == name]
        scored = [r for r in mine if r["best_val_loss"] is not None]
        if not scored:
            best.append({"optimizer": name, "lr_key": mine[0]["lr_key"], "lr": None, "val_loss": None,
                         "best_val_loss": None, "at_edge": False})
            continue
        top = min(scored, key=lambda r: r["best_val_loss"])
        swept = sorted(r["lr"] for r in mine)
        best.append({"optimizer": name, "lr_key": top["lr_key"], "lr": top["lr"], "val_loss": top["val_loss"],
                     "best_val_loss": top["best_val_loss"],
                     "at_edge": len(swept) > 1 and top["lr"] in (swept[0], swept[-1])})

    print(f"\n{steps} steps of {CONFIG.relative_to(ROOT)} on {args.text.name}; the lowest val loss of each "
          "optimizer over its lr sweep")
    print(f"{'optimizer':10} {'best val':>9} {'final val':>9}  {'lr':<24} swept")
    for row in best:
        swept = ", ".join(f"{r['lr']:g}" for r in runs if r["optimizer"] == row["optimizer"])
        if row["lr"] is None:
            print(f"{row['optimizer']:10} {'diverged':>9} {'':>9}  {'':<24} {swept}")
            continue
        lr = f"{row['lr_key'].split('.')[1]} = {row['lr']:g}" + (" (edge)" if row["at_edge"] else "")
        final = "nan" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
        print(f"{row['optimizer']:10} {row['best_val_loss']:9.4f} {final:>9}  {lr:<24} {swept}")
    result = {"config": str(CONFIG.relative_to(ROOT)), "text": str(args.text), "steps": steps,
              "smoke": args.smoke, "overrides": args.overrides, "best": best, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
