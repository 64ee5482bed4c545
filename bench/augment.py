"""Where augmentation should matter: a small corpus a model overfits. The first --kb kilobytes of a text
(tinyshakespeare), character level, a model large enough to memorize it; the best val loss over the run
with each data.augment setting against none.

    python bench/augment.py ../shared/data/tinyshakespeare.txt [--kb 100 --steps 3000 --lr 3e-3]

The defaults overfit: 90 KB of training text against a 0.8M-parameter model at lr 3e-3 reaches its best
val loss well before the last step, and from there val rises while train falls (each row prints where its
best val was). A run whose best is at its last step never overfit: make it longer or the corpus smaller.
    python bench/augment.py TEXT --smoke
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {"none": [], "swap 0.05": ["swap:0.05"], "noise 0.05": ["noise:0.05"], "drop 0.1": ["drop:0.1"],
            "all three": ["swap:0.05", "noise:0.05", "drop:0.1"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("text", type=Path)
    p.add_argument("--kb", type=int, default=100)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "augment.json")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.kb, args.steps = 20, 4
    model = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=128", "model.dropout=0.0",
             "train.batch_size=16"] if not args.smoke else ["model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                                                             "model.block_size=32", "train.batch_size=2"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = args.text.read_text(encoding="utf-8")[:args.kb * 1000]
        (tmp / "small.txt").write_text(text, encoding="utf-8")
        subprocess.run([sys.executable, "-m", "data_prep", "prepare", str(tmp / "small.txt"), "--out", str(tmp / "data"),
                        "--tokenizer", "char", "--val-fraction", "0.1"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        every = max(1, args.steps // 30)
        settings = {k: SETTINGS[k] for k in ("none", "all three")} if args.smoke else SETTINGS
        for name, specs in settings.items():
            out = tmp / name.replace(" ", "_")
            subprocess.run([sys.executable, "train.py", str(ROOT / "configs" / "shakespeare_char.toml"), *model,
                            f"data.dir={tmp / 'data'}", f"train.out_dir={out}", f"train.max_steps={args.steps}",
                            f"train.eval_interval={every}", f"optim.lr={args.lr}", "train.checkpoint_interval=1000000",
                            "train.eval_sequences=64", "log.progress=false", f"data.augment={json.dumps(specs)}"],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            vals = [(r["val_loss"], r["step"]) for r in records if "val_loss" in r]
            train = [r["loss"] for r in records if "loss" in r]
            best, at = min(vals)
            results[name] = {"best_val_loss": best, "best_at_step": at, "final_val_loss": vals[-1][0],
                             "final_train_loss": train[-1]}
            print(f"{name:11} best val {best:.4f} at step {at:5}  final val {vals[-1][0]:.4f}  final train "
                  f"{train[-1]:.4f}", flush=True)
    none = results["none"]["best_val_loss"]
    print(f"\n{'augment':11} {'best val':>9} {'vs none':>8} {'at step':>8} {'final val':>10} {'final train':>12}")
    for name, r in results.items():
        print(f"{name:11} {r['best_val_loss']:9.4f} {r['best_val_loss'] - none:+8.4f} {r['best_at_step']:8} "
              f"{r['final_val_loss']:10.4f} {r['final_train_loss']:12.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"kb": args.kb, "steps": args.steps, "lr": args.lr, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
