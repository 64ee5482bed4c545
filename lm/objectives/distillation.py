"""Distillation ([distill]) as a part that wraps another objective: the wrapped one's batches, validation
and state, with its loss mixed with a teacher's softened distribution (lm/objectives/teacher.py). So a student is
distilled on pretraining shards or on prompt/completion examples alike."""
from __future__ import annotations

import torch

from lm.objectives.teacher import distillation_loss, load_teacher
from lm.objectives.base import Objective


class Distillation:
    def __init__(self, inner: Objective, trainer):
        self.inner = inner
        cfg = trainer.cfg
        self.teacher = load_teacher(cfg, inner.tokenizer_file, trainer.world, trainer.device)
        self.temperature, self.alpha = cfg.distill.temperature, cfg.distill.alpha
        trainer._print(f"distilling from {cfg.distill.teacher} (T = {self.temperature:g}, alpha = {self.alpha:g})")

    def __getattr__(self, name):  # everything but the loss is the wrapped objective's
        return getattr(self.inner, name)

    def loss(self, model, x, y) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(x)[0]
        return distillation_loss(model(x)[0], teacher_logits, y, self.temperature, self.alpha) * self.inner.weight(y)
