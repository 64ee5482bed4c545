"""The classification head on the GPT, and `python -m lm.classify RUN --text ...` (training:
lm/objectives/classification.py).

The model is the GPT with one more module, `cls_head`: a Linear(n_embd, classes) on a pooled hidden state of
the final norm (transformer.ln_f). "last" pooling reads the last real token (each text's closing EOS, which
has attended to the whole text), "mean" averages the real tokens. The head is a submodule of the model, so it
is built, initialized (by name and seed), sharded, checkpointed and restored like every other parameter;
the LM head stays (tied to the embedding) and unused. The data side (JSONL, labels, padding, class weights,
oversampling) is lm/classify_data.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from data_prep import DataError, load_tokenizer
from lm import checkpoint
from lm.classify_data import encode, pad
from lm.config import Config, ConfigError

LABELS_FILE = "labels.json"
BEST_DIR = "best"


# ---- the head ---------------------------------------------------------------------------------------
class ClassificationHead(nn.Linear):
    """Linear(n_embd, classes) on each sequence's pooled hidden state. `lengths` counts each row's real
    tokens; the rows are right-padded after them (lm/classify_data.py), so the padded positions are never
    read: "last" takes position lengths - 1, "mean" averages positions < lengths."""

    def __init__(self, n_embd: int, classes: int, pooling: str):
        super().__init__(n_embd, classes, bias=True)
        self.pooling = pooling

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T, _ = hidden.shape
        if self.pooling == "last":
            pooled = hidden[torch.arange(B, device=hidden.device), lengths - 1]
        else:
            mask = (torch.arange(T, device=hidden.device) < lengths[:, None]).to(hidden.dtype)
            pooled = (hidden * mask[..., None]).sum(1) / lengths[:, None].to(hidden.dtype)
        return super().forward(pooled)


def attach_head(model: nn.Module, cfg: Config, seed: int | None = None):
    """Give `model` its classification head (cfg.classify.labels resolved). Its initial values come from
    the model's generator per parameter name (N(0, 0.02) weights, zero bias), as every parameter's do; on
    the meta device they are drawn later by init_weights."""
    head = ClassificationHead(cfg.model.n_embd, len(cfg.classify.labels), cfg.classify.pooling)
    model.cls_head = head
    if head.weight.is_meta:
        return
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(model.initial_value(f"cls_head.{name}", cfg.train.seed if seed is None else seed))


@contextlib.contextmanager
def detached_head(model: nn.Module):
    """The model without its head for a while: loading a source that has none (a pretraining run, hf:DIR)."""
    head = model._modules.pop("cls_head")
    try:
        yield
    finally:
        model._modules["cls_head"] = head


def class_logits(model, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return model(ids, lengths=lengths)[0]


# ---- inference --------------------------------------------------------------------------------------
def load_classifier(path, device="cpu", last: bool = False):
    """(checkpoint, config, model in eval mode, tokenizer) of a classification run: RUN/best/ when there is
    one (unless `last`), else the run's newest checkpoint, or the checkpoint directory given."""
    from lm.attention import inference_backends
    from lm.model import GPT

    path = Path(path)
    if not last and (path / BEST_DIR / checkpoint.RECORD).is_file():
        path = path / BEST_DIR
    ckpt = checkpoint.resolve(path)
    cfg = checkpoint.load_config(ckpt)
    if cfg.train.task != "classify":
        raise checkpoint.CheckpointError(f"{ckpt}: is not a classifier (train.task = '{cfg.train.task}'); train one "
                                         "with train.task = 'classify'")
    model = GPT(inference_backends(cfg.model, device))
    attach_head(model, cfg)
    checkpoint.load_model(ckpt, model)
    return ckpt, cfg, model.to(device).eval(), load_tokenizer(ckpt)


@torch.no_grad()
def predict(model, tokenizer, cfg: Config, texts: list[str], batch_size: int = 32, device="cpu") -> np.ndarray:
    """Class probabilities (N, classes) of `texts`, encoded as in training."""
    rows = encode(tokenizer, texts, cfg.classify.max_length or cfg.model.block_size)
    out = []
    for start in range(0, len(rows), batch_size):
        ids, lengths = pad(rows[start:start + batch_size], tokenizer.eos_id, device)
        out.append(torch.softmax(class_logits(model, ids, lengths).float(), -1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(cfg.classify.labels)))


def _read_texts(path: Path, field: str) -> list[str]:
    """A JSONL file's `field` per record, or a text file's non-empty lines; at least one."""
    from data_prep import jsonl_objects
    from lm.files import read_text

    if path.suffix == ".jsonl":
        texts = []
        for number, record in jsonl_objects(path, "texts to classify"):
            if not isinstance(record.get(field), str):
                raise DataError(f"{path}: line {number}: has no string field '{field}'")
            texts.append(record[field])
    else:
        texts = [line for line in read_text(path, "file of texts").splitlines() if line.strip()]
    if not texts:
        raise DataError(f"{path}: no texts to classify (the file is empty or blank)")
    return texts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lm.classify",
                                     description="Labels and class probabilities of texts from a classification run.")
    parser.add_argument("run", help="a classification run (its best/ checkpoint, else the newest) or a checkpoint")
    parser.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    parser.add_argument("--file", type=Path, help="texts: a .jsonl file (the run's text field) or one text a line")
    parser.add_argument("--text-field", default=None, help="the JSONL field (default: the run's classify.text_field)")
    parser.add_argument("--last", action="store_true", help="the newest checkpoint instead of RUN/best/")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="one JSON object a text instead of the table")
    args = parser.parse_args(argv)
    try:
        if not args.text and args.file is None:
            raise ValueError("give --text TEXT (repeatable) or --file FILE")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
        ckpt, cfg, model, tokenizer = load_classifier(args.run, args.device, args.last)
        texts = list(args.text)
        if args.file is not None:
            texts += _read_texts(args.file, args.text_field or cfg.classify.text_field)
        probs = predict(model, tokenizer, cfg, texts, args.batch_size, args.device)
    except (checkpoint.CheckpointError, DataError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labels = cfg.classify.labels
    print(f"{ckpt} (step {checkpoint.load_info(ckpt)['step']})", file=sys.stderr)
    for text, p in zip(texts, probs):
        best = int(p.argmax())
        if args.json:
            print(json.dumps({"text": text, "label": labels[best],
                              "probabilities": {label: round(float(q), 6) for label, q in zip(labels, p)}},
                             ensure_ascii=False))
        else:
            others = "  ".join(f"{label} {q:.3f}" for label, q in zip(labels, p))
            snippet = " ".join(text.split())
            snippet = snippet[:60] + ("..." if len(snippet) > 60 else "")
            print(f"{labels[best]}\t{p[best]:.3f}\t[{others}]\t{snippet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
