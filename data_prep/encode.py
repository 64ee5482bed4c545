"""Ordered parallel encoding: chunks of documents go to worker processes, results come back in order.

Workers load the tokenizer from its saved file (spawned processes share nothing), encode with the
tokenizer's batch call and return one flat uint32 array plus per-document lengths (cheap to pickle).
The number of chunks in flight is bounded, so memory stays bounded however large the corpus is, and
the output is identical for any worker count because results are consumed in submission order.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .tokenizer import Tokenizer, tokenizer_classes

_worker_tok: Tokenizer | None = None


def encode_chunk(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat token ids, tokens per document, UTF-8 bytes per document)."""
    ids = tok.encode_batch(texts)
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.concatenate([np.asarray(x, dtype=np.uint32) for x in ids]) if ids else np.zeros(0, np.uint32)
    nbytes = np.fromiter((len(t.encode("utf-8", "surrogatepass")) for t in texts), dtype=np.int64, count=len(texts))
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
    """`map(chunks)` yields encode_chunk(chunk) for each chunk, in order.

    workers <= 1 encodes in this process, letting the tokenizer use its own threads (HF tokenizers'
    encode_batch runs on all cores in Rust). workers > 1 spawns that many processes, each given
    cores // workers threads.
    """

    def __init__(self, tok: Tokenizer, tokenizer_path: Path, workers: int = 1, in_flight_per_worker: int = 2):
        self.tok, self.path, self.workers = tok, Path(tokenizer_path), max(1, workers)
        self.max_in_flight = self.workers * in_flight_per_worker
        self._pool = None

    def __enter__(self) -> "ParallelEncoder":
        if self.workers > 1:
            threads = max(1, (os.cpu_count() or 1) // self.workers)
            self._pool = mp.get_context("spawn").Pool(self.workers, initializer=_init_worker,
                                                      initargs=(str(self.path), threads))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def map(self, chunks: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if self._pool is None:
            for texts in chunks:
                yield encode_chunk(self.tok, texts)
            return
        pending: deque = deque()
        for texts in chunks:
            pending.append(self._pool.apply_async(_encode_in_worker, (texts,)))
            if len(pending) >= self.max_in_flight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
