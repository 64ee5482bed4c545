"""Compile every shipped config of every kernel for a GPU this machine does not have (no GPU needed).

    python bench/compile.py [--arch 90,80] [--dtypes bf16,fp16,fp32] [--dims 64,128,256]
                            [--features causal,full,gqa,docs,dropout] [--kernels fwd,dkdv,dq,delta,norm]
                            [--jobs N] [--out bench/results/compile.json]

Prints a table (registers, spill bytes per thread, shared memory per block, compile seconds, matrix
instructions) and a summary per kernel, and writes both as JSON. Exit code 1 when any config spills,
needs more shared memory than the target has, or fails to compile. Each run compiles into a fresh
Triton cache, so the seconds are cold compiles: `seconds` is wall time (it grows when jobs or other
work share the cores), `cpu_s` the CPU time of the compile and its ptxas, which bench/gpu.py --plan
reads. How it compiles: kernels/compile_check.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("TRITON_INTERPRET", None)  # kernels decorated for the interpreter cannot compile for a GPU

COLUMNS = ("kernel", "dtype", "dim", "feature", "config", "regs", "spill", "shared", "seconds", "cpu_s", "mma", "ok")


def table(rows: list[dict], columns=COLUMNS) -> str:
    def cell(row, c):
        v = row.get(c)
        if c == "ok" and "error" in row:
            return "ERROR"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if c == "shared" and isinstance(v, int):
            return f"{v / 1024:.0f}K"
        return "-" if v is None else str(v)

    cells = [[cell(r, c) for c in columns] for r in rows]
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in cells]
    lines += [f"  error: {r['kernel']} {r['dtype']} D{r['dim']} {r['feature']} {r['config']}: {r['error']}"
              for r in rows if "error" in r]
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[dict]:
    """Per (arch, kernel, dtype): variants, how many spill, the worst spill, the most shared memory,
    the compile seconds in all and at most."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["arch"], r["kernel"], r["dtype"])].append(r)
    out = []
    for (arch, kernel, dtype), rs in groups.items():
        good = [r for r in rs if "error" not in r]
        out.append(dict(arch=arch, kernel=kernel, dtype=dtype, variants=len(rs),
                        spilling=sum(r["spill"] > 0 for r in good),
                        max_spill=max((r["spill"] for r in good), default=0),
                        max_shared_kb=round(max((r["shared"] for r in good), default=0) / 1024),
                        over_shared=sum(not r["ok"] and r["spill"] == 0 for r in good),
                        errors=len(rs) - len(good), seconds=round(sum(r["seconds"] for r in rs), 1),
                        cpu_s=round(sum(r.get("cpu_s", 0) for r in good), 1),
                        max_seconds=max(r["seconds"] for r in rs)))
    return out


def main() -> int:
    from lm.kernels import compile_check as cc

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="90", help="comma-separated SM versions (90: H100, 80: A100)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--dims", default="64,128,256", help="head dims")
    p.add_argument("--features", default=",".join(cc.FEATURES))
    p.add_argument("--kernels", default="fwd,dkdv,dq,delta,norm")
    p.add_argument("--norm-n", default=",".join(map(str, cc.NORM_N)), help="norm row widths")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compile.json")
    p.add_argument("--cache-dir", help="Triton cache to compile into (default: a fresh temporary one)")
    args = p.parse_args()
    why = cc.toolchain_missing()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    specs = cc.shipped_specs(dtypes=split(args.dtypes), dims=[int(d) for d in split(args.dims)],
                             features=split(args.features), kernels=split(args.kernels),
                             norm_n=[int(n) for n in split(args.norm_n)])
    os.environ["TRITON_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="lmforge-compile-")
    rows = []
    start = time.perf_counter()
    for arch in [int(a) for a in split(args.arch)]:
        print(f"sm_{arch}: {len(specs)} kernels, {args.jobs} jobs", flush=True)
        done = [0]

        def progress(row):
            done[0] += 1
            what = row.get("error") or (f"{row['regs']} regs, {row['spill']} B spilled, "
                                        f"{row['shared'] // 1024} KB shared")
            print(f"  [{done[0]}/{len(specs)}] {row['kernel']} {row['dtype']} D{row['dim']} {row['feature']} "
                  f"{row['config']}: {what}, {row['seconds']} s", flush=True)

        rows += cc.compile_all(specs, arch, args.jobs, on_row=progress)
    wall = time.perf_counter() - start
    print(table(rows))
    sums = summary(rows)
    print()
    print(table(sums, tuple(sums[0]) if sums else ()))
    bad = [r for r in rows if not r.get("ok")]
    print(f"\n{len(rows)} compiles in {wall:.0f} s wall ({sum(r['seconds'] for r in rows):.0f} s of compiling, "
          f"{args.jobs} jobs); {len(bad)} spill, overflow shared memory or fail")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    import torch
    import triton

    tmp.write_text(json.dumps(dict(command=" ".join(sys.argv), triton=triton.__version__, torch=torch.__version__,
                                   jobs=args.jobs, wall_s=round(wall, 1),
                                   shared_limit=cc.SHARED_LIMIT, rows=rows, summary=sums), indent=1))
    os.replace(tmp, args.out)
    print(f"JSON: {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
