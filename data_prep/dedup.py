"""Duplicate detection: exact (hash of whitespace-normalized text) and near (MinHash-LSH on word n-grams).

MinHash is vectorized with numpy: word hashes come from one polynomial prefix hash over the UTF-8 bytes,
n-gram shingles combine n word hashes, and one-permutation hashing spreads each shingle's hash over the
`bands * rows` signature bins (see MinHasher.signature). Hash constants are fixed by a seed, so decisions are
reproducible across runs and processes (Python's own `hash` is salted per process).
"""
from __future__ import annotations

import hashlib
import os
from array import array
from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .hashing import mix64
from .keyindex import KeyIndex, SignatureStore

_U64 = np.uint64
_P32 = 0x01000193  # odd multiplier of the byte-level polynomial word hash (mod 2^32)
_P32_INV = pow(_P32, -1, 1 << 32)
# A bucket keeps its first BUCKET_CAP documents; later ones are compared with those only. Without a cap,
# 50k copies of a boilerplate page would cost 50k^2 / 2 comparisons per band.
BUCKET_CAP = 64
_DENSIFY_STEP = 0x9E3779B1  # odd: an empty bin's borrowed value differs from its source bin's
_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[[9, 10, 11, 12, 13, 32]] = True


HASH_PIECE_CHARS = 1 << 18  # huge documents are hashed in pieces of about this many characters: bounded memory
_ASCII_SPACES = "\t\n\x0b\x0c\r "


def text_pieces(text: str, size: int | None = None):
    """`text` in consecutive slices of `size` characters (HASH_PIECE_CHARS), for hashing it without a copy."""
    size = size or HASH_PIECE_CHARS
    for start in range(0, len(text), size):
        yield text[start:start + size]


def exact_key(text: str) -> bytes:
    """16-byte digest of the text with whitespace runs collapsed (so trailing newlines do not hide a copy):
    blake2b(" ".join(text.split())), computed piece by piece (a huge text's words never exist at once)."""
    h = hashlib.blake2b(digest_size=16)
    wrote = in_word = False  # a word was hashed; the last piece ended inside a word
    for piece in text_pieces(text):
        words = piece.split()
        if words:
            if in_word and not piece[0].isspace():  # the word goes on from the last piece
                h.update(words.pop(0).encode("utf-8", "surrogatepass"))
            if words:
                h.update(((" " if wrote else "") + " ".join(words)).encode("utf-8", "surrogatepass"))
            wrote = True
        in_word = not piece[-1].isspace()
    return h.digest()


@dataclass(frozen=True)
class MinHashConfig:
    ngram: int = 5  # words per shingle
    bands: int = 14
    rows: int = 8  # bands * rows permutations (GUIDE: 14 x 8 = 112)
    threshold: float = 0.7  # estimated Jaccard an LSH candidate must reach to count as a near duplicate
    seed: int = 0

    def __post_init__(self):
        if self.ngram < 1 or self.bands < 1 or self.rows < 1:
            raise DataError(f"MinHash ngram, bands and rows must be >= 1, got {self.ngram}, {self.bands}, {self.rows}")
        if not 0.0 < self.threshold <= 1.0:
            raise DataError(f"near-duplicate threshold must be in (0, 1], got {self.threshold}")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


