"""Evaluation of a trained model: perplexity and bits/byte on text, multiple-choice accuracy, and an
lm-evaluation-harness adapter.

    spec.py      task strings (`ppl:PATH`, `mc:FILE.jsonl`, options) -> TaskSpec
    scoring.py   log-likelihood of token windows, batched and sharded over ranks
    tasks.py     a task's files -> scoring requests -> metrics
    __main__.py  `python -m lm.eval RUN --tasks ...`
    harness.py   lm-evaluation-harness model "lmforge" (`python -m lm.eval.harness --model lmforge ...`)

Training runs chosen tasks at every evaluation (`[eval] tasks`, lm/training/evaluation.py).
"""
