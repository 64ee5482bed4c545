"""Training samples from prepared token shards, addressed by a global sample index.

Sample i is the window of block_size + 1 tokens starting at a position hashed from (seed, i). The stream
is a pure function of the index, so a run resumes from one counter (samples consumed) and the stream
does not depend on how many processes read it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from data_prep import DataError, TokenReader, is_prepared, prepare
from data_prep.mixture import Mixture
from lm.config import DataConfig

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each element (Steele et al., SplitMix64 finalizer)."""
    with np.errstate(over="ignore"):
        z = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


class SampleStream:
    def __init__(self, reader: TokenReader, block_size: int, seed: int, name: str):
        self.reader, self.block_size = reader, block_size
        self.num_starts = reader.num_tokens - block_size  # windows of block_size + 1 tokens
        if self.num_starts < 1:
            raise DataError(f"{name}: {reader.num_tokens} tokens, fewer than model.block_size + 1 = "
                            f"{block_size + 1}; use a smaller block_size or more data")
        self.key = splitmix64(np.array([seed], dtype=np.uint64))[0]

    def starts(self, first: int, count: int) -> np.ndarray:
        return self.starts_of(np.arange(first, first + count, dtype=np.uint64))

    def starts_of(self, index: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return (splitmix64(index.astype(np.uint64) ^ self.key) % np.uint64(self.num_starts)).astype(np.int64)

    def windows(self, index: np.ndarray) -> np.ndarray:
        """(len(index), block_size + 1) tokens of the samples `index`."""
        return np.stack([self.reader.read(int(s), self.block_size + 1) for s in self.starts_of(index)])

    def batch(self, first: int, count: int, device: torch.device):
        """Inputs and next-token targets for samples first .. first + count - 1, each (count, block_size)."""
        return to_batch(self.windows(np.arange(first, first + count)), device)


def to_batch(windows: np.ndarray, device: torch.device):
    tokens = torch.from_numpy(windows.astype(np.int64))
    x, y = tokens[:, :-1], tokens[:, 1:]
    if device.type == "cuda":
        return (x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)


class MixedStream:
    """Several sources behind one global sample index: the deterministic interleave (data_prep.Mixture)
    gives each index a source and an ordinal in it, and the ordinal picks a window from that source's
    own SampleStream. A run still resumes from one counter."""

    def __init__(self, streams: list[SampleStream], weights: list[float]):
        self.streams, self.mixture = streams, Mixture(weights)

    def batch(self, first: int, count: int, device: torch.device):
        src, ordinal = self.mixture.assign(first, count)
        windows = np.empty((count, self.streams[0].block_size + 1), dtype=np.int64)
        for i, stream in enumerate(self.streams):
            rows = np.flatnonzero(src == i)
            if len(rows):
                windows[rows] = stream.windows(ordinal[rows])
        return to_batch(windows, device)


def check_same_tokenizer(dirs: list[Path]):
    """Sources mixed in one run must share a tokenizer: ids from different vocabularies are noise."""
    first = TokenReader(dirs[0], "train").meta["tokenizer"]["sha256"]
    for d in dirs[1:]:
        if TokenReader(d, "train").meta["tokenizer"]["sha256"] != first:
            raise DataError(f"{d} and {dirs[0]} were prepared with different tokenizers; re-prepare one "
                            f"with --tokenizer-from the other")


def ensure_prepared(cfg: DataConfig, show_progress: bool = True) -> Path:
    """The prepared shard directory for this config, preparing it from `cfg.inputs` first if missing."""
    out = Path(cfg.dir)
    if is_prepared(out):
        return out
    if not cfg.inputs:
        raise DataError(f"{out}: no prepared data (meta.json) and data.inputs is empty; run "
                        f"`python -m data_prep prepare INPUT --out {out}` or set data.inputs")
    if cfg.url:
        download_once(cfg.url, Path(cfg.inputs[0]), cfg.sha256)
    print(f"preparing {out} from {', '.join(cfg.inputs)} ({cfg.tokenizer} tokenizer)", flush=True)
    prepare(cfg.inputs, out, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction,
            exclude=cfg.exclude, text_field=cfg.text_field, show_progress=show_progress)
    return out


def download_once(url: str, path: Path, sha256: str):
    """Fetch `url` to `path` unless it is already there; the file must match `sha256` when given."""
    if not path.exists():
        import urllib.request

        print(f"downloading {url} -> {path}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as e:
            raise DataError(f"{url}: download failed ({e}); place the file at {path} yourself") from None
        os.replace(tmp, path)
    if sha256:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise DataError(f"{path}: sha256 {digest} does not match data.sha256 {sha256}")
