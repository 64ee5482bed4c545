"""Faster to the same loss: our recipe (configs/shakespeare_char_fast.toml) against nanoGPT's baby GPT on
tinyshakespeare characters, timed to the validation loss nanoGPT reaches at 2000 steps.

The target is measured in the same invocation: the bare nanoGPT-style loop of bench/shakespeare_char.py
(configs/shakespeare_char.toml, no framework) trains its 2000 steps and its final val loss is the target.
Our recipe runs through train.py as a user would. Both are whole commands timed from the outside (imports,
data loading, evaluations and, for ours, checkpoints included), alternating round by round so a change in the
machine's load touches both alike. Both evaluate on the same 240 validation windows; the validation split
is only ever evaluated, never trained on or used to pick anything during a run.

    python bench/speedrun.py ../shared/data/tinyshakespeare.txt               (2 alternating rounds)
    python bench/speedrun.py TEXT --threads 1        (both sides: on a machine others share; see the README)
    python bench/speedrun.py TEXT --rounds 3 optim.lr=0.01                    (overrides apply to ours)
    python bench/speedrun.py TEXT --ablation [--target 1.886]                 (each ingredient alone, the recipe without each,
                                                                               and with each left-off candidate)
    python bench/speedrun.py TEXT --smoke                                     (a tiny budget: the wiring only)

Time to target (ours): the command's wall time, less the time its run spent after the first evaluation at
or below the target (0 when that is the last one). Results: a table, and JSON in bench/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after the root: bench/data_prep.py must not shadow the package
from shakespeare_char import CONFIG as BASELINE_CONFIG, prepare, timed  # noqa: E402  (the baseline's bench)

FAST_CONFIG = ROOT / "configs" / "shakespeare_char_fast.toml"

# The recipe as changes to nanoGPT's config, one ingredient each: configs/shakespeare_char_fast.toml is
# shakespeare_char.toml with all of them (tests/test_speedrun.py checks that), and --ablation runs each alone,
# the recipe without each and the recipe with each of LEFT_OFF, all at the recipe's step count.
INGREDIENTS: dict[str, list[str]] = {
    "muon": ["optim.name=muon", "optim.muon_lr=0.02"],
    "higher lr": ["optim.lr=0.004"],
    "wsd schedule": ["optim.schedule=wsd", "optim.wsd_decay_fraction=0.4", "optim.min_lr=0.0",
                     "optim.warmup_steps=50"],
    "batch 32": ["train.batch_size=32"],
}
# Measured and left off: --ablation runs the recipe with each. Neither gained at the recipe's budget (ReLU^2
# 0.04 nats worse and slower per step on a CPU; zero-init + untied head -0.002 nats over three seeds, within
# their +-0.015 spread).
LEFT_OFF: dict[str, list[str]] = {
    "relu2": ["model.mlp=relu2"],
    "zero-init, untied head": ["model.zero_init=true", "model.tie_embeddings=false"],
}
STEPS = ["train.max_steps=250"]  # the recipe's budget, shared by every ablation row
# evaluation as often as the recipe's config does it (so every row pays the same for it); one checkpoint
EVAL = ["train.eval_interval=125", "train.checkpoint_interval=250"]

# a tiny budget for --smoke: both sides, a model of one small block, a few steps
SMOKE_BASELINE = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16",
                  "train.max_steps=6", "train.eval_interval=3", "train.eval_sequences=8", "train.batch_size=4"]
SMOKE_OURS = SMOKE_BASELINE


def threads(args) -> list[str]:
    """--threads N: train.threads for both sides (1 where other work shares the cores: see the README)."""
    return [f"train.threads={args.threads}"] if args.threads else []


def recipe_overrides(without: str | None = None, only: str | None = None) -> list[str]:
    names = [only] if only else [n for n in INGREDIENTS if n != without]
    return [o for n in names for o in INGREDIENTS[n]]


def run_baseline(data: Path, out: Path, overrides: list[str]) -> dict:
    """The bare nanoGPT-style loop (bench/shakespeare_char.py --bare) as one timed command."""
    wall = timed([sys.executable, str(ROOT / "bench" / "shakespeare_char.py"), "--bare", str(data), str(out),
                  *overrides])
    from lm.config.load import load_config

    result = json.loads(out.read_text())
    cfg = load_config(BASELINE_CONFIG, overrides)
    tokens = result["steps"] * cfg.train.batch_size * cfg.model.block_size  # the bare loop: no accumulation
    return {"wall_s": wall, "val_loss": result["val_loss"], "steps": result["steps"], "tokens": tokens}


def run_ours(config: Path, data: Path, run_dir: Path, overrides: list[str], target: float | None) -> dict:
    """train.py CONFIG as one timed command; its evaluations read back from the run's metrics.jsonl."""
    from lm.config.load import load_config

    args = [f"data.dir={data}", f"train.out_dir={run_dir}", "log.progress=false", "train.keep_checkpoints=1",
            *overrides]
    wall = timed([sys.executable, "train.py", str(config), *args])
    cfg = load_config(config, args)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    steps = max(r["step"] for r in records)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    result = {"wall_s": wall, "val_loss": evals[-1]["val_loss"], "steps": steps,
              "tokens": steps * tokens_per_step, "ms_per_step": 1000 * wall / steps,
              "evals": [(r["step"], r["val_loss"]) for r in evals]}
    if target is not None:
        hit = next((r for r in evals if r["val_loss"] <= target), None)
        result["reached"] = hit is not None
        if hit is not None:
            result.update(target_step=hit["step"], target_tokens=hit["step"] * tokens_per_step,
                          to_target_s=wall - (evals[-1]["wall_s"] - hit["wall_s"]))
    return result


