"""Small file helpers: content hashes, atomic writes (a killed process or a full disk never leaves a torn
file) and the one reader of the JSON files data_prep itself wrote (manifests, task results, state): any
damage is one DataError naming the file and the field."""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

from .errors import DataError

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
    """Write to `<path>.tmp` then rename, so readers see either the old file or the complete new one; a
    failed write (a full disk) removes the temporary file and raises an OSError naming `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


# ---- reading JSON we wrote: never trusted ------------------------------------------------------------

COUNT = "count"  # spec: an integer >= 0
FRACTION = "fraction"  # spec: a number in [0, 1)


def read_json(path: str | os.PathLike, spec=None):
    """The JSON value in `path`, checked against `spec` (see check_json); DataError naming the file (and
    the field) when it is missing, unreadable, not JSON or not of that shape."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if spec is not None:
        check_json(value, spec, path)
    return value


def check_json(value, spec, path, field: str = "") -> None:
    """Spec: a type (int never matches a bool; float matches an int), COUNT, FRACTION, a dict of required
    keys -> specs (other keys allowed), `{str: spec}` (an object of any keys, each value a spec), or `[spec]`
    (a list of them)."""
    def fail(expected: str):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise DataError(f"{path}: {field or 'the file'} must be {expected}, got {shown}")

    if isinstance(spec, dict):
        if not isinstance(value, dict):
            keys = [k for k in spec if isinstance(k, str)]
            fail("a JSON object" + (f" with {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}" if keys else ""))
        if list(spec) == [str]:
            for key, item in value.items():
                check_json(item, spec[str], path, f"{field}.{key}" if field else key)
            return
        for key, sub in spec.items():
            name = f"{field}.{key}" if field else key
            if key not in value:
                raise DataError(f"{path}: {name} is missing")
            check_json(value[key], sub, path, name)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            fail("a list")
        for i, item in enumerate(value):
            check_json(item, spec[0], path, f"{field}[{i}]")
    elif spec == COUNT:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            fail("an integer >= 0")
    elif spec == FRACTION:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
            fail("a number in [0, 1)")
    elif spec is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            fail("a number")
    elif not isinstance(value, spec) or (isinstance(value, bool) and spec is not bool):
        fail({str: "a string", int: "an integer", bool: "true or false"}.get(spec, spec.__name__))
