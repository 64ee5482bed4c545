"""Validation during training: one or more named validation sets, each scored on the same sequences every
time and for any number of ranks, with forgetting and adaptation tracked against their starting losses.

The validation set is `train.eval_sequences` windows of each set's val split, chosen by a fixed seed (not
train.seed), so two runs that differ in seed or world size are scored on the same text.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep import DataError, TokenReader
from lm.config.checks import parse_val_sets
from lm.config.schema import Config, ConfigError
from lm.data.batches import SampleStream
from lm.eval.tasks import run_task, training_tasks

VAL_SEED = 0x5EED  # the windows a validation set is scored on; independent of train.seed


class ValSet:
    def __init__(self, name: str, directory: str, block_size: int):
        reader = TokenReader(directory, "val")
        split = reader.meta["splits"]["val"]
        if "bytes" not in split:
            raise DataError(f"{Path(directory) / 'meta.json'}: split 'val' has no 'bytes' (needed for bits/byte)")
        self.name, self.directory = name, directory
        self.stream = SampleStream(reader, block_size, VAL_SEED, f"{directory} val split")
        self.bytes_per_token = split["bytes"] / split["tokens"]


def validation_sets(cfg: Config, sources: list[tuple[str, float, str]], data_dir: Path,
                    old_data: str | None = None) -> list[ValSet]:
    """`data.val_sets` as named; else one set per training source, named by its role; else, when the run
    continues from one of ours (`old_data`: the data it was trained on), "new" (this run's data) and
    "replay" (the old domain, so forgetting is tracked without being asked for); else the single unnamed
    set ("") of a plain run, logged as val_loss alone. A plain run without a val split has none."""
    named = parse_val_sets(cfg.data.val_sets)
    if not named and sources:
        roles = [r for r, _, _ in sources]
        named = [(r if roles.count(r) == 1 else f"{r}{i}", d) for i, (r, _, d) in enumerate(sources)]
    if not named and old_data and Path(old_data).resolve() != Path(data_dir).resolve():
        named = [("new", str(data_dir)), ("replay", old_data)]
    sets = []
    for name, directory in named or [("", str(data_dir))]:
        try:
            meta = TokenReader(directory, "train").meta
        except DataError as e:
            if not cfg.data.val_sets:
                raise
            raise DataError(f"data.val_sets: '{name}:{directory}': {e} (data.val_sets names its directories "
                            f"apart from data.dir = {cfg.data.dir}: override it too, e.g. "
                            f"'data.val_sets=[\"new:{cfg.data.dir}\", ...]', or set it to [])") from None
        if "val" not in meta["splits"]:
            if named:
                raise DataError(f"{directory}: has no val split for validation set '{name}'")
            continue
        sets.append(ValSet(name, directory, cfg.model.block_size))
    return sets


def rank_batches(n: int, batch_size: int, world):
    """(start, count) of the batches this rank scores of n rows: a contiguous share of them. Every rank runs
    the same number of batches (FSDP gathers weights collectively): an idle one gets count 0 and scores a
    dummy row with weight 0."""
    share = math.ceil(n / world.size)
    first, end = world.rank * share, min(n, (world.rank + 1) * share)
    for start in range(first, first + share, batch_size):
        yield start, max(0, min(batch_size, end - start))


class Evaluator:
    """Scores the model on every validation set; keeps each set's first loss (its state in checkpoints)."""

    def __init__(self, sets: list[ValSet], cfg: Config, world, device: torch.device, autocast):
        self.sets, self.world, self.device, self.autocast = sets, world, device, autocast
        self.sequences, self.batch_size = cfg.train.eval_sequences, cfg.train.batch_size
        self.start: dict[str, float] = {}  # each set's loss at the start of the run
        self.last_loss: float | None = None  # of the first set
        self.last_step: int | None = None  # the step last_loss was measured at
        # `[eval] tasks`, scored at every evaluation by every rank, each a share (lm/eval/scoring.py)
        self.tasks = training_tasks(cfg)
        if self.tasks and not sets:
            raise ConfigError(f"eval.tasks: the tasks run at each validation, and this run has none (no val split "
                              f"in {cfg.data.dir}; data.val_fraction > 0 gives one)")

    @property
    def active(self) -> bool:
        return bool(self.sets)

    def bits_per_byte(self, loss: float) -> float | None:
        """Of the first set."""
        return bits_per_byte(loss, self.sets[0]) if self.sets else None

    @torch.no_grad()
    def loss(self, model, val: ValSet) -> float:
        """Mean loss per target token over the set's `eval_sequences` windows. Rank r scores a contiguous
        share; every rank runs the same number of forwards (FSDP gathers weights collectively), an idle one
        on a dummy window with weight 0."""
        n = getattr(val, "sequences", None) or self.sequences  # a packed SFT set: each row once
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        was_training = model.training
        model.eval()
        for start, count in rank_batches(n, self.batch_size, self.world):
            x, y = val.stream.batch(start if count else 0, max(count, 1), self.device)
            with self.autocast():
                loss = model(x, y)[1].double()
            # weighted by scored targets, so the result is a mean over tokens (SFT rows hold fewer)
            targets = (y[:count] >= 0).sum().double()
            total += torch.stack([torch.where(targets > 0, loss * targets, 0.0), targets])
        model.train(was_training)
        if self.world.distributed:
            dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def evaluate(self, model, step: int) -> dict:
        """A metrics record: val_loss and val_bpb of the first set; with named sets, each set's loss,
        bits/byte and change since the start: forgetting (rise of "replay"), adaptation (fall of "new")."""
        losses = {s.name: self.loss(model, s) for s in self.sets}
        first = self.sets[0]
        self.last_loss, self.last_step = losses[first.name], step
        record = {"step": step, "val_loss": self.last_loss, "val_bpb": bits_per_byte(self.last_loss, first)}
        if first.name:
            for s in self.sets:
                loss = losses[s.name]
                record[f"val/{s.name}_loss"] = loss
                record[f"val/{s.name}_bpb"] = bits_per_byte(loss, s)
                record[f"val/{s.name}_change"] = loss - self.start.setdefault(s.name, loss)
            if "replay" in losses:
                record["forgetting"] = record["val/replay_change"]
            if "new" in losses:
                record["adaptation"] = -record["val/new_change"]
        for task in self.tasks:
            metrics = run_task(task, model, self.batch_size, self.device, self.world, self.autocast)
            record.update({f"eval/{task.name}/{key}": value for key, value in metrics.items()})
        return record

    def summary(self, record: dict) -> str:
        """One line for the console: each set's loss and bits/byte, then each task's headline metrics."""
        if not self.sets[0].name:
            line = f"val loss {record['val_loss']:.4f} nats/token, {record['val_bpb']:.4f} bits/byte"
        else:
            line = "val " + ", ".join(f"{s.name} {record[f'val/{s.name}_loss']:.4f} "
                                      f"({record[f'val/{s.name}_bpb']:.4f} bits/byte)" for s in self.sets)
        for task in self.tasks:
            line += f"; {task.name} " + " ".join(f"{k} {record[f'eval/{task.name}/{k}']:.4f}" for k in task.headline)
        return line


def bits_per_byte(loss: float, val: ValSet) -> float:
    return loss / math.log(2) / val.bytes_per_token
