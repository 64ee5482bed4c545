"""Where each token sits: rotary embeddings (model.position = "rope") and documents inside a packed
sequence (data.document_mask).

RoPE rotates each head's query and key pairs by an angle proportional to the position, so their dot product
depends only on the distance between the two positions. Pairs are (i, i + D/2), the "rotate half" layout of
Llama's Hugging Face port, so exported weights need no permutation.
"""
from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) in fp32 for `positions` (T,) or (B, T), shaped to broadcast over (B, H, T, head_dim)."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    angles = positions.float()[..., None] * inv_freq  # (..., T, D/2)
    angles = torch.cat([angles, angles], dim=-1)
    if positions.dim() == 2:  # one row of positions per sequence: (B, 1, T, D)
        angles = angles[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated; the tables are cast to x's dtype as Llama does."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def document_segments(idx: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) int32 document index of each token: an EOS closes its document, so it belongs to the one it
    ends and the next token starts a new one."""
    ends = (idx == eos_id).to(torch.int32)
    return (torch.cumsum(ends, dim=1, dtype=torch.int32) - ends).contiguous()


def document_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token inside its document (0 at each document's first token)."""
    T = segments.size(1)
    index = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first
