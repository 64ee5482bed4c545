"""Layer freezing in phases: from a given step, the embeddings (with the tied head) and the first K blocks
stop training. A frozen parameter has requires_grad False, so its grad stays None and AdamW neither
updates it nor creates state for it; a later phase unfreezes it without a restart."""
from __future__ import annotations

import torch

from lm.config.checks import parse_freeze


class Freezing:
    def __init__(self, entries: list[str]):
        self.phases = parse_freeze(entries)  # (start step, frozen blocks), steps increasing
        self.applied: int | None = None  # blocks frozen by the last apply: the per-step call is then free

    def frozen_blocks(self, step: int) -> int:
        """Blocks frozen during `step` (before the first phase: none)."""
        k = 0
        for start, blocks in self.phases:
            if start <= step:
                k = blocks
        return k

    def frozen_throughout(self, step: int) -> int:
        """Blocks frozen in every step before `step`: only the others can have optimizer state in a
        checkpoint of that step, so a restore must not create state for them either."""
        return min(self.frozen_blocks(s) for s in {0, *(start for start, _ in self.phases if start < step)})

    def apply(self, model: torch.nn.Module, blocks: int) -> bool:
        """Freeze the embeddings and the first `blocks` blocks; everything else trains. Returns whether
        anything changed (the caller's list of trainable parameters is then stale)."""
        if blocks == self.applied:
            return False
        self.applied = blocks
        for p in model.parameters():
            p.requires_grad_(True)
        if blocks == 0:
            return True
        embeddings = [model.transformer[name] for name in ("wte", "wpe") if name in model.transformer]
        frozen = [*embeddings, *model.transformer.h[:blocks]]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        return True
