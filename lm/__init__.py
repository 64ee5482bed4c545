"""lmforge: train decoder-only language models, from a laptop CPU to a GPU cluster.

The packages, from the bottom up (each `__init__.py` lists its modules):

    config/       the run configuration: TOML sections as dataclasses, overrides, checks
    model/        the GPT, its kernels' selection, generation, the classification head
    kernels/      our Triton kernels (the repository's kernels/ folder, imported as lm.kernels)
    data/         samples from prepared shards (data_prep/ prepares them), augmentation
    objectives/   how a batch becomes a loss: language modelling, prompt/completion, classification,
                  distillation
    training/     the trainer, FSDP2, optimizers, stability, validation, checkpoints, planning
    compress/     quantization, pruning
    interop/      Hugging Face directories in and out
    eval/         perplexity, bits/byte, multiple choice, the lm-evaluation-harness adapter
    grow/         a trained model made deeper and wider without losing what it learned

The modules directly in lm/ are commands (`python -m lm.<name>`: classify, consolidate, export, plot,
prune, quantize) and files.py, the one way model files are read and written. Import a name from the
module that defines it. No import runs in circles (tests/test_layout.py checks it).
"""
