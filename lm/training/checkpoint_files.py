"""What a checkpoint directory holds, read without running code and checked against its record.

DCP's `.metadata` is unpickled admitting an exact list of classes; non-tensor entries must load with
`torch.load(weights_only=True)`; `checkpoint.json` lists every other file's size and crc32, so a damaged
or half-written step is found before anything is loaded. See lm/training/checkpoint.py for the layout.
"""
from __future__ import annotations

import io
import json
import pickle
import warnings
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: `except Exception` misses it



CKPT_DIR = "ckpt"
RECORD = "checkpoint.json"

# One process without a process group is a normal way to save and load here, not a mistake to warn about.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the model; one line for the user."""


# ---- reading DCP metadata without running code ------------------------------------------------------
# Every class the DCP metadata of torch 2.11-2.13 pickles (found by unpickling real metadata and listing
# its globals), as exact (module, name) pairs: protocol 4 resolves a dotted name through attributes, so a
# module prefix would admit `torch.distributed.checkpoint.filesystem` + `os.system`.
_METADATA_CLASSES = {
    **{("torch.distributed.checkpoint.metadata", cls.__name__): cls for cls in (
        dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata,
        dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties, dcp_metadata.MetadataIndex,
        dcp_metadata.StorageMeta, dcp_metadata._MEM_FORMAT_ENCODING)},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    # StorageMeta.checkpoint_id, where it was saved: a record only, so a pure path (no I/O) that builds on
    # any OS; Python 3.13 pickles pathlib's classes from pathlib._local.
    **{(module, name): pure for module in ("pathlib", "pathlib._local") for name, pure in (
        ("PosixPath", PurePosixPath), ("PurePosixPath", PurePosixPath),
        ("WindowsPath", PureWindowsPath), ("PureWindowsPath", PureWindowsPath))},
}
# The only objects that are not classes: dtypes (attributes of torch), and the function a torch.layout
# pickles as, which looks its string argument up among torch's layouts.
_METADATA_VALUES = {
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the classes DCP metadata is made of, and nothing that could run code."""

    def find_class(self, module, name):
        cls = _METADATA_CLASSES.get((module, name))
        if isinstance(cls, type):  # a function listed here by mistake is still refused
            return cls
        if (module, name) in _METADATA_VALUES:
            return _METADATA_VALUES[module, name]
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not a DCP metadata class")


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def read_metadata(ckpt: Path) -> dcp_metadata.Metadata:
    """`.metadata`, unpickled safely, whose storage entries all point at files inside `ckpt` big enough
    to hold them."""
    path = ckpt / ".metadata"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # random bytes raise anything from EOFError to OverflowError
        raise CheckpointError(f"{path}: unreadable ({first_line(e)})") from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: is not DCP metadata")
    for entry in metadata.storage_data.values():
        if not isinstance(entry, dcp_filesystem._StorageInfo):
            raise CheckpointError(f"{path}: has a storage entry of type {type(entry).__name__}")
        name = entry.relative_path
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path}: names a storage file outside the checkpoint: {name!r}")
        if entry.transform_descriptors:  # never written here; each would be a decoder run on the bytes
            raise CheckpointError(f"{path}: {name} has stream transforms {entry.transform_descriptors}")
        try:
            size = (ckpt / name).stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{ckpt / name}: missing (named by {path})") from None
        if not (isinstance(entry.offset, int) and isinstance(entry.length, int)
                and 0 <= entry.offset and 0 <= entry.length and entry.offset + entry.length <= size):
            raise CheckpointError(f"{ckpt / name}: {size} bytes, too short for what {path} says it holds "
                                  "(truncated)")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader, given metadata already read by `read_metadata`."""

    def __init__(self, ckpt: Path, metadata: dcp_metadata.Metadata):
        super().__init__(str(ckpt))
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs):
        if self.metadata.storage_meta is None:
            self.metadata.storage_meta = dcp_metadata.StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP unpickles a non-tensor entry with torch.load(weights_only=False): metadata of allowed classes
    alone could point a tensor's key at a pickle that runs code. Such bytes must load as plain data first."""

    def load_bytes(self, read_item, value):
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


# ---- the completion record --------------------------------------------------------------------------
def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def describe(directory: Path, names) -> dict[str, dict]:
    """The record of files just written: size and crc32 (about 0.3 s per GB, read back from the page
    cache; each rank hashes its own shards)."""
    return {name: {"size": (directory / name).stat().st_size, "crc32": _crc32(directory / name)}
            for name in names}


SIZES, SMALL_FILES, ALL_FILES = 0, 1, 2  # how far damage looks: sizes; + crc32 but of shards; + shards


def damage(ckpt: Path, hashes: int = SIZES) -> str | None:
    """Why `ckpt` is not a complete checkpoint, or None when it is."""
    path = ckpt / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{path}: missing"
    except (OSError, ValueError) as e:
        return f"{path}: unreadable ({first_line(e)})"
    if not isinstance(record, dict):
        return f"{path}: is not a JSON object"
    files = record.get("files")
    if files is None:  # written before the record existed: complete when its metadata's files are there
        try:
            read_metadata(ckpt)
        except CheckpointError as e:
            return str(e)
        return None
    if not (isinstance(files, dict) and all(isinstance(f, dict) for f in files.values())):
        return f"{path}: 'files' is not a record of files"
    for name, entry in files.items():
        file = ckpt / name
        if Path(name).name != name or name in ("", ".", ".."):
            return f"{path}: names a file outside the checkpoint: {name!r}"
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            return f"{file}: missing"
        if size != entry.get("size"):
            return f"{file}: {size} bytes, {RECORD} records {entry.get('size')} (truncated or overwritten)"
    for name, entry in files.items():
        if hashes == ALL_FILES or (hashes == SMALL_FILES and not name.endswith(".distcp")):
            if _crc32(ckpt / name) != entry.get("crc32"):
                return f"{ckpt / name}: contents differ from the crc32 {RECORD} records (damaged)"
    return None


def verify(ckpt: Path, hashes: int = SMALL_FILES):
    problem = damage(ckpt, hashes)
    if problem:
        raise CheckpointError(f"{problem}; {ckpt} is not a complete checkpoint")



def dcp_load(ckpt: Path, state: dict):
    """DCP's load, after the record's sizes (and the small files' crc32) and the metadata are checked."""
    verify(ckpt)
    metadata = read_metadata(ckpt)
    try:
        dcp.load(state, storage_reader=SafeReader(ckpt, metadata), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as e:  # a shape mismatch, a shard whose bytes changed
        # name the damaged file: hashing every shard costs nothing on the path that succeeds
        verify(ckpt, ALL_FILES)
        raise CheckpointError(f"{ckpt}: cannot be loaded ({first_line(_unwrap(e))})") from None


def _unwrap(e: BaseException) -> BaseException:
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]  # (exception, traceback summary) per failed rank
    return e


# ---- saving -----------------------------------------------------------------------------------------
def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0



def training_state(model, optimizer) -> dict:
    """Model and optimizer tensors under their parameter names (sharded as DTensors under FSDP). The
    optimizer's hyperparameters are not saved: they come from the config."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state["state"]}, optim_state["param_groups"]

