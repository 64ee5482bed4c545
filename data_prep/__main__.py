"""CLI: `python -m data_prep prepare INPUT... --out DIR`, `inspect DIR`; for many machines `tokenizer
INPUT... --out TOKDIR`, then `prepare ... --tokenizer-from TOKDIR --tasks N --task K` per task, then `merge DIR`."""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .cleaning import NORMAL_FORMS, CleanConfig
from .dedup import MinHashConfig
from .errors import DataError
from .plan import DEDUP_MODES, LEAKAGE_MODES
from .remote import close_sessions
from .prepare import DEFAULT_SAMPLE_BYTES, MANIFEST_FILE, prepare, prepare_tokenizer
from .tasks import STAGES, merge, task_from_environment
from .shards import DEFAULT_SHARD_TOKENS, TokenReader, read_meta
from .stats import document_lengths, length_histogram, top_tokens
from .tokenizer import TOKENIZER_KINDS, load_tokenizer


def _clean_config(args) -> CleanConfig | None:
    return None if args.no_clean else CleanConfig(normalize=None if args.normalize == "none" else args.normalize,
                                                  strip_control=not args.keep_control, min_chars=args.min_chars)


def _cmd_tokenizer(args) -> None:
    path = prepare_tokenizer(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                             val_fraction=args.val_fraction, exclude=args.exclude, text_field=args.text_field,
                             seed=args.seed, clean=_clean_config(args), special_tokens=args.special_tokens,
                             tokenizer_sample_bytes=args.tokenizer_sample_bytes or None, strict=args.strict,
                             show_progress=not args.quiet, overwrite=args.overwrite)
    print(f"trained {path} (pass --tokenizer-from {args.out} to every task's prepare)")


def _cmd_merge(args) -> None:
    meta = merge(args.dir, overwrite=args.overwrite)
    print(f"merged {meta['source']['tasks']} tasks into {args.dir}: " + ", ".join(
        f"{name} {s['tokens']} tokens, {s['docs']} docs, {len(s['shards'])} shards" for name, s in meta["splits"].items()))


