"""Checkpoints: one directory per step, sharded with torch.distributed.checkpoint (DCP), written whole or
not at all.

    RUN_DIR/ckpt/step_00001000/
        .metadata, __*_*.distcp   model weights and optimizer state, sharded (DCP); any world size loads them
        rng_rank{R}.pt            each rank's RNG states (tensors only)
        config.toml               the resolved config the run used
        tokenizer.json            (or chars.json) the tokenizer the data was encoded with
        checkpoint.json           step, samples consumed, schedule and stability state, val loss, and
                                  "files": every other file's size and crc32. Written last: the mark that
                                  the checkpoint is complete.

A checkpoint is built in `step_XXXXXXXX.tmp`, every file and the directory fsynced, and renamed by rank 0
when every rank has finished; a checkpoint it replaces (a re-save of its step) is moved aside to `.old`
and deleted only after that, and pruned ones go through `.trash`. The next save clears what a killed one
left. A step directory whose files disagree with its record is damaged: it is never listed, and
`--resume` refuses it when it is the newest. Checkpoints written before the record existed count as
complete when `.metadata`, `checkpoint.json` and every file the metadata names are there.

Loading never runs pickled code: DCP's metadata is read with an unpickler that admits an exact list of
DCP's metadata classes, non-tensor entries must pass `torch.load(weights_only=True)`, and the rest is
`torch.load(weights_only=True)`, JSON or TOML. Every problem is a one-line `CheckpointError` naming the
file.
"""
from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
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

from lm.config import Config, ConfigError, config_from_toml_text, head_size, mlp_hidden_size, to_toml
from lm.files import fsync_dir

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


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def _read_metadata(ckpt: Path) -> dcp_metadata.Metadata:
    """`.metadata`, unpickled safely, whose storage entries all point at files inside `ckpt` big enough
    to hold them."""
    path = ckpt / ".metadata"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # random bytes raise anything from EOFError to OverflowError
        raise CheckpointError(f"{path}: unreadable ({_first_line(e)})") from None
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
    """DCP's file reader, given metadata already read by `_read_metadata`."""

    def __init__(self, ckpt: Path, metadata: dcp_metadata.Metadata):
        super().__init__(str(ckpt))
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs):
        if self.metadata.storage_meta is None:
            self.metadata.storage_meta = dcp_metadata.StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class _SafeLoadPlanner(dcp.DefaultLoadPlanner):
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


def _describe(directory: Path, names) -> dict[str, dict]:
    """The record of files just written: size and crc32 (about 0.3 s per GB, read back from the page
    cache; each rank hashes its own shards)."""
    return {name: {"size": (directory / name).stat().st_size, "crc32": _crc32(directory / name)}
            for name in names}


SIZES, SMALL_FILES, ALL_FILES = 0, 1, 2  # how far _damage looks: sizes; + crc32 but of shards; + shards


def _damage(ckpt: Path, hashes: int = SIZES) -> str | None:
    """Why `ckpt` is not a complete checkpoint, or None when it is."""
    path = ckpt / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{path}: missing"
    except (OSError, ValueError) as e:
        return f"{path}: unreadable ({_first_line(e)})"
    if not isinstance(record, dict):
        return f"{path}: is not a JSON object"
    files = record.get("files")
    if files is None:  # written before the record existed: complete when its metadata's files are there
        try:
            _read_metadata(ckpt)
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


def _verify(ckpt: Path, hashes: int = SMALL_FILES):
    damage = _damage(ckpt, hashes)
    if damage:
        raise CheckpointError(f"{damage}; {ckpt} is not a complete checkpoint")


# ---- finding checkpoints ----------------------------------------------------------------------------
def _step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def step_dirs(run_dir: Path) -> list[Path]:
    """Every step directory of a run, complete or not (not the .tmp/.old/.trash of a save), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()),
                  key=_step)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [p for p in step_dirs(run_dir) if _damage(p) is None]


def _newest_intact(steps: list[Path]) -> Path | None:
    # the small files' crc32 too (a few KB to MB each): cheap once per resume, and it catches garbage
    # metadata, RNG state or config; the shards' bytes are hashed only when loading them fails
    return next((p for p in reversed(steps) if _damage(p, SMALL_FILES) is None), None)


def _damaged_newest(newest: Path, damage: str, good: Path | None, advice: str) -> CheckpointError:
    hint = f"the newest intact checkpoint is {good}: {advice}" if good else "and no older checkpoint is intact"
    return CheckpointError(f"{newest}: damaged or incomplete ({damage}); {hint}")


def find_resumable(run_dir: Path, last_good: bool = False) -> Path | None:
    """The checkpoint `--resume` continues from: the newest, or None when the run has none. A damaged
    newest one is refused, naming the newest intact one; with `last_good` that one is returned instead
    (the caller says which it skipped: the step directories after it)."""
    steps = step_dirs(run_dir)
    if not steps:
        return None
    damage = _damage(steps[-1], SMALL_FILES)
    if damage is None:
        return steps[-1]
    good = _newest_intact(steps[:-1])
    if last_good and good is not None:
        return good
    raise _damaged_newest(steps[-1], damage, good, "pass --resume-from-last-good to continue from it")


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint directory or a run directory (its newest checkpoint)."""
    path = Path(path)
    if (path / RECORD).is_file() or (path / "model.safetensors").is_file():  # ours, or exported
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    steps = step_dirs(path)
    if not steps:
        raise CheckpointError(f"{path}: holds no complete checkpoint (expected {path / CKPT_DIR}/step_*/)")
    damage = _damage(steps[-1], SMALL_FILES)
    if damage:
        raise _damaged_newest(steps[-1], damage, _newest_intact(steps[:-1]), "pass that directory to use it")
    return steps[-1]


