"""Keeping a run alive: skip steps whose loss or gradient is not finite (or whose loss spikes), scale fp16
losses dynamically, and say when too many bad steps in a row call for a rollback to the last checkpoint.

Its state travels in checkpoints (under the keys of checkpoint.json below), so a resumed run skips and
scales exactly like the uninterrupted one.
"""
from __future__ import annotations

import math
from collections import deque

from lm.config.schema import StabilityConfig

GROW_AFTER = 1000  # fp16: good steps in a row before a larger loss scale is probed
MIN_SCALE, MAX_SCALE = 1.0, 2.0 ** 24  # fp16's loss scale stays in this range


class Stability:
    def __init__(self, cfg: StabilityConfig, fp16: bool):
        self.cfg = cfg
        self.fp16 = fp16
        self.loss_scale = cfg.loss_scale if fp16 else 1.0
        self.good_since_scale = 0
        self.recent_losses: deque[float] = deque(maxlen=cfg.spike_window)
        self.skipped = 0  # steps that never reached the weights, over the whole run
        self.bad_in_a_row = 0  # non-finite steps since the last good one (fp16 overflows not counted)
        self.overflow_at_floor = False  # the last bad step overflowed fp16 at the smallest loss scale
        self.rollbacks = 0

    def verdict(self, loss: float, grad_norm: float) -> str | None:
        """None for a good step; else why it must be skipped: "overflow" (fp16: a finite loss whose scaled
        gradient overflowed), "nonfinite" or "spike"."""
        if not math.isfinite(loss):
            return "nonfinite"
        if not math.isfinite(grad_norm):
            return "overflow" if self.fp16 else "nonfinite"
        return "spike" if self._is_spike(loss) else None

    def record(self, reason: str | None, loss: float):
        """Account for a step after its verdict. An fp16 overflow halves the loss scale and is not a bad
        step (the scale, not the model, was wrong) until the scale is at its floor; GROW_AFTER good steps
        in a row double it again, whatever it fell to."""
        if reason is None:
            self.recent_losses.append(loss)
            self.bad_in_a_row = 0
            if self.fp16:
                self.good_since_scale += 1
                if self.good_since_scale >= GROW_AFTER:
                    self.loss_scale, self.good_since_scale = min(MAX_SCALE, self.loss_scale * 2), 0
            return
        self.skipped += 1
        if reason == "spike":
            return
        if reason == "overflow":
            self.good_since_scale = 0
            if self.loss_scale > MIN_SCALE:
                self.loss_scale = max(MIN_SCALE, self.loss_scale / 2)
                return
            self.overflow_at_floor = True
        else:
            self.overflow_at_floor = False
        self.bad_in_a_row += 1

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
                "good_since_scale": self.good_since_scale, "recent_losses": list(self.recent_losses)}

    def load_state_dict(self, state: dict):
        self.skipped, self.rollbacks = state["skipped_steps"], state["rollbacks"]
        self.loss_scale = state["loss_scale"]
        self.recent_losses.clear()
        self.recent_losses.extend(state["recent_losses"])
        self.good_since_scale = state.get("good_since_scale", 0)  # absent in checkpoints before round 3
        self.bad_in_a_row, self.overflow_at_floor = 0, False

    def why_unrecoverable(self) -> str:
        """What to change when bad steps cannot be rolled back."""
        if self.overflow_at_floor:
            return ("float16 gradients overflow even at loss scale 1; use train.dtype = \"bfloat16\" or "
                    "\"float32\", or lower optim.lr")
        return "lower optim.lr (or set optim.grad_clip), or check the data"
