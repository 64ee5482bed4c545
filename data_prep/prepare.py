"""Build a prepared dataset in two streaming passes over the sources.

Pass 1 (plan.py) cleans, splits and deduplicates every document and samples text for the tokenizer;
only per-document decisions and the sample stay in memory. Pass 2 re-reads the sources, cleans again
(deterministic), and encodes the kept documents in ordered chunks on worker processes into shards.
Everything is built in `<out>.tmp-prepare/` (see workdir.py): an interrupted run resumes from its last
complete shard, and only the final rename publishes the dataset.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .cleaning import CleanConfig, Cleaner
from .dedup import MinHashConfig
from .encode import ParallelEncoder
from .errors import DataError
from .fileio import atomic_write_json, file_sha256
from .plan import DROP, TRAIN, Planner, val_score
from .shards import DEFAULT_SHARD_TOKENS, FORMAT_VERSION, META_FILE, ShardWriter, dtype_for_vocab
from .sources import Document, SourceStats, expand_placeholders, iter_files, list_files
from .tokenizer import (TOKENIZER_KINDS, Tokenizer, load_tokenizer, split_for_encoding, tokenizer_classes,
                        train_tokenizer)
from .workdir import WorkDir, fingerprint

MANIFEST_FILE = "manifest.json"
CHUNK_CHARS = 1 << 20  # documents per encode chunk: about 1M characters, never one huge string
CHUNK_DOCS = 4096
SEGMENT_CHARS = 1 << 16  # huge documents are encoded in line-aligned pieces of about this size
DEFAULT_SAMPLE_BYTES = 200_000_000
FAIL_AFTER_ENV = "LMFORGE_PREPARE_FAIL_AFTER_SHARDS"  # test hook: simulate a kill after K new shards


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Return (train, val).

    One document: split by position, the last `val_fraction` of its characters is val (nanoGPT's
    shakespeare_char convention). Several: whole documents go to val by a seeded hash, with at least
    one document on each side.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return list(docs), []
    if len(docs) == 1:
        doc = docs[0]
        n = len(doc.text)
        if n < 2:
            raise DataError(f"{doc.source}: a {n}-character corpus cannot be split into train and val")
        cut = min(max(int(n * (1.0 - val_fraction)), 1), n - 1)
        return [Document(doc.text[:cut], doc.source)], [Document(doc.text[cut:], doc.source)]
    scores = [val_score(seed, d) for d in docs]
    is_val = [s < val_fraction for s in scores]
    if not any(is_val):
        is_val[min(range(len(docs)), key=scores.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=scores.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val



def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if (out / META_FILE).is_file():
        if not overwrite:
            raise DataError(f"{out}: already holds a prepared dataset (pass overwrite=True / --overwrite to replace it)")
    elif out.is_dir() and any(out.iterdir()):
        # Never delete a directory we did not create: it might be the user's source tree.
        raise DataError(f"{out}: exists, is not empty and is not a prepared dataset; refusing to write into it")


def prepare(inputs: Iterable[str], out_dir: str | os.PathLike, *, tokenizer: str = "bpe", vocab_size: int = 8192,
            val_fraction: float = 0.1, exclude: Iterable[str] = (), text_field: str = "text", seed: int = 1337,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, tokenizer_dir: str | os.PathLike | None = None,
            show_progress: bool = True, overwrite: bool = False, workers: int = 1,
            clean: CleanConfig | None = CleanConfig(), dedup: str = "near", leakage: str = "remove",
            minhash: MinHashConfig = MinHashConfig(), special_tokens: Sequence[str] = (),
            tokenizer_sample_bytes: int | None = DEFAULT_SAMPLE_BYTES, strict: bool = False) -> dict:
    """Prepare `inputs` into `out_dir` and return its meta.json contents.

    `clean=None` keeps documents byte-exact (only empty ones are dropped). `dedup`: "near" (exact +
    MinHash-LSH), "exact" or "none"; `leakage`: val documents matching train ones are "remove"d,
    "flag"ged (counted) or not checked ("off"). `workers` > 1 encodes on that many processes; the
    output is identical for any value. Counts of everything removed go to manifest.json.
    """
    t0 = time.time()
    inputs, exclude, special_tokens = list(inputs), list(exclude), list(special_tokens)
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    if tokenizer_dir is None and tokenizer not in TOKENIZER_KINDS:
        raise DataError(f"unknown tokenizer kind {tokenizer!r} (expected one of {', '.join(TOKENIZER_KINDS)})")
    if tokenizer_sample_bytes is not None and tokenizer_sample_bytes <= 0:
        raise DataError(f"tokenizer_sample_bytes must be positive, got {tokenizer_sample_bytes}")
    if not inputs:
        raise DataError("no inputs given")
    clean_cfg = clean if clean is not None else CleanConfig(normalize=None, strip_control=False, min_chars=1)
    listing = SourceStats()
    files = list_files(inputs, exclude, listing)  # expanded once: globs over big trees are slow
    reused = Path(tokenizer_dir) if tokenizer_dir is not None else None
    config = {
        "inputs": [expand_placeholders(s) for s in inputs], "exclude": exclude, "text_field": text_field,
        "strict": strict, "clean": vars(clean_cfg), "dedup": dedup, "leakage": leakage, "minhash": vars(minhash),
        "val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens, "tokenizer": tokenizer,
        "vocab_size": vocab_size, "special_tokens": special_tokens, "sample_bytes": tokenizer_sample_bytes,
        "tokenizer_dir": str(reused) if reused else None,
        "tokenizer_sha": _tokenizer_file_sha(reused) if reused else None,
    }
    work = WorkDir(out)
    resumed = work.open(fingerprint(config, files))
    config["files"], config["excluded_files"] = files, listing.excluded
    try:
        tok, tok_path, info = _pass1(work, config, clean_cfg, minhash, reused, show_progress)
        meta = _pass2(work, config, clean_cfg, tok, tok_path, info, workers, show_progress)
        meta["source"].update(seconds=round(time.time() - t0, 2), resumed=resumed, workers=workers)
        atomic_write_json(work.path / MANIFEST_FILE, _manifest(config, info, meta))
        atomic_write_json(work.path / META_FILE, meta)  # last: its presence means "prepared"
        (work.path / "state.json").unlink()
        (work.path / "plan.npy").unlink()
        work.close()
        (work.path / "lock").unlink()
        _publish(work.path, out, overwrite)
    except DataError:
        # Bad input or settings fail the same way on a rerun: nothing worth keeping.
        work.close()
        shutil.rmtree(work.path, ignore_errors=True)
        raise
    finally:
        work.close()  # any other failure (interrupt, kill, disk) keeps the progress for a rerun
    return meta


def _tokenizer_file_sha(directory: Path) -> str:
    tok = load_tokenizer(directory)
    return file_sha256(directory / tok.file_name)


def _documents(config: dict, stats: SourceStats | None = None) -> Iterator[Document]:
    return iter_files(config["files"], config["text_field"], stats=stats, strict=config["strict"])


def _pass1(work: WorkDir, config: dict, clean_cfg: CleanConfig, minhash: MinHashConfig, reused: Path | None,
           show_progress: bool) -> tuple[Tokenizer, Path, dict]:
    """Plan every document and get the tokenizer (both kept in the work dir, so a resume skips this)."""
    loaded = work.load_plan()
    if loaded is not None:
        side, info = loaded
        info["side"] = side
        path = work.path / info["tokenizer_file"]
        return tokenizer_classes()[path.name].load(path), path, info
    stats = SourceStats()
    kind = config["tokenizer"]
    planner = Planner(Cleaner(clean_cfg), config["val_fraction"], config["seed"], config["dedup"], config["leakage"],
                      minhash, sample_chars=None if reused else config["sample_bytes"],
                      want_alphabet=reused is None and kind == "char")
    for doc in tqdm(_documents(config, stats), desc="plan", unit="doc", disable=not show_progress):
        planner.add(doc)
    plan = planner.finish()
    if plan.kept == 0:
        raise DataError(f"empty corpus: {' '.join(config['inputs'])} ({stats.files} files, "
                        f"{plan.documents_seen} documents read, none left after cleaning; "
                        f"{stats.skipped.total()} files/records skipped)")
    if reused is not None:
        tok = load_tokenizer(reused)
        trained_on = f"reused from {reused}"
    elif kind == "char":
        # The alphabet comes from every document: an unseen character in val would otherwise make
        # preparation fail outright, and a character set leaks nothing about val's content.
        tok = train_tokenizer("char", ["".join(sorted(planner.alphabet))], 0)
        trained_on = "all documents (alphabet)"
    else:
        texts = planner.tokenizer_texts(plan)
        tok = train_tokenizer(kind, texts, config["vocab_size"], config["special_tokens"], show_progress)
        trained_on = f"train split sample ({sum(len(t) for t in texts)} characters, {len(texts)} documents)"
    tok_path = tok.save(work.path)
    info = {
        "tokenizer_file": tok_path.name, "trained_on": trained_on, "split_mode": plan.split_mode, "cut": plan.cut,
        "removed": plan.removed, "modified": plan.modified, "skipped": stats.skipped.to_json(),
        "documents_seen": plan.documents_seen, "files": stats.files, "bytes": stats.bytes,
        "excluded_files": config["excluded_files"],
    }
    work.save_plan(plan.side, info)
    info["side"] = plan.side
    return tok, tok_path, info


def _chunks(config: dict, clean_cfg: CleanConfig, info: dict, start: dict[str, int], meta_out: list,
            splittable: bool):
    """Yield lists of texts to encode; for each, append ([(split, ordinal, source, last), ...], texts) to
    meta_out. A huge document becomes several consecutive texts (`last` marks its final one)."""
    side, cut, position = info["side"], info["cut"], info["split_mode"] == "position"
    cleaner = Cleaner(clean_cfg)
    texts, where, size = [], [], 0
    for ordinal, doc in enumerate(_documents(config)):
        s = side[ordinal] if ordinal < len(side) else DROP
        if s == DROP:
            continue
        if position:
            parts = [("train", ordinal), ("val", ordinal)]
        else:
            parts = [("train" if s == TRAIN else "val", ordinal)]
        parts = [p for p in parts if ordinal >= start[p[0]]]
        if not parts:
            continue  # already in a completed shard of a resumed run
        text = cleaner.clean(doc.text, doc.source)
        for split, _ in parts:
            piece = text if not position else (text[:cut] if split == "train" else text[cut:])
            segments = split_for_encoding(piece, SEGMENT_CHARS) if splittable else [piece]
            for k, seg in enumerate(segments):
                texts.append(seg)
                where.append((split, ordinal, doc.source, k == len(segments) - 1))
                size += len(seg)
        if size >= CHUNK_CHARS or len(texts) >= CHUNK_DOCS:
            meta_out.append((where, texts))
            yield texts
            texts, where, size = [], [], 0
    if texts:
        meta_out.append((where, texts))
        yield texts


def _pass2(work: WorkDir, config: dict, clean_cfg: CleanConfig, tok: Tokenizer, tok_path: Path, info: dict,
           workers: int, show_progress: bool) -> dict:
    """Encode the kept documents into shards, saving progress after every completed shard."""
    dtype = dtype_for_vocab(tok.vocab_size)
    splits = ["train", "val"] if info["split_mode"] != "none" else ["train"]
    progress = {s: work.split_progress(s) for s in splits}
    for s in splits:
        if any(not (work.path / sh["file"]).is_file() for sh in progress[s]["shards"]):
            progress[s].update(shards=[], next=0, bytes=0)  # damaged progress: redo this split
            work.split_progress(s)
    writers = {s: ShardWriter(work.path, s, dtype, tok.eos_id, shard_tokens=config["shard_tokens"],
                              shards=progress[s]["shards"]) for s in splits}
    nbytes = {s: progress[s]["bytes"] for s in splits}
    start = {s: progress[s]["next"] for s in splits}
    fail_after = int(os.environ.get(FAIL_AFTER_ENV) or 0)
    new_shards = 0
    pending: list = []  # (where, texts) of chunks submitted and not yet written
    try:
        with ParallelEncoder(tok, tok_path, workers) as enc, \
                tqdm(desc="encode", unit="doc", disable=not show_progress) as bar:
            results = enc.map(_chunks(config, clean_cfg, info, start, pending, tok.splits_at_lines))
            partial: list[np.ndarray] = []  # ids of a document whose remaining segments are still coming
            while True:
                try:
                    flat, lengths, doc_bytes = next(results)
                except StopIteration:
                    break
                except DataError:
                    _explain(tok, pending[0])
                    raise
                where, _ = pending.pop(0)
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                for k, (split, ordinal, _source, last) in enumerate(where):
                    nbytes[split] += int(doc_bytes[k])
                    partial.append(flat[offsets[k]:offsets[k + 1]])
                    if not last:
                        continue
                    w = writers[split]
                    before = len(w.shards)
                    w.add_document(partial[0] if len(partial) == 1 else np.concatenate(partial))
                    partial = []
                    if len(w.shards) > before:
                        progress[split].update(shards=w.shards, next=ordinal + 1, bytes=nbytes[split])
                        work.save()
                        new_shards += 1
                        if fail_after and new_shards >= fail_after:
                            raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: simulated interruption")
                bar.update(sum(1 for x in where if x[3]))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    entries = {}
    for s in splits:
        entries[s] = writers[s].close()
        entries[s]["bytes"] = nbytes[s]
    return _meta(config, tok, tok_path, info, entries, dtype)


def _explain(tok: Tokenizer, chunk) -> None:
    """Re-encode a failed chunk one document at a time to name the offending source."""
    where, texts = chunk
    for (_split, _ordinal, source, _last), text in zip(where, texts):
        try:
            tok.encode(text)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None


def _meta(config: dict, tok: Tokenizer, tok_path: Path, info: dict, entries: dict, dtype: str) -> dict:
    reused = config["tokenizer_dir"] is not None
    return {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "tokenizer": {"kind": tok.kind, "file": tok_path.name, "sha256": file_sha256(tok_path),
                      "trained_on": info["trained_on"],
                      "requested_kind": None if reused else config["tokenizer"],
                      "requested_vocab_size": None if reused or tok.kind == "char" else config["vocab_size"]},
        "splits": entries,
        "source": {
            "inputs": config["inputs"],
            "resolved_inputs": [os.path.abspath(s) for s in config["inputs"]],  # to compare from any cwd
            "exclude": config["exclude"],
            "text_field": config["text_field"],
            "files": info["files"],
            "bytes": info["bytes"],
            "excluded_files": info["excluded_files"],
            "skipped_records": sum(v["count"] for v in info["skipped"].values()),
            "removed_documents": sum(v["count"] for k, v in info["removed"].items()
                                     if not (config["leakage"] == "flag" and k.startswith("val_train_overlap"))),
            "documents_read": info["documents_seen"],
            "documents": int((info["side"] != DROP).sum()),
            "split_mode": info["split_mode"],
            "val_fraction": config["val_fraction"],
            "seed": config["seed"],
            "shard_tokens": config["shard_tokens"],
        },
    }


def _manifest(config: dict, info: dict, meta: dict) -> dict:
    """What was removed or changed, and why: counts with one example source per reason."""
    return {
        "inputs": config["inputs"],
        "settings": {k: config[k] for k in ("clean", "dedup", "leakage", "minhash", "strict", "val_fraction", "seed")},
        "documents_read": info["documents_seen"],
        "documents_kept": meta["source"]["documents"],
        "skipped": info["skipped"],  # unusable files and records (binary, bad UTF-8, bad JSON, ...)
        "removed": info["removed"],  # documents dropped by cleaning, dedup and val/train leakage
        "modified": info["modified"],  # documents changed by cleaning
        "leakage": config["leakage"],
    }


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished dataset into place; an old dataset is removed only after the new one is in."""
    _check_out_dir(out, overwrite)  # re-check: another run may have finished meanwhile
    if out.exists():
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
