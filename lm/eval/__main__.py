"""Evaluate a checkpoint: `python -m lm.eval RUN --tasks ppl:FILE,mc:FILE.jsonl [--out results.json]`.

RUN is a run directory (its newest complete checkpoint), a checkpoint directory, or an `lm.export --format
safetensors` directory, loaded as sample.py loads it. Prints a table of every task's metrics; --out also
writes them as JSON. Task specs: see lm/eval/spec.py, or the README's Evaluation section.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from data_prep import DataError, load_tokenizer
from lm.training import checkpoint
from lm.config.schema import ConfigError
from lm.eval.spec import parse_tasks, split_task_list
from lm.files import check_destination, write_file
from lm.eval.tasks import load_task, run_task


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a run directory (its newest checkpoint) or a checkpoint directory")
    p.add_argument("--tasks", action="append", required=True,
                   help="comma-separated task specs (repeatable): ppl:PATH, mc:FILE.jsonl, options as :key=value")
    p.add_argument("--limit", type=int, default=0, help="score only the first N documents / examples of each task")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--stride", type=int, default=0,
                   help="perplexity: tokens a window advances by (default: half the model's context)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", type=Path, help="also write the results as JSON to this file (a new one)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # a device this torch build or machine lacks fails here
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"--device {name}: {str(e).splitlines()[0]}") from None
    return device


def format_table(results: dict[str, dict]) -> str:
    rows = [("task", "metric", "value")]
    for name, metrics in results.items():
        for key, value in metrics.items():
            if key != "spec":
                rows.append((name, key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)


def evaluate(args) -> dict:
    for flag in ("limit", "stride"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag} {getattr(args, flag)}: must be >= 0")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
    if args.out:
        check_destination(args.out, args.force, directory=False)  # before the evaluation, not after it
    specs = parse_tasks([t for group in args.tasks for t in split_task_list(group)])
    if not specs:
        raise ValueError("--tasks: no task given")
    device = pick_device(args.device)
    from lm.interop.export import load  # after the cheap checks: this builds the model

    ckpt, model = load(args.path, device)
    model = model.to(device=device, dtype=getattr(torch, args.dtype))
    tokenizer = load_tokenizer(ckpt)
    block = model.cfg.block_size
    tasks = [load_task(s, tokenizer, ckpt / tokenizer.file_name, block, args.limit, args.stride or None)
             for s in specs]
    results = {}
    for task in tasks:
        start = time.perf_counter()
        metrics = run_task(task, model, args.batch_size, device)
        results[task.name] = {"spec": task.spec.text, **metrics, "seconds": round(time.perf_counter() - start, 3)}
        if task.spec.kind == "ppl":
            results[task.name]["stride"] = task.stride
    step = checkpoint.load_info(ckpt)["step"] if (ckpt / checkpoint.RECORD).is_file() else None
    return {"checkpoint": str(ckpt), "step": step, "block_size": block, "tasks": results}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = evaluate(args)
        if args.out:
            write_file(args.out, json.dumps(report, indent=2) + "\n", force=args.force)
    except (checkpoint.CheckpointError, DataError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = f" (step {report['step']})" if report["step"] is not None else ""
    print(f"{report['checkpoint']}{step}")
    print(format_table(report["tasks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
