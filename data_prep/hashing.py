"""SplitMix64 (Steele et al.), the one 64-bit mixer of the project: dedup's word and shingle hashes and the
training sample order (lm/data.py) both use it, so both must stay bit-identical across versions."""
from __future__ import annotations

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer of each element: spreads structured inputs over all 64 bits.

    uint64 array arithmetic wraps modulo 2^64 (numpy checks overflow only on scalars).
    """
    x = x.astype(np.uint64, copy=False)
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 output for state x: the finalizer of x + golden-ratio gamma."""
    return mix64(x.astype(np.uint64, copy=False) + _GAMMA)
