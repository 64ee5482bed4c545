"""Statistics of a prepared split for `inspect`: document lengths and token frequencies, streamed."""
from __future__ import annotations

import numpy as np

from .shards import TokenReader

_COUNT_CHUNK = 1 << 24  # tokens per bincount pass, bounds memory on big splits


def document_lengths(reader: TokenReader) -> np.ndarray:
    """Tokens per document (EOS excluded), from the shard indexes without reading the tokens."""
    parts = []
    for shard, idx in zip(reader.shards, reader._index):
        starts = np.asarray(idx, dtype=np.int64)
        ends = np.append(starts[1:], shard["tokens"])
        parts.append(ends - starts - 1)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def length_histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(low, high, documents) per power-of-two bucket [low, high); empty documents fall in [0, 1)."""
    if lengths.size == 0:
        return []
    buckets = np.where(lengths > 0, np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64) + 1, 0)
    counts = np.bincount(buckets)
    return [(0 if b == 0 else 1 << (b - 1), 1 if b == 0 else 1 << b, int(c)) for b, c in enumerate(counts) if c]


def top_tokens(reader: TokenReader, k: int = 10) -> list[tuple[int, int]]:
    counts = np.zeros(reader.vocab_size, dtype=np.int64)
    for start in range(0, reader.num_tokens, _COUNT_CHUNK):
        chunk = reader.read(start, min(_COUNT_CHUNK, reader.num_tokens - start))
        counts += np.bincount(chunk, minlength=reader.vocab_size)[:reader.vocab_size]
    order = np.argsort(-counts, kind="stable")[:k]
    return [(int(i), int(counts[i])) for i in order if counts[i] > 0]
