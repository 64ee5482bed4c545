"""Imbalanced sequence classification: where does a 256-character passage come from? War and Peace (90%),
the standard library's docstrings (9%) or tinyshakespeare (1%, the minority). A small GPT is pretrained on
the three texts, then fine-tuned three ways for the same steps: plain, with class weights ("balanced") and
with oversampling (equal class shares); macro-F1, the minority class's recall and accuracy on a held-out
set with the same shares.

    python bench/classify.py [--warandpeace PATH] [--shakespeare PATH] [--seeds 3] [--steps 100]
    python bench/classify.py --smoke        # a tiny version, ~20 s (tests/test_classify.py runs it)

The texts default to ../shared/data/{warandpeace,tinyshakespeare}.txt beside the repository; the docstrings
come from the running Python's standard library (no download). Each source's whitespace is collapsed to
single spaces (line breaks and indentation would give the source away) and cut into consecutive
256-character passages; its first 70% gives the training passages (and the pretraining text), its last 30%
the held-out ones. Writes bench/results/classify.json (--smoke: --out, default /tmp).
"""
from __future__ import annotations

import argparse
import ast
import json
import random
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

SHARED = ROOT.parent / "shared" / "data"
CLASSES = ("warandpeace", "docstring", "shakespeare")  # majority, middle, minority
SHARES = (0.90, 0.09, 0.01)
MINORITY = "shakespeare"
METHODS = {"plain": [], "class weights": ["classify.class_weights=balanced"],
           "oversampling": ["classify.oversample=true"]}
PASSAGE = 256
HELD_OUT = 0.3

# Sized for about 5 minutes on 2 busy CPU cores (one thread: torch's two threads are several times slower
# when another job shares the cores): a 0.5M-parameter GPT, 400 pretraining steps, 100 steps per method.
# A short budget, as fine-tuning often is: plain training sees about 16 minority passages in 1600 samples.
FULL = dict(docstring_chars=2_000_000, train=4000, val=3000, pretrain_steps=400, steps=100, vocab=2048,
            model=["model.n_layer=3", "model.n_head=4", "model.n_embd=96", "model.block_size=128"], batch=16)
SMOKE = dict(docstring_chars=150_000, train=300, val=150, pretrain_steps=10, steps=8, vocab=512,
             model=["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=128"], batch=8)