# ---- saving -----------------------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_gather(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_if_any(error: str | None):
    """A barrier that also tells every rank whether any failed, so that none waits on one that gave up."""
    first = next((e for e in _all_gather(error) if e), None)
    if first:
        raise CheckpointError(first)


def _save_error(e: BaseException, root: Path, step: int) -> str:
    """One line for a failed save. torch reports a failed write as RuntimeError('unexpected pos ...')
    with the OSError as its context, and DCP wraps that per rank: look through both for the OSError."""
    seen, todo = set(), [e]
    while todo:
        cause = todo.pop(0)
        if cause is None or id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, OSError):
            where = f" ({cause.filename})" if cause.filename else ""
            if cause.errno in (errno.ENOSPC, errno.EDQUOT):
                return f"{root}: disk full while saving step {step}{where}; the earlier checkpoints are intact"
            if cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return f"{root}: cannot save step {step} there: permission denied or read-only{where}"
            return f"{root}: saving step {step} failed: {cause.strerror or cause}{where}"
        if isinstance(cause, CheckpointException):
            todo += [wrapped[0] for wrapped in cause.failures.values()]
        todo += [cause.__cause__, cause.__context__]
    return f"{root}: saving step {step} failed ({_first_line(e)})"


def _write(path: Path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _clear_leftovers(root: Path):
    """What a killed save left: a `.tmp` being written, a `.trash` being deleted, and an `.old` being
    replaced, which goes back into place if its replacement never arrived."""
    for p in sorted(root.glob("step_*.*")):
        final = p.with_suffix("")
        if p.suffix == ".old" and not final.exists():
            os.replace(p, final)
        elif p.suffix in (".tmp", ".old", ".trash"):
            shutil.rmtree(p)


def _publish(tmp: Path, final: Path):
    """Move the finished `tmp` into place; a checkpoint already there (a re-save of its step) goes aside
    first and is deleted only once the new one is durable, or put back if the move fails."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old.exists():
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def _state(model, optimizer) -> dict:
    """Model and optimizer tensors under their parameter names (sharded as DTensors under FSDP). The
    optimizer's hyperparameters are not saved: they come from the config."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state["state"]}, optim_state["param_groups"]


def save(run_dir: Path, step: int, model, optimizer, info: dict, cfg: Config, tokenizer_file: Path,
         keep_last: int, keep_every: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final directory. A failure (a full disk, a read-only
    directory) raises a CheckpointError on every rank and leaves the checkpoints already there as they were."""
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    rank = _rank()
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _clear_leftovers(root)
            tmp.mkdir()
        except OSError as e:
            error = _save_error(e, root, step)
    raise_if_any(error)

    # Any failure is caught (not only OSError) so that it reaches every rank instead of leaving them waiting.
    written, error = {}, None
    try:
        state, _ = _state(model, optimizer)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)))  # fsyncs its files
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        buffer = io.BytesIO()  # torch.save to a path reports a full disk as "unexpected pos"; a write says ENOSPC
        torch.save(rng, buffer)
        _write(tmp / f"rng_rank{rank}.pt", buffer.getvalue())
        mine = [p.name for p in tmp.iterdir() if p.name.startswith(f"__{rank}_")] + [f"rng_rank{rank}.pt"]
        written = _describe(tmp, mine)
    except (Exception, CheckpointException) as e:
        error = _save_error(e, root, step)
    gathered = _all_gather((written, error))
    error = next((e for _, e in gathered if e), None)
    if error is None and rank == 0:
        try:
            _write(tmp / "config.toml", to_toml(cfg).encode())
            _write(tmp / Path(tokenizer_file).name, Path(tokenizer_file).read_bytes())
            files = {name: entry for part, _ in gathered for name, entry in part.items()}
            files.update(_describe(tmp, sorted(p.name for p in tmp.iterdir() if p.name not in files)))
            _write(tmp / RECORD, json.dumps({"step": step, **info, "files": files}, indent=2).encode())  # last
            fsync_dir(tmp)
            _publish(tmp, final)
        except (Exception, CheckpointException) as e:
            error = _save_error(e, root, step)
        if error is None:
            try:
                _prune(run_dir, step, keep_last, keep_every)
            except OSError as e:
                error = f"{final}: saved, but removing older checkpoints failed ({_first_line(e)})"
    if error and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise_if_any(error)
    return final


def _prune(run_dir: Path, step: int, keep_last: int, keep_every: int):
    """Keep the newest `keep_last` complete checkpoints and every multiple of `keep_every`; delete the
    other step directories before `step`, damaged ones included. Each is renamed first, so that a kill
    while deleting leaves a `.trash` (cleared at the next save), never a step directory that looks whole."""
    older = [p for p in step_dirs(run_dir) if _step(p) < step]
    intact = [p for p in older if _damage(p) is None]
    keep = set(intact[-(keep_last - 1):] if keep_last > 1 else [])  # the new one is the first kept
    keep |= {p for p in intact if keep_every and _step(p) % keep_every == 0}
    for old in older:
        if old not in keep:
            trash = old.with_name(old.name + ".trash")
            os.replace(old, trash)
            shutil.rmtree(trash)


# ---- loading ----------------------------------------------------------------------------------------
def load_config(ckpt: Path) -> Config:
    path = ckpt / "config.toml"
    try:
        cfg = config_from_toml_text(path.read_text(), str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {ckpt} is not a complete checkpoint") from None
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    except ValueError as e:  # TOMLDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path}: not a valid TOML config ({_first_line(e)})") from None
    if (cfg.data.document_mask or cfg.sft.train_file) and cfg.model.document_eos < 0:
        # saved before model.document_eos existed: the masks it trained with end documents at its EOS
        from data_prep import DataError, load_tokenizer

        try:
            cfg.model.document_eos = int(load_tokenizer(ckpt).eos_id)
        except DataError as e:
            raise CheckpointError(f"{ckpt}: trained with document masks, and its tokenizer is unreadable ({e})") from None
    return cfg


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What a resume reads from checkpoint.json: key -> (check, what it must be). world_size and val_start are
# optional (older checkpoints lack val_start).
_INFO = {
    "step": (_count, "an integer >= 0"),
    "samples": (_count, "an integer >= 0"),
    "skipped_steps": (_count, "an integer >= 0"),
    "rollbacks": (_count, "an integer >= 0"),
    "loss_scale": (lambda v: _number(v) and v > 0, "a number > 0"),
    "val_loss": (lambda v: v is None or _number(v), "a number or null"),
    "recent_losses": (lambda v: isinstance(v, list) and all(map(_number, v)), "a list of numbers"),
    "schedule": (lambda v: isinstance(v, dict) and all(x is None or _number(x) for x in v.values()),
                 "a table of numbers"),
}
_OPTIONAL_INFO = {
    "world_size": (lambda v: _count(v) and v >= 1, "an integer >= 1"),
    "val_start": (lambda v: isinstance(v, dict) and all(map(_number, v.values())), "a table of numbers"),
    "good_since_scale": (_count, "an integer >= 0"),
    "val_step": (lambda v: v is None or _count(v), "an integer >= 0 or null"),
}


def load_info(ckpt: Path) -> dict:
    """checkpoint.json without its file record, every key a resume reads checked."""
    path = ckpt / RECORD
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({_first_line(e)}); {ckpt} is not a complete checkpoint") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: is not a JSON object")
    for key, (check, what) in {**_INFO, **_OPTIONAL_INFO}.items():
        if key not in info and key in _OPTIONAL_INFO:
            continue
        if key not in info:
            raise CheckpointError(f"{path}: has no '{key}'")
        if not check(info[key]):
            raise CheckpointError(f"{path}: '{key}' must be {what}, got {info[key]!r}")
    info.pop("files", None)
    return info


SHAPE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "activation", "norm", "position",
              "mlp", "mlp_hidden", "n_kv_head", "qk_norm", "share_layers", "head_dim",
              "tie_embeddings")
RESOLVED = {"mlp_hidden": mlp_hidden_size, "n_kv_head": lambda m: m.n_kv_head or m.n_head, "head_dim": head_size}  # 0 means a default


def check_shape(ckpt: Path, saved: Config, current: Config):
    """Refuse to load weights into a model of another shape, naming the first differing key."""
    for key in SHAPE_KEYS:
        value = RESOLVED.get(key, lambda m: getattr(m, key))
        a, b = value(saved.model), value(current.model)
        if a != b:
            raise CheckpointError(f"{ckpt}: checkpoint has model.{key} = {a}, the config asks for {b}")


def check_optimizer(ckpt: Path, saved: Config, current: Config):
    """Refuse to load one optimizer's state into another (AdamW's moments are not SGD's momentum), naming
    the key. Checkpoints older than optim.name were all AdamW, which its default says."""
    from lm.optim import momentum

    a, b = saved.optim, current.optim
    if a.name != b.name:
        raise CheckpointError(f"{ckpt}: checkpoint has optim.name = '{a.name}', the config asks for '{b.name}'; "
                              "its optimizer state cannot continue another optimizer (keep optim.name, or start a "
                              "new run from its weights with init.from)")
    if a.name in ("sgd", "rmsprop") and (momentum(a) > 0) != (momentum(b) > 0):
        raise CheckpointError(f"{ckpt}: checkpoint has optim.momentum = {momentum(a):g} ({a.name}), the config asks "
                              f"for {momentum(b):g}; a momentum buffer cannot appear or vanish on resume")


def _dcp_load(ckpt: Path, state: dict):
    """DCP's load, after the record's sizes (and the small files' crc32) and the metadata are checked."""
    _verify(ckpt)
    metadata = _read_metadata(ckpt)
    try:
        dcp.load(state, storage_reader=SafeReader(ckpt, metadata), planner=_SafeLoadPlanner())
    except (Exception, CheckpointException) as e:  # a shape mismatch, a shard whose bytes changed
        # name the damaged file: hashing every shard costs nothing on the path that succeeds
        _verify(ckpt, ALL_FILES)
        raise CheckpointError(f"{ckpt}: cannot be loaded ({_first_line(_unwrap(e))})") from None


def _unwrap(e: BaseException) -> BaseException:
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]  # (exception, traceback summary) per failed rank
    return e


def _read_rng(path: Path) -> dict:
    try:
        rng = torch.load(path, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable ({_first_line(e)})") from None
    if not isinstance(rng, dict) or "cpu" not in rng:
        raise CheckpointError(f"{path}: is not a table of RNG states with a 'cpu' entry")
    for key, value in rng.items():
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8):
            raise CheckpointError(f"{path}: '{key}' must be a torch.ByteTensor (an RNG state), got "
                                  f"{type(value).__name__}")
    return rng


def load_training(ckpt: Path, model, optimizer):
    """Weights, optimizer state and this rank's RNG state; collective under torchrun. Returns the info."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    info = load_info(ckpt)
    state, param_groups = _state(model, optimizer)
    _dcp_load(ckpt, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"], "param_groups": param_groups})
    rng_file = ckpt / f"rng_rank{_rank()}.pt"
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rng_file.is_file() and info.get("world_size", 1) == world:
        rng = _read_rng(rng_file)
        try:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        except RuntimeError as e:  # a ByteTensor of the wrong size
            raise CheckpointError(f"{rng_file}: not an RNG state ({_first_line(e)})") from None
    else:  # another world size: a fresh, still deterministic RNG per rank
        torch.manual_seed(info["step"] * 1_000_003 + _rank())
    return info


def load_model(ckpt: Path, model: torch.nn.Module):
    """Weights only, into an unsharded model: from a training checkpoint (DCP) or from the single
    `model.safetensors` of `lm.export --format safetensors` (which stores the tied head once)."""
    path = ckpt / "model.safetensors"
    if path.is_file() and not (ckpt / ".metadata").is_file():
        from data_prep import DataError
        from lm.files import expect_tensor, read_safetensors
        from lm.quantize import FLOATS, QUANT_KEY, dequantized_state

        shapes = {k: v.shape for k, v in model.state_dict().items()}
        tied = model.lm_head.weight is model.transformer.wte.weight
        if tied:  # stored once, as the embedding
            del shapes["lm_head.weight"]
        try:
            stored, metadata = read_safetensors(path)  # header checked before anything is allocated
            if tied and "lm_head.weight" in stored:
                raise DataError(f"{path}: holds its own lm_head.weight, but model.tie_embeddings is true in "
                                f"{ckpt / 'config.toml'}")
            if QUANT_KEY in metadata:  # lm.quantize: integers and scales, made fp32 here
                state = dequantized_state(path, stored, metadata, shapes)
            else:
                state = {k: expect_tensor(stored, k, path, shape, FLOATS) for k, shape in shapes.items()}
        except DataError as e:
            raise CheckpointError(str(e)) from None
        if tied:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        model.load_state_dict(state)
        return
    state = {"model": model.state_dict()}
    _dcp_load(ckpt, state)
    model.load_state_dict(state["model"])
