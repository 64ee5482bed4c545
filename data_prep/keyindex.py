"""Compact in-memory indexes for dedup: what the planner keeps per document, at ~12 bytes per entry instead of
the ~110 of a Python dict entry, so planning 100M documents takes ~20-40 GB (peaks while runs merge), not ~250.

KeyIndex maps uint64 keys to rows (several rows per key). Recent entries sit in a small dict; when it fills,
they become a sorted numpy run, and runs of similar size merge like a binary counter (a log-structured
merge), so an insert costs amortized O(log n) and a lookup is one binary search per run (~log n runs).

SignatureStore keeps MinHash signatures in an unnamed temporary file, read back only for the rare
candidates LSH proposes; the page cache may hold them, but they are not this process's memory.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np


class KeyIndex:
    """uint64 key -> the rows added under it, oldest first (see the module doc)."""

    def __init__(self, buffer_entries: int = 1 << 15):
        self._buffer_entries = buffer_entries
        self._recent: dict[int, int | list[int]] = {}  # a row, or a list once a key has several (few do)
        self._n_recent = 0
        # (keys sorted, their rows), oldest and largest first; a key's rows in insertion order (stable sorts)
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return self._n_recent + sum(keys.size for keys, _ in self._runs)

    def lookup(self, keys: list[int]) -> list[list[int]]:
        """The rows held under each key, oldest first."""
        found: list[list[int]] = [[] for _ in keys]
        if self._runs:
            q = np.asarray(keys, dtype=np.uint64)
            for run_keys, run_rows in self._runs:
                lo = np.searchsorted(run_keys, q)
                hit = run_keys[np.minimum(lo, run_keys.size - 1)] == q
                for i in np.flatnonzero(hit).tolist():  # rare: most keys are in no bucket yet
                    hi = int(np.searchsorted(run_keys, q[i], "right"))
                    found[i].extend(run_rows[lo[i]:hi].tolist())
        for i, k in enumerate(keys):
            held = self._recent.get(k)
            if isinstance(held, list):
                found[i].extend(held)
            elif held is not None:
                found[i].append(held)
        return found

    def add(self, key: int, row: int) -> None:
        held = self._recent.get(key)
        if held is None:
            self._recent[key] = row
        elif isinstance(held, list):
            held.append(row)
        else:
            self._recent[key] = [held, row]
        self._n_recent += 1
        if self._n_recent >= self._buffer_entries:
            self._flush()

    def _flush(self) -> None:
        groups = [held if isinstance(held, list) else [held] for held in self._recent.values()]
        keys = np.repeat(np.fromiter(self._recent.keys(), dtype=np.uint64, count=len(groups)), [len(g) for g in groups])
        rows = np.fromiter((r for g in groups for r in g), dtype=np.int64, count=self._n_recent)
        if rows.max() < 1 << 32:
            rows = rows.astype(np.uint32)  # 12 bytes an entry, not 16
        self._recent, self._n_recent = {}, 0
        order = np.argsort(keys, kind="stable")
        run = (keys[order], rows[order])
        while self._runs and self._runs[-1][0].size <= 2 * run[0].size:
            run = _merge(self._runs.pop(), run)
        self._runs.append(run)


def _merge(older: tuple[np.ndarray, np.ndarray], newer: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted runs as one; a key's older rows first. Memory: the output and one index per newer entry
    (an argsort of the concatenation would hold three copies)."""
    (old_keys, old_rows), (new_keys, new_rows) = older, newer
    at = np.searchsorted(old_keys, new_keys, side="right") + np.arange(new_keys.size)
    old_at = np.ones(old_keys.size + new_keys.size, dtype=bool)
    old_at[at] = False
    keys = np.empty(old_at.size, dtype=np.uint64)
    rows = np.empty(old_at.size, dtype=np.result_type(old_rows, new_rows))
    keys[at], rows[at] = new_keys, new_rows
    keys[old_at], rows[old_at] = old_keys, old_rows
    return keys, rows


class SignatureStore:
    """Fixed-size uint32 rows appended in order, read back by row number. The file goes in `directory` (None:
    the system's temporary directory); 100M documents' signatures take ~45 GB."""

    def __init__(self, width: int, directory: str | os.PathLike | None = None, buffer_rows: int = 4096):
        self.width, self.directory = width, directory
        self._row_bytes = width * 4
        self._buffer = np.empty((buffer_rows, width), dtype=np.uint32)
        self._in_buffer = 0
        self._on_disk = 0
        self._file = None

    def __len__(self) -> int:
        return self._on_disk + self._in_buffer

    def append(self, sig: np.ndarray) -> None:
        if self._in_buffer == len(self._buffer):
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="lmforge-signatures-", dir=self.directory)
            self._file.seek(self._on_disk * self._row_bytes)
            self._file.write(self._buffer.tobytes())
            self._on_disk += self._in_buffer
            self._in_buffer = 0
        self._buffer[self._in_buffer] = sig
        self._in_buffer += 1

    def get(self, rows: np.ndarray) -> np.ndarray:
        """uint32[len(rows), width]."""
        out = np.empty((len(rows), self.width), dtype=np.uint32)
        for i, r in enumerate(rows.tolist()):
            if r >= self._on_disk:
                out[i] = self._buffer[r - self._on_disk]
            else:
                self._file.seek(r * self._row_bytes)
                out[i] = np.frombuffer(self._file.read(self._row_bytes), dtype=np.uint32)
        return out
