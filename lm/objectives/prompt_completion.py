"""Prompt/completion tuning ([sft]): the loss on completion tokens only, examples packed and kept apart by
the document mask; data.dir gives the tokenizer (its shards are not read). The data side is lm/sft.py."""
from __future__ import annotations

from data_prep import load_tokenizer
from lm.evaluation import Evaluator
from lm.objectives.language import LanguageModeling
from lm.sft import prepare_sft, split_targets


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
