"""Where a run's starting weights come from (init.from): a run or checkpoint of ours, saved by any number
of ranks, or a Hugging Face GPT-2 directory ("hf:DIR"). Both load straight into this run's layout: the
whole model in one process, each rank's FSDP shards under torchrun (DCP reshards ours; a HF tensor is
read whole and each rank keeps its slice)."""
from __future__ import annotations

from pathlib import Path

import torch

from lm.training import checkpoint
from lm.config.schema import Config, ConfigError
from lm.interop.hf import check_hf_shape, load_hf_weights, read_hf_config


def old_domain(source: str) -> str | None:
    """The data directory the run behind init.from was trained on (its first source when it mixed
    several), when that run is ours and its data is still here with a val split; else None."""
    if not source or source.startswith("hf:"):
        return None
    from data_prep.shards import read_meta
    from lm.config.checks import parse_sources

    saved = checkpoint.load_config(checkpoint.resolve(source))
    sources = parse_sources(saved.data.sources)
    directory = Path(sources[0][2] if sources else saved.data.dir)
    if not (directory / "meta.json").is_file() or "val" not in read_meta(directory)["splits"]:
        return None
    return str(directory)


def adopt_shape(cfg: Config):
    """init.from gives the model its shape: every shape key the config leaves at its default takes the
    source's value, and the keys the config sets must agree, all differences named at once."""
    source = cfg.init.from_
    if not source:
        return
    if source.startswith("hf:"):
        from lm.interop.hf import hf_shape_keys

        theirs, where = read_hf_config(Path(source[3:])), f"{source}/config.json"
        keys = hf_shape_keys(theirs)
    else:
        ckpt = checkpoint.resolve(source)
        theirs, where, keys = checkpoint.load_config(ckpt).model, str(ckpt), checkpoint.SHAPE_KEYS
    given = getattr(cfg, "given", frozenset())
    ours, differ = cfg.model, []
    for key in keys:
        value = checkpoint.RESOLVED.get(key, lambda m: getattr(m, key))
        if f"model.{key}" not in given and hasattr(ours, key):
            setattr(ours, key, getattr(theirs, key))
        elif value(theirs) != value(ours):
            differ.append(f"model.{key} = {value(ours)!r} ({value(theirs)!r} there)")
    if differ:
        raise ConfigError(f"init.from = {source}: the config asks for another shape than {where}: "
                          f"{', '.join(differ)}; leave these keys out to take the source's shape")


def load_initial_weights(source: str, model: torch.nn.Module, optimizer, cfg: Config, rank: int):
    """Weights (and with init.optimizer the optimizer state, of the same optim.name) from `source`. The step,
    the data cursor and the RNG start afresh: this is a new run."""
    if source.startswith("hf:"):
        directory = Path(source[3:])
        check_hf_shape(directory, read_hf_config(directory), cfg.model)
        load_hf_weights(directory, model)
        return
    ckpt = checkpoint.resolve(source)
    saved = checkpoint.load_config(ckpt)
    checkpoint.check_shape(ckpt, saved, cfg)
    if cfg.init.optimizer:
        checkpoint.check_optimizer(ckpt, saved, cfg)
        checkpoint.load_training(ckpt, model, optimizer)
        torch.manual_seed(cfg.train.seed + rank)  # load_training restored the old run's RNG
    else:
        checkpoint.load_model(ckpt, model)
