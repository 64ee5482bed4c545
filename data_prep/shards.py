"""On-disk token shards: writer, memory-mapped reader and validation.

Layout of a prepared dataset directory:
  meta.json              format version, dtype, vocab, tokenizer hash, per-split shard list with checksums
  <split>_NNNNN.bin      raw little-endian tokens, EOS after every document
  <split>_NNNNN.idx      raw little-endian int64 start offset of every document within that shard
  tokenizer.json | chars.json

Nothing read from disk is trusted: read_meta checks meta.json's schema and that every file it names stays
inside the dataset, and TokenReader checks each shard's size, checksum and token ids when it opens it.
A shard entry records "sha256" (for `inspect` and sha256sum) and, since issue 11, "crc32": the checksum
checked at every open, about twice as cheap (see scan_tokens); entries without it are checked by sha256.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import DataError
from .fileio import Crc32, atomic_write_bytes, file_sha256, new_hash, read_json

FORMAT_VERSION = 1
META_FILE = "meta.json"
DEFAULT_SHARD_TOKENS = 100_000_000
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_IDX_DTYPE = np.dtype("<i8")
_MAX_VOCAB = 1 << 32  # uint32 token ids
_MAX_COUNT = 1 << 48  # tokens or documents of one split: far beyond real data, and safe in int64 sums
CHECKSUMS = ("crc32", "sha256")  # a shard is checked at open by the first of these its entry records
SCAN_CHUNK = 1 << 23  # tokens per step of the open-time scan: bounded memory on any shard size


def dtype_for_vocab(vocab_size: int) -> str:
    """Smallest token dtype that holds every id: uint16 iff vocab_size <= 65536."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise DataError(f"vocab_size {vocab_size} does not fit uint32 token ids")


def is_prepared(data_dir: str | os.PathLike) -> bool:
    return (Path(data_dir) / META_FILE).is_file()


def _np_dtype(name: str, where: str) -> np.dtype:
    if name not in _DTYPES:
        raise DataError(f"{where}: unknown dtype {name!r} (expected one of {sorted(_DTYPES)})")
    return _DTYPES[name]


class ShardWriter:
    """Streams documents of one split into shards; `close()` returns the split's meta.json entry.

    The writer appends `eos_id` after each document itself. A shard is closed once it reaches
    `shard_tokens`, always at a document boundary (a single huge document is never cut).
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, dtype: str, eos_id: int,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, shards: list[dict] | None = None, stem: str | None = None):
        """`shards`: entries of shards already complete on disk (a resumed run continues after them);
        files are named `<stem>_NNNNN` (stem: the split; prepare's tasks add their number)."""
        if shard_tokens <= 0:
            raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.split, self.stem = split, stem or split
        self.dtype = _np_dtype(dtype, "ShardWriter")
        self.max_id = np.iinfo(self.dtype).max
        if not 0 <= eos_id <= self.max_id:
            raise DataError(f"eos_id {eos_id} does not fit {dtype}")
        self.eos = np.array([eos_id], dtype=self.dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = list(shards or [])
        self._file = None
        self._closed = False
        self._in_document = False  # a document's first pieces are written, not yet its end

    def _open_shard(self) -> None:
        name = f"{self.stem}_{len(self.shards):05d}"
        self._bin_path = self.out_dir / f"{name}.bin"
        self._bin_tmp = self._bin_path.with_name(self._bin_path.name + ".tmp")
        self._file = open(self._bin_tmp, "wb")
        self._hash, self._crc = hashlib.sha256(), Crc32()
        self._offsets: list[int] = []
        self._tokens = 0

    def _close_shard(self) -> None:
        try:
            self._file.close()  # flushes: a full disk fails here too
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self._bin_tmp)) from None
        os.replace(self._bin_tmp, self._bin_path)
        idx_path = self._bin_path.with_suffix(".idx")
        idx_bytes = np.asarray(self._offsets, dtype=_IDX_DTYPE).tobytes()
        atomic_write_bytes(idx_path, idx_bytes)
        self.shards.append({
            "file": self._bin_path.name,
            "index": idx_path.name,
            "tokens": self._tokens,
            "docs": len(self._offsets),
            "sha256": self._hash.hexdigest(),
            "crc32": self._crc.hexdigest(),
            "index_sha256": hashlib.sha256(idx_bytes).hexdigest(),
        })
        self._file = None

    def add_document(self, token_ids, end: bool = True) -> None:
        """Append a document's ids and its EOS; `end=False`: only a piece of it, the rest follows in the next
        calls (a huge document is written as it is encoded, never held whole)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        ids = np.asarray(token_ids)
        if ids.dtype.kind not in "iu":
            ids = ids.astype(np.int64)  # an empty list comes as float64
        if ids.ndim != 1:
            raise DataError(f"{self.split}: a document must be a flat sequence of token ids, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() > self.max_id):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise DataError(f"{self.split}: token id {bad} does not fit {self.dtype.name}")
        if self._file is None:
            self._open_shard()
        if not self._in_document:
            self._offsets.append(self._tokens)
            self._in_document = True
        data = (np.concatenate([ids.astype(self.dtype), self.eos]) if end else ids.astype(self.dtype)).tobytes()
        try:
            self._file.write(data)
        except OSError as e:  # a full disk: name the file (abort() then removes it)
            raise OSError(e.errno, e.strerror, str(self._bin_tmp)) from None
        self._hash.update(data)
        self._crc.update(data)
        self._tokens += ids.size + int(end)
        if end:
            self._in_document = False
            if self._tokens >= self.shard_tokens:
                self._close_shard()

    def close(self) -> dict:
        """Finish the last shard and return {"tokens", "docs", "shards": [...]} for meta.json."""
        if not self._closed:
            if self._file is not None:
                self._close_shard()
            self._closed = True
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "docs": sum(s["docs"] for s in self.shards),
            "shards": list(self.shards),
        }

    def abort(self) -> None:
        """Close without publishing the partial shard (used when preparation fails)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # flushing on a full disk fails again: the file goes anyway
                pass
            self._bin_tmp.unlink(missing_ok=True)
            self._file = None
        self._closed = True


