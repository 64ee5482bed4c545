"""Checkpoints: one directory per step, sharded with torch.distributed.checkpoint (DCP), written whole or
not at all.

    RUN_DIR/ckpt/step_00001000/
        .metadata, __*_*.distcp   model weights and optimizer state, sharded (DCP); any world size loads them
        rng_rank{R}.pt            each rank's RNG states (tensors only)
        checkpoint.json           step, samples consumed, schedule and stability state, val loss
        config.toml               the resolved config the run used
        tokenizer.json            (or chars.json) the tokenizer the data was encoded with

A checkpoint is built in `step_XXXXXXXX.tmp` and renamed by rank 0 when every rank has finished, so a
run killed mid-save leaves only a `.tmp` that `--resume` ignores. Loading never runs pickled code: DCP's
metadata is read with an unpickler that admits only DCP's own metadata classes, and the rest is
`torch.load(weights_only=True)`, JSON or TOML.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from lm.config import Config, ConfigError, config_from_toml_text, to_toml

CKPT_DIR = "ckpt"

# One process without a process group is a normal way to save and load here, not a mistake to warn about.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the model; one line for the user."""


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the classes DCP metadata is made of, and nothing that could run code."""

    def find_class(self, module, name):
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in {
                ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"), ("builtins", "set"),
                ("builtins", "frozenset")}:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from checkpoint metadata")


class SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing; {self.path} is not a complete checkpoint") from None
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if hasattr(metadata, "storage_meta") and metadata.storage_meta is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "checkpoint.json").is_file())


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint directory or a run directory (its newest checkpoint)."""
    path = Path(path)
    if (path / "checkpoint.json").is_file() or (path / "model.safetensors").is_file():  # ours, or exported
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    found = checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: holds no complete checkpoint (expected {path / CKPT_DIR}/step_*/)")
    return found[-1]


def _state(model, optimizer) -> dict:
    """Model and optimizer tensors under their parameter names (sharded as DTensors under FSDP). The
    optimizer's hyperparameters are not saved: they come from the config."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state["state"]}, optim_state["param_groups"]


def save(run_dir: Path, step: int, model, optimizer, info: dict, cfg: Config, tokenizer_file: Path,
         keep_last: int, keep_every: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    final = Path(run_dir) / CKPT_DIR / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    state, _ = _state(model, optimizer)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / f"rng_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "config.toml").write_text(to_toml(cfg))
        shutil.copyfile(tokenizer_file, tmp / Path(tokenizer_file).name)
        (tmp / "checkpoint.json").write_text(json.dumps({"step": step, **info}, indent=2))
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (after a rollback or resume) replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(run_dir, keep_last, keep_every)
    _barrier()
    return final


def _prune(run_dir: Path, keep_last: int, keep_every: int):
    found = checkpoints(run_dir)
    for old in found[:-keep_last]:
        step = int(old.name.split("_")[1])
        if not (keep_every and step % keep_every == 0):
            shutil.rmtree(old)


def _fsync_dir(directory: Path):
    for f in directory.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def load_config(ckpt: Path) -> Config:
    path = ckpt / "config.toml"
    try:
        return config_from_toml_text(path.read_text(), str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {ckpt} is not a complete checkpoint") from None
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def load_info(ckpt: Path) -> dict:
    path = ckpt / "checkpoint.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}); {ckpt} is not a complete checkpoint") from None


SHAPE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "activation")


def check_shape(ckpt: Path, saved: Config, current: Config):
    """Refuse to load weights into a model of another shape, naming the first differing key."""
    for key in SHAPE_KEYS:
        a, b = getattr(saved.model, key), getattr(current.model, key)
        if a != b:
            raise CheckpointError(f"{ckpt}: checkpoint has model.{key} = {a}, the config asks for {b}")


def _dcp_load(ckpt: Path, state: dict):
    try:
        dcp.load(state, storage_reader=SafeReader(str(ckpt)))
    except CheckpointError:
        raise
    except Exception as e:  # a missing key, a truncated shard file, a shape mismatch
        raise CheckpointError(f"{ckpt}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None


def load_training(ckpt: Path, model, optimizer):
    """Weights, optimizer state and this rank's RNG state; collective under torchrun. Returns the info."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state, param_groups = _state(model, optimizer)
    _dcp_load(ckpt, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"], "param_groups": param_groups})
    rng_file = ckpt / f"rng_rank{_rank()}.pt"
    info = load_info(ckpt)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rng_file.is_file() and info.get("world_size", 1) == world:
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # another world size: a fresh, still deterministic RNG per rank
        torch.manual_seed(info["step"] * 1_000_003 + _rank())
    return info


def load_model(ckpt: Path, model: torch.nn.Module):
    """Weights only, into an unsharded model: from a training checkpoint (DCP) or from the single
    `model.safetensors` of `lm.export --format safetensors` (which stores the tied head once)."""
    path = ckpt / "model.safetensors"
    if path.is_file() and not (ckpt / ".metadata").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path))
        state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
        for key, tensor in model.state_dict().items():
            if state.get(key) is None:
                raise CheckpointError(f"{path}: has no tensor '{key}'")
            if state[key].shape != tensor.shape:
                raise CheckpointError(f"{path}: '{key}' has shape {tuple(state[key].shape)}, "
                                      f"the model expects {tuple(tensor.shape)}")
        model.load_state_dict(state)
        return
    state = {"model": model.state_dict()}
    _dcp_load(ckpt, state)
    model.load_state_dict(state["model"])