def speedrun(args, data: Path, tmp: Path) -> dict:
    baseline_overrides = (SMOKE_BASELINE if args.smoke else []) + threads(args)
    ours_overrides = (SMOKE_OURS if args.smoke else []) + threads(args) + args.overrides
    rounds = []
    for i in range(args.rounds):  # alternating: baseline then ours, round after round
        base = run_baseline(data, tmp / "bare.json", baseline_overrides)
        ours = run_ours(FAST_CONFIG, data, tmp / f"run{i}", ours_overrides, base["val_loss"])
        ratio = ours["to_target_s"] / base["wall_s"] if ours["reached"] else None
        rounds.append({"baseline": base, "ours": ours, "ratio": ratio, "load_average": os.getloadavg()})
        print(f"round {i + 1}: baseline {base['wall_s']:.1f} s (val {base['val_loss']:.4f}); ours "
              + (f"{ours['to_target_s']:.1f} s to target at step {ours['target_step']} "
                 f"(val {ours['val_loss']:.4f}): {ratio:.3f}x" if ours["reached"]
                 else f"did not reach {base['val_loss']:.4f} (val {ours['val_loss']:.4f})")
              + f"; load {os.getloadavg()[0]:.2f}", flush=True)
    ratios = [r["ratio"] for r in rounds if r["ratio"] is not None]
    return {"mode": "speedrun", "rounds": rounds, "target": [r["baseline"]["val_loss"] for r in rounds],
            "median_ratio": statistics.median(ratios) if ratios else None,
            "all_reached": len(ratios) == len(rounds)}


def print_speedrun(result: dict):
    print(f"\n{'round':>5} {'side':9} {'steps':>6} {'tokens':>10} {'val loss':>9} {'wall s':>8} "
          f"{'to target s':>12} {'ratio':>7} {'load':>5}")
    for i, r in enumerate(result["rounds"], 1):
        b, o = r["baseline"], r["ours"]
        print(f"{i:5} {'baseline':9} {b['steps']:6} {b['tokens']:10} {b['val_loss']:9.4f} {b['wall_s']:8.1f} "
              f"{b['wall_s']:12.1f} {'1.000':>7} {r['load_average'][0]:5.2f}")
        reached = o["reached"]
        print(f"{i:5} {'ours':9} {o.get('target_step', o['steps']):6} {o.get('target_tokens', o['tokens']):10} "
              f"{o['val_loss']:9.4f} {o['wall_s']:8.1f} "
              f"{(o['to_target_s'] if reached else float('nan')):12.1f} "
              f"{(r['ratio'] if reached else float('nan')):7.3f}")
    if result["median_ratio"] is not None:
        print(f"median ours / baseline wall time to the baseline's val loss: {result['median_ratio']:.3f}x"
              + ("" if result["all_reached"] else " (some rounds did not reach the target)"))
    else:
        print("ours did not reach the target in any round")


