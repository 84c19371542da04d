"""Deterministic weighted interleave of datasets, computable for any window of the (infinite) sample
stream.

Sample k of dataset d gets the key (k + 0.5) / w_d (w normalised to sum 1); the stream is every
(key, d) in increasing order, ties to the lower d. This is the Sainte-Lague divisor sequence: after
n samples dataset d has contributed n * w_d samples up to about one, at every n. Unlike Megatron's
greedy loop (helpers.cpp), the samples at positions [start, stop) follow from a closed form, so a
resumed run computes only the window it needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            f"mixture weights must be finite, non-negative and not all zero, got {list(weights)}"
        )
    return w / w.sum()


def _keys_below(w: np.ndarray, bound: float) -> np.ndarray:
    """Per dataset, how many of its keys (k + 0.5) / w lie below `bound`, using the same float
    expression."""
    with np.errstate(divide="ignore"):
        count = np.maximum(np.ceil(bound * w - 0.5), 0).astype(np.int64)
        for _ in range(2):  # the closed form may be off by one where float rounding decides a tie
            count -= (count > 0) & ((count - 1 + 0.5) / w >= bound)
            count += (count + 0.5) / w < bound
    return np.where(w > 0, count, 0)


def blend(weights: Sequence[float], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index, sample index within that dataset) for global samples [start, stop)."""
    w = normalize_weights(weights)
    if not 0 <= start <= stop:
        raise ValueError(f"bad sample window [{start}, {stop})")
    n = len(w)
    # Keys grow by about one sample per unit, so every key below `low` comes before `start`, and the
    # keys in [low, high) include the whole window.
    low = float(max(0, start - n - 1))
    high = float(stop + n + 1)
    first = _keys_below(w, low)
    base = int(first.sum())
    active = np.flatnonzero(w > 0)
    extra = np.ceil((high - low) * w[active]).astype(np.int64) + 2
    ds = np.repeat(active, extra)
    ks = np.concatenate([np.arange(first[d], first[d] + e) for d, e in zip(active, extra)])
    keys = (ks + 0.5) / w[ds]
    order = np.lexsort((ds, keys))[start - base : stop - base]
    return ds[order], ks[order]
