"""Training curves: `python -m lm.plot RUN_DIR [--out FILE.png]` draws loss (train and val), learning rate
and gradient norm from RUN_DIR/metrics.jsonl into one PNG (matplotlib, the `plot` extra)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in rows], [v for _, v in rows]


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    axes[0].plot(*series(records, "loss"), label="train", linewidth=1)
    axes[0].plot(*series(records, "val_loss"), "o-", label="val")
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend()
    axes[1].plot(*series(records, "lr"))
    axes[1].set_ylabel("learning rate")
    axes[2].plot(*series(records, "grad_norm"))
    axes[2].set_ylabel("grad norm")
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/curves.png")
    args = p.parse_args(argv)
    try:
        out = plot(args.run_dir, args.out or args.run_dir / "curves.png")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
