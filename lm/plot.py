"""Training curves: `python -m lm.plot RUN_DIR [--out FILE.png] [--smooth N]` draws loss (train and val),
learning rate and gradient norm from RUN_DIR/metrics.jsonl into one PNG (matplotlib, the `plot` extra).

Each train record is one batch, so its loss is noisy: the raw curve is drawn faint, with an exponential
moving average over about N records on top (decay 1 - 1/N, bias-corrected as in Adam, so it starts at
the first value instead of rising from 0). Validation is one series per named set (`val/NAME_loss`), or
the one `val_loss` of a plain run."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SMOOTH = 20  # default EMA window, in metric records


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in rows], [v for _, v in rows]


def ema(steps: list[int], values: list[float], window: int) -> tuple[list[int], list[float]]:
    """Bias-corrected exponential moving average (decay 1 - 1/window) of the finite values: a skipped
    step's inf or NaN loss is left out rather than poisoning every later point."""
    beta = 1 - 1 / max(1, window)
    avg, weight, xs, ys = 0.0, 0.0, [], []
    for s, v in zip(steps, values):
        if not math.isfinite(v):
            continue
        avg = beta * avg + (1 - beta) * v
        weight = beta * weight + (1 - beta)  # = 1 - beta**n: the correction for starting at 0
        xs.append(s)
        ys.append(avg / weight if weight else v)
    return xs, ys


def val_keys(records: list[dict]) -> list[tuple[str, str]]:
    """(key, label) per validation series: each named set in first-seen order, else the plain val_loss
    (with named sets, val_loss repeats the first set's loss)."""
    named = list(dict.fromkeys(k for r in records for k in r if k.startswith("val/") and k.endswith("_loss")))
    if named:
        return [(k, "val " + k[len("val/"):-len("_loss")]) for k in named]
    return [("val_loss", "val")]


def draw_noisy(ax, steps, values, label: str, window: int):
    """The raw values faint, the smoothed ones on top in the same colour."""
    if window > 1:
        (raw,) = ax.plot(steps, values, linewidth=0.8, alpha=0.3, label=f"{label} (raw)")
        ax.plot(*ema(steps, values, window), linewidth=1.5, color=raw.get_color(),
                label=f"{label} (EMA, {window} records)")
    else:
        ax.plot(steps, values, linewidth=1, label=label)


def plot(run_dir: Path, out: Path, smooth: int = SMOOTH):
    """Draw RUN_DIR/metrics.jsonl into `out` (PNG); returns the matplotlib Figure (closed, for inspection)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    draw_noisy(axes[0], *series(records, "loss"), "train", smooth)
    for key, label in val_keys(records):
        steps, values = series(records, key)
        if steps:
            axes[0].plot(steps, values, "o-", markersize=4, label=label)
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend()
    axes[1].plot(*series(records, "lr"))
    axes[1].set_ylabel("learning rate")
    draw_noisy(axes[2], *series(records, "grad_norm"), "grad norm", smooth)
    axes[2].set_ylabel("grad norm")
    if smooth > 1:
        axes[2].legend()
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/curves.png")
    p.add_argument("--smooth", type=int, default=SMOOTH,
                   help=f"EMA window in records for the train loss and grad norm (default {SMOOTH}; 1: raw only)")
    args = p.parse_args(argv)
    if args.smooth < 1:
        print(f"error: --smooth {args.smooth}: must be >= 1 (1 draws the raw curve only)", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / "curves.png"
    try:
        plot(args.run_dir, out, args.smooth)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
