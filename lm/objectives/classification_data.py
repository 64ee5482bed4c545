"""The data of sequence classification (train.task = "classify"): JSONL examples, the label list, class
weights, oversampling, and right-padded batches addressed by the global sample index.

An example is one JSON object a line with a text field and a label field (classify.text_field,
classify.label_field). Labels are strings; an integer label is read as its decimal text. The label list
(classify.labels, or the training labels sorted: numerically when every one is an integer) fixes the class
indices; it is resolved into the run's config, so config.toml, every checkpoint and labels.json carry it.

A text is read as a pretraining document is: after an EOS and closed by one, [EOS] + tokens + [EOS]; a text
longer than classify.max_length tokens loses its end (the closing EOS stays). A batch is right-padded with
the EOS id to its longest row, and `lengths` says how many tokens of each row are real: the attention mask
is `arange(T) < lengths`. Attention itself needs no mask: it is causal, so with the padding on the right no
real token ever attends to a padded position, and the pooling reads only real positions (lm/model/classifier.py).

Sample i of training is example `order_e[i mod E]` of epoch e = i // E, each epoch its own seeded order, so
resume and any number of ranks read the same examples. Plain: an epoch is every example once. Oversampling
(classify.oversample): an epoch of E slots gives each class its share of the slots (exact, by largest
remainders), filled with that class's examples in seeded cycles; E is the smallest size at which no class
gets fewer slots than it has examples, so the majority class is never undersampled and a rare one repeats.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep import DataError, jsonl_objects
from lm.config.schema import Config, ConfigError

VAL_SEED = 0x5EED  # the examples held out when classify.val_file is empty: the same for any train.seed


@dataclass
class Examples:
    """Encoded examples: token ids per example ([EOS] + text + [EOS]) and class indices."""
    rows: list[np.ndarray]
    labels: np.ndarray  # int64 class indices
    source: str  # where they came from, for messages

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)

    def subset(self, index: np.ndarray, source: str) -> "Examples":
        return Examples([self.rows[i] for i in index], self.labels[index], source)


def label_text(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: the label must be a string or an integer, got {type(value).__name__} {value!r}")


def read_examples(path: str | Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    """(texts, labels) of a JSONL file; a bad line is one error naming the file, the line and the field."""
    texts, labels = [], []
    for number, record in jsonl_objects(path, "classification examples"):
        where = f"{path}: line {number}"
        for name in (text_field, label_field):
            if name not in record:
                raise DataError(f"{where}: has no field '{name}' (its fields: {', '.join(map(str, record)) or 'none'})")
        if not isinstance(record[text_field], str):
            raise DataError(f"{where}: field '{text_field}' must be a string")
        texts.append(record[text_field])
        labels.append(label_text(record[label_field], where))
    if not texts:
        raise DataError(f"{path}: holds no examples")
    return texts, labels


def sorted_labels(labels) -> list[str]:
    """The distinct labels in order: numerically when every one is an integer ("2" before "10")."""
    distinct = set(labels)
    if all(re.fullmatch(r"-?\d+", s) for s in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def resolve_labels(configured: list[str], train_labels: list[str], where: str) -> list[str]:
    if configured:
        if len(set(configured)) != len(configured):
            raise ConfigError(f"classify.labels has repeated labels: {configured}")
        unknown = sorted_labels(set(train_labels) - set(configured))
        if unknown:
            raise DataError(f"{where}: label '{unknown[0]}' is not in classify.labels {configured}")
        labels = list(configured)
    else:
        labels = sorted_labels(train_labels)
    if len(labels) < 2:
        raise DataError(f"{where}: needs at least two classes, found {labels}")
    return labels


def encode(tokenizer, texts: list[str], max_length: int, where: str = "") -> list[np.ndarray]:
    """[EOS] + tokens + [EOS] per text, the tokens cut to max_length - 2."""
    eos = tokenizer.eos_id
    try:
        ids = tokenizer.encode_batch(list(texts))
    except DataError as e:  # e.g. a character a char vocabulary lacks
        raise DataError(f"{where}: {e}" if where else str(e)) from None
    return [np.array([eos, *t[:max_length - 2], eos], dtype=np.int64) for t in ids]


def pad(rows: list[np.ndarray], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), lengths (B,)): rows right-padded with `pad_id` to the longest one."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    ids = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device)


def apportion(total: int, shares: np.ndarray) -> np.ndarray:
    """`total` slots split by `shares` (summing to 1) by largest remainders: whole numbers summing to total."""
    exact = total * shares
    slots = np.floor(exact).astype(np.int64)
    rest = total - int(slots.sum())
    slots[np.argsort(-(exact - slots), kind="stable")[:rest]] += 1
    return slots


class ExampleSampler:
    """Global sample index -> example index (see the module docstring)."""

    def __init__(self, labels: np.ndarray, num_classes: int, shares: list[float] | None, seed: int):
        self.labels, self.seed = labels, seed
        self.members = [np.flatnonzero(labels == c) for c in range(num_classes)]
        if shares is None:
            self.slots = None
            self.epoch_size = len(labels)
        else:
            share = np.asarray(shares, dtype=np.float64) / sum(shares)
            counts = np.array([len(m) for m in self.members])
            size = max(math.ceil(counts[c] / share[c] - 1e-9) for c in range(num_classes) if share[c] > 0)
            self.slots = apportion(size, share)
            self.epoch_size = size
        self._cache: dict[int, np.ndarray] = {}

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._cache:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, e])
            if self.slots is None:
                order = rng.permutation(len(self.labels))
            else:
                parts = []
                for members, k in zip(self.members, self.slots):
                    if k:
                        cycles = -(-int(k) // len(members))
                        parts.append(np.concatenate([rng.permutation(members) for _ in range(cycles)])[:k])
                order = rng.permutation(np.concatenate(parts))
            if len(self._cache) >= 2:
                self._cache.pop(min(self._cache))
            self._cache[e] = order
        return self._cache[e]

    def indices(self, first: int, count: int) -> np.ndarray:
        index = np.arange(first, first + count)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(index // self.epoch_size):
            at = index // self.epoch_size == e
            out[at] = self.epoch(int(e))[index[at] % self.epoch_size]
        return out


class Batcher:
    """The trainer's batch source for classification (the Prefetcher's interface): the batch of `count`
    samples from global sample `first` is ((ids, lengths), labels)."""

    def __init__(self, examples: Examples, sampler: ExampleSampler, count: int, pad_id: int, device):
        self.examples, self.sampler, self.count, self.pad_id, self.device = examples, sampler, count, pad_id, device

    def batch(self, first: int, next_first: int | None = None):
        index = self.sampler.indices(first, self.count)
        ids, lengths = pad([self.examples.rows[i] for i in index], self.pad_id, self.device)
        return (ids, lengths), torch.from_numpy(self.examples.labels[index]).to(self.device)

    def close(self):
        """Nothing to release: batches are built when asked for (no reader thread)."""


def class_weights(spec, counts: np.ndarray, labels: list[str]) -> np.ndarray | None:
    """classify.class_weights: "" none; "balanced" N / (C n_c) (scikit-learn's: every class weighs as much in
    the loss as the others in sum); a list, one weight per label in the labels' order."""
    if isinstance(spec, str) and not spec:
        return None
    if isinstance(spec, str):  # "balanced"
        empty = [label for label, n in zip(labels, counts) if n == 0]
        if empty:
            raise DataError(f"classify.class_weights = 'balanced': class '{empty[0]}' has no training examples")
        return counts.sum() / (len(labels) * counts.astype(np.float64))
    if len(spec) != len(labels):
        raise ConfigError(f"classify.class_weights has {len(spec)} weights for {len(labels)} labels {labels}")
    return np.asarray(spec, dtype=np.float64)


