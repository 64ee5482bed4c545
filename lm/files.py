"""One way every command reads and writes its files.

Readers turn any malformed content (missing, not JSON, the wrong type, a truncated or pickled safetensors
file) into one `DataError` line naming the file and the field. Writers build an output under a temporary
name in its destination and rename it when complete, so a full disk or a kill leaves no partial output,
and they never overwrite an existing file or directory unless asked (`force`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from pathlib import Path

from data_prep import DataError

# ---------------------------------------------------------------------------------------------- reading

_JSON_TYPES = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "an integer",
               float: "a number", bool: "true or false"}


def _kind(value) -> str:
    for t, name in _JSON_TYPES.items():
        if type(value) is t:
            return name
    return "null" if value is None else type(value).__name__


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: missing ({what})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a {what}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def read_json(path: str | os.PathLike, expect: type = dict, what: str = "JSON file"):
    """The parsed JSON of `path`, which must be of type `expect` (dict or list) at the top level."""
    path = Path(path)
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if expect is not None and type(value) is not expect:
        raise DataError(f"{path}: expected {_JSON_TYPES[expect]}, found {_kind(value)}")
    return value


def field(record: dict, key: str, path, types=(int,), check=None, default=...):
    """`record[key]` checked to be one of `types` (bool never counts as a number) and to pass `check`
    (a predicate, or a (predicate, description) pair); missing keys raise unless a default is given."""
    if key not in record:
        if default is not ...:
            return default
        raise DataError(f"{path}: field {key!r} is missing")
    value = record[key]
    numeric = any(t in (int, float) for t in types)
    if type(value) not in types and not (float in types and type(value) is int):
        wanted = " or ".join(_JSON_TYPES.get(t, t.__name__) for t in types)
        raise DataError(f"{path}: field {key!r} = {value!r:.60}: expected {wanted}")
    if numeric and isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{path}: field {key!r} = {value}: must be finite")
    if check is not None:
        predicate, description = check if isinstance(check, tuple) else (check, "out of range")
        if not predicate(value):
            raise DataError(f"{path}: field {key!r} = {value!r:.60}: {description}")
    return value


# Safetensors: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
# the tensor bytes. The header is read and checked before anything is allocated, so a truncated file, a
# pickle renamed to .safetensors or a header promising 500 GB ends in one line.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
_MAX_HEADER = 100 << 20


def safetensors_header(path: str | os.PathLike) -> dict:
    """`{name: {"dtype", "shape", "data_offsets"}}` of a safetensors file (plus "__metadata__" when
    present), every entry checked against the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > min(size - 8, _MAX_HEADER):
                raise DataError(f"{path}: not a safetensors file (no valid header: truncated, or another format "
                                "such as a pickle; only safetensors weights are read)")
            raw = f.read(n)
    except FileNotFoundError:
        raise DataError(f"{path}: missing (only safetensors weights are read, never pickles)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a safetensors file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: not a safetensors file (its header is {_kind(header)})")
    body = size - 8 - n
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise DataError(f"{path}: __metadata__ must map names to strings")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and entry.get("dtype") in _DTYPE_BYTES
                and isinstance(entry.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in entry["shape"])
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(type(o) is int for o in entry["data_offsets"])):
            raise DataError(f"{path}: tensor {name!r}: damaged header entry {entry!r:.80}")
        start, end = entry["data_offsets"]
        nbytes = math.prod(entry["shape"]) * _DTYPE_BYTES[entry["dtype"]]
        if not (0 <= start <= end <= body) or end - start != nbytes:
            raise DataError(f"{path}: tensor {name!r}: data {start}..{end} does not fit its shape "
                            f"{entry['shape']} {entry['dtype']} in the file's {body} bytes (truncated or damaged)")
    return header


def read_safetensors(path: str | os.PathLike, finite: bool = True) -> tuple[dict, dict]:
    """(tensors, metadata) of a checked safetensors file; floating tensors must be finite unless told."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    import torch

    path = Path(path)
    header = safetensors_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if finite:
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DataError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return tensors, dict(header.get("__metadata__", {}))


def expect_tensor(tensors: dict, name: str, path, shape=None, dtypes=None):
    """`tensors[name]`, checked for presence, shape and dtype, with one line naming the file and tensor."""
    if name not in tensors:
        raise DataError(f"{path}: tensor {name!r} is missing")
    t = tensors[name]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise DataError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise DataError(f"{path}: tensor {name!r} is {str(t.dtype).removeprefix('torch.')}, expected {names}")
    return t


# ---------------------------------------------------------------------------------------------- writing

def fsync_dir(directory: Path):
    """Makes the directory's entries (created or renamed files) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path):
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def _temporary_sibling(dest: Path, kind: str) -> Path:
    return dest.with_name(f".{dest.name}.{kind}-{os.getpid()}")


def writing_error(e: OSError, dest) -> DataError:
    return DataError(f"{dest}: cannot write ({e.strerror or e}{': ' + str(e.filename) if e.filename else ''}); "
                     "nothing was left behind")


def check_destination(dest: str | os.PathLike, force: bool = False, directory: bool = True, keep=()):
    """Refuse an existing `dest` (a file, a non-empty directory) unless `force`, and a `dest` that is or holds
    one of the inputs in `keep` (replacing it would delete them): call it before the work that fills the
    output, so a mistake costs nothing; the writers check again."""
    dest = Path(dest)
    for source in map(Path, keep):
        if source.resolve().is_relative_to(dest.resolve()):
            raise DataError(f"{dest}: holds the input {source}; write the output elsewhere")
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_dir() != directory:  # --force would not help: a file is not replaced by a directory
        raise DataError(f"{dest}: exists and is {'not ' if directory else ''}a directory; choose another path")
    if directory and not any(dest.iterdir()):
        return  # an empty directory the user made for us
    if not force:
        what = "a non-empty directory" if directory else "a file"
        raise DataError(f"{dest}: already exists ({what}); choose another path or pass --force to replace it")


@contextlib.contextmanager
def output_dir(dest: str | os.PathLike, force: bool = False):
    """Yields a temporary directory beside `dest`; when the block ends without an exception its files are
    fsynced and it is renamed to `dest` (replacing it only with `force`). On any error it is removed and
    an OSError becomes one line, so a full or read-only disk leaves neither a partial output nor a trace."""
    dest = Path(dest)
    check_destination(dest, force, directory=True)
    tmp = _temporary_sibling(dest, "tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        if dest.exists():
            old = _temporary_sibling(dest, "old")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as e:
        raise writing_error(e, dest) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_file(dest: str | os.PathLike, data: str | bytes, force: bool = False):
    """Write `data` to `dest` through a temporary sibling and a rename; an existing `dest` is refused
    unless `force`."""
    dest = Path(dest)
    check_destination(dest, force, directory=False)
    tmp = _temporary_sibling(dest, "tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as e:
        raise writing_error(e, dest) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_safetensors(state: dict, path: Path, metadata: dict):
    """safetensors' save_file, with the mode of any new file (0666 less the umask: 0644 usually); save_file
    itself leaves 0600, which other users (a serving account, a shared group) cannot read. Call it inside
    `output_dir` so a failed write leaves nothing; a SafetensorError from a full disk becomes an OSError."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(state, str(path), metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"{e}".splitlines()[0] if str(e) else "safetensors write failed") from None
    umask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
