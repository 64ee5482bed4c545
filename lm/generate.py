"""Autoregressive sampling with a KV cache: temperature, top-k and top-p (nucleus) filtering."""
from __future__ import annotations

import torch

from lm.model import GPT, KVCache


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the smallest set whose probability >= top_p."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked strictly higher
        drop_sorted = mass_before >= top_p  # the set is complete once the higher-ranked mass reaches p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(model: GPT, prompt: list[int], max_new_tokens: int, *, num_samples: int = 1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """`num_samples` continuations of `prompt` (token ids), each stopping after EOS or max_new_tokens.
    temperature 0 is greedy. Past the context length the window slides (the cache is rebuilt)."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    block = model.cfg.block_size
    tokens = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    cache = KVCache(model.cfg, num_samples, block, device, dtype)
    logits, _ = model(tokens[:, -block:], cache=cache)
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    out = [[] for _ in range(num_samples)]
    for _ in range(max_new_tokens):
        last = logits[:, -1, :].float()
        if temperature == 0:
            nxt = last.argmax(dim=-1, keepdim=True)
        else:
            probs = filter_logits(last / temperature, top_k, top_p).softmax(dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        for i, t in enumerate(nxt[:, 0].tolist()):
            if not done[i]:
                out[i].append(t)
        if eos_id is not None:
            done |= nxt[:, 0] == eos_id
            if bool(done.all()):
                break
        tokens = torch.cat([tokens, nxt], dim=1)
        if cache.length < block:
            logits, _ = model(nxt, cache=cache)
        else:  # context full: slide the window and rebuild the cache
            cache.length = 0
            logits, _ = model(tokens[:, -block:], cache=cache)
    return out
