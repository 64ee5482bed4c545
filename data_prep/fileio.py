"""Small file helpers: content hashes and atomic writes (a killed process never leaves a torn file)."""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so large shards do not load into memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Crc32:
    """zlib.crc32 behind hashlib's update/hexdigest interface."""

    def __init__(self):
        self._value = 0

    def update(self, data) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"


def new_hash(algo: str):
    """A running hash by name: "crc32" (cheap, to catch corruption) or any hashlib algorithm."""
    return Crc32() if algo == "crc32" else hashlib.new(algo)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to `<path>.tmp` then rename, so readers see either the old file or the complete new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
