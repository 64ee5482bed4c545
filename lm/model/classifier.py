"""The classification head on the GPT (training: lm/objectives/classification.py; the command: lm/classify.py).

The model is the GPT with one more module, `cls_head`: a Linear(n_embd, classes) on a pooled hidden state of
the final norm (transformer.ln_f). "last" pooling reads the last real token (each text's closing EOS, which
has attended to the whole text), "mean" averages the real tokens. The head is a submodule of the model, so it
is built, initialized (by name and seed), sharded, checkpointed and restored like every other parameter;
the LM head stays (tied to the embedding) and unused. The data side (JSONL, labels, padding, class weights,
oversampling) is lm/objectives/classification_data.py.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from lm.config.schema import Config

LABELS_FILE = "labels.json"
BEST_DIR = "best"


# ---- the head ---------------------------------------------------------------------------------------
class ClassificationHead(nn.Linear):
    """Linear(n_embd, classes) on each sequence's pooled hidden state. `lengths` counts each row's real
    tokens; the rows are right-padded after them (lm/objectives/classification_data.py), so the padded positions are never
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

