"""The model: a GPT in plain PyTorch and what runs it.

    gpt.py          embeddings, blocks (GPT-2's, or Llama's options), the head; parameter sharing
    attention.py    which attention and norm kernels (PyTorch or ours in lm.kernels) a config selects
    position.py     rotary embeddings, and documents inside a packed row (document masks)
    loss.py         chunked cross-entropy of the head, without the whole logits tensor
    kv_cache.py     the keys and values generation keeps per layer
    generate.py     sampling: batched prompts, top-k/top-p, penalties, stops, sliding context
    classifier.py   the classification head (train.task = "classify")

Import from the module that defines a name (`from lm.model.gpt import GPT`).
"""