def oversample_shares(spec, counts: np.ndarray, labels: list[str]) -> list[float] | None:
    """classify.oversample: false none; true equal shares; a list, each label's share of the samples."""
    if spec is False:
        return None
    shares = [1.0] * len(labels) if spec is True else list(spec)
    if len(shares) != len(labels):
        raise ConfigError(f"classify.oversample has {len(shares)} shares for {len(labels)} labels {labels}")
    empty = [label for label, n, s in zip(labels, counts, shares) if s > 0 and n == 0]
    if empty:
        raise DataError(f"classify.oversample: class '{empty[0]}' has no training examples to draw")
    return shares


@dataclass
class ClassificationData:
    labels: list[str]
    train: Examples
    val: Examples | None
    weights: np.ndarray | None  # per class, for the loss
    shares: list[float] | None  # oversampling shares per class


def load_data(cfg: Config, tokenizer) -> ClassificationData:
    """The training and validation examples of cfg.classify, encoded; cfg.classify.labels is resolved."""
    c = cfg.classify
    length = c.max_length or cfg.model.block_size
    texts, names = read_examples(c.train_file, c.text_field, c.label_field)
    labels = resolve_labels(c.labels, names, c.train_file)
    index = {label: i for i, label in enumerate(labels)}
    train = Examples(encode(tokenizer, texts, length, c.train_file), np.array([index[n] for n in names]),
                     c.train_file)
    val = None
    if c.val_file:
        texts, names = read_examples(c.val_file, c.text_field, c.label_field)
        unknown = sorted_labels(set(names) - set(labels))
        if unknown:
            raise DataError(f"{c.val_file}: label '{unknown[0]}' is not among the training labels {labels}")
        val = Examples(encode(tokenizer, texts, length, c.val_file), np.array([index[n] for n in names]), c.val_file)
    elif c.val_fraction > 0:  # stratified: each class gives its share, at least one example when it has two
        rng = np.random.default_rng(VAL_SEED)
        held = []
        for k in range(len(labels)):
            members = rng.permutation(np.flatnonzero(train.labels == k))
            n = min(len(members) - 1, max(1, round(c.val_fraction * len(members)))) if len(members) > 1 else 0
            held.append(members[:n])
        held = np.sort(np.concatenate(held))
        if len(held):
            keep = np.setdiff1d(np.arange(len(train)), held)
            val = train.subset(held, f"{c.train_file} (held out: classify.val_fraction)")
            train = train.subset(keep, c.train_file)
    c.labels = labels
    counts = train.counts(len(labels))
    return ClassificationData(labels, train, val, class_weights(c.class_weights, counts, labels),
                              oversample_shares(c.oversample, counts, labels))
