"""Smaller models that keep their quality, on the quickstart corpus, in one table: a teacher; a student
trained plainly and distilled for the same steps; the teacher magnitude-pruned (before and after a short
recovery fine-tune); structurally pruned (heads, neurons; before and after the fine-tune); a shared-layer
model against an unshared one of equal parameters; int8 / int4 copies of the teacher. Each row: parameters,
size on disk, val loss and bits/byte, tokens/s (training; evaluation for rows that were not trained).

    python bench/compress.py                               (the quickstart corpus; prepared on first use)
    python bench/compress.py --steps 400 --recovery 100    (the defaults)
    python bench/compress.py --smoke                       (tiny sizes, seconds: the test suite's check)
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lm.config.load import load_config  # noqa: E402

CONFIG = ROOT / "configs" / "quickstart.toml"


def run_train(overrides: list[str], out: Path) -> dict:
    """Train (a fresh process, as a user runs it); the numbers of its last records."""
    cmd = [sys.executable, "train.py", str(CONFIG), *overrides, f"train.out_dir={out}", "log.progress=false",
           "train.device=cpu"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return {"tokens_per_s": sum(speeds[1:] or speeds) / len(speeds[1:] or speeds)}


def cli(*args):
    subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def disk_bytes(path: Path, params: int) -> int:
    """The weights' bytes on disk: the file of an exported, pruned or quantized directory; for a training run
    the fp32 weights alone (4 bytes a parameter: its checkpoints also hold the optimizer). Magnitude-pruned
    weights are stored dense: the zeros save nothing on disk."""
    from lm.training import checkpoint

    ckpt = checkpoint.resolve(path)
    return (ckpt / "model.safetensors").stat().st_size if (ckpt / "model.safetensors").is_file() else 4 * params


def evaluate(path: Path, data: Path, sequences: int, batch: int) -> dict:
    """Val loss, bits/byte and forward tokens/s of the model at `path` on `data`'s val split."""
    from lm.training.evaluation import ValSet
    from lm.interop.export import load

    _, model = load(path)
    val = ValSet("val", str(data), model.cfg.block_size)
    total, start = 0.0, time.perf_counter()
    with torch.no_grad():
        for i in range(0, sequences, batch):
            x, y = val.stream.batch(i, batch, torch.device("cpu"))
            total += model(x, y)[1].item()
    elapsed = time.perf_counter() - start
    loss = total / math.ceil(sequences / batch)
    return {"params": model.num_params(), "val_loss": loss, "val_bpb": loss / math.log(2) / val.bytes_per_token,
            "eval_tokens_per_s": sequences * model.cfg.block_size / elapsed}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "stdlib_code")
    p.add_argument("--steps", type=int, default=400, help="training steps of teacher and students")
    p.add_argument("--recovery", type=int, default=100, help="fine-tuning steps after pruning")
    p.add_argument("--teacher", default="6x384", help="LAYERSxWIDTH")
    p.add_argument("--student", default="4x192", help="LAYERSxWIDTH")
    p.add_argument("--eval-sequences", type=int, default=80)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compress.json")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.recovery, args.teacher, args.student, args.eval_sequences = 2, 1, "2x64", "1x32", 8
    tl, tw = map(int, args.teacher.split("x"))
    sl, sw = map(int, args.student.split("x"))
    # another prepared directory than the quickstart's own is taken as it is
    data = [f"data.dir={args.data}"] + ([] if args.data == p.get_default("data") else ["data.inputs=[]"])
    base = [*data, f"train.max_steps={args.steps}", f"train.eval_interval={args.steps}",
            "optim.warmup_steps=20", f"train.eval_sequences={args.eval_sequences}", "log.interval=5"]
    if args.smoke:
        base += ["model.block_size=32", "train.batch_size=2", "log.interval=1"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def row(name, path, trained=None, note=""):
            r = evaluate(path, args.data, args.eval_sequences, 8 if not args.smoke else 2)
            r.update(name=name, disk_mb=disk_bytes(path, r["params"]) / 1e6, note=note,
                     tokens_per_s=(trained or {}).get("tokens_per_s"))
            rows.append(r)
            print(f"{name:34} {r['params']:>10,} {r['disk_mb']:8.2f} MB  val {r['val_loss']:.4f}  "
                  f"train {r['tokens_per_s'] or 0:>8,.0f} tok/s  eval {r['eval_tokens_per_s']:>8,.0f} tok/s", flush=True)

        def shape(layers, width, heads):
            return [f"model.n_layer={layers}", f"model.n_embd={width}", f"model.n_head={heads}"]

        teacher = tmp / "teacher"
        row(f"teacher {args.teacher}", teacher, run_train([*base, *shape(tl, tw, 6 if tw % 6 == 0 else 4)], teacher))
        student_shape = shape(sl, sw, 6 if sw % 6 == 0 else 4)
        plain = tmp / "student"
        row(f"student {args.student} plain", plain, run_train([*base, *student_shape], plain))
        distilled = tmp / "distilled"
        row(f"student {args.student} distilled", distilled,
            run_train([*base, *student_shape, f"distill.teacher={teacher}", "distill.alpha=0.5",
                       "distill.temperature=2"], distilled))

        recovery = [*data, f"train.max_steps={args.recovery}", f"train.eval_interval={args.recovery}",
                    "optim.warmup_steps=0", "optim.lr=3e-4", "optim.min_lr=3e-5",
                    f"train.eval_sequences={args.eval_sequences}", "log.interval=1"]
        if args.smoke:
            recovery += ["train.batch_size=2"]
        for method, sparsities in (("magnitude", (0.3, 0.5, 0.7)), ("heads", (0.25, 0.5)), ("neurons", (0.25, 0.5))):
            for s in sparsities:
                pruned = tmp / f"{method}{s}"
                cli("-m", "lm.prune", teacher, pruned, "--method", method, "--sparsity", s, "--data", args.data,
                    "--batches", 4)
                row(f"teacher {method} {int(s * 100)}%", pruned, note="before recovery")
                tuned = tmp / f"{method}{s}_ft"
                row(f"teacher {method} {int(s * 100)}% + {args.recovery} steps", tuned,
                    _fine_tune(recovery, pruned, tuned))

        # shared layers: 2K layers sharing pairs vs K unshared layers (the same parameters, twice the compute)
        shared = tmp / "shared"
        row(f"shared {2 * sl}x{sw} (pairs)", shared,
            run_train([*base, *shape(2 * sl, sw, 6 if sw % 6 == 0 else 4), "model.share_layers=2"], shared))
        row(f"(unshared {sl}x{sw}: the plain student)", plain)

        for bits in (8, 4):
            q = tmp / f"int{bits}"
            cli("-m", "lm.quantize", teacher, "--bits", bits, q)
            row(f"teacher int{bits}", q)
    print(f"\n{'model':34} {'params':>10} {'disk MB':>8} {'val loss':>9} {'bits/byte':>9} {'train tok/s':>11} "
          f"{'eval tok/s':>10}")
    for r in rows:
        bpb = f"{r['val_bpb']:.3f}" if r["val_bpb"] else "-"
        train = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        print(f"{r['name']:34} {r['params']:>10,} {r['disk_mb']:8.2f} {r['val_loss']:9.4f} {bpb:>9} {train:>11} "
              f"{r['eval_tokens_per_s']:>10,.0f}")
    by_name = {r["name"]: r for r in rows}
    gain = by_name[f"student {args.student} plain"]["val_loss"] - by_name[f"student {args.student} distilled"]["val_loss"]
    print(f"distillation vs plain training of the same student at {args.steps} steps: {gain:+.4f} nats "
          f"({'better' if gain > 0 else 'not better'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                    "distillation_gain_nats": gain}, indent=2))
    print(f"wrote {args.out}")


def _fine_tune(recovery: list[str], pruned: Path, out: Path) -> dict:
    """A short fine-tune of a pruned directory: its own config (the smaller shape), started from its weights."""
    cmd = [sys.executable, "train.py", str(pruned / "config.toml"), *recovery, f"init.from={pruned}",
           f"train.out_dir={out}", "log.progress=false", "train.device=cpu"]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return {"tokens_per_s": sum(speeds[1:] or speeds) / len(speeds[1:] or speeds)}


if __name__ == "__main__":
    main()