def docstrings(limit_chars: int) -> str:
    """The standard library's module, class and function docstrings (no tests, no site-packages), joined."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib).parts
        if any(p in ("site-packages", "test", "tests", "idlelib") for p in rel):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    parts.append(doc)
                    total += len(doc) + 2
        if total >= limit_chars:
            break
    return "\n\n".join(parts)


def passages(text: str) -> list[str]:
    return [text[i:i + PASSAGE] for i in range(0, len(text) - PASSAGE + 1, PASSAGE)]


def sample(pools: dict[str, list[str]], n: int, rng: random.Random) -> list[dict]:
    """n passages at SHARES (whole numbers: the minority gets round(n * share)), shuffled."""
    counts = [round(n * s) for s in SHARES[1:]]
    counts = [n - sum(counts), *counts]
    rows = []
    for label, k in zip(CLASSES, counts):
        if k > len(pools[label]):
            raise SystemExit(f"error: {label}: {len(pools[label])} passages, {k} needed")
        rows += [{"text": t, "label": label} for t in rng.sample(pools[label], k)]
    rng.shuffle(rows)
    return rows


def build_data(args, size: dict, work: Path) -> Path:
    """train.jsonl, val.jsonl and the prepared pretraining text (BPE) under `work`."""
    if (work / "val.jsonl").is_file() and is_prepared(work / "lm_data"):
        return work
    work.mkdir(parents=True, exist_ok=True)
    texts = {"warandpeace": args.warandpeace.read_text(encoding="utf-8"),
             "shakespeare": args.shakespeare.read_text(encoding="utf-8"),
             "docstring": docstrings(size["docstring_chars"])}
    train_pool, val_pool = {}, {}
    for label, text in texts.items():
        text = " ".join(text.split())  # one line: line breaks and indentation would give each source away
        cut = int(len(text) * (1 - HELD_OUT))
        train_pool[label], val_pool[label] = passages(text[:cut]), passages(text[cut:])
    rng = random.Random(0)
    for name, pools, n in (("train", train_pool, size["train"]), ("val", val_pool, size["val"])):
        rows = sample(pools, n, rng)
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # pretraining: every training-side passage of the three texts (the docstrings as many as War and Peace's),
    # one document each; the held-out passages are never seen
    pool = train_pool["warandpeace"]
    corpus = pool + train_pool["shakespeare"] + train_pool["docstring"][:len(pool)]
    if size is SMOKE:
        corpus = rng.sample(corpus, 600)
    (work / "pretrain.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus), encoding="utf-8")
    prepare([str(work / "pretrain.jsonl")], work / "lm_data", vocab_size=size["vocab"], val_fraction=0.05,
            show_progress=False)
    return work


def train(overrides: list[str]) -> dict:
    trainer = Trainer(load_config(None, overrides))
    try:
        return trainer.run()
    finally:
        trainer.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warandpeace", type=Path, default=SHARED / "warandpeace.txt")
    p.add_argument("--shakespeare", type=Path, default=SHARED / "tinyshakespeare.txt")
    p.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per method (default 3; smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per method (default 100)")
    p.add_argument("--smoke", action="store_true", help="a tiny run that checks the pipeline (~20 s)")
    p.add_argument("--work", type=Path, default=None, help="working directory (default /tmp/lmforge-classify[-smoke])")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default bench/results/classify.json)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for path in (args.warandpeace, args.shakespeare):
        if not path.is_file():
            print(f"error: {path}: no such file (pass --warandpeace / --shakespeare)", file=sys.stderr)
            return 2
    size = SMOKE if args.smoke else FULL
    seeds = args.seeds or (1 if args.smoke else 3)
    steps = args.steps or size["steps"]
    work = args.work or Path("/tmp/lmforge-classify" + ("-smoke" if args.smoke else ""))
    out = args.out or (Path("/tmp/lmforge-classify-smoke.json") if args.smoke else ROOT / "bench/results/classify.json")
    t0 = time.perf_counter()
    build_data(args, size, work)
    common = [*size["model"], f"train.batch_size={size['batch']}", "train.device=cpu", "train.dtype=float32",
              "log.progress=false", f"train.threads={args.threads}", "train.keep_checkpoints=1", "model.dropout=0.0"]
    pre = work / f"pretrain_{size['pretrain_steps']}"
    if not checkpoint.checkpoints(pre):
        n = size["pretrain_steps"]
        train([*common, f"data.dir={work / 'lm_data'}", f"train.out_dir={pre}", f"train.max_steps={n}",
               f"train.eval_interval={n}", "train.eval_sequences=64", f"optim.warmup_steps={n // 10}",
               "optim.lr=2e-3", "optim.min_lr=2e-4", f"log.interval={max(1, n // 4)}"])
    pretrained_s = time.perf_counter() - t0
    print(f"data + pretraining: {pretrained_s:.0f} s", flush=True)

    runs: dict[str, list[dict]] = {}
    for seed in range(seeds):
        for method, extra in METHODS.items():
            run = work / f"s{steps}_seed{seed}_{method.replace(' ', '_')}"
            if not checkpoint.checkpoints(run):  # a finished run is reused: its metrics are read back
                train([*common, "train.task=classify", f"init.from={pre}", f"train.out_dir={run}",
                       f"classify.train_file={work / 'train.jsonl'}", f"classify.val_file={work / 'val.jsonl'}",
                       f"train.seed={1000 + seed}", f"train.max_steps={steps}",
                       f"train.eval_interval={steps}", f"optim.warmup_steps={steps // 10}",
                       "optim.lr=1e-3", "optim.min_lr=1e-4", f"log.interval={max(1, steps // 4)}", *extra])
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            last = [r for r in records if "val/macro_f1" in r][-1]
            runs.setdefault(method, []).append({
                "seed": seed, "step": last["step"], "macro_f1": last["val/macro_f1"],
                "minority_recall": last[f"val/recall/{MINORITY}"], "accuracy": last["val/accuracy"],
                "recall": {c: last[f"val/recall/{c}"] for c in CLASSES}, "confusion": last["val/confusion"]})
            r = runs[method][-1]
            print(f"{method:14} seed {seed}: macro-F1 {r['macro_f1']:.3f}  {MINORITY} recall "
                  f"{r['minority_recall']:.3f}  accuracy {r['accuracy']:.3f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)

    def mean_std(values):
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    table = {method: {key: mean_std([r[key] for r in rs]) for key in ("macro_f1", "minority_recall", "accuracy")}
             for method, rs in runs.items()}
    print(f"\n{'method':14} | {'macro-F1':>13} | {MINORITY + ' recall':>19} | {'accuracy':>13}")
    print("-" * 70)
    for method, row in table.items():
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in (row["macro_f1"], row["minority_recall"], row["accuracy"])]
        print(f"{method:14} | {cells[0]:>13} | {cells[1]:>19} | {cells[2]:>13}")
    print(f"({seeds} seed(s) x {steps} steps each, mean ± sd; held-out set of {size['val']} passages at "
          f"{' / '.join(f'{s:.0%}' for s in SHARES)}; {time.perf_counter() - t0:.0f} s in all)")
    result = {"classes": dict(zip(CLASSES, SHARES)), "minority": MINORITY, "passage_chars": PASSAGE,
              "train_examples": size["train"], "val_examples": size["val"], "pretrain_steps": size["pretrain_steps"],
              "steps": steps, "seeds": seeds, "batch_size": size["batch"], "model": size["model"],
              "table": {m: {k: {"mean": v[0], "sd": v[1]} for k, v in row.items()} for m, row in table.items()},
              "runs": runs, "smoke": args.smoke, "seconds": round(time.perf_counter() - t0, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
