"""Build a prepared dataset: read documents, split train/val, train or reuse a tokenizer, write shards."""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from .errors import DataError
from .fileio import atomic_write_json, file_sha256
from .shards import DEFAULT_SHARD_TOKENS, FORMAT_VERSION, META_FILE, ShardWriter, dtype_for_vocab
from .sources import Document, SourceStats, expand_placeholders, iter_documents
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

ENCODE_BATCH_DOCS = 1000


def _val_score(seed: int, doc: Document) -> float:
    """Uniform [0, 1) value fixed by (seed, source, text): the split does not depend on input order."""
    text_hash = hashlib.sha256(doc.text.encode("utf-8", "surrogatepass")).hexdigest()
    key = f"{seed}\0{doc.source}\0{text_hash}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


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
    scores = [_val_score(seed, d) for d in docs]
    is_val = [s < val_fraction for s in scores]
    if not any(is_val):
        is_val[min(range(len(docs)), key=scores.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=scores.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


def _build_tokenizer(kind: str, vocab_size: int, train_docs: list[Document], all_docs: list[Document],
                     show_progress: bool) -> Tokenizer:
    if kind == "bpe":
        return BPETokenizer.train((d.text for d in train_docs), vocab_size, show_progress=show_progress)
    if kind == "char":
        # The alphabet comes from every document: an unseen character in val would otherwise make
        # preparation fail outright, and a character set leaks nothing about val's content.
        return CharTokenizer.train(d.text for d in all_docs)
    raise DataError(f"unknown tokenizer kind {kind!r} (expected 'bpe' or 'char')")


def _write_split(out: Path, split: str, docs: list[Document], tok: Tokenizer, dtype: str,
                 shard_tokens: int, show_progress: bool) -> dict:
    writer = ShardWriter(out, split, dtype, tok.eos_id, shard_tokens=shard_tokens)
    try:
        with tqdm(total=len(docs), desc=f"encode {split}", unit="doc", disable=not show_progress) as bar:
            for i in range(0, len(docs), ENCODE_BATCH_DOCS):
                batch = docs[i:i + ENCODE_BATCH_DOCS]
                try:
                    encoded = tok.encode_batch([d.text for d in batch])
                except DataError:
                    # Re-encode one by one to name the offending document.
                    for d in batch:
                        try:
                            tok.encode(d.text)
                        except DataError as e:
                            raise DataError(f"{d.source}: {e}") from None
                    raise
                for ids in encoded:
                    writer.add_document(ids)
                bar.update(len(batch))
    except BaseException:
        writer.abort()
        raise
    entry = writer.close()
    entry["bytes"] = sum(len(d.text.encode("utf-8")) for d in docs)  # UTF-8 bytes of text, for bytes/token
    return entry


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
            show_progress: bool = True, overwrite: bool = False) -> dict:
    """Prepare `inputs` into `out_dir` and return its meta.json contents.

    Everything is built in a sibling `<out_dir>.tmp-<pid>` directory that is renamed into place at
    the end, so an interrupted run never leaves a directory that looks prepared.
    """
    t0 = time.time()
    inputs, exclude = list(inputs), list(exclude)
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    if tokenizer_dir is None and tokenizer not in ("bpe", "char"):
        raise DataError(f"unknown tokenizer kind {tokenizer!r} (expected 'bpe' or 'char')")

    stats = SourceStats()
    docs, empty = [], 0
    for d in tqdm(iter_documents(inputs, exclude, text_field, stats=stats), desc="read", unit="doc",
                  disable=not show_progress):
        if d.text:
            docs.append(d)
        else:
            empty += 1
    if not docs:
        raise DataError(f"empty corpus: {' '.join(expand_placeholders(s) for s in inputs)} "
                        f"({stats.files} files, {empty} empty documents, {len(stats.undecodable)} undecodable)")
    train, val = split_documents(docs, val_fraction, seed)

    if tokenizer_dir is not None:
        tok = load_tokenizer(tokenizer_dir)
    else:
        tok = _build_tokenizer(tokenizer, vocab_size, train, docs, show_progress)
    dtype = dtype_for_vocab(tok.vocab_size)

    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        tok_path = tok.save(tmp)
        splits = {"train": _write_split(tmp, "train", train, tok, dtype, shard_tokens, show_progress)}
        if val:
            splits["val"] = _write_split(tmp, "val", val, tok, dtype, shard_tokens, show_progress)
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "tokenizer": {"kind": tok.kind, "file": tok_path.name, "sha256": file_sha256(tok_path),
                          "trained_on": "reused from " + str(tokenizer_dir) if tokenizer_dir is not None
                          else ("all documents (alphabet)" if tok.kind == "char" else "train split"),
                          "requested_vocab_size": None if tokenizer_dir is not None or tok.kind == "char" else vocab_size},
            "splits": splits,
            "source": {
                "inputs": inputs,
                "resolved_inputs": [expand_placeholders(s) for s in inputs],
                "exclude": exclude,
                "text_field": text_field,
                "files": stats.files,
                "bytes": stats.bytes,
                "excluded_files": stats.excluded,
                "undecodable_files": len(stats.undecodable),
                "empty_documents": empty,
                "documents": len(docs),
                "split_mode": "none" if not val else ("position" if len(docs) == 1 else "document"),
                "val_fraction": val_fraction,
                "seed": seed,
                "shard_tokens": shard_tokens,
                "seconds": round(time.time() - t0, 2),
            },
        }
        atomic_write_json(tmp / META_FILE, meta)  # last: its presence means "prepared"
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


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
