"""What every objective gives the trainer, and the rules between features, checked in one place.

An objective owns how a batch becomes a loss: its training batches (`batches`), what the trainer does to a
batch before the forward (`inputs`), the loss, its validation (`evaluator`: `evaluate(model, step)` -> a
metrics record, `summary(record)` -> one console line) and any state it keeps in checkpoints. The trainer
(lm/training/trainer.py) owns everything else: the loop, the optimizer, stability, freezing, EWC, pruning masks,
checkpoints and FSDP. The hooks' defaults are language modelling's.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lm.config.schema import Config, ConfigError
from lm.data.batches import Prefetcher
from lm.training.initialize import load_initial_weights


def _setting(cfg: Config, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


class Objective:
    name = "objective"
    # config key -> why this objective cannot run with that feature on; `check_combinations` applies it
    excludes: dict[str, str] = {}

    def __init__(self, trainer):
        self.trainer, self.cfg = trainer, trainer.cfg
        self.tokenizer_file: Path | None = None
        self.vocab_size, self.eos = 0, 0  # of the tokenizer; set by the objective's data
        self.sources: list = []  # data.sources as parsed (language modelling's mixture)
        self.train_stream = None
        self.evaluator = None

    @classmethod
    def check_combinations(cls, cfg: Config):
        """One line naming both features for the first combination this objective cannot run."""
        for key, why in cls.excludes.items():
            if _setting(cfg, key):
                raise ConfigError(f"{key} cannot be combined with {cls.name}: {why}")
        check_feature_rules(cfg)

    def resolve_vocab(self, vocab: int, where):
        """model.vocab_size 0 takes the tokenizer's; a smaller one is refused."""
        m = self.cfg.model
        self.vocab_size = vocab
        if m.vocab_size == 0:
            m.vocab_size = vocab
        elif m.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size = {m.vocab_size} is smaller than the tokenizer's vocabulary of "
                              f"{vocab} in {where}")

    # ---- hooks, in the order a step meets them ----------------------------------------------------------
    def batches(self, batch_size: int, device: torch.device):
        """The micro-batch source: `batch(first, next_first)` -> (x, y), `close()`."""
        return Prefetcher(self.train_stream, batch_size, device)

    def begin_step(self, samples: int, count: int):
        """Before a step over global samples [samples, samples + count)."""

    def inputs(self, x, y):
        """(inputs, targets) of a batch as the model reads them."""
        return x, y

    def weight(self, y):
        """What turns a micro-batch's mean loss into its share of the global batch's mean: 1 where every
        micro-batch holds as many targets as any other (language modelling)."""
        return 1.0

    def loss(self, model, x, y) -> torch.Tensor:
        return model(x, y)[1]

    # ---- run lifecycle --------------------------------------------------------------------------------
    def initial_weights(self, model, optimizer):
        """init.from's weights at the start of a new run."""
        load_initial_weights(self.cfg.init.from_, model, optimizer, self.cfg, self.trainer.world.rank)

    def check_checkpoint(self, ckpt: Path, saved: Config):
        """Refuse a checkpoint another objective wrote (before it is restored)."""

    def state_dict(self) -> dict:
        """More entries for checkpoint.json."""
        return {}

    def load_state_dict(self, info: dict):
        """From a restored checkpoint.json."""

    def started(self):
        """After the run directory exists (a new run or a resumed one)."""

    def after_eval(self, record: dict, step: int) -> tuple[str, str | None]:
        """Given an evaluation's record (which it may extend): a note for its console line, and why to stop
        the run early (None: go on)."""
        return "", None

    def after_save(self, ckpt: Path):
        """After a checkpoint is saved."""

    def finished(self) -> str | None:
        """Why a resumed run has nothing left to train (beyond train.max_steps), or None."""
        return None

    def result(self) -> dict:
        """More entries for the run's result."""
        return {}


def documents_masked(cfg: Config) -> bool:
    """Whether the training batches pack documents kept apart by the document mask."""
    return bool(cfg.data.document_mask or cfg.sft.train_file)


def check_feature_rules(cfg: Config):
    """Rules between features that hold whatever the objective."""
    from lm.data.augment import parse_augment

    kinds = [kind for kind, _ in parse_augment(cfg.data.augment)]
    if "drop" in kinds and documents_masked(cfg):
        masked_by = "data.document_mask" if cfg.data.document_mask else "sft.train_file"
        raise ConfigError(f"data.augment 'drop' cannot be combined with {masked_by}: it writes EOS into the inputs, "
                          "which the document mask reads as document ends")
