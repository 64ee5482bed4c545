"""Prompt/completion tuning on the standard-library demo: prompt = a function's signature and docstring,
completion = its body. Completion loss and the share of generated bodies that parse (`ast.parse`, the rule
of bench/quickstart.py), before and after tuning a pretrained run.

    python bench/sft.py --base runs/quickstart [--steps 300 --samples 32]
    python bench/sft.py --pretrain-steps 300 ...     (no base: pretrain one on the quickstart corpus first)
    python bench/sft.py --smoke                      (tiny, seconds: the test suite's check)
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

from quickstart import function_source, load_run, reached_end  # noqa: E402

SKIP = ("site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data")


def stdlib_examples(limit: int, seed: int = 0, max_chars: int = 1200) -> list[dict]:
    """Functions with a docstring from the standard library: prompt = the def line(s) and the docstring,
    completion = the rest of the body, both dedented to the def's column."""
    examples = []
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if not set(p.parts) & set(SKIP))
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.decorator_list or len(node.body) < 2:
                continue
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
                continue
            text = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
            split = doc.end_lineno - node.lineno + 1
            body = text.splitlines(keepends=True)
            prompt, completion = "".join(body[:split]), "".join(body[split:])
            if completion.strip() and len(text) <= max_chars and text.startswith("def "):
                examples.append({"prompt": prompt, "completion": completion})
    random.Random(seed).shuffle(examples)
    return examples[:limit]


def completion_loss(run: Path, val_file: Path) -> float:
    """The mean loss on the val examples' completion tokens (packed as tuning packs them)."""
    from lm.config.load import load_config
    from lm.objectives.sft_data import prepare_sft

    model, tokenizer = load_run(run)
    cfg = load_config(None, [f"model.block_size={model.cfg.block_size}", f"sft.train_file={val_file}",
                             f"sft.val_file={val_file}"])
    _, val = prepare_sft(cfg, tokenizer, tokenizer.eos_id)
    model.document_eos = tokenizer.eos_id
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, val.sequences, 8):
            n = min(8, val.sequences - start)
            x, y = val.stream.batch(start, n, torch.device("cpu"))
            tokens = int((y != -100).sum())
            total += model(x, y)[1].item() * tokens
            count += tokens
    return total / count


def parse_share(run: Path, examples: list[dict], max_new_tokens: int) -> float:
    """The share of bodies generated after each prompt (temperature 0.8, seed = its index) that end (EOS, or
    a line back at the def's column) and whose function, prompt included, parses as is."""
    from lm.model.generate import generate

    model, tokenizer = load_run(run)
    model.document_eos = None
    parsed = 0
    for i, ex in enumerate(examples):
        ids = tokenizer.encode(ex["prompt"])[-(model.cfg.block_size - max_new_tokens):]
        g = torch.Generator().manual_seed(i)
        new = generate(model, [ids], max_new_tokens, temperature=0.8, top_k=200, eos_id=tokenizer.eos_id,
                       generator=g, stop=lambda row, t: reached_end(ex["prompt"] + tokenizer.decode(t)))[0]
        text = ex["prompt"] + tokenizer.decode([t for t in new if t != tokenizer.eos_id])
        source, dedented, _ = function_source(text)
        ended = dedented or tokenizer.eos_id in new  # a body cut by the token budget does not count
        parsed += ended and has_a_body(source)
    return parsed / len(examples)


def has_a_body(source: str) -> bool:
    """`source` parses as one function with at least one statement after its docstring."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return len(tree.body) == 1 and isinstance(tree.body[0], ast.FunctionDef) and len(tree.body[0].body) >= 2


def train(config: Path, overrides: list[str]):
    subprocess.run([sys.executable, "train.py", str(config), *overrides, "log.progress=false"], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, help="a pretrained run on the quickstart corpus (default: pretrain one)")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=300, help="tuning steps")
    p.add_argument("--examples", type=int, default=3000)
    p.add_argument("--samples", type=int, default=32, help="val prompts generated from")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sft.json")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    small = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=128",
             "train.batch_size=2", "train.eval_sequences=4"] if args.smoke else []
    if args.smoke:
        args.pretrain_steps, args.steps, args.examples, args.samples, args.max_new_tokens = 2, 2, 60, 2, 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        examples = stdlib_examples(args.examples)
        n_val = max(args.samples, len(examples) // 20)
        val, trainset = examples[:n_val], examples[n_val:]
        for name, rows in (("train", trainset), ("val", val)):
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        base = args.base
        if base is None:
            base = tmp / "base"
            train(ROOT / "configs" / "quickstart.toml",
                  [*small, f"train.max_steps={args.pretrain_steps}", f"train.eval_interval={args.pretrain_steps}",
                   f"train.out_dir={base}"])
        tuned = tmp / "tuned"
        from lm.training import checkpoint

        config = checkpoint.resolve(base) / "config.toml"
        train(config, [f"init.from={base}", f"train.out_dir={tuned}", f"sft.train_file={tmp / 'train.jsonl'}",
                       f"sft.val_file={tmp / 'val.jsonl'}", f"train.max_steps={args.steps}",
                       f"train.eval_interval={args.steps}", "optim.warmup_steps=20", "optim.lr=1e-3",
                       "optim.min_lr=1e-4", "train.eval_sequences=32", *(["train.batch_size=2"] if args.smoke else [])])
        result = {"examples": {"train": len(trainset), "val": len(val)}, "steps": args.steps}
        for name, run in (("before", base), ("after", tuned)):
            result[name] = {"completion_loss": completion_loss(run, tmp / "val.jsonl"),
                            "parse_share": parse_share(run, val[:args.samples], args.max_new_tokens)}
    print(f"{'':8} {'completion loss':>16} {'bodies that parse':>18}   ({result['examples']['train']} train / "
          f"{result['examples']['val']} val examples, {args.steps} tuning steps)")
    for name in ("before", "after"):
        r = result[name]
        print(f"{name:8} {r['completion_loss']:16.4f} {r['parse_share']:17.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
