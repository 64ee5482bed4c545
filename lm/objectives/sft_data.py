"""Prompt/completion tuning ([sft]): JSONL examples, the loss on completion tokens only.

An example is {"prompt": ..., "completion": ...} (field names configurable) or a chat, {"messages":
[{"role": ..., "content": ...}, ...]}: the last assistant turn is the completion, the turns before it the
prompt, each rendered "ROLE: CONTENT\\n". Its tokens are prompt + completion + EOS; the targets are the
completion's tokens and the EOS (the model learns to stop), never the prompt's.

Examples are packed, not padded: whole examples fill rows of block_size + 1 tokens (the rest of a row is
EOS with no loss), with data.document_mask's machinery on, so no token attends across an example and
positions restart in each one. Packing wastes no compute on padding; the mask makes each example's loss
exactly what it would be alone. A too-long example keeps its completion and the end of its prompt.

A window's ignored targets travel as negative ids (-(id + 1)) through the same sample stream, prefetcher
and evaluator code as pretraining; `split_targets` turns a window into inputs and targets (-100 ignored).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_prep import DataError, jsonl_objects

IGNORE = -100


def read_examples(path: Path, prompt_field: str, completion_field: str, messages_field: str) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of a JSONL file; one line naming file, line and field for a bad one."""
    examples = []
    for number, record in jsonl_objects(path, "sft examples"):
        if messages_field in record:
            examples.append(_chat(record[messages_field], f"{path}: line {number}"))
            continue
        prompt, completion = record.get(prompt_field), record.get(completion_field)
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
            raise DataError(f"{path}: line {number}: needs string fields '{prompt_field}' and a non-empty "
                            f"'{completion_field}' (or '{messages_field}')")
        examples.append((prompt, completion))
    if not examples:
        raise DataError(f"{path}: holds no examples")
    return examples


def _chat(turns, where: str) -> tuple[str, str]:
    ok = isinstance(turns, list) and turns and all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                                    and isinstance(t.get("content"), str) for t in turns)
    if not ok or turns[-1]["role"] != "assistant" or not turns[-1]["content"]:
        raise DataError(f"{where}: messages must be a list of {{role, content}} ending with a non-empty "
                        "assistant turn")
    prompt = "".join(f"{t['role']}: {t['content']}\n" for t in turns[:-1]) + "assistant: "
    return prompt, turns[-1]["content"]


def fit(prompt: list[int], completion: list[int], width: int, eos: int) -> tuple[list[int], bool]:
    """One example as at most `width` ids (ignored targets negative), and whether its completion was cut.
    The completion and its EOS are kept whole when they fit beside one prompt token (the one that predicts
    the completion's first token); the prompt loses its beginning first. A completion too long for the
    window keeps its beginning and no EOS: the model must not learn to stop where the window did."""
    whole = len(completion) + 2 <= width
    kept = completion if whole else completion[:width - 1]
    room = width - len(kept) - whole  # >= 1
    prompt = (prompt or [eos])[-room:]
    return [-(t + 1) for t in prompt] + kept + ([eos] if whole else []), not whole


def pack(examples: list[tuple[list[int], list[int]]], block_size: int, eos: int) -> np.ndarray:
    """Rows of block_size + 1 ids, ignored targets stored as -(id + 1): whole examples, greedily, in order."""
    width = block_size + 1
    rows, row = [], []

    def close(row):
        pad = [-(eos + 1)] * (width - len(row))  # EOS filler, no loss
        rows.append(row + pad)

    for prompt, completion in examples:
        ids, _ = fit(prompt, completion, width, eos)
        if len(row) + len(ids) > width:
            close(row)
            row = []
        row += ids
    if row:
        close(row)
    return np.array(rows, dtype=np.int64)


