"""Smaller models from trained ones (growing one is lm/grow/).

    quantize.py   int8 for CPU sampling; int8/int4 checkpoints for storage (`python -m lm.quantize`)
    prune.py      magnitude masks kept through training; heads and neurons removed (`python -m lm.prune`)

Parameter sharing across layers is a model option (model.share_layers, lm/model/gpt.py).
"""