class MinHasher:
    def __init__(self, config: MinHashConfig = MinHashConfig()):
        self.config = config
        rng = np.random.default_rng(config.seed)
        self._gram = rng.integers(0, 1 << 63, size=config.ngram, dtype=np.uint64) * _U64(2) + _U64(1)
        self._salt = rng.integers(0, 1 << 63, dtype=np.uint64)
        self._pow = self._ipow = np.zeros(0, dtype=np.uint32)

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """P^i and P^-i mod 2^32 for i < n, cached: the prefix hash then costs one cumsum per document."""
        if n > self._pow.size:
            m = max(n, 2 * self._pow.size, 1 << 16)
            with np.errstate(over="ignore"):
                self._pow = np.cumprod(np.full(m, _P32, dtype=np.uint32), dtype=np.uint32) * np.uint32(_P32_INV)
                self._ipow = np.cumprod(np.full(m, _P32_INV, dtype=np.uint32), dtype=np.uint32) * np.uint32(_P32)
        return self._pow[:n], self._ipow[:n]

    def word_hashes(self, text: str) -> np.ndarray:
        """uint64 hash of every whitespace-separated word (ASCII whitespace; case-sensitive)."""
        return np.concatenate([self._word_hashes(data) for data in self._pieces(text)] or [np.zeros(0, np.uint64)])

    @staticmethod
    def _pieces(text: str):
        """UTF-8 bytes of `text` in pieces of about HASH_PIECE_CHARS characters, each cut after ASCII whitespace
        (so no word spans two; one word longer than a piece stays whole)."""
        n, pos = len(text), 0
        while pos < n:
            end = pos + HASH_PIECE_CHARS
            if end < n:
                cut = max(text.rfind(c, pos, end) for c in _ASCII_SPACES)
                if cut < pos:  # no space in this stretch: the word ends at the next one
                    found = [i for i in (text.find(c, end) for c in _ASCII_SPACES) if i >= 0]
                    cut = min(found) if found else n - 1
                end = cut + 1
            yield text[pos:end].encode("utf-8", "surrogatepass")
            pos = end

    def _word_hashes(self, raw: bytes) -> np.ndarray:
        data = np.frombuffer(raw, dtype=np.uint8)
        word = ~_ASCII_SPACE[data]
        edges = np.diff(word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        if starts.size == 0:
            return np.zeros(0, dtype=np.uint64)
        pw, ipw = self._powers(data.size)
        with np.errstate(over="ignore"):
            prefix = np.concatenate(([np.uint32(0)], np.cumsum(data * pw, dtype=np.uint32)))
            h = ((prefix[ends] - prefix[starts]) * ipw[starts]).astype(np.uint64)
            return mix64(h | ((ends - starts).astype(np.uint64) << _U64(32)))

    def _shingle_pieces(self, text: str):
        """uint64 hashes of every n-word shingle, piece by piece (a short document is one shingle of all its
        words); the last n - 1 words of a piece start the next one's shingles."""
        n = self.config.ngram
        carry, full = np.zeros(0, dtype=np.uint64), False
        with np.errstate(over="ignore"):
            for data in self._pieces(text):
                words = self._word_hashes(data)
                if carry.size:
                    words = np.concatenate([carry, words])
                if words.size < n:
                    carry = words
                    continue
                acc = np.zeros(words.size - n + 1, dtype=np.uint64)
                for j in range(n):
                    acc += words[j:words.size - n + 1 + j] * self._gram[j]
                yield mix64(acc ^ self._salt)
                full, carry = True, words[words.size - n + 1:]
            if not full and carry.size:
                yield mix64(np.array([np.sum(carry * self._gram[:carry.size], dtype=np.uint64)]) ^ self._salt)

    def _shingle_hashes(self, text: str) -> np.ndarray:
        return np.concatenate([*self._shingle_pieces(text), np.zeros(0, dtype=np.uint64)])

    def shingles(self, text: str) -> np.ndarray:
        """uint32 hash of every n-word shingle."""
        return (self._shingle_hashes(text) >> _U64(32)).astype(np.uint32)

    def signature(self, text: str) -> np.ndarray | None:
        """uint32[num_perm] one-permutation MinHash signature, or None for a text without words.

        One hash per shingle instead of num_perm: its high bits choose a bin, its low 32 bits compete for
        the bin's minimum (Li, Owen & Zhang 2012). Bins no shingle fell into borrow the value of the next
        filled bin to their right, offset by the distance (rotation densification, Shrivastava & Li 2014),
        so two documents' signatures agree in a bin with probability ~ their Jaccard similarity, as with
        num_perm independent permutations, at ~1/num_perm of the cost. Shingles are taken piece by piece:
        memory stays bounded for a huge document.
        """
        k = self.config.num_perm
        sig = np.full(k, np.iinfo(np.uint32).max, dtype=np.uint32)
        filled = np.zeros(k, dtype=bool)
        for h in self._shingle_pieces(text):
            bins = (((h >> _U64(32)) * _U64(k)) >> _U64(32)).astype(np.intp)
            np.minimum.at(sig, bins, (h & _U64(0xFFFFFFFF)).astype(np.uint32))
            filled[bins] = True
        if not filled.any():
            return None
        if not filled.all():
            idx = np.flatnonzero(filled)
            right = idx[np.searchsorted(idx, np.arange(k)) % idx.size]  # next filled bin, circularly
            distance = ((right - np.arange(k)) % k).astype(np.uint32)
            with np.errstate(over="ignore"):
                sig = np.where(filled, sig, sig[right] + distance * np.uint32(_DENSIFY_STEP))
        return sig


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact Jaccard similarity of the word n-gram sets (for tests and reports, not the hot path)."""
    def grams(t):
        w = t.split()
        return {tuple(w[i:i + ngram]) for i in range(max(len(w) - ngram + 1, 1))} if w else set()
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb) if ga | gb else 1.0


class LSHIndex:
    """Banded LSH over MinHash signatures, candidates verified by their estimated Jaccard. Held compactly
    (keyindex.py): ~14 x 12 bytes of band entries per document in memory, signatures in a temporary file in
    `spill_dir` (None: the system's temporary directory)."""

    def __init__(self, config: MinHashConfig = MinHashConfig(), spill_dir: str | os.PathLike | None = None):
        self.config = config
        rng = np.random.default_rng(config.seed + 1)
        self._band_mult = rng.integers(0, 1 << 63, size=config.rows, dtype=np.uint64) * _U64(2) + _U64(1)
        # One index for all bands: a band's keys are XORed with its own salt (a cross-band clash: p ~ 2^-64)
        self._band_salt = rng.integers(0, 1 << 63, size=config.bands, dtype=np.uint64)
        self._buckets = KeyIndex()
        self._sigs = SignatureStore(config.num_perm, spill_dir)
        self._keys = array("q")

    def __len__(self) -> int:
        return len(self._keys)

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """One 64-bit key per band: documents sharing a band's key are candidates."""
        with np.errstate(over="ignore"):
            rows = sig.reshape(self.config.bands, self.config.rows).astype(np.uint64)
            return (rows * self._band_mult).sum(axis=1, dtype=np.uint64)

    def _buckets_of(self, sig: np.ndarray) -> tuple[list[int], list[list[int]]]:
        """Each band's index key and the rows its bucket holds."""
        keys = (self.band_keys(sig) ^ self._band_salt).tolist()
        return keys, self._buckets.lookup(keys)

    def _similar(self, sig: np.ndarray, held: list[list[int]]) -> list[int]:
        rows = {r for bucket in held for r in bucket}
        if not rows:
            return []
        cand = np.fromiter(sorted(rows), dtype=np.int64, count=len(rows))
        est = (self._sigs.get(cand) == sig[None, :]).mean(axis=1)
        return [self._keys[r] for r in cand[est >= self.config.threshold].tolist()]

    def _insert(self, key: int, sig: np.ndarray, keys: list[int], held: list[list[int]]) -> None:
        row = len(self._keys)
        self._sigs.append(sig)
        self._keys.append(key)
        for k, bucket in zip(keys, held):
            if len(bucket) < BUCKET_CAP:
                self._buckets.add(k, row)

    def find_all(self, sig: np.ndarray) -> list[int]:
        """Keys of stored signatures sharing a band with `sig` and reaching the threshold, oldest first."""
        return self._similar(sig, self._buckets_of(sig)[1])

    def add(self, key: int, sig: np.ndarray) -> None:
        self._insert(key, sig, *self._buckets_of(sig))

    def find_all_then_add(self, key: int, sig: np.ndarray) -> list[int]:
        """find_all(sig), then add(key, sig), with one lookup."""
        keys, held = self._buckets_of(sig)
        found = self._similar(sig, held)
        self._insert(key, sig, keys, held)
        return found
