"""Keeping a run alive: skip steps whose loss or gradient is not finite (or whose loss spikes), scale fp16
losses dynamically, and say when too many bad steps in a row call for a rollback to the last checkpoint.

Its state travels in checkpoints (under the keys of checkpoint.json below), so a resumed run skips and
scales exactly like the uninterrupted one.
"""
from __future__ import annotations

import math
from collections import deque

from lm.config import StabilityConfig

GROW_AFTER = 1000  # fp16: good steps in a row before a larger loss scale is probed


class Stability:
    def __init__(self, cfg: StabilityConfig, fp16: bool):
        self.cfg = cfg
        self.loss_scale = cfg.loss_scale if fp16 else 1.0
        self.good_since_scale = 0
        self.recent_losses: deque[float] = deque(maxlen=cfg.spike_window)
        self.skipped = 0  # steps that never reached the weights, over the whole run
        self.bad_in_a_row = 0  # non-finite steps since the last good one
        self.rollbacks = 0

    def verdict(self, loss: float, grad_norm: float) -> str | None:
        """None for a good step; else why it must be skipped: "nonfinite" or "spike"."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "nonfinite"
        return "spike" if self._is_spike(loss) else None

    def record(self, reason: str | None, loss: float):
        """Account for a step after its verdict."""
        if reason is None:
            self.recent_losses.append(loss)
            self.bad_in_a_row = 0
            if self.loss_scale != 1.0:
                self.good_since_scale += 1
                if self.good_since_scale >= GROW_AFTER:
                    self.loss_scale, self.good_since_scale = self.loss_scale * 2, 0
            return
        self.skipped += 1
        if reason == "nonfinite":
            self.bad_in_a_row += 1
            if self.loss_scale != 1.0:  # fp16 overflow: halve the scale and start counting again
                self.loss_scale, self.good_since_scale = max(1.0, self.loss_scale / 2), 0

    @property
    def must_roll_back(self) -> bool:
        return self.cfg.rollback_after > 0 and self.bad_in_a_row >= self.cfg.rollback_after

    def _is_spike(self, loss: float) -> bool:
        z, window = self.cfg.spike_zscore, self.recent_losses
        if z <= 0 or len(window) < window.maxlen:
            return False
        mean = sum(window) / len(window)
        std = math.sqrt(sum((v - mean) ** 2 for v in window) / (len(window) - 1))
        return std > 0 and (loss - mean) / std > z

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped, "rollbacks": self.rollbacks, "loss_scale": self.loss_scale,
                "recent_losses": list(self.recent_losses)}

    def load_state_dict(self, state: dict):
        self.skipped, self.rollbacks = state["skipped_steps"], state["rollbacks"]
        self.loss_scale = state["loss_scale"]
        self.recent_losses.clear()
        self.recent_losses.extend(state["recent_losses"])
        self.bad_in_a_row, self.good_since_scale = 0, 0
