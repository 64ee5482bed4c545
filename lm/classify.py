"""Classify texts with a trained classifier: `python -m lm.classify RUN --text ...` (or --file).

The head is lm/model/classifier.py; training is lm/objectives/classification.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from data_prep import DataError, jsonl_objects, load_tokenizer
from lm.config.schema import Config, ConfigError
from lm.files import read_text
from lm.model.attention import inference_backends
from lm.model.classifier import BEST_DIR, attach_head, class_logits
from lm.model.gpt import GPT
from lm.objectives.classification_data import encode, pad
from lm.training import checkpoint

# ---- inference --------------------------------------------------------------------------------------
def load_classifier(path, device="cpu", last: bool = False):
    """(checkpoint, config, model in eval mode, tokenizer) of a classification run: RUN/best/ when there is
    one (unless `last`), else the run's newest checkpoint, or the checkpoint directory given."""
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
