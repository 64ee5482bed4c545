"""Where a run's starting weights come from (init.from): a run or checkpoint of ours, saved by any number
of ranks, or a Hugging Face GPT-2 directory ("hf:DIR"). Both load straight into this run's layout: the
whole model in one process, each rank's FSDP shards under torchrun (DCP reshards ours; a HF tensor is
read whole and each rank keeps its slice)."""
from __future__ import annotations

from pathlib import Path

import torch

from lm import checkpoint
from lm.config import Config
from lm.hf import check_hf_shape, load_hf_weights, read_hf_config


def old_domain(source: str) -> str | None:
    """The data directory the run behind init.from was trained on (its first source when it mixed
    several), when that run is ours and its data is still here with a val split; else None."""
    if not source or source.startswith("hf:"):
        return None
    from data_prep.shards import read_meta
    from lm.config import parse_sources

    saved = checkpoint.load_config(checkpoint.resolve(source))
    sources = parse_sources(saved.data.sources)
    directory = Path(sources[0][2] if sources else saved.data.dir)
    if not (directory / "meta.json").is_file() or "val" not in read_meta(directory)["splits"]:
        return None
    return str(directory)


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
