"""Ordered parallel encoding: chunks of documents go to encoder threads (or processes), results come back
in order while the caller reads, cleans and plans the next chunks.

Each chunk comes back as one flat uint32 array plus per-document lengths and UTF-8 sizes. Byte-level
BPE encodes through tiktoken (fast_bpe.py) outside the GIL, so `workers` threads of this process encode
in parallel; tokenizers that hold the GIL (char, SentencePiece) get `workers` processes instead when
workers > 1. The number of chunks in flight is bounded, so memory stays bounded however large the corpus
is, and the output is identical for any worker count because results are consumed in submission order.

The fast engine is checked against the reference encoder as it runs: the start of the first text, then of
one text every CHECK_EVERY_CHARS characters, is also encoded by HF `tokenizers`; a difference stops the
run (DataError) before anything wrong is published.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import DataError
from .tokenizer import Tokenizer, tokenizer_classes

CHECK_EVERY_CHARS = 16 << 20  # one check per 16M characters of text
CHECK_CHARS = 8192  # the first this many characters of a checked text are encoded by both (~5 ms of HF)

_worker_tok: Tokenizer | None = None


def encode_chunk(tok: Tokenizer, texts: list[str], check: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat token ids, tokens per document, UTF-8 bytes per document); `check`: indices of texts whose fast
    ids are compared with the reference encoder's."""
    fast = tok.fast_encode()
    if fast is None:
        ids = tok.encode_batch(texts)
    else:
        ids = [fast(t) for t in texts]
        for i in check:
            sample = texts[i][:CHECK_CHARS]
            if not np.array_equal(np.asarray(fast(sample), dtype=np.int64), tok.encode(sample)):
                raise DataError(f"the tiktoken encoder gives other ids than HF tokenizers for a text starting "
                                f"{texts[i][:40]!r}: set LMFORGE_ENCODER=hf to encode with HF tokenizers")
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate([np.asarray(x, dtype=np.uint32) for x in ids]) if ids else np.zeros(0, np.uint32)
    nbytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    return flat, lengths, nbytes


def _init_worker(path: str, threads: int) -> None:
    global _worker_tok
    # Must be set before the Rust thread pool starts: N workers x all cores would oversubscribe.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    _worker_tok = tokenizer_classes()[Path(path).name].load(path)
    if hasattr(_worker_tok, "num_threads"):
        _worker_tok.num_threads = threads


def _encode_in_worker(texts: list[str]):
    return encode_chunk(_worker_tok, texts)


class ParallelEncoder:
    """`map(chunks)` yields encode_chunk(chunk) for each chunk, in order, encoding up to `workers` chunks at
    once beside the caller (see the module doc for threads vs processes)."""

    def __init__(self, tok: Tokenizer, tokenizer_path: Path, workers: int = 1, in_flight_per_worker: int = 2):
        self.tok, self.path, self.workers = tok, Path(tokenizer_path), max(1, workers)
        self.max_in_flight = self.workers * in_flight_per_worker
        self._pool = self._threads = None
        self._chars = 0

    def __enter__(self) -> "ParallelEncoder":
        if self.workers > 1 and not self.tok.releases_gil:
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self._pool = mp.get_context("spawn").Pool(self.workers, initializer=_init_worker,
                                                      initargs=(str(self.path), threads))
        else:
            self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="encode")
            self._threads.submit(self.tok.fast_encode)  # builds the engine while the caller reads the first chunk
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        if self._threads is not None:
            self._threads.shutdown(wait=True, cancel_futures=True)
            self._threads = None

    def _checks(self, texts: list[str]) -> tuple[int, ...]:
        """Indices of texts that start a new CHECK_EVERY_CHARS stretch of the stream (the first text too)."""
        picked = []
        for i, t in enumerate(texts):
            if self._chars == 0 or self._chars // CHECK_EVERY_CHARS != (self._chars + len(t)) // CHECK_EVERY_CHARS:
                picked.append(i)
            self._chars += len(t) or 1
        return tuple(picked)

    def map(self, chunks: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        pending: deque = deque()
        for texts in chunks:
            if self._pool is not None:
                pending.append(self._pool.apply_async(_encode_in_worker, (texts,)))
            else:
                pending.append(self._threads.submit(encode_chunk, self.tok, texts, self._checks(texts)))
            if len(pending) >= self.max_in_flight:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    @staticmethod
    def _result(job):
        return job.get() if hasattr(job, "get") else job.result()
