"""Objectives: how a batch becomes a loss. One trainer (lm/training/trainer.py) runs any of them.

  language.py           language modelling on prepared shards (one source or a mixture)
  prompt_completion.py  prompt/completion tuning ([sft]): completion tokens only, packed examples
    sft_data.py           its JSONL examples, packing, and validation rows
  classification.py     sequence classification (train.task = "classify")
    classification_data.py  its JSONL examples, labels, padding, class weights and oversampling
  distillation.py       a teacher's softened distribution mixed into another objective's loss
    teacher.py            loading the teacher (a run of ours or hf:DIR) and the distillation loss

Each declares what it cannot combine with (`excludes`, checked by `check_combinations` with the rules that
hold for every objective, lm/objectives/base.py): the one place such rules are written.
"""
from __future__ import annotations

from lm.config.schema import Config
from lm.objectives.base import Objective


def objective_class(cfg: Config) -> type[Objective]:
    if cfg.train.task == "classify":
        from lm.objectives.classification import Classification

        return Classification
    if cfg.sft.train_file:
        from lm.objectives.prompt_completion import PromptCompletion

        return PromptCompletion
    from lm.objectives.language import LanguageModeling

    return LanguageModeling


def build_objective(trainer) -> Objective:
    """The objective of trainer.cfg, wrapped by distillation when a teacher is named."""
    objective = objective_class(trainer.cfg)(trainer)
    if trainer.cfg.distill.teacher:
        from lm.objectives.distillation import Distillation

        objective = Distillation(objective, trainer)
    return objective
