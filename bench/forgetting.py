"""Forgetting under continued pretraining: pretrain a small GPT on prose (domain A), continue on Python
source (domain B) with each method, and measure what is lost and gained.

    python bench/forgetting.py /work/shared/data/tinyshakespeare.txt /work/shared/data/warandpeace.txt \
        [--stdlib DIR] [--steps 300] [--seeds 3] [--work /tmp/lmforge-forgetting]

Per method and seed: forgetting F = L_A(end) - L_A(start), adaptation G = L_B(start) - L_B(end) (validation
losses, nats/token), and retention R = 1 - F / F_plain. Writes bench/results/forgetting.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import is_prepared, prepare  # noqa: E402
from lm.training import checkpoint  # noqa: E402
from lm.config.load import load_config  # noqa: E402
from lm.training.trainer import Trainer  # noqa: E402

EXCLUDE = ["**/site-packages/**", "**/test/**", "**/tests/**"]
# small enough for ~0.2 s/step on 2 CPU cores; a batch of 20 holds 5% and 25% replay exactly
MODEL = ["model.n_layer=3", "model.n_head=4", "model.n_embd=96", "model.block_size=64", "model.dropout=0.0",
         "train.batch_size=20", "train.eval_sequences=200", "train.device=cpu", "train.dtype=float32",
         "log.progress=false", "log.interval=50", "optim.lr=2e-3", "optim.min_lr=2e-4", "optim.weight_decay=0.1",
         "train.keep_checkpoints=1", "train.threads=2"]
# name -> overrides of the continued run (A is the replay source / old domain, B the new one)
METHODS = {
    "plain": [],
    "replay 5%": ['data.sources=["new:0.95:{B}", "replay:0.05:{A}"]'],
    "replay 25%": ['data.sources=["new:0.75:{B}", "replay:0.25:{A}"]'],
    # lambda multiplies a Fisher of mean 1; from 0.1 up it costs >= 0.5 nats of adaptation here
    "ewc 0.003": ["continual.ewc_batches=16", "continual.ewc_lambda=0.003"],
    "ewc 0.005": ["continual.ewc_batches=16", "continual.ewc_lambda=0.005"],
    "ewc 0.007": ["continual.ewc_batches=16", "continual.ewc_lambda=0.007"],
    "ewc 0.01": ["continual.ewc_batches=16", "continual.ewc_lambda=0.01"],
    "ewc 0.03": ["continual.ewc_batches=16", "continual.ewc_lambda=0.03"],
    "ewc 0.1": ["continual.ewc_batches=16", "continual.ewc_lambda=0.1"],
    "ewc 0.3": ["continual.ewc_batches=16", "continual.ewc_lambda=0.3"],
    "ewc 1": ["continual.ewc_batches=16", "continual.ewc_lambda=1"],
    # embeddings (tied to the head) and blocks 0-1 frozen for the first half, then everything trains
    "freeze half": ['continual.freeze=["0:2", "{half}:0"]'],
    "ewc 0.1 + replay 25%": ["continual.ewc_batches=16", "continual.ewc_lambda=0.1",
                             'data.sources=["new:0.75:{B}", "replay:0.25:{A}"]'],
}


def chunk_files(texts: list[Path], out: Path, size: int = 16_000) -> Path:
    """Prose cut into ~16 KB documents, so the val split samples both books (a document is a file)."""
    if not out.is_dir():
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        n = 0
        for text in texts:
            body = text.read_text(encoding="utf-8")
            for start in range(0, len(body), size):
                (tmp / f"{n:05d}.txt").write_text(body[start:start + size], encoding="utf-8")
                n += 1
        tmp.rename(out)
    return out


def prepare_domains(texts: list[Path], stdlib: str, work: Path) -> tuple[Path, Path]:
    """A and B tokenized by one BPE trained on both (mixed sources must share a tokenizer)."""
    prose = chunk_files(texts, work / "prose")
    code = [f"{stdlib}/**/*.py"]
    if not is_prepared(work / "tok"):
        prepare([str(prose), *code], work / "tok", vocab_size=4096, exclude=EXCLUDE, dedup="exact",
                show_progress=False)
    for name, inputs, exclude in (("A", [str(prose)], []), ("B", code, EXCLUDE)):
        if not is_prepared(work / name):
            prepare(inputs, work / name, tokenizer_dir=work / "tok", exclude=exclude, dedup="exact",
                    show_progress=False)
    return work / "A", work / "B"


def train(overrides: list[str]) -> Trainer:
    trainer = Trainer(load_config(None, [*MODEL, *overrides]))
    trainer.run()
    trainer.close()
    return trainer


def evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val/replay_loss" in r]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("texts", type=Path, nargs="+", help="domain A text files (tinyshakespeare.txt warandpeace.txt)")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="domain B: *.py under this dir")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps, and continued steps per method")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="*", default=list(METHODS),
                   # argparse %-formats help: escape the % of "replay 5%"
                   help=f"a subset of: {', '.join(METHODS)}".replace("%", "%%"))
    p.add_argument("--work", type=Path, default=Path("/tmp/lmforge-forgetting"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "forgetting.json")
    args = p.parse_args()
    t0 = time.perf_counter()
    a, b = prepare_domains(args.texts, args.stdlib, args.work)
    steps = args.steps
    sched = [f"train.max_steps={steps}", f"train.eval_interval={steps}", f"optim.warmup_steps={steps // 10}"]
    pre = args.work / f"pretrain_{steps}"
    if not checkpoint.checkpoints(pre):
        train([f"data.dir={a}", f"train.out_dir={pre}", *sched])
    print(f"data + pretraining: {time.perf_counter() - t0:.0f} s", flush=True)

    runs: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for method in args.methods:
            out = args.work / f"s{steps}_seed{seed}_{method.replace(' ', '_').replace('%', 'pct')}"
            if not checkpoint.checkpoints(out):  # finished runs are reused
                extra = [o.format(A=a, B=b, half=steps // 2) for o in METHODS[method]]
                train([f"init.from={pre}", f"data.dir={b}", f'data.val_sets=["replay:{a}", "new:{b}"]',
                       f"continual.ewc_data={a}", f"train.out_dir={out}", f"train.seed={1000 + seed}", *sched,
                       *extra])
            first, last = evals(out)[0], evals(out)[-1]
            runs.setdefault(method, []).append({"seed": seed, "forgetting": last["forgetting"],
                                                "adaptation": last["adaptation"],
                                                "L_A": [first["val/replay_loss"], last["val/replay_loss"]],
                                                "L_B": [first["val/new_loss"], last["val/new_loss"]]})
            print(f"{method:22} seed {seed}: F {last['forgetting']:+.3f}  G {last['adaptation']:+.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    def mean_std(values):
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    f_plain = mean_std([r["forgetting"] for r in runs["plain"]])[0] if "plain" in runs else float("nan")
    g_plain = mean_std([r["adaptation"] for r in runs["plain"]])[0] if "plain" in runs else float("nan")
    table = {}
    for method, rs in runs.items():
        f, f_sd = mean_std([r["forgetting"] for r in rs])
        g, g_sd = mean_std([r["adaptation"] for r in rs])
        table[method] = {"F": f, "F_std": f_sd, "G": g, "G_std": g_sd, "R": 1 - f / f_plain,
                         "new_domain_cost": g_plain - g, "runs": rs}
    print(f"\n{'method':22} {'F (nats)':>15} {'G (nats)':>15} {'R':>6} {'cost':>7}")
    for method, r in table.items():
        print(f"{method:22} {r['F']:8.3f} ±{r['F_std']:.3f} {r['G']:8.3f} ±{r['G_std']:.3f} {r['R']:6.2f} "
              f"{r['new_domain_cost']:+7.3f}")
    wall = time.perf_counter() - t0
    print(f"wall {wall:.0f} s")
    result = {"steps": steps, "seeds": args.seeds, "model": MODEL, "methods": {m: METHODS[m] for m in runs},
              "texts": [str(t) for t in args.texts], "stdlib": args.stdlib, "wall_s": wall, "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
