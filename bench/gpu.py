"""Everything worth measuring in one GPU window, in under 8 minutes: environment, kernel correctness and
speed, end-to-end training speed, a ~1.3B run through torchrun, and loss curves of our kernels vs PyTorch's.

    PYTHONPATH=. python bench/gpu.py [--out bench/results/gpu.json] [--only STAGE,...]
    python bench/gpu.py --smoke [--out PATH]     # every stage at toy sizes on the CPU (about 2 minutes)

Each stage runs as its own process (`bench/gpu.py --stage NAME --out JSON`) under a time budget: one that
runs long (or hangs compiling) is cut and reported as "cut after N s", one that crashes is reported with
its last error line, and the next stage runs either way. Rows are saved as they are produced, so a cut
stage keeps what it measured. The JSON (and a `<out>_logs/` folder of each stage's output) is rewritten
after every stage; each stage's table is printed when it ends, and a summary at the end. Exit code 0 when
every stage is ok. The stages, budgets and what each measures are in STAGES below; the formulas in
bench/_gpu/measure.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # lm/, kernels/, data_prep/ and bench/_gpu/

from _gpu import kernel_stages as ks  # noqa: E402
from _gpu import training_stages as ts  # noqa: E402
from _gpu.measure import Ctx, Skip, child_env, kill_tree, last_line, short_error  # noqa: E402

TOTAL_LIMIT_S = 480  # the whole run, GPU sizes: 8 minutes


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int  # on the GPU
    smoke_budget_s: int  # on --smoke, CPU
    run: Callable[[Ctx], Iterable[dict]]
    title: str


STAGES = [
    Stage("env", 15, 30, ks.env, "environment; measured bf16 matmul and device-copy ceilings"),
    Stage("data", 40, 40, ts.data, "quickstart data (Python stdlib) prepared into the scratch dir"),
    Stage("kernel_check", 80, 60, ks.kernel_check, "our attention and LayerNorm vs fp64 references"),
    Stage("attention_speed", 60, 40, ks.attention_speed, "attention TFLOP/s: ours vs SDPA flash / cuDNN"),
    Stage("layernorm_speed", 40, 40, ks.layernorm_speed, "LayerNorm GB/s: ours vs F.layer_norm / compiled"),
    Stage("e2e_eager", 40, 40, ts.e2e_eager, "gpt2-124m training tokens/s and MFU, eager"),
    Stage("e2e_compiled", 70, 60, ts.e2e_compiled, "gpt2-124m training tokens/s and MFU, parallel.compile"),
    Stage("train_1p3b", 60, 60, ts.train_1p3b, "1.3B shape through torchrun train.py vs the planner"),
    Stage("quickstart_200", 40, 60, ts.quickstart_200, "quickstart 200 steps: triton vs sdpa loss curves"),
]
BY_NAME = {s.name: s for s in STAGES}
assert sum(s.budget_s for s in STAGES) < 450, "stage budgets must leave the 8-minute run some slack"


# ---------------------------------------------------------------- one stage, in its own process

def run_stage(stage: Stage, ctx: Ctx, out: Path) -> int:
    """Run one stage's generator, rewriting `out` after every row so a cut stage keeps its rows."""
    rows = []

    def dump(status: str, error: str | None = None):  # atomic: a cut never leaves half a file
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"status": status, "error": error, "rows": rows}, default=str))
        os.replace(tmp, out)

    dump("running")
    try:
        for row in stage.run(ctx):
            rows.append(row)
            dump("running")
    except Skip as e:
        dump("skipped", str(e))
        return 0
    except BaseException as e:  # noqa: BLE001  (reported to the parent, which goes on)
        traceback.print_exc()
        dump("crashed", short_error(e))
        return 1
    dump("ok")
    return 0


# ---------------------------------------------------------------- the whole run

