"""nanoGPT's CPU baby GPT (configs/shakespeare_char.toml) on a given text file: val loss at 2000 steps and
wall time, beside nanoGPT's published figures for the same config on a 2-core CPU.

    python bench/shakespeare_char.py ../shared/data/tinyshakespeare.txt [--out bench/results/shakespeare_char.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NANOGPT = {"val_loss": 1.886, "wall_s": 132.0, "ms_per_step": 50.0}  # ../shared/GUIDE.md, same config


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("text", type=Path, help="tinyshakespeare.txt")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shakespeare_char.json")
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, str(ROOT / "train.py"), str(ROOT / "configs" / "shakespeare_char.toml"),
               f'data.inputs=["{args.text.resolve()}"]', f"data.dir={tmp / 'data'}", f"train.out_dir={tmp / 'run'}",
               "log.progress=false", *args.overrides]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        wall = time.perf_counter() - start
        records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "loss" in r]
    train_s = steps[-1]["wall_s"] - evals[0]["wall_s"]  # from the end of the step-0 evaluation to the last step
    result = {
        "config": "configs/shakespeare_char.toml", "text": str(args.text), "steps": steps[-1]["step"],
        "val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1]["val_bpb"], "wall_s": wall,
        "train_loop_s": train_s, "ms_per_step": 1000 * train_s / steps[-1]["step"],
        "nanogpt": NANOGPT, "wall_speedup_vs_nanogpt": NANOGPT["wall_s"] / wall,
    }
    print(f"{'':10} {'val loss':>9} {'wall s':>8} {'ms/step':>8}")
    print(f"{'lmforge':10} {result['val_loss']:9.4f} {wall:8.1f} {result['ms_per_step']:8.1f}")
    print(f"{'nanoGPT':10} {NANOGPT['val_loss']:9.4f} {NANOGPT['wall_s']:8.1f} {NANOGPT['ms_per_step']:8.1f}")
    print(f"wall-time ratio nanoGPT/lmforge: {result['wall_speedup_vs_nanogpt']:.2f}x "
          "(nanoGPT figure from ../shared/GUIDE.md, same config on a 2-core CPU)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
