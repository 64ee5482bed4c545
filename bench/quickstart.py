"""Does the quickstart write Python? Trains `configs/quickstart.toml` (or scores an existing run), samples
continuations of `def ` and reports the share that parse as a Python function, with val bits/byte and the
wall time of the training command (data preparation included when it happens) and the load it ran under.

    python bench/quickstart.py                                  # train + score (~10 min on a 2-core CPU)
    python bench/quickstart.py --run-dir runs/quickstart        # score an existing run only
    python bench/quickstart.py --out-dir DIR [section.key=value ...]   # train into DIR with overrides

Sample i (i = 0 .. --samples - 1) uses seed i, temperature 0.8 and top-k 200 (sample.py's defaults), so it is
the start of `python sample.py RUN --prompt "def " --seed i`. A sample ends at EOS, after --max-new-tokens,
or at the first line back at column 0 once the def's header is complete (see function_source).
Results: a table on the console and JSON (default bench/results/quickstart.json).
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path[0] != str(ROOT):
    sys.path.insert(0, str(ROOT))  # run as a script, bench/ comes first: bench/data_prep.py would shadow data_prep
PROMPT = "def "
_SKIP = (tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER)


# ---- the parsing rule ----------------------------------------------------------------------------------
def function_source(text: str) -> tuple[str, bool, str | None]:
    """Split a sample that starts with `def ` at the end of that function.

    Returns (source, complete, completion). `complete`: the text reached the first logical line back at
    indentation 0 after the def's header (the "first dedent"; lines inside brackets or strings, and
    comments, do not count), and `source` is the text before that line. Otherwise the text was cut (by the
    token budget or EOS): `source` is all of it, and `completion` is its whole lines up to the last complete
    logical line, followed by `pass` (one level deeper than that line when it ends in `:`, at its level
    otherwise): the function as it would be had the sample stopped cleanly where it was cut. None when
    there is no complete header line, or the tokenizer rejects the text (an inconsistent dedent).
    """
    lines = text.splitlines(keepends=True)
    scan = _scan(text)
    if scan["dedent_row"] is not None:
        return "".join(lines[:scan["dedent_row"] - 1]), True, None
    whole = text[:text.rfind("\n") + 1]  # a last line without its newline may be cut mid-token
    scan = _scan(whole)
    if scan["error"] or scan["last_end"] == 0:
        return text, False, None
    kept = "".join(whole.splitlines(keepends=True)[:scan["last_end"]])
    indent = scan["indent"] + ("    " if scan["last_op"] == ":" else "")
    return text, False, kept + indent + "pass\n"


def _scan(text: str) -> dict:
    """Walk `text`'s tokens: the row of the first logical line at indentation 0 after the first one
    (dedent_row), the row ending the last complete logical line (last_end, 0 for none), that line's last
    token (last_op) and indentation (indent), and whether tokenizing failed (error)."""
    depth = 0  # open INDENTs
    out = {"dedent_row": None, "last_end": 0, "last_op": None, "indent": "", "error": False}
    line_start, line_indent, last_op = True, "", None
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.INDENT:
                depth += 1
            elif tok.type == tokenize.DEDENT:
                depth -= 1
            elif tok.type == tokenize.NEWLINE:
                out.update(last_end=tok.end[0], last_op=last_op, indent=line_indent)
                line_start = True
            elif tok.type not in _SKIP:
                if line_start:
                    if out["last_end"] and depth == 0 and tok.start[1] == 0:
                        out["dedent_row"] = tok.start[0]
                        return out
                    line_indent = tok.line[:tok.start[1]]
                line_start, last_op = False, tok.string
    except tokenize.TokenError:  # the end inside brackets or a string: the text was cut there
        pass
    except (IndentationError, SyntaxError):
        out["error"] = True
    return out


def _is_one_function(source: str) -> bool:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte
        return False
    return len(tree.body) == 1 and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))


def parses_as_function(text: str) -> bool:
    """True when `text` (a sample starting with `def `), up to the first dedent, is one Python function:
    `ast.parse` accepts it as is, or, when the sample was cut before that dedent, with its body completed
    by `pass` where it was cut (see function_source)."""
    source, complete, completion = function_source(text)
    if _is_one_function(source):
        return True
    return not complete and completion is not None and _is_one_function(completion)


def reached_end(text: str) -> bool:
    """The sample has passed the end of its function: generation can stop."""
    return "\n" in text and function_source(text)[1]


# ---- training ------------------------------------------------------------------------------------------
class LoadSampler:
    """The 1-minute load average every `every` seconds while a command runs."""

    def __init__(self, every: float = 5.0):
        self.values, self.every, self.stop = [os.getloadavg()[0]], every, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.every):
            self.values.append(os.getloadavg()[0])

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.values.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"start": self.values[0], "end": self.values[-1], "mean": sum(self.values) / len(self.values),
                "max": max(self.values), "samples": len(self.values)}


def train(config: Path, out_dir: Path, overrides: list[str]) -> dict:
    """Run `train.py config train.out_dir=out_dir overrides...`; its wall time (and when setup, data
    preparation included, ended), CPU time and the load it ran under."""
    cmd = [sys.executable, str(ROOT / "train.py"), str(config), f"train.out_dir={out_dir}", "log.progress=false",
           *overrides]
    print("$", " ".join(cmd[1:]), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    setup_s, prepared = None, False
    with LoadSampler() as load:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = []
        for line in proc.stdout:
            sys.stdout.write(line)
            tail = (tail + [line])[-20:]
            if line.startswith("preparing "):
                prepared = True
            if setup_s is None and line.startswith("model:"):
                setup_s = time.perf_counter() - start
        rc = proc.wait()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"error: training failed (exit code {rc}):\n{''.join(tail)}")
    return {"command": " ".join(cmd[1:]), "wall_s": wall, "setup_s": setup_s, "data_prepared_in_run": prepared,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "load_average": load.summary(), "cpus": os.cpu_count()}


def run_metrics(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if r.get("val_loss") is not None]
    steps = [r for r in records if "loss" in r]
    return {"step": max((r.get("step", 0) for r in records), default=0),
            "val_loss": evals[-1]["val_loss"] if evals else None, "val_bpb": evals[-1].get("val_bpb") if evals else None,
            "train_loss": steps[-1]["loss"] if steps else None,
            "train_loop_s": (steps[-1]["wall_s"] - evals[0]["wall_s"]) if steps and evals else None}


# ---- bits/byte on a fixed text --------------------------------------------------------------------------
def val_text(data_dir: Path, max_bytes: int) -> str:
    """The first documents of a prepared dataset's val split, decoded, up to `max_bytes` UTF-8 bytes: one
    text that runs prepared from different corpora (with different tokenizers) can all be scored on. The
    split is a seeded hash of each document, so a document in this val split is in the val split of any
    corpus that contains it (the pre-curation quickstart's included)."""
    from data_prep import TokenReader, load_tokenizer

    reader, tokenizer = TokenReader(data_dir, "val"), load_tokenizer(data_dir)
    tokens = reader.read(0, reader.num_tokens).tolist()
    docs, start = [], 0
    for i, t in enumerate(tokens + [reader.eos_id]):
        if t == reader.eos_id:
            if i > start:
                docs.append(tokenizer.decode(tokens[start:i]))
            start = i + 1
    text = "".join(d if d.endswith("\n") else d + "\n" for d in docs)
    return text.encode()[:max_bytes].decode(errors="ignore")


def text_bits_per_byte(model, tokenizer, text: str, batch: int = 8) -> float:
    """Bits per UTF-8 byte of `text` under `model`: the text in consecutive windows of the model's context,
    every token after the first scored once."""
    import torch

    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    block = model.cfg.block_size
    starts = list(range(0, len(ids) - 1, block))
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(starts), batch):
            rows = [ids[s:s + block + 1] for s in starts[i:i + batch]]
            full = [r for r in rows if len(r) == block + 1]
            short = [r for r in rows if len(r) < block + 1]
            if full:
                x = torch.stack(full)
                logits, _ = model(x[:, :-1])
                total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(),
                                                           reduction="sum").item()
            for r in short:
                logits, _ = model(r[None, :-1])
                total += torch.nn.functional.cross_entropy(logits.float()[0], r[1:], reduction="sum").item()
    return total / math.log(2) / len(text.encode())


