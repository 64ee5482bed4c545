"""Checkpoints: one directory per step, written whole or not at all.

    RUN_DIR/ckpt/step_00001000/
        model.pt        model state dict (tensors only)
        train_state.pt  optimizer state, RNG states, step and data cursor (tensors and plain values)
        config.toml     the resolved config the run used
        checkpoint.json step, samples consumed, val loss, parameter count
        tokenizer.json  (or chars.json) the tokenizer the data was encoded with

A checkpoint is built in `step_XXXXXXXX.tmp` and renamed when complete, so a killed run never leaves a
partial checkpoint that looks finished. Loading uses `torch.load(weights_only=True)`: no pickled code runs.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from lm.config import Config, config_from_toml_text, ConfigError, to_toml

CKPT_DIR = "ckpt"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the model; one line for the user."""


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def resolve(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint directory or a run directory (its newest checkpoint)."""
    path = Path(path)
    if (path / "model.pt").is_file() or (path / "model.safetensors").is_file():  # ours, or consolidated
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    found = checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: holds no complete checkpoint (expected {path / CKPT_DIR}/step_*/model.pt)")
    return found[-1]


def save(run_dir: Path, step: int, model: torch.nn.Module, train_state: dict, cfg: Config,
         meta: dict, tokenizer_file: Path, keep: int) -> Path:
    final = Path(run_dir) / CKPT_DIR / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    torch.save(train_state, tmp / "train_state.pt")
    (tmp / "config.toml").write_text(to_toml(cfg))
    (tmp / "checkpoint.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    shutil.copyfile(tokenizer_file, tmp / Path(tokenizer_file).name)
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. after a resume) replaces the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def _fsync_dir(directory: Path):
    for f in directory.iterdir():
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


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {path.parent} is not a complete checkpoint") from None
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None


SHAPE_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "activation")


def check_shape(ckpt: Path, saved: Config, current: Config):
    """Refuse to load weights into a model of another shape, naming the first differing key."""
    for key in SHAPE_KEYS:
        a, b = getattr(saved.model, key), getattr(current.model, key)
        if a != b:
            raise CheckpointError(f"{ckpt}: checkpoint has model.{key} = {a}, the config asks for {b}")


def load_model(ckpt: Path, model: torch.nn.Module):
    """Weights from `model.pt` (a training checkpoint) or `model.safetensors` (`lm.export --format
    safetensors`, which stores the tied head once)."""
    path = ckpt / "model.pt"
    if path.is_file():
        state = _load(path)
    else:
        from safetensors.torch import load_file

        path = ckpt / "model.safetensors"
        state = load_file(str(path))
        state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    for key, tensor in model.state_dict().items():
        if state.get(key) is None:
            raise CheckpointError(f"{path}: has no tensor '{key}'")
        if state[key].shape != tensor.shape:
            raise CheckpointError(f"{path}: '{key}' has shape {tuple(state[key].shape)}, "
                                  f"the model expects {tuple(tensor.shape)}")
    model.load_state_dict(state)


def load_train_state(ckpt: Path) -> dict:
    return _load(ckpt / "train_state.pt")
