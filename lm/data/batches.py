"""Training samples from prepared token shards, addressed by a global sample index.

Sample i is the window of block_size + 1 tokens starting at a position hashed from (seed, i). The stream
is a pure function of the index, so a run resumes from one counter (samples consumed) and the stream
does not depend on how many processes read it.
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.parse
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from data_prep import DataError, TokenReader, is_prepared, prepare, read_meta
from data_prep.hashing import splitmix64
from data_prep.mixture import Mixture
from data_prep.sources import expand_placeholders
from lm.config.schema import DataConfig


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

    def read(self, first: int, count: int) -> np.ndarray:
        """(count, block_size + 1) tokens of samples first .. first + count - 1."""
        return self.windows(np.arange(first, first + count))

    def batch(self, first: int, count: int, device: torch.device):
        """Inputs and next-token targets for samples first .. first + count - 1, each (count, block_size)."""
        return to_batch(self.read(first, count), device)


def to_batch(windows: np.ndarray, device: torch.device):
    return to_device(host_tokens(windows, device), device)


def host_tokens(windows: np.ndarray, device: torch.device) -> torch.Tensor:
    """The windows as one int64 tensor in host memory, pinned when it is bound for a GPU."""
    tokens = torch.from_numpy(windows.astype(np.int64))
    return tokens.pin_memory() if device.type == "cuda" else tokens


def to_device(tokens: torch.Tensor, device: torch.device):
    """Inputs and next-token targets on `device`; from pinned memory the copy does not wait for the GPU."""
    tokens = tokens.to(device, non_blocking=True)
    return tokens[:, :-1], tokens[:, 1:]


class Prefetcher:
    """Reads the next micro-batch on a background thread while the current one computes. A batch is a pure
    function of its first sample index, so the one prepared ahead is exactly the one the loop asks for
    next; when the loop asks for another (after a rollback), it is read on the spot.

    The thread pays on a GPU, whose work it overlaps. On a CPU the step already keeps every core busy: a
    reader thread would only take cycles (and the GIL) from it, so there (`background` None: by device)
    each batch is read when asked for."""

    def __init__(self, stream, count: int, device: torch.device, background: bool | None = None):
        self.stream, self.count, self.device = stream, count, device
        if background is None:
            background = device.type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-prefetch") if background else None
        self.ahead: tuple[int, Future] | None = None

    def _read(self, first: int) -> torch.Tensor:
        return host_tokens(self.stream.read(first, self.count), self.device)

    def batch(self, first: int, next_first: int):
        """The batch starting at sample `first`; starts reading the one at `next_first`."""
        ahead, self.ahead = self.ahead, None
        tokens = ahead[1].result() if ahead is not None and ahead[0] == first else self._read(first)
        if self.pool is not None:
            self.ahead = (next_first, self.pool.submit(self._read, next_first))
        return to_device(tokens, self.device)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class MixedStream:
    """Several sources behind one global sample index: the deterministic interleave (data_prep.Mixture)
    gives each index a source and an ordinal in it, and the ordinal picks a window from that source's
    own SampleStream. A run still resumes from one counter."""

    def __init__(self, streams: list[SampleStream], weights: list[float]):
        self.streams, self.mixture = streams, Mixture(weights)

    def read(self, first: int, count: int) -> np.ndarray:
        """(count, block_size + 1) tokens of samples first .. first + count - 1."""
        src, ordinal = self.mixture.assign(first, count)
        windows = np.empty((count, self.streams[0].block_size + 1), dtype=np.int64)
        for i, stream in enumerate(self.streams):
            rows = np.flatnonzero(src == i)
            if len(rows):
                windows[rows] = stream.windows(ordinal[rows])
        return windows

    def batch(self, first: int, count: int, device: torch.device):
        return to_batch(self.read(first, count), device)


def check_same_tokenizer(dirs: list[Path]):
    """Sources mixed in one run must share a tokenizer: ids from different vocabularies are noise."""
    first = read_meta(dirs[0])["tokenizer"]["sha256"]
    for d in dirs[1:]:
        if read_meta(d)["tokenizer"]["sha256"] != first:
            raise DataError(f"{d} and {dirs[0]} were prepared with different tokenizers; re-prepare one "
                            f"with --tokenizer-from the other")


def ensure_prepared(cfg: DataConfig, show_progress: bool = True) -> Path:
    """The prepared shard directory for this config, preparing it first if missing.

    The inputs are `data.inputs`; when that is empty and `data.url` is set, the file at the url, downloaded
    once to download_path(cfg): a path derived from `data.dir`, never one the user named. An existing
    directory is checked against the config (see check_prepared_as_configured).
    """
    out = Path(cfg.dir)
    if is_prepared(out):
        check_prepared_as_configured(cfg, out)
        return out
    inputs = list(cfg.inputs)
    if not inputs and cfg.url:
        inputs = [str(download_path(cfg))]
        download_once(cfg.url, Path(inputs[0]), cfg.sha256)
    if not inputs:
        raise DataError(f"{out}: no prepared data (meta.json) and data.inputs and data.url are empty; run "
                        f"`python -m data_prep prepare INPUT --out {out}` or set data.inputs")
    # A relative data.dir is read from the current directory: say where, so a run started from another
    # directory does not prepare a second copy of the data unnoticed.
    where = "" if out.is_absolute() else f" (data.dir is relative: {out.resolve()}, under the current directory)"
    print(f"preparing {out} from {', '.join(inputs)} ({cfg.tokenizer} tokenizer){where}", flush=True)
    prepare(inputs, out, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size, val_fraction=cfg.val_fraction,
            exclude=cfg.exclude, text_field=cfg.text_field, show_progress=show_progress)
    return out


def download_path(cfg: DataConfig) -> Path:
    """Where `data.url` is downloaded: DIR.download/NAME beside data.dir (NAME: the url's last part), a
    path the config owns. It stays out of DIR itself, which holds only a prepared dataset, and survives
    deleting DIR to re-prepare it."""
    out = Path(cfg.dir)
    name = PurePosixPath(urllib.parse.urlparse(cfg.url).path).name or "download"
    return out.parent / f"{out.name}.download" / name


def _same_paths(a: list[str], b: list[str]) -> bool:
    # Inputs as written may be relative ("./x", "x", "../d/x"): compare them made absolute.
    return [os.path.abspath(p) for p in a] == [os.path.abspath(p) for p in b]


def check_prepared_as_configured(cfg: DataConfig, out: Path) -> None:
    """Refuse a prepared `out` whose recorded inputs or settings differ from the config's: training would
    silently use other tokens than the config names. A config with no data.inputs takes `out` as it is
    (prepared by hand with `python -m data_prep prepare`), unless `out` was prepared from its download."""
    meta = read_meta(out)
    source, tok = meta["source"], meta["tokenizer"]
    recorded = source["inputs"]
    if cfg.inputs:
        configured = [expand_placeholders(s) for s in cfg.inputs]
        # resolved_inputs are absolute (older datasets: as written, relative to the directory run in)
        if not _same_paths(configured, source.get("resolved_inputs", recorded)):
            raise DataError(f"{out} was prepared from {json.dumps(recorded)} but data.inputs is "
                            f"{json.dumps(configured)}; set data.dir to a new directory for these inputs "
                            f"(or delete {out} to re-prepare it)")
    elif not (cfg.url and _same_paths([str(download_path(cfg))], recorded)):
        return
    kind = tok.get("requested_kind", tok["kind"])  # None: a tokenizer reused from another dataset
    settings = [("exclude", source["exclude"], cfg.exclude), ("text_field", source["text_field"], cfg.text_field),
                ("val_fraction", source["val_fraction"], cfg.val_fraction)]
    if kind is not None:
        settings.append(("tokenizer", kind, cfg.tokenizer))
    if kind != "char" and tok.get("requested_vocab_size") is not None:
        settings.append(("vocab_size", tok["requested_vocab_size"], cfg.vocab_size))
    for key, was, now in settings:
        if was != now:
            raise DataError(f"{out} was prepared with data.{key} = {json.dumps(was)} but the config sets "
                            f"{json.dumps(now)}; set data.dir to a new directory for these settings "
                            f"(or delete {out} to re-prepare it)")


def download_once(url: str, path: Path, sha256: str):
    """Fetch `url` to `path` unless it is already there; the file must match `sha256` when given. A
    download that fails the check is deleted, never left where the next run would take it."""
    if path.exists():
        _check_sha256(path, sha256, path)
        return
    print(f"downloading {url} -> {path}", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        urllib.request.urlretrieve(url, tmp)
        _check_sha256(tmp, sha256, url)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url}: download failed ({e}); place the file at {path} yourself") from None
    except DataError:
        tmp.unlink()
        raise
    os.replace(tmp, path)


def _check_sha256(path: Path, sha256: str, name) -> None:
    if sha256:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise DataError(f"{name}: sha256 {digest} does not match data.sha256 {sha256}")
