"""A GPT in plain PyTorch, readable top to bottom: attention, MLP, Block, GPT.

Token + learned position embeddings, pre-LayerNorm blocks, causal self-attention, GELU MLP, dropout on
embeddings / attention / residuals, a final LayerNorm, and an output head tied to the token embedding.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lm.config import ModelConfig


def sdpa_attention(q, k, v, *, causal: bool, dropout_p: float, mask=None):
    """(B, H, T, D) queries against (B, H, S, D) keys/values; with causal and S > T the queries are the
    last T positions (a KV cache prefix sits before them). `mask` (bool, True = attend), when given,
    already holds the causal structure (batched generation with padding)."""
    T, S = q.size(-2), k.size(-2)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if not causal or T == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def triton_attention(q, k, v, *, causal: bool, dropout_p: float, mask=None):
    """Our fused flash-attention kernel (kernels/); generation with a KV cache or padding uses SDPA."""
    if q.size(-2) != k.size(-2) or mask is not None:
        return sdpa_attention(q, k, v, causal=causal, dropout_p=dropout_p, mask=mask)
    from kernels.flash_attention import flash_attention  # Triton is imported only when selected

    return flash_attention(q, k, v, causal=causal, dropout_p=dropout_p)


# The attention interface: name -> fn(q, k, v, *, causal, dropout_p, mask=None), chosen by model.attention.
ATTENTION = {"sdpa": sdpa_attention, "triton": triton_attention}


def make_layernorm(cfg: ModelConfig) -> nn.Module:
    """nn.LayerNorm, or our fused Triton LayerNorm (same parameter names, so checkpoints interchange)."""
    if cfg.layernorm == "triton":
        from kernels.layer_norm import TritonLayerNorm

        return TritonLayerNorm(cfg.n_embd, bias=cfg.bias)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


class KVCache:
    """Preallocated keys and values for every layer, filled as tokens are generated. Rows of a batch may
    be left-padded (`pad[b]` slots): padding is never attended to and positions start after it."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype, pad=None):
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
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

    def update(self, layer: int, k, v):
        """Store this step's k, v for `layer`; return all keys and values so far."""
        start, end = self.length, self.length + k.size(-2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attend = ATTENTION[cfg.attention]

    def forward(self, x, cache: KVCache | None = None, mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = self.attend(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0, mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh" if cfg.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = make_layernorm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = make_layernorm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cache: KVCache | None = None, mask=None):
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be resolved (>= 1) before building the model")
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=make_layernorm(cfg),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix reads and writes tokens
        self.checkpointed: set[int] = set()  # blocks that recompute activations in backward (lm.parallel)
        self.init_weights(seed)

    def initial_value(self, name: str, seed: int) -> torch.Tensor:
        """The full initial tensor of parameter `name`, drawn from a generator seeded by (seed, name), so
        a model sharded over any number of ranks starts exactly like a single-process one.
        N(0, 0.02) for weights; projections into the residual stream get 0.02 / sqrt(2 * n_layer) so the
        stream's variance does not grow with depth (GPT-2); LayerNorm gains 1; biases 0."""
        shape = self.get_parameter(name).shape
        if name.endswith(".bias"):
            return torch.zeros(shape)
        if ".ln_" in name or name.startswith("transformer.ln_f"):
            return torch.ones(shape)
        std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.empty(shape).normal_(0.0, std, generator=generator)

    @torch.no_grad()
    def init_weights(self, seed: int = 0):
        for name, p in self.named_parameters():  # the tied head is the embedding: initialized once
            if p.is_meta:
                continue
            value = self.initial_value(name, seed)
            if hasattr(p, "device_mesh"):  # a DTensor shard (FSDP2): keep only this rank's slice
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(value)
            else:
                p.copy_(value)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied head shares the token embedding)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() - self.transformer.wte.weight.numel() \
            if non_embedding else n

    def forward(self, idx, targets=None, cache: KVCache | None = None):
        """Logits for every position; with targets, also the mean cross-entropy loss."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.block_size = {self.cfg.block_size}")
        if cache is None:
            pos, mask = torch.arange(T, device=idx.device), None
        else:
            pos, mask = cache.positions(T, idx.device), cache.attention_mask(T, idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            if i in self.checkpointed and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)  # RNG state is preserved for dropout
            else:
                x = block(x, cache, mask)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