def read_meta(data_dir: str | os.PathLike) -> dict:
    """Load and sanity-check meta.json; DataError (one line, naming the path) on any problem."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory does not exist (run python -m data_prep prepare ... --out {data_dir} first)")
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing, so {data_dir} is not a prepared dataset "
                        f"(run python -m data_prep prepare ... --out {data_dir} first)")
    meta = read_json(meta_path, {})  # an object; its fields are checked below, with their ranges
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{meta_path}: unknown format_version {meta.get('format_version')!r} "
                        f"(this code reads version {FORMAT_VERSION}; re-run python -m data_prep prepare)")
    _MetaSchema(data_dir).check(meta)
    return meta


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _MetaSchema:
    """Checks a meta.json's fields; every problem is one DataError naming the file and the field."""

    def __init__(self, data_dir: Path):
        self.data_dir, self.meta_path = data_dir, data_dir / META_FILE
        self.root = data_dir.resolve()

    def fail(self, field: str, problem: str):
        raise DataError(f"{self.meta_path}: {field} {problem}")

    def get(self, obj: dict, prefix: str, key: str, kind: type, what: str):
        """obj[key] if it is a `kind` (a bool is no integer); `prefix` + key names the field."""
        if key not in obj:
            self.fail(prefix + key, "is missing")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            self.fail(prefix + key, f"must be {what}, got {_short(value)}")
        return value

    def integer(self, obj: dict, prefix: str, key: str, lo: int, hi: int) -> int:
        value = self.get(obj, prefix, key, int, f"an integer in [{lo}, {hi}]")
        if not lo <= value <= hi:
            self.fail(prefix + key, f"must be an integer in [{lo}, {hi}], got {value}")
        return value

    def file_name(self, obj: dict, prefix: str, key: str) -> str:
        """A file of the dataset: a relative path with no "..", whose target (links resolved) is inside it."""
        name = self.get(obj, prefix, key, str, "a file name")
        pure = PurePosixPath(name)
        if not name or "\x00" in name or pure.is_absolute() or ".." in pure.parts:
            self.fail(prefix + key, f"{name!r} is not a plain relative path inside {self.data_dir}")
        if not (self.root / name).resolve().is_relative_to(self.root):
            self.fail(prefix + key, f"{name!r} resolves outside {self.data_dir}")
        return name

    def check(self, meta: dict) -> None:
        dtype = _np_dtype(self.get(meta, "", "dtype", str, "a string"), str(self.meta_path))
        vocab = self.integer(meta, "", "vocab_size", 1, _MAX_VOCAB)
        if vocab > 1 << (8 * dtype.itemsize):
            self.fail("vocab_size", f"{vocab} does not fit dtype {dtype.name} (at most {1 << (8 * dtype.itemsize)} ids)")
        self.integer(meta, "", "eos_id", 0, vocab - 1)
        if meta.get("pad_id") is not None:
            self.integer(meta, "", "pad_id", 0, vocab - 1)
        tok = self.get(meta, "", "tokenizer", dict, "an object")
        self.get(tok, "tokenizer.", "kind", str, "a string")
        self.file_name(tok, "tokenizer.", "file")
        self.get(tok, "tokenizer.", "sha256", str, "a string")
        splits = self.get(meta, "", "splits", dict, "an object")
        for name in splits:
            self.split(f"splits.{name}", self.get(splits, "splits.", name, dict, "an object"))

    def split(self, prefix: str, entry: dict) -> None:
        tokens = self.integer(entry, prefix + ".", "tokens", 0, _MAX_COUNT)
        docs = self.integer(entry, prefix + ".", "docs", 0, _MAX_COUNT)
        if "bytes" in entry:
            self.integer(entry, prefix + ".", "bytes", 0, 8 * _MAX_COUNT)
        shard_tokens = shard_docs = 0
        for i, s in enumerate(self.get(entry, prefix + ".", "shards", list, "a list")):
            where = f"{prefix}.shards[{i}]"
            if not isinstance(s, dict):
                self.fail(where, f"must be an object, got {_short(s)}")
            self.file_name(s, where + ".", "file")
            self.file_name(s, where + ".", "index")
            shard_tokens += self.integer(s, where + ".", "tokens", 0, _MAX_COUNT)
            shard_docs += self.integer(s, where + ".", "docs", 0, _MAX_COUNT)
            recorded = [algo for algo in (*CHECKSUMS, "index_sha256") if algo in s]
            for algo in recorded:
                self.get(s, where + ".", algo, str, "a hex string")
            if not set(recorded) & set(CHECKSUMS):
                self.fail(where, f"records no checksum ({' or '.join(CHECKSUMS)})")
        if (shard_tokens, shard_docs) != (tokens, docs):
            self.fail(prefix, f"totals ({tokens} tokens, {docs} docs) disagree with its shards "
                              f"({shard_tokens} tokens, {shard_docs} docs)")


