"""Deterministic mixtures of several prepared sources: which source each global sample comes from.

The interleave is Megatron's `build_blending_indices`: sample n goes to the source furthest below its
target share, error_i = w_i * (n + 1) - count_i, argmax with ties to the lowest index. Every prefix then
holds each source within one sample of its share, and the order is a pure function of the global
sample index (so it does not depend on the number of ranks; resume is one counter).

With rational weights p_i / D the greedy returns to zero error after D samples, so the sequence is
periodic: one period is computed exactly with integers, and any window [first, first + count) is then
a vectorized lookup, O(count) with an O(1) seek. Weights are made rational with a bounded denominator
(`max_period`); when they need more, they are rounded to D = max_period (largest remainders), which
moves a share by at most 1 / max_period.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

from .errors import DataError

MAX_PERIOD = 1 << 20


def _rational_weights(weights: Sequence[float], max_period: int) -> list[int]:
    """Integer weights W_i with sum D <= max_period and W_i / D == w_i / sum(w) where possible."""
    if len(weights) == 0:
        raise DataError("a mixture needs at least one source")
    for i, w in enumerate(weights):
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise DataError(f"mixture weight {i} is {w!r}: weights must be positive finite numbers")
    fracs = [Fraction(w).limit_denominator(1_000_000) for w in weights]
    total = sum(fracs)
    shares = [f / total for f in fracs]
    period = math.lcm(*(s.denominator for s in shares))
    if period <= max_period:
        return [int(s * period) for s in shares]
    # Too fine: largest-remainder rounding to max_period, every source keeping at least one slot.
    exact = [s * max_period for s in shares]
    ints = [max(1, math.floor(x)) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    k = 0
    while sum(ints) < max_period:
        ints[order[k % len(order)]] += 1
        k += 1
    while sum(ints) > max_period:
        i = max(range(len(ints)), key=lambda j: (ints[j] - exact[j], -j))
        ints[i] -= 1
    return ints


def build_blending_indices(weights: Sequence[int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The greedy interleave for samples 0..size-1 with integer weights (exact arithmetic).

    Returns (source id, ordinal within that source) per sample.
    """
    n_src, total = len(weights), sum(weights)
    counts = [0] * n_src
    src = np.empty(size, dtype=np.int64)
    ordinal = np.empty(size, dtype=np.int64)
    for n in range(size):
        # error_i * total = W_i * (n + 1) - count_i * total: integers, so ties are exact.
        best, best_err = 0, None
        for i in range(n_src):
            err = weights[i] * (n + 1) - counts[i] * total
            if best_err is None or err > best_err:
                best, best_err = i, err
        src[n], ordinal[n] = best, counts[best]
        counts[best] += 1
    return src, ordinal


class Mixture:
    """`assign(first, count)`: source id and per-source ordinal of global samples first..first+count-1.

    The caller maps an ordinal to a window of that source (e.g. its own hashed order, modulo its size
    for further epochs): ordinals of each source count up 0, 1, 2, ... with no gaps or repeats.
    """

    def __init__(self, weights: Sequence[float], max_period: int = MAX_PERIOD):
        self.int_weights = _rational_weights(list(weights), max_period)
        self.period = sum(self.int_weights)
        total = float(self.period)
        self.weights = np.array([w / total for w in self.int_weights])
        self._src, self._ord = build_blending_indices(self.int_weights, self.period)
        per_period = np.bincount(self._src, minlength=len(self.int_weights))
        if per_period.tolist() != self.int_weights:  # the greedy's bounded error guarantees this
            raise AssertionError(f"mixture period is not exact: {per_period.tolist()} != {self.int_weights}")
        self._per_period = np.array(self.int_weights, dtype=np.int64)

    @property
    def num_sources(self) -> int:
        return len(self.int_weights)

    def assign(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        if first < 0 or count < 0:
            raise ValueError(f"assign({first}, {count}): first and count must be >= 0")
        n = np.arange(first, first + count, dtype=np.int64)
        cycle, r = np.divmod(n, self.period)
        src = self._src[r]
        return src, cycle * self._per_period[src] + self._ord[r]

    def counts(self, n: int) -> np.ndarray:
        """Samples each source has contributed among the first n (O(period) at most)."""
        cycle, r = divmod(n, self.period)
        return cycle * self._per_period + np.bincount(self._src[:r], minlength=self.num_sources)
