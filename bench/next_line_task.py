"""A multiple-choice task from local data: the true next line of a standard-library function among 4.

The functions come from the standard library's test suites, which the quickstart corpus leaves out
(configs/quickstart.toml excludes **/test/**): text the quickstart model never trained on. Each example:
context = a function's first lines (at least its def line and one more), endings = the true next line and
three lines drawn from other functions at the same indentation, label = the true one's index. Written in
the HellaSwag layout that `python -m lm.eval ... --tasks mc:FILE` reads.

    python bench/next_line_task.py OUT.jsonl [--count 200] [--seed 0]
    python -m lm.eval runs/quickstart --tasks mc:OUT.jsonl
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sysconfig
import textwrap
from pathlib import Path


def functions() -> list[list[str]]:
    """Each function of the standard library's tests as its dedented lines (with newlines), sorted by file."""
    out = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("test/**/*.py")) + sorted(root.glob("*/test*/**/*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and 4 <= node.end_lineno - node.lineno <= 30:
                out.append(textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno])).splitlines(keepends=True))
    return out


def indentation(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def build(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    funcs = functions()
    pool: dict[str, list[str]] = {}
    for lines in funcs:
        for line in lines[1:]:
            if line.strip():
                pool.setdefault(indentation(line), []).append(line)
    examples = []
    for lines in rng.sample(funcs, len(funcs)):
        cut = rng.randrange(2, len(lines))
        true = lines[cut]
        candidates = [l for l in pool.get(indentation(true), []) if l.strip() != true.strip()]
        if not true.strip() or len(set(candidates)) < 3:
            continue
        distractors = rng.sample(sorted(set(candidates)), 3)
        label = rng.randrange(4)
        endings = distractors[:label] + [true] + distractors[label:]
        examples.append({"ctx": "".join(lines[:cut]), "endings": endings, "label": label})
        if len(examples) == count:
            break
    return examples


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    examples = build(args.count, args.seed)
    args.out.write_text("".join(json.dumps(e) + "\n" for e in examples))
    print(f"wrote {len(examples)} examples to {args.out} (chance: 25%)")


if __name__ == "__main__":
    main()
