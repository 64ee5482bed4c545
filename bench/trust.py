"""Bad and hostile inputs to the trainer, each run as a user would: does it end in one `error:` line (or run
with the note it owes), or in a traceback, silence, or wrong results? A table and JSON.

    python bench/trust.py [--repo DIR] [--out FILE]

--repo runs another checkout's train.py (e.g. a worktree of an older commit) on the same cases, for a
before -> after comparison. Cases that need a read-only mount use a tmpfs remounted read-only when this
process may mount (root in a VM); otherwise they are reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.batch_size=4",
        "train.eval_sequences=4", "train.max_steps=2", "train.eval_interval=2", "log.progress=false",
        "train.device=cpu", "train.threads=1"]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def outcome(r: subprocess.CompletedProcess, expect: str, note: str | None) -> str:
    """"one line" / "traceback" / "accepted" (exit 0 where a refusal was due) / "noted" / "silent"."""
    err = r.stderr.strip().splitlines()
    if "Traceback" in r.stderr:
        return "traceback"
    if r.returncode == 2 and err and err[-1].startswith("error: "):
        return "one line" if expect == "refuse" else "refused (wrongly)"
    if r.returncode == 0:
        if expect == "refuse":
            return "accepted"
        return "noted" if note is None or note in r.stdout + r.stderr else "silent"
    return f"exit {r.returncode}"


def setup(work: Path) -> dict:
    corpus = work / "corpus"
    corpus.mkdir()
    for d in range(12):
        (corpus / f"d{d}.txt").write_text(" ".join(WORDS[(d + i) % len(WORDS)] for i in range(300)) + ".\n")
    data = work / "data"
    subprocess.run([sys.executable, "-m", "data_prep", "prepare", str(corpus), "--out", str(data), "--tokenizer",
                    "char"], cwd=ROOT, check=True, capture_output=True)
    files = {"data": data}

    def jsonl(name, records):
        path = work / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        files[name] = path

    jsonl("sft.jsonl", [{"prompt": f"say {w}.", "completion": f" {w}."} for w in WORDS * 3])
    jsonl("one.jsonl", [{"prompt": "say a.", "completion": " a."}])
    jsonl("empty_turn.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}])
    jsonl("long.jsonl", [{"prompt": "say.", "completion": " " + " ".join(WORDS)}] * 8)
    jsonl("cls.jsonl", [{"text": w, "label": "abc"[i % 3]} for i, w in enumerate(WORDS * 3)])
    return files


def cases(f: dict, work: Path) -> list[tuple[str, list[str], str, str | None]]:
    """(name, train.py arguments, "refuse" or "run", the note a run owes)."""
    sft, cls = f"sft.train_file={f['sft.jsonl']}", ["train.task=classify", f"classify.train_file={f['cls.jsonl']}"]
    return [
        ("classify.class_weights = [inf, 1, 1]", [*cls, "classify.class_weights=[inf, 1.0, 1.0]"], "refuse", None),
        ("distill.temperature = inf", [f"distill.teacher={work / 'finished'}", "distill.temperature=inf"], "refuse",
         None),
        ("optim.lr = nan", ["optim.lr=nan"], "refuse", None),
        ("sft.val_fraction = -0.5", [sft, "sft.val_fraction=-0.5"], "refuse", None),
        ("sft.val_fraction = 1.0", [sft, "sft.val_fraction=1.0"], "refuse", None),
        ("SFT file of one example", [f"sft.train_file={f['one.jsonl']}"], "refuse", None),
        ("SFT assistant turn \"\"", [f"sft.train_file={f['empty_turn.jsonl']}"], "refuse", None),
        ("SFT + data.augment drop", [sft, 'data.augment=["drop:0.1"]'], "refuse", None),
        ("SFT + data.sources", [sft, f'data.sources=["new:1:{f["data"]}"]'], "refuse", None),
        ("classify + data.document_mask", [*cls, "data.document_mask=true"], "refuse", None),
        ("SFT completion longer than the window", [f"sft.train_file={f['long.jsonl']}"], "run", "training completions"),
        ("train.out_dir under a file", [f"train.out_dir={f['data'] / 'meta.json' / 'run'}"], "refuse", None),
        ("data.val_sets names a missing directory", ['data.val_sets=["new:data/nowhere"]'], "refuse", None),
        ("init.from of another shape (2 keys)", ["SHAPE"], "refuse", "model.n_embd"),
    ]


def run(repo: Path, args: list[str], timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "configs/shakespeare_char.toml", *args], cwd=repo,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=ROOT)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trust.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trust-"))
    f = setup(work)
    base = [*TINY, f"data.dir={f['data']}"]
    rows = []
    n = 0

    def record(name, expect, result, detail):
        rows.append({"case": name, "expect": expect, "outcome": result, "detail": detail[-160:]})
        print(f"{name:<44} {expect:<7} {result:<12} {detail[-100:]}", flush=True)

    # a finished run, for the resume and shape cases
    finished = work / "finished"
    run(args.repo, [*base, f"train.out_dir={finished}"])
    for name, extra, expect, note in cases(f, work):
        n += 1
        if extra == ["SHAPE"]:
            extra = [f"init.from={finished}", "model.n_layer=3", "model.n_embd=32"]
        out = [f"train.out_dir={work / f'run{n}'}"] if not any(a.startswith("train.out_dir") for a in extra) else []
        r = run(args.repo, [*base, *out, *extra])
        result = outcome(r, expect, note)
        if expect == "refuse" and note and result == "one line" and note not in r.stderr:
            result = "one line (names one key)"
        record(name, expect, result, (r.stderr.strip().splitlines() or [""])[-1])
    r = run(args.repo, [*base, f"train.out_dir={finished}", "--resume"])
    said = "nothing to train" in r.stdout
    record("--resume of a finished run", "run", "noted" if said and r.returncode == 0 else "silent",
           (r.stdout.strip().splitlines() or [""])[-1])
    mount = work / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True).returncode == 0:
        run(args.repo, [*base, f"train.out_dir={mount / 'run'}"])
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        for name, extra in (("a fresh run into a read-only mount", [f"train.out_dir={mount / 'fresh'}"]),
                            ("--resume on a read-only mount", [f"train.out_dir={mount / 'run'}", "train.max_steps=4",
                                                               "--resume"])):
            r = run(args.repo, [*base, *extra])
            record(name, "refuse", outcome(r, "refuse", None), (r.stderr.strip().splitlines() or [""])[-1])
        subprocess.run(["umount", str(mount)])
    else:
        record("read-only mount cases", "refuse", "skipped", "cannot mount a tmpfs here")
    good = sum(r["outcome"] in ("one line", "noted") for r in rows)
    print(f"\n{good} of {len(rows)} cases end as they should ({args.repo})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repo": str(args.repo), "good": good, "cases": rows}, indent=2))


if __name__ == "__main__":
    main()
