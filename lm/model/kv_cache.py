"""The KV cache generation fills (lm/model/generate.py) and the model's attention reads (lm/model/gpt.py):
per layer, the keys and values of every position seen so far, in preallocated slots."""
from __future__ import annotations

import torch

from lm.config.schema import ModelConfig, head_size


class KVCache:
    """Preallocated keys and values for every layer, filled as tokens are generated. Rows of a batch may
    be left-padded (`pad[b]` slots): padding is never attended to and positions start after it."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype, pad=None):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head or cfg.n_head, max_len, head_size(cfg))
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # slots filled so far
        self.max_len = max_len
        self.pad = pad if pad is not None and bool(pad.any()) else None

    def positions(self, T: int, device):
        pos = torch.arange(self.length, self.length + T, device=device)
        return pos if self.pad is None else (pos[None, :] - self.pad[:, None]).clamp(min=0)

    def attention_mask(self, T: int, device):
        """None without padding; else (B, 1, T, S) bool: causal, padding hidden (a padded query sees itself
        so its softmax stays finite; its output is never used)."""
        if self.pad is None:
            return None
        S = self.length + T
        query = torch.arange(self.length, S, device=device)[:, None]
        key = torch.arange(S, device=device)[None, :]
        visible = (key <= query) & (key >= self.pad[:, None, None])
        return (visible | (key == query))[:, None]

    def layer(self, index: int) -> "LayerCache":
        return LayerCache(self, index)

    def update(self, layer: int, k, v):
        """Store this step's k, v for `layer`; return all keys and values so far."""
        start, end = self.length, self.length + k.size(-2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class LayerCache:
    """One layer's slots of a KVCache, handed to the block that runs as that layer: with shared weights
    (model.share_layers) one block runs as several layers, each with its own keys and values."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def update(self, k, v):
        return self.cache.update(self.index, k, v)
