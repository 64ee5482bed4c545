"""The encoding pass of prepare: one streaming read of the sources that cleans, plans (dedup, split) and
encodes at once, the encoders working on earlier chunks while this thread reads and plans the next.

A train document's fate is final when the planner first sees it, so it goes straight into train shards.
A val document can still be removed later (a later train document may turn out to be its copy), so val
documents are encoded into a pending file and written into val shards, without the removed ones, at the
end (finish). A corpus that is one plain text file is one document cut by position (nanoGPT's
convention), known before reading. When the planner's final adjustments change a train document's side
(a corpus so small that one side came out empty, or one document left after dedup), prepare resets this
pass and encodes again from the final plan: correct, and only tiny corpora take that path.

Resume: after each completed train shard the state records the shards, the next document ordinal and the
length of the pending val file. A rerun replays the planner over the documents before that ordinal
(reading and planning without encoding) and continues from there.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from .encode import ParallelEncoder
from .errors import DataError
from .formats import JSONL_SUFFIXES, split_suffix
from .shards import ShardWriter
from .sources import SourceStats, iter_files
from .tokenizer import Tokenizer, split_for_encoding
from .workdir import WorkDir

CHUNK_CHARS = 1 << 18  # documents per encode chunk: about 256K characters (small: workers stay balanced)
CHUNK_DOCS = 4096
SEGMENT_CHARS = 1 << 16  # huge documents are encoded in line-aligned pieces of about this size
FAIL_AFTER_ENV = "LMFORGE_PREPARE_FAIL_AFTER_SHARDS"  # test hook: simulate a kill after K new shards
PENDING_TOKENS, PENDING_INDEX = "pending_val.bin", "pending_val.idx"  # not "val_*": those are val shards
_INDEX = np.dtype("<i8")  # per pending val document: ordinal, tokens, UTF-8 bytes
_VAL_PIECE_TOKENS = 1 << 22  # val documents are copied into shards in pieces of at most this many tokens


def is_single_document(files: list[Path]) -> bool:
    """One plain text file: one document, whatever it holds (JSONL and Parquet hold records)."""
    return len(files) == 1 and split_suffix(files[0])[0] not in (*JSONL_SUFFIXES, ".parquet")


def position_cut(n_chars: int, val_fraction: float, source: str) -> int:
    """Characters of a single document that go to train: the last val_fraction of it is val."""
    if n_chars < 2:
        raise DataError(f"{source}: a {n_chars}-character corpus cannot be split into train and val")
    return min(max(int(n_chars * (1.0 - val_fraction)), 1), n_chars - 1)


class EncodePass:
    """Builds the train and val shards of one prepare run in `work` (see the module doc)."""

    def __init__(self, work: WorkDir, config: dict, tok: Tokenizer, tok_path: Path, dtype: str, workers: int,
                 show_progress: bool, stem_tag: str = ""):
        """`stem_tag` goes into shard names after the split (a task's number: train_t00003_00000.bin)."""
        self.stem_tag = stem_tag
        self.work, self.config, self.tok, self.tok_path = work, config, tok, tok_path
        self.dtype, self.workers, self.show_progress = np.dtype(dtype), workers, show_progress
        self.fail_after = int(os.environ.get(FAIL_AFTER_ENV) or 0)
        self.new_shards = 0

    # ---- the pass ----------------------------------------------------------------------------------

    def encode(self, decide: Callable) -> SourceStats:
        """Read every document, call decide(ordinal, doc) -> [(split, text), ...] for each (in order, also
        for documents a resumed run already encoded: the planner must see them) and encode the parts of
        documents not yet in completed shards. Train shards are written; val waits for finish()."""
        progress = self._open_progress()
        start = progress["train"]["next"]
        self.train = ShardWriter(self.work.path, "train", self.dtype.name, self.tok.eos_id,
                                 shard_tokens=self.config["shard_tokens"], shards=progress["train"]["shards"],
                                 stem="train" + self.stem_tag)
        self.train_bytes = progress["train"]["bytes"]
        self._open_pending(progress["pending"]["docs"], progress["pending"]["tokens"])
        stats = SourceStats()
        documents = iter_files(self.config["files"], self.config["text_field"], stats=stats,
                               strict=self.config["strict"])

        def route(ordinal: int, doc) -> list[tuple[str, str]]:
            parts = decide(ordinal, doc)
            return parts if ordinal >= start else []

        self._encode(self._chunks(documents, route))
        return stats

    def finish(self, keep_val: Callable[[int], bool]) -> dict:
        """Write the val shards (the pending documents whose ordinal keep_val accepts), close the last train
        shard; {split: meta.json entry}."""
        entries = {"val": self._write_val(keep_val), "train": self.train.close()}
        entries["train"]["bytes"] = self.train_bytes
        self._close_pending()
        return entries

    def abort(self) -> None:
        if getattr(self, "train", None) is not None:
            self.train.abort()
        self._close_pending()

    def reset(self) -> None:
        """Forget all progress (before a rebuild from the final plan)."""
        self.abort()
        self.work.state["progress"] = {}
        for name in (PENDING_TOKENS, PENDING_INDEX):
            (self.work.path / name).unlink(missing_ok=True)
        self.work.save()

    def _chunks(self, documents, route: Callable) -> Iterator[tuple[list, list[str]]]:
        """(where, texts) chunks; where[k] = (split, ordinal, source, is the document's last piece)."""
        bar = tqdm(desc="encode", unit="doc", disable=not self.show_progress)
        try:
            yield from self._chunk_documents(documents, route, bar, self.tok.cut_at)
        finally:
            bar.close()

    def _chunk_documents(self, documents, route, bar, cut_at):
        texts, where, size = [], [], 0
        for ordinal, doc in enumerate(documents):
            bar.update()
            parts, source = route(ordinal, doc), doc.source
            del doc  # the parts hold the text now
            for split, piece in parts:
                segments = split_for_encoding(piece, SEGMENT_CHARS, cut_at) if cut_at is not None else iter([piece])
                seg = next(segments)
                while seg is not None:
                    following = next(segments, None)  # one ahead: a piece must know whether it is the last
                    texts.append(seg)
                    where.append((split, ordinal, source, following is None))
                    size += len(seg)
                    if size >= CHUNK_CHARS or len(texts) >= CHUNK_DOCS:  # a huge document spans chunks
                        yield where, texts
                        texts, where, size = [], [], 0
                    seg = following
        if texts:
            yield where, texts

    def _encode(self, chunks: Iterator) -> None:
        queued: list = []  # (where, texts) of chunks handed to the encoders, oldest first
        source_failed = []

        def texts_of(chunks):
            try:
                for chunk in chunks:
                    queued.append(chunk)
                    yield chunk[1]
            except BaseException:
                source_failed.append(True)  # reading or planning failed, not an encoder
                raise

        nbytes = 0  # UTF-8 bytes of the pieces of the document being written
        due = None  # the ordinal a checkpoint waits for: every part of the one before it is written
        with ParallelEncoder(self.tok, self.tok_path, self.workers) as enc:
            results = enc.map(texts_of(chunks))
            while True:
                try:
                    flat, lengths, doc_bytes = next(results)
                except StopIteration:
                    break
                except DataError:
                    if not source_failed and queued:
                        _explain(self.tok, queued[0])
                    raise
                where, _ = queued.pop(0)
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                for k, (split, ordinal, _source, last) in enumerate(where):
                    if due is not None and ordinal >= due:  # no document is part-written here
                        self._checkpoint(due)
                        due = None
                    nbytes += int(doc_bytes[k])
                    ids = flat[offsets[k]:offsets[k + 1]]  # a piece goes out as it comes: memory stays bounded
                    if split == "val":
                        self._add_pending(ids)
                        if last:
                            self._end_pending(ordinal, nbytes)
                    else:
                        before = len(self.train.shards)
                        self.train.add_document(ids, end=last)
                        if last:
                            self.train_bytes += nbytes
                            if len(self.train.shards) > before:
                                # A single document's val part comes after its train part: checkpoint once
                                # the next document starts, so a resume never skips a part not yet written.
                                due = ordinal + 1
                    if last:
                        nbytes = 0

    # ---- val documents: pending until the plan is final ----------------------------------------------

    def _open_pending(self, docs: int, tokens: int) -> None:
        """Open the pending val files, cut back to what the last checkpoint recorded."""
        paths = [self.work.path / PENDING_TOKENS, self.work.path / PENDING_INDEX]
        sizes = [tokens * self.dtype.itemsize, docs * 3 * _INDEX.itemsize]
        self._pending = []
        for path, size in zip(paths, sizes):
            f = open(path, "r+b" if path.exists() else "w+b")
            f.truncate(size)
            f.seek(size)
            self._pending.append(f)
        self.pending_docs, self.pending_tokens, self._document_tokens = docs, tokens, 0

    def _add_pending(self, ids: np.ndarray) -> None:
        """Append a piece of a val document's ids (its index row comes with its last piece: _end_pending)."""
        if ids.size and int(ids.max()) > np.iinfo(self.dtype).max:
            raise DataError(f"val: token id {int(ids.max())} does not fit {self.dtype.name}")
        self._pending[0].write(ids.astype(self.dtype).tobytes())
        self._document_tokens += ids.size

    def _end_pending(self, ordinal: int, nbytes: int) -> None:
        self._pending[1].write(np.array([ordinal, self._document_tokens, nbytes], dtype=_INDEX).tobytes())
        self.pending_docs += 1
        self.pending_tokens += self._document_tokens
        self._document_tokens = 0

    def _close_pending(self) -> None:
        for f in getattr(self, "_pending", []):
            f.close()
        self._pending = []

    def _write_val(self, keep: Callable[[int], bool]) -> dict:
        for f in self._pending:
            f.flush()
        self.work.remove_unlisted("val", [])
        writer = ShardWriter(self.work.path, "val", self.dtype.name, self.tok.eos_id,
                             shard_tokens=self.config["shard_tokens"], stem="val" + self.stem_tag)
        index = np.fromfile(self.work.path / PENDING_INDEX, dtype=_INDEX).reshape(-1, 3)
        nbytes = 0
        try:
            # read, not memory-mapped: mapped pages count in RSS (val tokens: ~5% of the corpus bytes)
            with open(self.work.path / PENDING_TOKENS, "rb") as tokens:
                for ordinal, n, b in index.tolist():
                    if not keep(ordinal):
                        tokens.seek(n * self.dtype.itemsize, os.SEEK_CUR)
                        continue
                    while True:  # in pieces: a huge val document is never held whole
                        ids = np.fromfile(tokens, dtype=self.dtype, count=min(n, _VAL_PIECE_TOKENS))
                        n -= ids.size
                        writer.add_document(ids, end=n == 0)
                        if n == 0:
                            break
                    nbytes += b
            entry = writer.close()
        except BaseException:
            writer.abort()
            raise
        entry["bytes"] = nbytes
        return entry

    # ---- progress ------------------------------------------------------------------------------------

    def _open_progress(self) -> dict:
        state = self.work.state.setdefault("progress", {})
        train = state.setdefault("train", {"shards": [], "next": 0, "bytes": 0})
        pending = state.setdefault("pending", {"docs": 0, "tokens": 0})
        if any(not (self.work.path / sh["file"]).is_file() for sh in train["shards"]):
            train.update(shards=[], next=0, bytes=0)  # damaged progress: start over
            pending.update(docs=0, tokens=0)
        self.work.remove_unlisted("train", train["shards"])
        self.work.save()
        return state

    def _checkpoint(self, next_ordinal: int) -> None:
        for f in self._pending:
            f.flush()
            os.fsync(f.fileno())
        progress = self.work.state["progress"]
        progress["train"].update(shards=self.train.shards, next=next_ordinal, bytes=self.train_bytes)
        progress["pending"].update(docs=self.pending_docs, tokens=self.pending_tokens)
        self.work.save()
        self.new_shards += 1
        if self.fail_after and self.new_shards >= self.fail_after:
            raise RuntimeError(f"{FAIL_AFTER_ENV}={self.fail_after}: simulated interruption")


def _explain(tok: Tokenizer, chunk) -> None:
    """Re-encode a failed chunk one document at a time to name the offending source."""
    where, texts = chunk
    for (_split, _ordinal, source, _last), text in zip(where, texts):
        try:
            tok.encode(text)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None
