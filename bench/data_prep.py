"""End-to-end `prepare` throughput against the raw HF `tokenizers` encoder, same text, same tokenizer.

    python bench/data_prep.py [TEXT_FILE ...] [--workers 1 2] [--out bench/results/data_prep.json]

For each corpus (the given files, plus the interpreter's stdlib .py files) and worker count, times
prepare() with a tokenizer trained once up front (tokenizer training is reported separately), and
times `encode_batch` on the documents prepare encodes (line-aligned pieces of the big files, as prepare
cuts them) with the Rust encoder's own threads. MB = UTF-8 megabytes of document text.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import BPETokenizer, iter_documents, prepare  # noqa: E402
from data_prep.prepare import SEGMENT_CHARS  # noqa: E402
from data_prep.tokenizer import split_for_encoding  # noqa: E402

STDLIB = ["${stdlib}/**/*.py"]
STDLIB_EXCLUDE = ["*/site-packages/*", "*/test/*", "*/tests/*"]


def corpora(files: list[str]) -> list[tuple[str, list[str], list[str]]]:
    out = [(Path(f).name, [f], []) for f in files]
    out.append(("stdlib *.py", STDLIB, STDLIB_EXCLUDE))
    return out


def raw_mb_per_s(tok: BPETokenizer, texts: list[str], repeat: int = 2) -> float:
    hf = tok._tok
    pieces = [p for t in texts for p in split_for_encoding(t, SEGMENT_CHARS)]
    mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        hf.encode_batch_fast(pieces, add_special_tokens=False)
        best = min(best, time.perf_counter() - t0)
    return mb / best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", default=["/work/shared/data/tinyshakespeare.txt",
                                                "/work/shared/data/warandpeace.txt"])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_prep.json"))
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_prep_"))
    rows, results = [], {"cpus": os.cpu_count(), "vocab_size": args.vocab_size, "corpora": []}
    try:
        all_texts = {name: [d.text for d in iter_documents(inputs, exclude)] for name, inputs, exclude in corpora(args.files)}
        t0 = time.perf_counter()
        tok = BPETokenizer.train([t for texts in all_texts.values() for t in texts], args.vocab_size)
        results["tokenizer_train_s"] = round(time.perf_counter() - t0, 2)
        tokdir = tmp / "tok"
        tokdir.mkdir()
        tok.save(tokdir)
        for name, inputs, exclude in corpora(args.files):
            texts = all_texts[name]
            mb = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) / 1e6
            raw = raw_mb_per_s(tok, texts)
            entry = {"corpus": name, "documents": len(texts), "mb": round(mb, 2), "raw_mb_s": round(raw, 2), "runs": []}
            for w in args.workers:
                out = tmp / f"out_{len(results['corpora'])}_{w}"
                t0 = time.perf_counter()
                meta = prepare(inputs, out, exclude=exclude, tokenizer_dir=tokdir, workers=w, show_progress=False)
                secs = time.perf_counter() - t0
                rate = mb / secs
                entry["runs"].append({"workers": w, "seconds": round(secs, 2), "mb_s": round(rate, 2),
                                      "ratio_vs_raw": round(rate / raw, 3),
                                      "tokens": sum(s["tokens"] for s in meta["splits"].values())})
                rows.append((name, mb, w, secs, rate, raw, rate / raw))
                shutil.rmtree(out)
            results["corpora"].append(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"tokenizer: byte-level BPE, vocab {args.vocab_size}, trained in {results['tokenizer_train_s']} s "
          f"(not included below); {os.cpu_count()} CPUs")
    print(f"{'corpus':<22} {'MB':>6} {'workers':>7} {'seconds':>8} {'pipeline MB/s':>14} {'raw MB/s':>9} {'ratio':>6}")
    for name, mb, w, secs, rate, raw, ratio in rows:
        print(f"{name:<22} {mb:>6.2f} {w:>7} {secs:>8.2f} {rate:>14.2f} {raw:>9.2f} {ratio:>6.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
