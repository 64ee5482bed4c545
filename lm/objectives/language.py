"""Language modelling: the next token of prepared shards (one source, or a weighted mixture), validated on
each validation set by loss and bits/byte (lm/training/evaluation.py)."""
from __future__ import annotations

from pathlib import Path

from data_prep import TokenReader
from lm.config.checks import parse_sources
from lm.config.schema import ConfigError
from lm.data.batches import MixedStream, SampleStream, check_same_tokenizer, ensure_prepared
from lm.training.evaluation import Evaluator, validation_sets
from lm.training.initialize import old_domain
from lm.objectives.base import Objective
from lm.training.parallel import barrier


class LanguageModeling(Objective):
    name = "language modelling"

    def __init__(self, trainer):
        super().__init__(trainer)
        cfg, world = self.cfg, trainer.world
        self.sources = parse_sources(cfg.data.sources)
        if world.main and not self.sources:
            ensure_prepared(cfg.data, show_progress=cfg.log.progress)
        barrier()
        dirs = [Path(d) for _, _, d in self.sources] or [Path(cfg.data.dir)]
        check_same_tokenizer(dirs)
        reader = TokenReader(dirs[0], "train")
        self.data_dir = dirs[0]
        self.tokenizer_file = dirs[0] / reader.meta["tokenizer"]["file"]
        self.eos = int(reader.meta["eos_id"])
        self.resolve_vocab(reader.vocab_size, dirs[0] / "meta.json")
        if cfg.data.document_mask:  # recorded in the model config: every consumer masks the same way
            cfg.model.document_eos = self.eos
        self.train_stream = self._train_stream(reader, dirs)
        self.evaluator = Evaluator(self._validation_sets(), cfg, world, trainer.device, trainer._autocast)

    def _train_stream(self, reader: TokenReader, dirs: list[Path]):
        """One source: its own stream. Several: the interleave, whose period must divide the global batch
        so that every step holds each source's exact share."""
        cfg = self.cfg
        seed, block = cfg.train.seed, cfg.model.block_size
        if not self.sources:
            return SampleStream(reader, block, seed, f"{dirs[0]} train split")
        # each source its own hashed order (seeds far apart)
        streams = [SampleStream(TokenReader(d, "train"), block, seed + 7919 * i, f"{d} train split")
                   for i, d in enumerate(dirs)]
        stream = MixedStream(streams, [w for _, w, _ in self.sources])
        t = cfg.train
        batch = self.trainer.world.size * t.batch_size * t.grad_accum
        if batch % stream.mixture.period:
            raise ConfigError(f"data.sources: a global batch of {batch} samples cannot hold the weights "
                              f"exactly; make it a multiple of {stream.mixture.period}")
        return stream

    def _validation_sets(self):
        cfg = self.cfg
        old = old_domain(cfg.init.from_)
        if old and not (self.sources or cfg.data.val_sets):
            check_same_tokenizer([self.data_dir, Path(old)])
        elif cfg.init.from_ and not (self.sources or cfg.data.val_sets or cfg.init.from_.startswith("hf:")):
            self.trainer._print(f"note: the data {cfg.init.from_} was trained on is not here (or has no val split): "
                                "forgetting is not tracked; name it in data.val_sets to track it")
        return validation_sets(cfg, self.sources, self.data_dir, old)