def launch(stage: Stage, budget: float, smoke: bool, work: Path, logs: Path) -> dict:
    """The stage as a child process under `budget` seconds; its result as a dict for the JSON."""
    part = work / f"{stage.name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage.name, "--out", str(part),
           "--work", str(work)] + (["--smoke"] if smoke else [])
    log = logs / f"{stage.name}.log"
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(smoke), stdout=f, stderr=subprocess.STDOUT)
    cut = False
    try:
        proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        cut = True
    seconds = time.perf_counter() - start
    try:
        result = json.loads(part.read_text())
    except (OSError, json.JSONDecodeError):
        result = {"status": None, "error": None, "rows": []}
    if cut:
        status, note = "cut", f"cut after {budget:.0f} s"
    elif result["status"] in ("ok", "skipped") and proc.returncode == 0:
        status, note = result["status"], result["error"]
    else:
        status = "crashed"
        note = result["error"] or last_line(log) or f"exit code {proc.returncode}"
    return dict(name=stage.name, title=stage.title, budget_s=round(budget), seconds=round(seconds, 1),
                status=status, note=note, log=str(log), rows=result["rows"])


def run_all(args) -> int:
    smoke = args.smoke
    stages = [BY_NAME[n] for n in args.only.split(",")] if args.only else STAGES
    out = args.out
    logs = out.with_name(out.stem + "_logs")
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lmforge-gpu-"))
    budgets = [(s, s.smoke_budget_s if smoke else s.budget_s) for s in stages]
    print(f"bench/gpu.py{' --smoke' if smoke else ''}: {len(stages)} stages, each a process cut at its budget: "
          + ", ".join(f"{s.name} {b} s" for s, b in budgets) + f" ({sum(b for _, b in budgets)} s in all); "
          f"scratch {work}", flush=True)
    report = dict(command=" ".join(sys.argv), smoke=smoke, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  budget_total_s=sum(b for _, b in budgets), stages=[])
    start = time.perf_counter()
    for stage, budget in budgets:
        left = TOTAL_LIMIT_S - (time.perf_counter() - start) - 5
        if not smoke and left < budget:
            budget = left  # the whole run stays within its 8 minutes
        if budget < 5:
            result = dict(name=stage.name, title=stage.title, budget_s=0, seconds=0, status="skipped",
                          note="no time left in the run", rows=[])
        else:
            print(f"\n== {stage.name} (budget {budget:.0f} s): {stage.title}", flush=True)
            result = launch(stage, budget, smoke, work, logs)
        report["stages"].append(result)
        report["total_s"] = round(time.perf_counter() - start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))
        print(f"-- {stage.name}: {result['status']} in {result['seconds']:.0f} s"
              + (f" ({result['note']})" if result["note"] else ""))
        if result["rows"]:
            print(format_table(result["rows"]), flush=True)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n== summary ({report['total_s']:.0f} s; JSON {out}; logs {logs})")
    print(format_table([dict(stage=r["name"], status=r["status"], seconds=r["seconds"], budget_s=r["budget_s"],
                             detail=r["note"]) for r in report["stages"]]))
    return 0 if all(r["status"] == "ok" for r in report["stages"]) else 1


# ---------------------------------------------------------------- the one table format

def fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return ("pass" if value else "FAIL") if key == "pass" else ("yes" if value else "no")
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 100_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 100_000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.0f}"
        if a >= 1:
            return f"{value:.2f}"
        if a >= 0.01:
            return f"{value:.3f}"
        return f"{value:.1e}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_table(rows: list[dict]) -> str:
    """Rows as an aligned table (columns: every key in first-seen order); rows holding "note" are
    printed below it as notes."""
    table = [r for r in rows if "note" not in r]
    notes = [r["note"] for r in rows if "note" in r]
    columns = list(dict.fromkeys(k for r in table for k in r))
    cells = [[fmt(c, r.get(c)) for c in columns] for r in table]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = []
    if table:
        lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU, kernels through Triton's interpreter")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu.json")
    p.add_argument("--only", help="comma-separated stage names: " + ",".join(BY_NAME))
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory (data, run dirs, logs)")
    p.add_argument("--stage", choices=list(BY_NAME), help=argparse.SUPPRESS)  # a child process: one stage
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only and not set(args.only.split(",")) <= set(BY_NAME):
        p.error(f"--only: stages are {', '.join(BY_NAME)}")
    if args.stage:
        return run_stage(BY_NAME[args.stage], Ctx(smoke=args.smoke, work=args.work), args.out)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