# ---- sampling ------------------------------------------------------------------------------------------
def load_run(run_dir: Path):
    """The run's newest checkpoint as (model, tokenizer), as sample.py loads it."""
    import warnings

    from data_prep import load_tokenizer
    from lm.interop.export import load

    with warnings.catch_warnings():  # DCP's note that it loads in one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        ckpt, model = load(run_dir)
    return model, load_tokenizer(ckpt)


def sample(model, tokenizer, samples: int, max_new_tokens: int, temperature: float, top_k: int,
           heal: bool = True) -> list[dict]:
    """Sample i continues PROMPT with seed i; each row: the text, its function (up to the first dedent) and
    whether it parses."""
    import torch

    from lm.model.generate import generate, heal_prompt

    ids, first, removed = tokenizer.encode(PROMPT), None, ""
    if heal:  # as sample.py does
        ids, first, removed = heal_prompt(ids, [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)])
    head = PROMPT[:len(PROMPT) - len(removed)]

    def decode(tokens):
        return tokenizer.decode([t for t in tokens if t != tokenizer.eos_id])

    out = []
    for seed in range(samples):
        generator = torch.Generator().manual_seed(seed)
        tokens = generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k,
                          eos_id=tokenizer.eos_id, stop=lambda row, new: reached_end(head + decode(new)),
                          generator=generator, first_allowed=[first])[0]
        text = head + decode(tokens)
        source, complete, _ = function_source(text)
        out.append({"seed": seed, "tokens": len(tokens), "eos": tokenizer.eos_id in tokens,
                    "complete": complete, "parses": parses_as_function(text), "function": source, "text": text})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for train.py")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.toml")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "quickstart_run",
                   help="where to train (must not exist or be empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="delete --out-dir first")
    p.add_argument("--run-dir", type=Path, help="score this existing run; train nothing")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--no-token-healing", action="store_true",
                   help="sample from the prompt's tokens as they are (sample.py heals the prompt's last token)")
    p.add_argument("--text-val", type=Path,
                   help="also score bits/byte on the first --text-val-bytes of this prepared dataset's val split, "
                        "decoded to text (comparable across corpora and tokenizers; default: the config's "
                        "data.dir when prepared; 'none' skips)")
    p.add_argument("--text-val-bytes", type=int, default=200_000)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "quickstart.json")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error("--samples must be >= 1")
    training = None
    if args.run_dir is None:
        if args.out_dir.exists() and any(args.out_dir.iterdir()):
            if not args.overwrite:
                print(f"error: {args.out_dir} is not empty: pass --overwrite to retrain there, or --run-dir "
                      f"{args.out_dir} to score it", file=sys.stderr)
                return 2
            shutil.rmtree(args.out_dir)
        training = train(args.config, args.out_dir, args.overrides)
        run_dir = args.out_dir
    else:
        run_dir = args.run_dir
    metrics = run_metrics(run_dir)
    model, tokenizer = load_run(run_dir)
    start = time.perf_counter()
    rows = sample(model, tokenizer, args.samples, args.max_new_tokens, args.temperature, args.top_k,
                  heal=not args.no_token_healing)
    sample_s = time.perf_counter() - start
    text_val = {"dir": None, "bytes": 0, "bpb": None}
    text_dir = text_val_dir(args)
    if text_dir is not None:
        text = val_text(text_dir, args.text_val_bytes)
        text_val = {"dir": str(text_dir), "bytes": len(text.encode()), "bpb": text_bits_per_byte(model, tokenizer, text)}
    share = sum(r["parses"] for r in rows) / len(rows)
    result = {"run_dir": str(run_dir), "prompt": PROMPT, "samples": len(rows), "temperature": args.temperature,
              "top_k": args.top_k, "token_healing": not args.no_token_healing, "max_new_tokens": args.max_new_tokens, "seeds": [r["seed"] for r in rows],
              "parse_share": share, "complete_share": sum(r["complete"] for r in rows) / len(rows),
              **{k: metrics[k] for k in ("step", "val_loss", "val_bpb", "train_loss", "train_loop_s")},
              "text_val": text_val, "training": training, "sample_s": sample_s,
              "load_average_now": list(os.getloadavg()), "results": rows}
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


