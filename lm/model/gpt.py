"""A GPT in plain PyTorch, readable top to bottom: attention, MLP, Block, GPT.

GPT-2's block by default: token + learned position embeddings, pre-LayerNorm blocks, causal self-attention,
GELU MLP, dropout on embeddings / attention / residuals, a final LayerNorm, and an output head tied to the
token embedding. The modern options are config keys: RMSNorm, rotary positions (lm/model/position.py), SwiGLU,
ReLU squared, grouped-query attention (n_kv_head), query/key norm, no biases, zero-initialized projections. The attention and norm kernels come from
lm.model.attention (model.attention, model.layernorm); the KV cache that `forward` fills during generation is
lm/model/kv_cache.py.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lm.model.attention import ATTENTION, is_norm, make_norm
from lm.config.schema import ModelConfig, head_size, mlp_hidden_size
from lm.model.loss import linear_cross_entropy
from lm.model.position import apply_rope, document_positions, document_segments, rope_tables

from lm.model.kv_cache import KVCache, LayerCache


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.n_kv_head = cfg.n_kv_head or cfg.n_head  # fewer: each key/value head serves a group of queries
        self.head_dim = head_size(cfg)
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * self.n_kv_head) * self.head_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            # RMSNorms whatever model.norm is, as in OLMo 2 and Qwen 3
            self.q_norm = make_norm(cfg, self.head_dim, kind="rmsnorm")
            self.k_norm = make_norm(cfg, self.head_dim, kind="rmsnorm")
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attend = ATTENTION[cfg.attention]

    def forward(self, x, rope=None, cache: LayerCache | None = None, mask=None, segments=None):
        B, T, _ = x.shape
        inner, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([inner, kv, kv], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # this layer's slots (a LayerCache)
        y = self.attend(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0, mask=mask,
                        segments=segments)
        y = y.transpose(1, 2).contiguous().view(B, T, inner)
        return self.resid_dropout(self.c_proj(y))


class ReLU2(nn.Module):
    def forward(self, x):
        return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        # model.mlp = "relu2": ReLU squared (modded-nanogpt), the same weights as GELU's MLP
        approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.gelu = ReLU2() if cfg.mlp == "relu2" else nn.GELU(approximate=approximate)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class SwiGLU(nn.Module):
    """Llama's MLP: silu(x W_gate) * (x W_up), projected back."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden_size(cfg)
        self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)

    def forward(self, x, rope=None, cache: LayerCache | None = None, mask=None, segments=None):
        x = x + self.attn(self.ln_1(x), rope, cache, mask, segments)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int = 0):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be resolved (>= 1) before building the model")
        self.cfg = cfg
        layers = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd))
        if cfg.position == "learned":
            layers["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **layers,
            drop=nn.Dropout(cfg.dropout),
            # with model.share_layers = K, layer i runs block i // K: n_layer / K sets of weights
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer // cfg.share_layers)),
            ln_f=make_norm(cfg),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # one matrix reads and writes tokens (GPT-2); Llama 3 8B has two
            self.lm_head.weight = self.transformer.wte.weight
        self.checkpointed: set[int] = set()  # blocks that recompute activations in backward (lm.training.parallel)
        # the EOS id that ends each packed document (model.document_eos, set by training with document masks)
        self.document_eos: int | None = cfg.document_eos if cfg.document_eos >= 0 else None
        self.init_weights(seed)

    def initial_value(self, name: str, seed: int) -> torch.Tensor:
        """The full initial tensor of parameter `name`, drawn from a generator seeded by (seed, name), so
        a model sharded over any number of ranks starts exactly like a single-process one.
        N(0, 0.02) for weights; projections into the residual stream get 0.02 / sqrt(2 * n_layer) so the
        stream's variance does not grow with depth (GPT-2), or 0 with model.zero_init (as does an untied
        head); norm gains 1; biases 0."""
        shape = self.get_parameter(name).shape
        if name.endswith(".bias"):
            return torch.zeros(shape)
        if is_norm(self.get_submodule(name.rsplit(".", 1)[0])):
            return torch.ones(shape)
        if self.cfg.zero_init and (name.endswith("c_proj.weight") or name == "lm_head.weight"):
            return torch.zeros(shape)  # (a tied head is the embedding and never named here)
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
        if non_embedding:
            n -= sum(self.transformer[name].weight.numel() for name in ("wte", "wpe") if name in self.transformer)
        return n

    def forward(self, idx, targets=None, cache: KVCache | None = None, lengths=None):
        """(logits, loss): logits for every position and, with targets, the mean cross-entropy (targets of
        -100 are ignored). With targets and model.loss_chunk > 0 the loss is computed chunk by chunk
        without the whole logits (lm/model/loss.py) and the logits returned are None. With `document_eos` set
        (data.document_mask), each packed document attends only to itself and its positions start at 0.
        With `lengths` (sequence classification, lm/model/classifier.py: each row's real tokens, right-padded), the
        logits are `cls_head`'s, one row of class logits per sequence, and the loss is None."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.block_size = {self.cfg.block_size}")
        segments, mask = None, None
        if cache is not None:
            pos, mask = cache.positions(T, idx.device), cache.attention_mask(T, idx.device)
        elif self.document_eos is not None:
            segments = document_segments(idx, self.document_eos)
            pos = document_positions(segments)
        else:
            pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx)
        rope = None
        if self.cfg.position == "rope":
            rope = rope_tables(pos, head_size(self.cfg), self.cfg.rope_theta)
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for i in range(self.cfg.n_layer):
            block = self.transformer.h[i // self.cfg.share_layers]
            if i in self.checkpointed and cache is None and torch.is_grad_enabled():
                # RNG state is preserved for dropout
                x = checkpoint(block, x, rope, None, None, segments, use_reentrant=False)
            else:
                x = block(x, rope, None if cache is None else cache.layer(i), mask, segments)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if lengths is not None:  # inside forward, so FSDP gathers the head's weights like the others'
            return self.cls_head(x, lengths), None
        if targets is None:
            return self.lm_head(x), None
        if self.cfg.loss_chunk and type(self.lm_head) is nn.Linear:  # (not a quantized head: lm.quantize)
            # the head and the loss chunk by chunk of tokens: the whole fp32 logits never exist (lm/model/loss.py)
            loss = linear_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                        self.cfg.loss_chunk)
            return None, loss
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
