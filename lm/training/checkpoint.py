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

This module finds and loads checkpoints; checkpoint_save.py writes them, checkpoint_files.py reads their
files safely and checks them against the record.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from lm.config.load import config_from_toml_text
from lm.config.schema import Config, ConfigError, head_size, mlp_hidden_size
from lm.training.checkpoint_files import (CKPT_DIR, RECORD, SMALL_FILES, CheckpointError, damage, dcp_load,
                                          first_line, rank, training_state)


# ---- finding checkpoints ----------------------------------------------------------------------------
def step_number(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def step_dirs(run_dir: Path) -> list[Path]:
    """Every step directory of a run, complete or not (not the .tmp/.old/.trash of a save), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()),
                  key=step_number)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [p for p in step_dirs(run_dir) if damage(p) is None]


def _newest_intact(steps: list[Path]) -> Path | None:
    # the small files' crc32 too (a few KB to MB each): cheap once per resume, and it catches garbage
    # metadata, RNG state or config; the shards' bytes are hashed only when loading them fails
    return next((p for p in reversed(steps) if damage(p, SMALL_FILES) is None), None)


def damaged_newest(newest: Path, damage: str, good: Path | None, advice: str) -> CheckpointError:
    hint = f"the newest intact checkpoint is {good}: {advice}" if good else "and no older checkpoint is intact"
    return CheckpointError(f"{newest}: damaged or incomplete ({damage}); {hint}")


def find_resumable(run_dir: Path, last_good: bool = False) -> Path | None:
    """The checkpoint `--resume` continues from: the newest, or None when the run has none. A damaged
    newest one is refused, naming the newest intact one; with `last_good` that one is returned instead
    (the caller says which it skipped: the step directories after it)."""
    steps = step_dirs(run_dir)
    if not steps:
        return None
    problem = damage(steps[-1], SMALL_FILES)
    if problem is None:
        return steps[-1]
    good = _newest_intact(steps[:-1])
    if last_good and good is not None:
        return good
    raise damaged_newest(steps[-1], problem, good, "pass --resume-from-last-good to continue from it")


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
    problem = damage(steps[-1], SMALL_FILES)
    if problem:
        raise damaged_newest(steps[-1], problem, _newest_intact(steps[:-1]), "pass that directory to use it")
    return steps[-1]



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
        raise CheckpointError(f"{path}: not a valid TOML config ({first_line(e)})") from None
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
        raise CheckpointError(f"{path}: unreadable ({first_line(e)}); {ckpt} is not a complete checkpoint") from None
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
    from lm.training.optim import momentum

    a, b = saved.optim, current.optim
    if a.name != b.name:
        raise CheckpointError(f"{ckpt}: checkpoint has optim.name = '{a.name}', the config asks for '{b.name}'; "
                              "its optimizer state cannot continue another optimizer (keep optim.name, or start a "
                              "new run from its weights with init.from)")
    if a.name in ("sgd", "rmsprop") and (momentum(a) > 0) != (momentum(b) > 0):
        raise CheckpointError(f"{ckpt}: checkpoint has optim.momentum = {momentum(a):g} ({a.name}), the config asks "
                              f"for {momentum(b):g}; a momentum buffer cannot appear or vanish on resume")

def _read_rng(path: Path) -> dict:
    try:
        rng = torch.load(path, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable ({first_line(e)})") from None
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
    state, param_groups = training_state(model, optimizer)
    dcp_load(ckpt, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"], "param_groups": param_groups})
    rng_file = ckpt / f"rng_rank{rank()}.pt"
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rng_file.is_file() and info.get("world_size", 1) == world:
        rng = _read_rng(rng_file)
        try:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        except RuntimeError as e:  # a ByteTensor of the wrong size
            raise CheckpointError(f"{rng_file}: not an RNG state ({first_line(e)})") from None
    else:  # another world size: a fresh, still deterministic RNG per rank
        torch.manual_seed(info["step"] * 1_000_003 + rank())
    return info


def load_model(ckpt: Path, model: torch.nn.Module):
    """Weights only, into an unsharded model: from a training checkpoint (DCP) or from the single
    `model.safetensors` of `lm.export --format safetensors` (which stores the tied head once)."""
    path = ckpt / "model.safetensors"
    if path.is_file() and not (ckpt / ".metadata").is_file():
        from data_prep import DataError
        from lm.files import expect_tensor, read_safetensors
        from lm.compress.quantize import FLOATS, QUANT_KEY, dequantized_state

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
    dcp_load(ckpt, state)
    model.load_state_dict(state["model"])