def split_targets(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of a packed window pair: negative ids are ignored targets, their inputs the id."""
    return torch.where(x < 0, -x - 1, x), torch.where(y < 0, IGNORE, y)


class PackedStream:
    """Rows of packed examples behind the global sample index: sample i is row perm_e[i mod n] of epoch
    e = i // n, each epoch its own seeded order, so resume and any world size read the same rows."""

    def __init__(self, rows: np.ndarray, seed: int, shuffle: bool = True):
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.block_size = rows.shape[1] - 1

    def read(self, first: int, count: int) -> np.ndarray:
        n = len(self.rows)
        index = np.arange(first, first + count)
        out = np.empty((count, self.rows.shape[1]), dtype=np.int64)
        for epoch in np.unique(index // n):
            at = index // n == epoch
            order = np.random.default_rng(self.seed * 1_000_003 + int(epoch)).permutation(n) if self.shuffle \
                else np.arange(n)
            out[at] = self.rows[order[index[at] % n]]
        return out

    def batch(self, first: int, count: int, device: torch.device):
        tokens = torch.from_numpy(self.read(first, count)).to(device)
        return split_targets(tokens[:, :-1], tokens[:, 1:])


class PackedValSet:
    """The validation examples, scored like a val split (lm.training.evaluation) but each row once (`sequences`),
    the loss a mean over target tokens; bits/byte counts the bytes of what is scored: the completion
    tokens kept in the window and the EOS ending each (EOS has no bytes, as in a prepared split)."""

    def __init__(self, rows: np.ndarray, scored_bytes: int):
        self.name, self.directory = "", "sft"
        self.stream = PackedStream(rows, seed=0, shuffle=False)
        self.sequences = len(rows)
        targets = int((rows[:, 1:] >= 0).sum())
        self.bytes_per_token = scored_bytes / targets


def prepare_sft(cfg, tokenizer, eos: int, note=print) -> tuple[PackedStream, PackedValSet | None]:
    """The training stream and the validation set of cfg.sft, tokenized and packed; `note` hears how many
    completions the window cuts."""
    s = cfg.sft
    fields = (s.prompt_field, s.completion_field, s.messages_field)
    train = read_examples(Path(s.train_file), *fields)
    val = read_examples(Path(s.val_file), *fields) if s.val_file else []
    if not s.val_file and s.val_fraction > 0:
        order = np.random.default_rng(cfg.train.seed).permutation(len(train))
        n_val = max(1, int(round(s.val_fraction * len(train))))
        if n_val >= len(train):
            raise DataError(f"{s.train_file}: {len(train)} example(s); sft.val_fraction = {s.val_fraction} holds "
                            "out all of them for validation: add examples, name sft.val_file, or set "
                            "sft.val_fraction = 0")
        val = [train[i] for i in order[:n_val]]
        train = [train[i] for i in order[n_val:]]

    def encoded(pairs, path):
        try:
            return [(tokenizer.encode(p), tokenizer.encode(c)) for p, c in pairs]
        except DataError as e:  # e.g. a character the char vocabulary lacks
            raise DataError(f"{path}: {e}") from None

    width = cfg.model.block_size + 1
    train_ids = encoded(train, s.train_file)
    cut = sum(fit(p, c, width, eos)[1] for p, c in train_ids)
    if cut:
        note(f"note: {cut} of {len(train_ids)} training completions are longer than model.block_size - 1 = "
             f"{width - 2} tokens: each keeps its first {width - 1} tokens and is trained without its ending "
             "and EOS")
    stream = PackedStream(pack(train_ids, cfg.model.block_size, eos), cfg.train.seed)
    if not val:
        return stream, None
    val_ids = encoded(val, s.val_file or s.train_file)
    scored_bytes = 0
    for p, c in val_ids:
        ids, was_cut = fit(p, c, width, eos)
        kept = [t for t in ids if t >= 0][:len(ids) if was_cut else -1]  # the completion without its EOS
        scored_bytes += len(tokenizer.decode(kept).encode("utf-8"))
    return stream, PackedValSet(pack(val_ids, cfg.model.block_size, eos), scored_bytes)