def check_tokenizer_hash(data_dir: Path, meta: dict) -> None:
    """Refuse a tokenizer file whose sha256 disagrees with meta.json: the shards would decode to garbage.

    Cheap (tokenizer files are small), so it runs at every open. Nothing to check if meta.json records
    no hash or the file is absent (reading token ids does not need it; load_tokenizer reports that).
    """
    tok = meta.get("tokenizer") or {}
    expect, name = tok.get("sha256"), tok.get("file")
    if expect and name and (data_dir / name).is_file():
        got = file_sha256(data_dir / name)
        if got != expect:
            raise DataError(f"{data_dir / name}: tokenizer file sha256 {got[:16]}... disagrees with meta.json "
                            f"({expect[:16]}...); it is not the one the shards were encoded with")


def scan_tokens(tokens: np.ndarray, algo: str, vocab_size: int) -> tuple[str, int | None]:
    """One pass over a shard's tokens: their `algo` checksum, and the position of the first id >= vocab_size
    (None if every id is in the vocabulary).

    Cost per GiB on one core (2-core AMD EPYC VM, page-cached uint16 shard): crc32 ~0.38 s, sha256 ~0.72 s
    (blake2b ~1.7 s), the id range ~0.07 s. At under half a second per GiB, every open is checked: no opt-out.
    """
    digest = new_hash(algo)
    bad = None
    for lo in range(0, tokens.size, SCAN_CHUNK):
        chunk = tokens[lo:lo + SCAN_CHUNK]
        digest.update(chunk)
        if bad is None and chunk.max() >= vocab_size:
            bad = lo + int(np.argmax(chunk >= vocab_size))
    return digest.hexdigest(), bad


# Shards this process has already scanned: (path, inode, size, mtime, expected checksum, vocab_size). The
# trainer opens the same split several times (train, val, every source); each file is read only once.
_VERIFIED: set[tuple] = set()


