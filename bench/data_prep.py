"""`prepare` throughput against the encoders it wraps, where its time goes, and its peak memory.

    python bench/data_prep.py [TEXT_FILE ...] [--workers 1 2]          (default: ../shared/data/*.txt + stdlib)
    python bench/data_prep.py --rss 100 1000                           (peak RSS on 100 MB and 1 GB corpora)
    python bench/data_prep.py --one-line 200                           (peak RSS on a 200 MB single-line document)
    python bench/data_prep.py --smoke

Per corpus (each file given, plus the interpreter's stdlib .py files), with one byte-level BPE trained up
front on all of them (its training is reported apart):
  raw HF        `tokenizers` encode_batch_fast on the texts prepare encodes (its own Rust threads: all cores)
  tiktoken 1t   our tiktoken engine (data_prep/fast_bpe.py), one thread: the encoder prepare's workers run
  pipeline Nw   prepare(..., workers=N) with that tokenizer reused, end to end (discovery to published dir)
ratios: pipeline 1w / tiktoken 1t (the aim: >= 0.9 on corpora of 3 MB and more) and 2w / 1w (>= 1.6).
The stage split times each stage alone, one thread, on the same corpus: discovery, reading, cleaning,
planning (dedup and split: the planner includes cleaning), encoding, writing shards; prepare overlaps
encoding with the rest. MB = UTF-8 megabytes of document text. Token ids of tiktoken and HF are compared
on every text of every corpus (the "ids equal" column).

--rss N...: synthetic corpora of N MB (files of ~8 KB documents sampled from the given texts' lines,
distinct, written under a temporary directory and deleted after), each prepared by a child process
(`python -m data_prep prepare`, tokenizer reused, default dedup); reports its peak RSS (VmHWM; Linux).
Results go to bench/results/data_prep.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import BPETokenizer, CleanConfig, Cleaner, iter_documents, prepare  # noqa: E402
from data_prep.dedup import MinHashConfig  # noqa: E402
from data_prep.plan import Planner  # noqa: E402
from data_prep.shards import ShardWriter  # noqa: E402
from data_prep.sources import iter_files, list_files  # noqa: E402
from data_prep.stream import SEGMENT_CHARS  # noqa: E402
from data_prep.tokenizer import split_for_encoding  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
STDLIB = ["${stdlib}/**/*.py"]
STDLIB_EXCLUDE = ["*/site-packages/*", "*/test/*", "*/tests/*"]


def corpora(files: list[str]) -> list[tuple[str, list[str], list[str]]]:
    return [(Path(f).name, [f], []) for f in files] + [("stdlib *.py", STDLIB, STDLIB_EXCLUDE)]


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def encoders(tok: BPETokenizer, texts: list[str], repeat: int) -> dict:
    pieces = [p for t in texts for p in split_for_encoding(t, SEGMENT_CHARS, tok.cut_at)]
    fast = tok.fast_encode()
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    hf_s = best_of(lambda: tok._tok.encode_batch_fast(pieces, add_special_tokens=False), repeat)
    tk_s = best_of(lambda: [fast(p) for p in pieces], repeat)
    with ThreadPoolExecutor(2) as pool:
        tk2_s = best_of(lambda: list(pool.map(lambda ps: [fast(p) for p in ps], [pieces[0::2], pieces[1::2]])), repeat)
    equal = all(list(fast(p)) == ids for p, ids in zip(pieces, tok.encode_batch(pieces)))
    return {"mb": mb, "hf_mb_s": mb / hf_s, "tiktoken_1t_mb_s": mb / tk_s, "tiktoken_2t_mb_s": mb / tk2_s,
            "ids_equal": equal, "pieces": pieces}


def stages(tok: BPETokenizer, inputs: list[str], exclude: list[str], pieces: list[str], tmp: Path) -> dict:
    """Seconds of each stage alone (one thread)."""
    out = {}
    t0 = time.perf_counter()
    files = list_files(inputs, exclude)
    out["discover"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    docs = list(iter_files(files))
    out["read"] = time.perf_counter() - t0
    cleaner = Cleaner(CleanConfig())
    t0 = time.perf_counter()
    for d in docs:
        cleaner.clean(d.text, d.source)
    out["clean"] = time.perf_counter() - t0
    planner = Planner(Cleaner(CleanConfig()), 0.1, 1337, "near", "remove", MinHashConfig())
    t0 = time.perf_counter()
    if len(docs) > 1:  # one document is not planned (nothing to deduplicate against)
        for d in docs:
            planner.add(d)
    out["plan (incl. clean)"] = time.perf_counter() - t0
    fast = tok.fast_encode()
    t0 = time.perf_counter()
    ids = [fast(p) for p in pieces]
    out["encode"] = time.perf_counter() - t0
    writer = ShardWriter(tmp, "train", "uint16", tok.eos_id)
    t0 = time.perf_counter()
    for x in ids:
        writer.add_document(x)
    writer.close()
    out["write"] = time.perf_counter() - t0
    for p in tmp.glob("train_*"):
        p.unlink()
    return out


def synthetic_corpus(directory: Path, megabytes: int, lines: list[str], seed: int = 0) -> int:
    """Files of 1,000 documents of ~8 KB, each a random draw of lines (distinct documents); bytes written."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    written, n_file = 0, 0
    while written < megabytes * 1_000_000:
        with open(directory / f"part{n_file:05d}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(1000):
                doc, size = [], 0
                while size < 8000:
                    line = rng.choice(lines)
                    doc.append(line)
                    size += len(line) + 1
                record = json.dumps({"text": "\n".join(doc)}, ensure_ascii=False) + "\n"
                f.write(record)
                written += len(record.encode("utf-8"))
        n_file += 1
    return written


def one_line_corpus(directory: Path, megabytes: int, lines: list[str], seed: int = 0) -> int:
    """One document of `megabytes` MB on a single line (lines drawn at random, joined by spaces) beside two
    small ones (so dedup runs on it); bytes written."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    written = 0
    with open(directory / "one_line.txt", "w", encoding="utf-8") as f:
        while written < megabytes * 1_000_000:
            piece = " ".join(rng.choice(lines).strip() for _ in range(1000)) + " "
            f.write(piece)
            written += len(piece.encode("utf-8"))
    for name in ("a.txt", "b.txt"):
        text = "\n".join(rng.choice(lines) for _ in range(100))
        (directory / name).write_text(text, encoding="utf-8")
        written += len(text.encode("utf-8"))
    return written


def peak_rss(tmp: Path, tokdir: Path, megabytes: int, lines: list[str], build=synthetic_corpus) -> dict:
    src = tmp / f"{build.__name__}_{megabytes}"
    nbytes = build(src, megabytes, lines)
    out = tmp / f"out_{megabytes}"
    t0 = time.perf_counter()
    # VmHWM: the child's own peak. ru_maxrss would not do: Linux carries it over fork and exec, so a child of
    # this ~400 MB process would report at least 400 MB.
    cmd = [sys.executable, "-c", "import sys; from data_prep.__main__ import main; rc = main(sys.argv[1:]); "
           "print('maxrss_kb', open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); sys.exit(rc)",
           "prepare", str(src), "--out", str(out), "--tokenizer-from", str(tokdir), "--quiet", "--workers", "2"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(run.stderr)
    rss_kb = int(next(line.split()[1] for line in run.stdout.splitlines() if line.startswith("maxrss_kb")))
    meta = json.loads((out / "meta.json").read_text())
    shutil.rmtree(src)
    shutil.rmtree(out)
    return {"corpus": build.__name__, "mb": round(nbytes / 1e6, 1), "documents": meta["source"]["documents"],
            "seconds": round(seconds, 1),
            "peak_rss_mb": round(rss_kb / 1024, 1), "mb_s": round(nbytes / 1e6 / seconds, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", default=[str(SHARED / "tinyshakespeare.txt"), str(SHARED / "warandpeace.txt")])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=2, help="best of this many runs per measurement")
    p.add_argument("--rss", type=int, nargs="*", default=None, metavar="MB", help="peak RSS on synthetic corpora")
    p.add_argument("--one-line", type=int, nargs="+", default=None, metavar="MB",
                   help="peak RSS on a corpus whose one document is a single line of MB megabytes")
    p.add_argument("--smoke", action="store_true", help="a tiny corpus, one repeat: the wiring only")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "data_prep.json"))
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_prep_"))
    results = {"cpus": os.cpu_count(), "vocab_size": args.vocab_size, "corpora": []}
    try:
        if args.smoke:
            small = tmp / "small.txt"
            small.write_text((ROOT / "README.md").read_text(encoding="utf-8") * 3, encoding="utf-8")
            args.files, args.repeat, args.vocab_size = [str(small)], 1, 400
        chosen = corpora(args.files)[:1] if args.smoke else corpora(args.files)
        all_texts = {name: [d.text for d in iter_documents(inputs, exclude)] for name, inputs, exclude in chosen}
        t0 = time.perf_counter()
        tok = BPETokenizer.train([t for texts in all_texts.values() for t in texts], args.vocab_size)
        results["tokenizer_train_s"] = round(time.perf_counter() - t0, 2)
        tokdir = tmp / "tok"
        tokdir.mkdir()
        tok.save(tokdir)
        if args.rss is not None or args.one_line:
            lines = [line for texts in all_texts.values() for t in texts for line in t.splitlines() if line.strip()]
            sizes = (args.rss or []) if args.one_line else (args.rss or [100, 1000])
            results["rss"] = [peak_rss(tmp, tokdir, mb, lines) for mb in sizes]
            results["rss"] += [peak_rss(tmp, tokdir, mb, lines, one_line_corpus) for mb in args.one_line or []]
        else:
            for name, inputs, exclude in chosen:
                results["corpora"].append(measure(name, inputs, exclude, all_texts[name], tok, tokdir, tmp, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def measure(name, inputs, exclude, texts, tok, tokdir, tmp, args) -> dict:
    enc = encoders(tok, texts, args.repeat)
    entry = {"corpus": name, "documents": len(texts), "mb": round(enc["mb"], 2), "ids_equal": enc["ids_equal"],
             **{k: round(v, 2) for k, v in enc.items() if k.endswith("_mb_s")}, "runs": []}
    for w in args.workers:
        def run():
            out = tmp / f"out_{w}"
            shutil.rmtree(out, ignore_errors=True)
            prepare(inputs, out, exclude=exclude, tokenizer_dir=tokdir, workers=w, show_progress=False)
        secs = best_of(run, args.repeat)
        entry["runs"].append({"workers": w, "seconds": round(secs, 2), "mb_s": round(enc["mb"] / secs, 2)})
    one = next((r["mb_s"] for r in entry["runs"] if r["workers"] == 1), None)
    for r in entry["runs"]:
        r["vs_tiktoken_1t"] = round(r["mb_s"] / enc["tiktoken_1t_mb_s"], 3)
        r["vs_1_worker"] = round(r["mb_s"] / one, 3) if one else None
    stage = tmp / "stage"
    stage.mkdir(exist_ok=True)
    entry["stages_s"] = {k: round(v, 3) for k, v in stages(tok, inputs, exclude, enc["pieces"], stage).items()}
    return entry


def report(results: dict) -> None:
    print(f"byte-level BPE, vocab {results['vocab_size']}, trained in {results.get('tokenizer_train_s')} s "
          f"(not included below); {results['cpus']} CPUs")
    if results["corpora"]:
        print(f"\n{'corpus':<20} {'MB':>6} {'raw HF':>7} {'tiktoken 1t':>11} {'2t':>6} {'ids equal':>9} "
              f"{'workers':>7} {'pipeline':>8} {'/ tiktoken 1t':>13} {'/ 1 worker':>10}   (MB/s)")
        for c in results["corpora"]:
            for k, r in enumerate(c["runs"]):
                head = (f"{c['corpus']:<20} {c['mb']:>6.2f} {c['hf_mb_s']:>7.2f} {c['tiktoken_1t_mb_s']:>11.2f} "
                        f"{c['tiktoken_2t_mb_s']:>6.2f} {str(c['ids_equal']):>9}") if k == 0 else " " * 65
                print(f"{head} {r['workers']:>7} {r['mb_s']:>8.2f} {r['vs_tiktoken_1t']:>13.3f} "
                      f"{r['vs_1_worker'] or 0:>10.3f}")
        print("\nstage split, each stage alone on one thread (seconds):")
        names = list(results["corpora"][0]["stages_s"])
        print(f"{'corpus':<20} " + " ".join(f"{n:>18}" for n in names))
        for c in results["corpora"]:
            print(f"{c['corpus']:<20} " + " ".join(f"{c['stages_s'][n]:>18.3f}" for n in names))
    for r in results.get("rss", []):
        print(f"{r.get('corpus', 'synthetic_corpus'):<16} {r['mb']:>7.1f} MB, {r['documents']} documents: "
              f"peak RSS {r['peak_rss_mb']} MB, "
              f"{r['seconds']} s ({r['mb_s']} MB/s, 2 workers)")


if __name__ == "__main__":
    sys.exit(main())
