"""Log-likelihood of token windows: the one model-facing piece of evaluation.

A `Request` is a window of at most block_size + 1 tokens whose last `n_score` tokens are scored, each given
every token before it in the window. Perplexity cuts a document into overlapping windows (`rolling`);
a multiple-choice ending is one window, its context left-truncated to fit (`continuation`). `score` runs any
list of them in batches (longest first, right-padded) and, under torchrun, sharded over ranks: every rank
runs the same number of forwards (FSDP gathers weights collectively; an idle rank scores a dummy token)
and the per-request results are summed across ranks, so every rank returns all of them.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Request:
    tokens: list[int]  # input tokens[:-1], targets tokens[1:]
    n_score: int  # the last n_score targets count


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: spaces ending the context move to the continuation, the whole text is
    encoded once and the continuation is what follows the context's tokens (so a merge across the boundary
    does not change how the continuation is tokenized)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context) if context else []
    return ctx, whole[len(ctx):]


def continuation(prefix: int, context: list[int], cont: list[int], block_size: int) -> Request:
    """Score `cont` after `context`, both after the document start `prefix` (EOS: every training document
    follows one); the front is cut so the window fits the model (left truncation)."""
    tokens = ([prefix] + context + cont)[-(block_size + 1):]
    return Request(tokens, min(len(cont), len(tokens) - 1))


def rolling(prefix: int, ids: list[int], block_size: int, stride: int) -> list[Request]:
    """Windows that score every token of a document exactly once, the first after `prefix`. Window ends
    advance by `stride`; each window is full (block_size inputs, where the document is that long) and scores
    only its tokens not scored before, so each has at least block_size - stride tokens of context (stride =
    block_size: disjoint windows, the fastest and least context)."""
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride {stride} must be in [1, block_size = {block_size}]")
    seq, n = [prefix] + list(ids), len(ids)
    out, done, end = [], 0, min(block_size, n)
    while done < n:
        begin = max(0, end - block_size)
        out.append(Request(seq[begin:end + 1], end - done))
        done, end = end, min(end + stride, n)
    return out


def default_stride(block_size: int) -> int:
    return max(1, block_size // 2)


@torch.no_grad()
def score(model, requests: list[Request], batch_size: int, device, *, world=None,
          autocast=contextlib.nullcontext) -> torch.Tensor:
    """(len(requests), 3) float64 on the CPU: each request's summed log-probability of its scored tokens
    (nats), how many were scored, and 1.0 when each of them is the model's argmax (greedy) choice."""
    out = torch.zeros(len(requests), 3, dtype=torch.float64, device=device)
    rank, size = (world.rank, world.size) if world is not None and world.distributed else (0, 1)
    order = sorted((i for i, r in enumerate(requests) if r.n_score > 0), key=lambda i: -len(requests[i].tokens))
    for i, r in enumerate(requests):
        if r.n_score <= 0:
            out[i, 2] = 1.0  # nothing to score: log 1, trivially greedy
    mine = order[rank::size]  # strided: every rank gets long and short windows alike
    forwards = math.ceil(math.ceil(len(order) / size) / batch_size)
    was_training = model.training
    model.eval()
    for f in range(forwards):
        batch = mine[f * batch_size:(f + 1) * batch_size]
        rows = [requests[i].tokens[:-1] for i in batch] or [[0]]  # an idle rank: one dummy token
        width = max(len(r) for r in rows)
        x = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
        with autocast():
            logits = model(x)[0]
        for row, i in enumerate(batch):
            req = requests[i]
            end = len(req.tokens) - 1
            logp = logits[row, end - req.n_score:end].float().log_softmax(-1)
            target = torch.tensor(req.tokens[-req.n_score:], dtype=torch.long, device=device)
            out[i, 0] = logp.gather(-1, target[:, None]).sum()  # tensor writes: no device sync per row
            out[i, 1] = req.n_score
            out[i, 2] = (logp.argmax(-1) == target).all()
    model.train(was_training)
    if size > 1:
        for i, r in enumerate(requests):  # the trivial rows were set on every rank: count them once
            if r.n_score <= 0 and rank:
                out[i, 2] = 0.0
        dist.all_reduce(out)
    return out.cpu()