def ablation_rows() -> list[tuple[str, list[str]]]:
    """(variant, overrides of nanoGPT's config): each ingredient alone, the recipe, the recipe without each,
    the recipe with each left-off candidate."""
    rows = [("nanoGPT config", [])]
    rows += [(f"+ {name}", recipe_overrides(only=name)) for name in INGREDIENTS]
    rows += [("recipe (all)", recipe_overrides())]
    rows += [(f"recipe - {name}", recipe_overrides(without=name)) for name in INGREDIENTS]
    return rows + [(f"recipe + {name}", [*recipe_overrides(), *LEFT_OFF[name]]) for name in LEFT_OFF]


def ablation(args, data: Path, tmp: Path) -> dict:
    target = args.target
    if target is None:
        base = run_baseline(data, tmp / "bare.json", (SMOKE_BASELINE if args.smoke else []) + threads(args))
        target = base["val_loss"]
        print(f"target (bare nanoGPT loop, {base['steps']} steps): {target:.4f} in {base['wall_s']:.1f} s", flush=True)
    budget = (SMOKE_OURS if args.smoke else STEPS + EVAL) + threads(args)
    results = []
    for i, (name, overrides) in enumerate(ablation_rows()):
        r = run_ours(BASELINE_CONFIG, data, tmp / f"ablation{i}", [*overrides, *budget, *args.overrides], target)
        r.update(name=name, overrides=overrides, load_average=os.getloadavg())
        results.append(r)
        print(f"{name:32} val {r['val_loss']:.4f} {r['wall_s']:6.1f} s "
              + (f"target at step {r['target_step']}" if r["reached"] else "target not reached")
              + f"; load {r['load_average'][0]:.2f}", flush=True)
    return {"mode": "ablation", "target": target, "budget": budget, "rows": results}


def print_ablation(result: dict):
    print(f"\nablation at {' '.join(result['budget'])}; target val loss {result['target']:.4f}")
    print(f"{'variant':32} {'val loss':>9} {'wall s':>7} {'ms/step':>8} {'target at step':>15} {'load':>5}")
    for r in result["rows"]:
        print(f"{r['name']:32} {r['val_loss']:9.4f} {r['wall_s']:7.1f} {r['ms_per_step']:8.1f} "
              f"{(str(r['target_step']) if r['reached'] else '-'):>15} {r['load_average'][0]:5.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("text", type=Path, help="tinyshakespeare.txt")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of baseline and ours")
    p.add_argument("--ablation", action="store_true", help="each ingredient alone and the recipe without each")
    p.add_argument("--target", type=float, help="--ablation: this target val loss instead of a baseline run")
    p.add_argument("--threads", type=int, default=0, help="train.threads for both sides (default: torch's)")
    p.add_argument("--smoke", action="store_true", help="a tiny model and a few steps: checks the wiring only")
    p.add_argument("--out", type=Path, help="JSON results (default bench/results/speedrun[_ablation].json)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for our runs")
    args = p.parse_intermixed_args(argv)
    out = args.out or ROOT / "bench" / "results" / f"speedrun{'_ablation' if args.ablation else ''}.json"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(args.text, tmp / "data")
        result = (ablation if args.ablation else speedrun)(args, tmp / "data", tmp)
    result.update(text=str(args.text), smoke=args.smoke, overrides=args.overrides, threads=args.threads,
                  cpu_count=os.cpu_count(),
                  evaluation="included in both: whole commands timed, each evaluates on the same 240 windows")
    (print_ablation if args.ablation else print_speedrun)(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