def _cmd_prepare(args) -> None:
    tasks, task = task_from_environment(args.tasks, args.task)
    meta = prepare(
        args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        val_fraction=args.val_fraction, exclude=args.exclude, text_field=args.text_field, seed=args.seed,
        shard_tokens=args.shard_tokens, tokenizer_dir=args.tokenizer_from, show_progress=not args.quiet,
        overwrite=args.overwrite, workers=args.workers, strict=args.strict,
        clean=_clean_config(args), dedup=args.dedup, leakage=args.leakage,
        minhash=MinHashConfig(ngram=args.minhash_ngram, bands=args.minhash_bands, rows=args.minhash_rows,
                              threshold=args.near_threshold),
        special_tokens=args.special_tokens,
        tokenizer_sample_bytes=args.tokenizer_sample_bytes or None,
        tasks=tasks, task=task, stage=args.stage, wait_s=args.wait,
    )
    if tasks > 1 and "entries" not in meta:
        print(f"task {task} of {tasks}: stage {args.stage} done")
        return
    if tasks > 1:
        entries = meta["entries"]
        print(f"task {task} of {tasks}: {meta['documents']} documents kept of {meta['documents_read']}; " + ", ".join(
            f"{name} {e['tokens']} tokens in {len(e['shards'])} shards" for name, e in entries.items())
            + f"; when all tasks are done: python -m data_prep merge {args.out}")
        return
    src = meta["source"]
    print(f"prepared {args.out}: {src['documents']} documents from {src['files']} files "
          f"({src['bytes']} bytes) in {src['seconds']} s; tokenizer {meta['tokenizer']['kind']} "
          f"vocab {meta['vocab_size']}, dtype {meta['dtype']}")
    for name, s in meta["splits"].items():
        print(f"  {name}: {s['tokens']} tokens, {s['docs']} docs, {len(s['shards'])} shards, "
              f"{s['bytes'] / max(s['tokens'], 1):.3f} bytes/token")
    if src["skipped_records"] or src["removed_documents"]:
        print(f"  skipped {src['skipped_records']} unusable files/records, removed {src['removed_documents']} "
              f"documents (reasons and examples in {args.out}/{MANIFEST_FILE})")


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
        lengths = document_lengths(reader)
        if lengths.size:
            print(f"  document length (tokens): mean {lengths.mean():.1f}, median {int(np.median(lengths))}, "
                  f"max {int(lengths.max())}")
            hist = length_histogram(lengths)
            peak = max(c for _, _, c in hist)
            for lo, hi, c in hist:
                print(f"    [{lo:>8}, {hi:>8}) {c:>10}  {'#' * max(1, round(40 * c / peak))}")
        print("  top tokens:")
        for tid, n in top_tokens(reader):
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
    pp.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="bpe",
                    help="bpe: byte-level BPE (HF tokenizers); sp-bpe / sp-unigram: SentencePiece; char")
    pp.add_argument("--vocab-size", type=int, default=8192)
    pp.add_argument("--val-fraction", type=float, default=0.1)
    pp.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="fnmatch patterns on file paths")
    pp.add_argument("--text-field", default="text", help="field holding the text in .jsonl records")
    pp.add_argument("--seed", type=int, default=1337)
    pp.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    pp.add_argument("--tokenizer-from", metavar="DIR", default=None,
                    help="reuse the tokenizer saved in DIR instead of training one")
    pp.add_argument("--tokenizer-sample-bytes", type=int, default=DEFAULT_SAMPLE_BYTES,
                    help="train the tokenizer on a hash-selected sample of about this many characters (0: all)")
    pp.add_argument("--special-tokens", nargs="+", default=[], metavar="TOKEN",
                    help="extra special tokens (reserved ids, after EOS and PAD)")
    pp.add_argument("--workers", type=int, default=1,
                    help="encoder threads beside the reading one (processes for char and SentencePiece); "
                         "output is identical for any N")
    pp.add_argument("--normalize", choices=[*NORMAL_FORMS, "none"], default="NFC", help="Unicode normalization")
    pp.add_argument("--keep-control", action="store_true", help="keep control characters (default: removed, "
                    "except \\t \\n \\r)")
    pp.add_argument("--min-chars", type=int, default=1, help="drop documents shorter than this after cleaning")
    pp.add_argument("--no-clean", action="store_true", help="keep documents byte-exact (overrides the three above)")
    pp.add_argument("--dedup", choices=DEDUP_MODES, default="near",
                    help="near: exact + MinHash-LSH near duplicates; exact; none")
    pp.add_argument("--leakage", choices=LEAKAGE_MODES, default="remove",
                    help="val documents duplicating train ones: remove them, flag (count only), or off")
    pp.add_argument("--minhash-ngram", type=int, default=5, help="words per shingle")
    pp.add_argument("--minhash-bands", type=int, default=14)
    pp.add_argument("--minhash-rows", type=int, default=8)
    pp.add_argument("--near-threshold", type=float, default=0.7,
                    help="estimated Jaccard at which an LSH candidate counts as a near duplicate")
    pp.add_argument("--strict", action="store_true",
                    help="bad JSONL/Parquet records are errors (default: skipped and counted in the manifest)")
    pp.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    pp.add_argument("--quiet", action="store_true", help="no progress bars")
    pp.add_argument("--tasks", type=int, default=None, help="split the work over N tasks (default: SLURM array "
                    "size, else WORLD_SIZE, else 1); needs --tokenizer-from; then `merge`")
    pp.add_argument("--task", type=int, default=None, help="this task's number (default: SLURM_ARRAY_TASK_ID, else RANK)")
    pp.add_argument("--stage", choices=[*STAGES, "all"], default="all",
                    help="with --tasks: run one stage (each waits for every task's previous stage)")
    pp.add_argument("--wait", type=float, default=7 * 86400, metavar="SECONDS",
                    help="with --tasks: how long a stage waits for the other tasks")
    pp.set_defaults(func=_cmd_prepare)

    pt = sub.add_parser("tokenizer", help="train the tokenizer prepare would train, for tasks to share")
    pt.add_argument("inputs", nargs="+", metavar="INPUT")
    pt.add_argument("--out", required=True, help="directory for the tokenizer file")
    for flag in ("--tokenizer", "--vocab-size", "--val-fraction", "--exclude", "--text-field", "--seed",
                 "--tokenizer-sample-bytes", "--special-tokens", "--normalize", "--keep-control", "--min-chars",
                 "--no-clean", "--strict", "--quiet"):
        action = next(a for a in pp._actions if flag in a.option_strings)
        pt._add_action(action)
    pt.add_argument("--overwrite", action="store_true", help="replace a tokenizer file already in --out")
    pt.set_defaults(func=_cmd_tokenizer)

    pm = sub.add_parser("merge", help="publish the dataset of finished tasks (prepare --tasks N)")
    pm.add_argument("dir", help="the --out directory the tasks were given")
    pm.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    pm.set_defaults(func=_cmd_merge)

    pi = sub.add_parser("inspect", help="summarize a prepared dataset and verify its checksums")
    pi.add_argument("dir")
    pi.set_defaults(func=_cmd_inspect)

    args = p.parse_args(argv)
    try:
        args.func(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk: one line too (prepare keeps its progress for a rerun)
        where = e.filename or getattr(args, "out", None) or getattr(args, "dir", "")
        print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        close_sessions()
    return 0


if __name__ == "__main__":
    sys.exit(main())
