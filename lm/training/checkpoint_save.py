"""Saving a checkpoint: built in `step_XXXXXXXX.tmp`, fsynced, renamed when every rank has finished;
older steps pruned (layout and guarantees: lm/training/checkpoint.py).
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: `except Exception` misses it

from lm.config.load import to_toml
from lm.config.schema import Config
from lm.files import fsync_dir
from lm.training.checkpoint import step_dirs, step_number
from lm.training.checkpoint_files import (CKPT_DIR, RECORD, CheckpointError, damage, describe, first_line, rank,
                                          training_state)


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
    return f"{root}: saving step {step} failed ({first_line(e)})"


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


def save(run_dir: Path, step: int, model, optimizer, info: dict, cfg: Config, tokenizer_file: Path,
         keep_last: int, keep_every: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final directory. A failure (a full disk, a read-only
    directory) raises a CheckpointError on every rank and leaves the checkpoints already there as they were."""
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    me = rank()
    error = None
    if me == 0:
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
        state, _ = training_state(model, optimizer)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)))  # fsyncs its files
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        buffer = io.BytesIO()  # torch.save to a path reports a full disk as "unexpected pos"; a write says ENOSPC
        torch.save(rng, buffer)
        _write(tmp / f"rng_rank{me}.pt", buffer.getvalue())
        mine = [p.name for p in tmp.iterdir() if p.name.startswith(f"__{me}_")] + [f"rng_rank{me}.pt"]
        written = describe(tmp, mine)
    except (Exception, CheckpointException) as e:
        error = _save_error(e, root, step)
    gathered = _all_gather((written, error))
    error = next((e for _, e in gathered if e), None)
    if error is None and me == 0:
        try:
            _write(tmp / "config.toml", to_toml(cfg).encode())
            _write(tmp / Path(tokenizer_file).name, Path(tokenizer_file).read_bytes())
            files = {name: entry for part, _ in gathered for name, entry in part.items()}
            files.update(describe(tmp, sorted(p.name for p in tmp.iterdir() if p.name not in files)))
            _write(tmp / RECORD, json.dumps({"step": step, **info, "files": files}, indent=2).encode())  # last
            fsync_dir(tmp)
            _publish(tmp, final)
        except (Exception, CheckpointException) as e:
            error = _save_error(e, root, step)
        if error is None:
            try:
                _prune(run_dir, step, keep_last, keep_every)
            except OSError as e:
                error = f"{final}: saved, but removing older checkpoints failed ({first_line(e)})"
    if error and me == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise_if_any(error)
    return final


def _prune(run_dir: Path, step: int, keep_last: int, keep_every: int):
    """Keep the newest `keep_last` complete checkpoints and every multiple of `keep_every`; delete the
    other step directories before `step`, damaged ones included. Each is renamed first, so that a kill
    while deleting leaves a `.trash` (cleared at the next save), never a step directory that looks whole."""
    older = [p for p in step_dirs(run_dir) if step_number(p) < step]
    intact = [p for p in older if damage(p) is None]
    keep = set(intact[-(keep_last - 1):] if keep_last > 1 else [])  # the new one is the first kept
    keep |= {p for p in intact if keep_every and step_number(p) % keep_every == 0}
    for old in older:
        if old not in keep:
            trash = old.with_name(old.name + ".trash")
            os.replace(old, trash)
            shutil.rmtree(trash)

