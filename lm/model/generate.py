"""Autoregressive sampling with a KV cache: batched prompts of different lengths (left-padded),
temperature, top-k, top-p (nucleus), repetition penalty, EOS and caller-defined stops, and a choice at the
context limit: stop, or slide the window (rebuilding the cache over its last three quarters; a batch slides
together, when its longest row fills the context)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from lm.model.gpt import GPT
from lm.model.kv_cache import KVCache

# What each sampling setting must be, checked by generate() and by sample.py's flags alike. Each rule says
# what is allowed, so NaN (false in every comparison) fails it.
SAMPLING_RULES = {
    "max_new_tokens": (lambda v: v >= 0, ">= 0"),
    "temperature": (lambda v: 0 <= v < math.inf, ">= 0 and finite (0 is greedy)"),
    "top_k": (lambda v: v >= 0, ">= 0 (0 keeps every token)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 keeps every token)"),
    "repetition_penalty": (lambda v: 0 < v < math.inf, "> 0 and finite (1 is no penalty)"),
}


def check_sampling(label: Callable[[str], str] = str, **settings):
    """Raise ValueError naming the first setting outside SAMPLING_RULES; `label` turns a setting's name
    into what the caller calls it (a command-line flag)."""
    for name, value in settings.items():
        ok, must = SAMPLING_RULES[name]
        if not ok(value):
            raise ValueError(f"{label(name)} {value}: must be {must}")


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


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: tokens already in the sequence get their logit divided by `penalty`
    (multiplied when negative), so they are less likely either way."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _document_starts(tokens: torch.Tensor, pad: torch.Tensor, eos: int) -> torch.Tensor:
    """Per row, where the document of its last token starts: after the last EOS before it (an EOS belongs to
    the document it ends), or at the row's padding."""
    T = tokens.size(1)
    ends = (tokens[:, :-1] == eos) & (torch.arange(T - 1, device=tokens.device) >= pad[:, None])
    after = torch.where(ends, torch.arange(1, T, device=tokens.device), torch.zeros_like(tokens[:, :-1]))
    return torch.maximum(pad, after.max(dim=1).values if T > 1 else pad)


def _prefill(model: GPT, tokens: torch.Tensor, pad: torch.Tensor, dtype):
    """The cache over `tokens` and each row's next-token logits. A model trained with document masks sees
    what it saw in training: each row's last document alone (the earlier ones are hidden like padding, and
    positions restart), and after a closing EOS the next token starts a document of its own."""
    eos = model.document_eos
    if eos is not None:
        pad = _document_starts(tokens, pad, eos)
    cache = KVCache(model.cfg, tokens.size(0), model.cfg.block_size, tokens.device, dtype, pad=pad)
    logits, _ = model(tokens, cache=cache)
    if eos is not None:
        cache.pad = torch.where(tokens[:, -1] == eos, cache.length, pad)
    return cache, logits[:, -1, :]


@torch.no_grad()
def heal_prompt(ids: list[int], token_texts: list[str]) -> tuple[list[int], list[int] | None, str]:
    """Token healing. A prompt that ends inside what the data writes as one token ("def " ends in the token
    " ", but the data has "def" + " foo") leaves the model after a token it rarely saw there, and the text
    derails. Back up by the last token and let the first new token be any whose text starts with it.
    Returns (prompt ids, the allowed first tokens or None when nothing was backed up, the removed text).
    `token_texts[i]` is token i decoded alone."""
    if len(ids) < 2:
        return ids, None, ""
    tail = token_texts[ids[-1]]
    allowed = [i for i, text in enumerate(token_texts) if text.startswith(tail)] if tail else []
    if len(allowed) < 2:  # nothing longer starts with it: the prompt already ends where a token ends
        return ids, None, ""
    return ids[:-1], allowed, tail


def _restrict(logits: torch.Tensor, allowed: list[list[int] | None]) -> torch.Tensor:
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for row, ids in enumerate(allowed):
        if ids is None:
            keep[row] = True
        else:
            keep[row, ids] = True
    return logits.masked_fill(~keep, float("-inf"))


def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, eos_id: int | None = None,
             stop: Callable[[int, list[int]], bool] | None = None, at_limit: str = "slide",
             generator: torch.Generator | None = None,
             on_token: Callable[[int, int], None] | None = None,
             on_limit: Callable[[int], None] | None = None,
             first_allowed: list[list[int] | None] | None = None) -> list[list[int]]:
    """New tokens for each prompt (token ids), each ending at EOS (included), when `stop(row, new_tokens)`
    says so, or after max_new_tokens. temperature 0 is greedy. `on_token(row, token)` streams them.
    `first_allowed[row]` (see heal_prompt) restricts that row's first new token to those ids.
    With at_limit="stop", `on_limit(row)` is called for each row that the context limit cut short (not yet
    at EOS, a stop or max_new_tokens)."""
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   repetition_penalty=repetition_penalty)
    if at_limit not in ("stop", "slide"):
        raise ValueError(f"at_limit must be 'stop' or 'slide', got {at_limit!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the EOS id to start a document)")
    model.eval()
    param = next(model.parameters())
    device, block = param.device, model.cfg.block_size
    longest = max(len(p) for p in prompts)
    if longest > block and at_limit == "stop":
        raise ValueError(f"a prompt of {longest} tokens does not fit the context of {block} tokens")
    prompts = [p[-block:] for p in prompts]
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    B, V = len(prompts), model.cfg.vocab_size
    seen = torch.zeros(B, V, dtype=torch.bool, device=device)
    if repetition_penalty != 1.0:
        for row, p in enumerate(prompts):
            seen[row, p] = True
    cache, last = _prefill(model, tokens, pad, param.dtype)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        logits = last.float()
        if step == 0 and first_allowed is not None:
            logits = _restrict(logits, first_allowed)
        if repetition_penalty != 1.0:
            logits = penalize_repeats(logits, seen, repetition_penalty)
        if temperature == 0:
            nxt = logits.argmax(dim=-1)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        seen[torch.arange(B, device=device), nxt] = True
        for row, token in enumerate(nxt.tolist()):
            if done[row]:
                continue
            out[row].append(token)
            if on_token is not None:
                on_token(row, token)
            done[row] = token == eos_id or (stop is not None and stop(row, out[row]))
        if all(done):
            break
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if cache.length < block:
            last = model(nxt[:, None], cache=cache)[0][:, -1, :]
            if model.document_eos is not None:  # a generated EOS closes its document: the next starts afresh
                cache.pad = torch.where(nxt == model.document_eos, cache.length, cache.pad)
        elif at_limit == "stop":
            if on_limit is not None and step + 1 < max_new_tokens:
                for row in range(B):
                    if not done[row]:
                        on_limit(row)
            break
        else:  # slide: keep the newest 3/4 of the window, so the rebuild is paid once per block/4 tokens
            keep = max(1, 3 * block // 4)
            pad = (pad - (tokens.size(1) - keep)).clamp(min=0)
            tokens = tokens[:, -keep:]
            cache, last = _prefill(model, tokens, pad, param.dtype)
    return out
