"""Everything worth measuring in one GPU window, in under 8 minutes: environment, kernel correctness and
speed, end-to-end training speed, a ~1.3B run through torchrun, and loss curves of our kernels vs PyTorch's.

    PYTHONPATH=. python bench/gpu.py [--out bench/results/gpu.json] [--only STAGE,...]
    python bench/gpu.py --plan [--compile-table bench/results/compile.json]   # estimated seconds per stage
    python bench/gpu.py --smoke [--out PATH]     # every stage at toy sizes on the CPU (about 2 minutes)

The first stage compiles every Triton kernel the others launch, in parallel on all cores, into Triton's
cache, and every stage process shares autotune results (TRITON_CACHE_AUTOTUNING=1), so the window is
spent measuring; `--plan` prints each stage's estimated seconds from bench/compile.py's table.

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

from _gpu import compile_stage as cs  # noqa: E402
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
    est_s: int = 0  # --plan: its measurements on an H100 with every kernel already compiled (an estimate)


STAGES = [
    Stage("compile", 45, 90, cs.precompile, "every Triton kernel the stages launch, compiled in parallel", 0),
    Stage("env", 15, 30, ks.env, "environment; measured bf16 matmul and device-copy ceilings", 8),
    Stage("data", 40, 40, ts.data, "quickstart data (Python stdlib) prepared into the scratch dir", 30),
    Stage("kernel_check", 55, 90, ks.kernel_check, "attention (GQA, documents, dropout first) and norms vs fp64",
          25),
    Stage("attention_speed", 60, 40, ks.attention_speed, "attention TFLOP/s: ours vs SDPA flash / cuDNN; GQA, docs",
          40),
    Stage("layernorm_speed", 30, 40, ks.layernorm_speed, "LayerNorm GB/s: ours vs F.layer_norm / compiled", 20),
    Stage("e2e_eager", 40, 40, ts.e2e_eager, "gpt2-124m training tokens/s and MFU, eager", 30),
    Stage("e2e_compiled", 65, 60, ts.e2e_compiled, "gpt2-124m training tokens/s and MFU, parallel.compile", 55),
    Stage("train_1p3b", 55, 60, ts.train_1p3b, "1.3B shape through torchrun train.py vs the planner", 45),
    Stage("quickstart_200", 40, 60, ts.quickstart_200, "quickstart 200 steps: triton vs sdpa loss curves", 35),
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


# ---------------------------------------------------------------- --plan

# bench/compile.py's JSON: a fresh one in bench/results/ if there is one, else the sm_90 table measured
# on a 2-core CPU and kept beside the stages (compile seconds there are per process; 16 cores divide them)
COMPILE_TABLE = ROOT / "bench" / "results" / "compile.json"
KEPT_COMPILE_TABLE = HERE / "_gpu" / "compile_sm90.json"
CACHE_LOAD_S = 0.05  # a kernel loaded from Triton's on-disk cache instead of compiled
AUTOTUNE_S = 0.15  # one config benchmarked by the autotuner (do_bench: 25 ms warm-up + 100 ms of runs)


def compile_seconds(table: Path):
    """A function spec -> cold compile seconds, from bench/compile.py's JSON: the same kernel, dtype, head
    dim, flags and config (T and H only change divisibility hints), else the median of that kernel and
    dtype, else of the whole table."""
    import statistics

    rows = [r for r in json.loads(table.read_text())["rows"] if "error" not in r and r.get("arch", 90) == 90]
    cost = {id(r): r.get("cpu_s", r["seconds"]) for r in rows}  # CPU seconds: a shared machine's wait excluded
    exact = {(r["kernel"], r["dtype"], r["dim"], r["feature"], r["config"]): cost[id(r)] for r in rows}
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault((r["kernel"], r["dtype"]), []).append(cost[id(r)])
    overall = statistics.median(cost.values())

    def seconds(spec) -> float:
        hit = exact.get((spec.kernel, spec.dtype, spec.dim, spec.feature, spec.config_name))
        if hit is not None:
            return hit
        near = by_kernel.get((spec.kernel, spec.dtype))
        return statistics.median(near) if near else overall
    return seconds


def plan(table: Path, cores: int = 16) -> int:
    """Each stage's estimated seconds on a 16-core GPU machine: the compile stage from the compile table
    (every launch's cold compile, spread over the cores, plus starting the workers); the others their
    measuring estimate (Stage.est_s) plus loading their kernels from the cache and autotuning."""
    if not table.exists():
        print(f"error: no compile table at {table}: run python bench/compile.py first", file=sys.stderr)
        return 2
    seconds = compile_seconds(table)
    needed = cs.needed_specs(Ctx(smoke=False, work=Path(tempfile.gettempdir())))
    launches = {stage: specs for stage, specs in needed.items()}
    per_stage = {"kernel_check": launches["kernel_check"], "attention_speed": launches["attention_speed"],
                 "layernorm_speed": launches["layernorm_speed"], "e2e_eager": launches["e2e"]}
    everything = [s for specs in launches.values() for s in specs]
    cold = sum(seconds(s) for s in everything)
    rows = []
    for stage in STAGES:
        if stage.name == "compile":
            est = cold / cores * 1.2 + 8  # 20% for uneven batches; 8 s to start the spawned workers
            rows.append(dict(stage=stage.name, budget_s=stage.budget_s, launches=len(everything),
                             cold_compile_s=cold, est_s=est))
            continue
        specs = per_stage.get(stage.name, [])
        tuned = sum(1 for s in specs if s.kernel in ("fwd", "dkdv", "dq")) if stage.name != "kernel_check" else 0
        est = stage.est_s + CACHE_LOAD_S * len(specs) + AUTOTUNE_S * tuned
        rows.append(dict(stage=stage.name, budget_s=stage.budget_s, launches=len(specs),
                         cold_compile_s=sum(seconds(s) for s in specs), est_s=est))
    total = sum(r["est_s"] for r in rows)
    print(f"bench/gpu.py --plan: {cores} cores; compile CPU seconds from {table} (cold, one process each); "
          f"est_s = measuring estimate + cache loads ({CACHE_LOAD_S} s each) + autotuning ({AUTOTUNE_S} s per "
          f"config); cold_compile_s: what the stage would spend compiling without the compile stage")
    print(format_table(rows))
    fits = total <= TOTAL_LIMIT_S
    print(f"total {total:.0f} s of {TOTAL_LIMIT_S} s ({'fits' if fits else 'DOES NOT FIT'}); budgets "
          f"{sum(s.budget_s for s in STAGES)} s")
    return 0 if fits else 1


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
    p.add_argument("--plan", action="store_true", help="print each stage's estimated time from the compile table")
    p.add_argument("--compile-table", type=Path, help="bench/compile.py's JSON for --plan (default: "
                   "bench/results/compile.json, else bench/_gpu/compile_sm90.json)")
    p.add_argument("--stage", choices=list(BY_NAME), help=argparse.SUPPRESS)  # a child process: one stage
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only and not set(args.only.split(",")) <= set(BY_NAME):
        p.error(f"--only: stages are {', '.join(BY_NAME)}")
    if args.plan:
        return plan(args.compile_table or (COMPILE_TABLE if COMPILE_TABLE.exists() else KEPT_COMPILE_TABLE))
    if args.stage:
        return run_stage(BY_NAME[args.stage], Ctx(smoke=args.smoke, work=args.work), args.out)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