class TokenReader:
    """Memory-mapped view of one split: the concatenation of its shards as one token stream.

    Opening checks that every file exists and has the size meta.json promises, and scans each shard once
    per process: its checksum (crc32, or sha256 for older datasets) and that every id < vocab_size, so a
    corrupt shard or one encoded with another vocabulary is refused before training reads it.
    `verify()` (inspect) additionally checks the sha256 of the index and tokenizer files.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str):
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = read_meta(self.data_dir)
        meta_path = self.data_dir / META_FILE
        splits = self.meta["splits"]
        if split not in splits:
            raise DataError(f"{meta_path}: no split {split!r} (available: {', '.join(sorted(splits)) or 'none'})")
        self.dtype = _np_dtype(self.meta["dtype"], str(meta_path))
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_id = int(self.meta["eos_id"])
        entry = splits[split]
        self.shards = entry["shards"]
        check_tokenizer_hash(self.data_dir, self.meta)

        self._tokens, self._index = [], []
        for s in self.shards:
            tokens = self._map(s["file"], self.dtype, s["tokens"], "tokens")
            self._scan_once(self.data_dir / s["file"], tokens, s)
            self._tokens.append(tokens)
            self._index.append(self._map(s["index"], _IDX_DTYPE, s["docs"], "documents"))
        counts = np.array([s["tokens"] for s in self.shards], dtype=np.int64)
        doc_counts = np.array([s["docs"] for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._doc_starts = np.concatenate([[0], np.cumsum(doc_counts)])
        self.num_tokens = int(self._starts[-1])  # read_meta checked these against the split's totals
        self.num_docs = int(self._doc_starts[-1])

    def _scan_once(self, path: Path, tokens: np.ndarray, entry: dict) -> None:
        """Checksum and id range of one shard, skipped if this process already checked this very file."""
        algo = next(a for a in CHECKSUMS if a in entry)
        expect = entry[algo]
        st = path.stat()
        key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, expect, self.vocab_size)
        if key in _VERIFIED:
            return
        got, bad = scan_tokens(tokens, algo, self.vocab_size)
        if got != expect:
            raise DataError(f"{path}: checksum mismatch ({algo} {got[:16]}, meta.json records {expect[:16]}); "
                            f"the file is corrupt or changed since it was prepared")
        if bad is not None:
            raise DataError(f"{path}: token id {int(tokens[bad])} >= vocab_size {self.vocab_size} at position {bad}")
        _VERIFIED.add(key)

    def _map(self, name: str, dtype: np.dtype, count: int, what: str):
        path = self.data_dir / name
        if not path.is_file():
            raise DataError(f"{path}: shard file listed in meta.json is missing")
        size, expect = path.stat().st_size, count * dtype.itemsize
        if size != expect:
            raise DataError(f"{path}: size {size} bytes disagrees with meta.json (expects {expect} bytes = "
                            f"{count} {what} x {dtype.name})")
        if count == 0:  # np.memmap cannot map an empty file
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the split as int64, spanning shard boundaries."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"read({start}, {length}) out of range for {self.num_tokens} tokens in split {self.split!r}")
        out = np.empty(length, dtype=np.int64)
        pos, end = start, start + length
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while pos < end:
            lo = pos - self._starts[shard]
            n = min(end, self._starts[shard + 1]) - pos
            out[pos - start:pos - start + n] = self._tokens[shard][lo:lo + n]
            pos += n
            shard += 1
        return out

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i (global index within the split), without the trailing EOS."""
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range for {self.num_docs} documents in split {self.split!r}")
        shard = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        j = i - self._doc_starts[shard]
        idx = self._index[shard]
        begin = int(idx[j])
        end = int(idx[j + 1]) if j + 1 < len(idx) else len(self._tokens[shard])
        return np.asarray(self._tokens[shard][begin:end - 1], dtype=np.int64)

    def verify(self) -> None:
        """Check the sha256 of every shard, index and the tokenizer file against meta.json."""
        checks = []
        for s in self.shards:
            if "sha256" in s:
                checks.append((s["file"], s["sha256"]))
            if "index_sha256" in s:
                checks.append((s["index"], s["index_sha256"]))
        tok = self.meta["tokenizer"]
        checks.append((tok["file"], tok["sha256"]))
        for name, expect in checks:
            path = self.data_dir / name
            if not path.is_file():
                raise DataError(f"{path}: missing")
            got = file_sha256(path)
            if got != expect:
                raise DataError(f"{path}: sha256 {got[:16]}... disagrees with meta.json ({expect[:16]}...); file is corrupt")