def text_val_dir(args) -> Path | None:
    if args.text_val is not None:
        return None if str(args.text_val) == "none" else args.text_val
    from data_prep import is_prepared
    from lm.config.load import load_config

    data_dir = ROOT / load_config(args.config, [o for o in args.overrides if o.startswith("data.dir=")]).data.dir
    return data_dir if is_prepared(data_dir) else None


def print_table(result: dict):
    training = result["training"] or {}
    load = training.get("load_average")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    cells = [("parse share", f"{result['parse_share']:.1%}"), ("complete", f"{result['complete_share']:.1%}"),
             ("val bpb", fmt(result["val_bpb"], ".4f")), ("val loss", fmt(result["val_loss"], ".4f")),
             ("text bpb", fmt(result["text_val"]["bpb"], ".4f")), ("steps", str(result["step"])),
             ("wall s", fmt(training.get("wall_s"), ".1f")), ("cpu s", fmt(training.get("cpu_s"), ".1f")),
             ("load mean/max", f"{load['mean']:.2f}/{load['max']:.2f}" if load else "-")]
    widths = [max(len(k), len(v)) for k, v in cells]
    print()
    print("  ".join(k.rjust(w) for (k, _), w in zip(cells, widths)))
    print("  ".join(v.rjust(w) for (_, v), w in zip(cells, widths)))
    first = next((r for r in result["results"] if r["parses"]), result["results"][0])
    print(f"\nsample (seed {first['seed']}, {'parses' if first['parses'] else 'does not parse'}):\n{first['function']}")


if __name__ == "__main__":
    sys.exit(main())
