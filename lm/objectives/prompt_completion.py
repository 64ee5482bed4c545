"""Prompt/completion tuning ([sft]): the loss on completion tokens only, examples packed and kept apart by
the document mask; data.dir gives the tokenizer (its shards are not read). The data side is lm/objectives/sft_data.py."""
from __future__ import annotations

import torch

from data_prep import load_tokenizer
from lm.training.evaluation import Evaluator
from lm.objectives.language import LanguageModeling
from lm.objectives.sft_data import IGNORE, prepare_sft, split_targets


class PromptCompletion(LanguageModeling):
    name = "prompt/completion tuning (sft.train_file)"
    excludes = {
        "data.sources": "examples come from sft.train_file, not from prepared shards",
        "data.val_sets": "validation is sft.val_file (or sft.val_fraction of the examples)",
    }

    def __init__(self, trainer):
        super().__init__(trainer)  # the tokenizer, vocabulary and EOS of data.dir
        cfg = self.cfg
        cfg.model.document_eos = self.eos  # packed examples never attend to each other
        self.train_stream, val = prepare_sft(cfg, load_tokenizer(self.data_dir), self.eos, note=trainer._print)
        self.evaluator = Evaluator([val] if val else [], cfg, trainer.world, trainer.device, trainer._autocast)

    def inputs(self, x, y):
        return split_targets(x, y)  # prompt tokens are no targets

    def begin_step(self, samples: int, count: int):
        """Rows hold different numbers of targets, so a micro-batch's mean loss is weighed by its share of the
        global batch's targets: the step's loss is the mean over every target of the global batch, the same
        on any number of ranks and with any grad_accum (the trainer and FSDP average over ranks x micro-batches)."""
        targets = int((self.train_stream.read(samples, count)[:, 1:] >= 0).sum())
        self._per_target = self.trainer.world.size * self.cfg.train.grad_accum / max(1, targets)

    def weight(self, y) -> torch.Tensor:
        return (y != IGNORE).sum() * self._per_target

    def loss(self, model, x, y) -> torch.Tensor:
        return model(x, y)[1] * self.weight(y)
