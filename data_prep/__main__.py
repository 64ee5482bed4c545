"""CLI: `python -m data_prep prepare INPUT... --out DIR` and `python -m data_prep inspect DIR`."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .errors import DataError
from .prepare import prepare
from .shards import DEFAULT_SHARD_TOKENS, TokenReader, read_meta
from .tokenizer import load_tokenizer

_COUNT_CHUNK = 1 << 24  # tokens per bincount pass, bounds memory on big splits


def _cmd_prepare(args) -> None:
    meta = prepare(
        args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        val_fraction=args.val_fraction, exclude=args.exclude, text_field=args.text_field, seed=args.seed,
        shard_tokens=args.shard_tokens, tokenizer_dir=args.tokenizer_from, show_progress=not args.quiet,
        overwrite=args.overwrite,
    )
    src = meta["source"]
    print(f"prepared {args.out}: {src['documents']} documents from {src['files']} files "
          f"({src['bytes']} bytes) in {src['seconds']} s; tokenizer {meta['tokenizer']['kind']} "
          f"vocab {meta['vocab_size']}, dtype {meta['dtype']}")
    for name, s in meta["splits"].items():
        print(f"  {name}: {s['tokens']} tokens, {s['docs']} docs, {len(s['shards'])} shards, "
              f"{s['bytes'] / max(s['tokens'], 1):.3f} bytes/token")
    if src["undecodable_files"]:
        print(f"  skipped {src['undecodable_files']} files that are not valid UTF-8")
    if src["empty_documents"]:
        print(f"  dropped {src['empty_documents']} empty documents")


def _top_tokens(reader: TokenReader, k: int = 10) -> list[tuple[int, int]]:
    counts = np.zeros(reader.vocab_size, dtype=np.int64)
    for start in range(0, reader.num_tokens, _COUNT_CHUNK):
        chunk = reader.read(start, min(_COUNT_CHUNK, reader.num_tokens - start))
        counts += np.bincount(chunk, minlength=reader.vocab_size)[:reader.vocab_size]
    order = np.argsort(-counts, kind="stable")[:k]
    return [(int(i), int(counts[i])) for i in order if counts[i] > 0]


def _cmd_inspect(args) -> None:
    meta = read_meta(args.dir)
    tok = load_tokenizer(args.dir)
    print(f"{args.dir}: format {meta['format_version']}, dtype {meta['dtype']}, vocab {meta['vocab_size']}, "
          f"eos {meta['eos_id']}, tokenizer {meta['tokenizer']['kind']} ({meta['tokenizer']['file']})")
    for split in meta["splits"]:
        reader = TokenReader(args.dir, split)
        entry = meta["splits"][split]
        line = f"[{split}] {reader.num_tokens} tokens, {reader.num_docs} documents, {len(reader.shards)} shards"
        if entry.get("bytes"):
            line += f", {entry['bytes'] / max(reader.num_tokens, 1):.3f} bytes/token"
        print(line)
        for tid, n in _top_tokens(reader):
            print(f"    {tid:>7} {n:>12}  {tok.decode([tid])!r}")
        reader.verify()
    print("checksums OK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    pp = sub.add_parser("prepare", help="tokenize text into token shards")
    pp.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="file, directory or glob (** recurses); ${stdlib} = this Python's standard library")
    pp.add_argument("--out", required=True, help="output dataset directory")
    pp.add_argument("--tokenizer", choices=["bpe", "char"], default="bpe")
    pp.add_argument("--vocab-size", type=int, default=8192)
    pp.add_argument("--val-fraction", type=float, default=0.1)
    pp.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="fnmatch patterns on file paths")
    pp.add_argument("--text-field", default="text", help="field holding the text in .jsonl records")
    pp.add_argument("--seed", type=int, default=1337)
    pp.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    pp.add_argument("--tokenizer-from", metavar="DIR", default=None,
                    help="reuse the tokenizer saved in DIR instead of training one")
    pp.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    pp.add_argument("--quiet", action="store_true", help="no progress bars")
    pp.set_defaults(func=_cmd_prepare)

    pi = sub.add_parser("inspect", help="summarize a prepared dataset and verify its checksums")
    pi.add_argument("dir")
    pi.set_defaults(func=_cmd_inspect)

    args = p.parse_args(argv)
    try:
        args.func(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
