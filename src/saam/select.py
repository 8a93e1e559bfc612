"""Head sets for aggregation: top-k, bottom-k, random-k and relevance-weighted ("soft").

Pure functions over a relevance row (one value per head); no model needed. ``k`` is a count
(int) or a fraction of the eligible heads (float in (0, 1]). Ties are broken by head order, so
results are deterministic.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .heads import HeadId, block_of

# every aggregation method: key (used in code) -> label (used in tables and figures), defined once
METHODS = {"daam": "DAAM (all heads)", "top": "top-k (selective)", "bottom": "bottom-k",
           "random": "random-k", "soft": "soft (relevance-weighted)"}


def eligible(heads: Sequence[HeadId], include_mid: bool = True) -> np.ndarray:
    """Boolean mask of heads allowed in a set (mid-block heads optional, as DAAM drops them)."""
    return np.array([include_mid or block_of(h.layer) != "mid" for h in heads], dtype=bool)


def resolve_k(k: int | float, n: int) -> int:
    """A head count from ``k``: an int is a count, a float a fraction of ``n`` (rounded, >= 1)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, float, np.integer, np.floating)):
        raise TypeError(f"k must be a head count (int) or a fraction of heads (float in (0, 1]), got {k!r} "
                        f"({type(k).__name__})")
    if isinstance(k, (float, np.floating)):
        if not 0 < k <= 1:
            raise ValueError(f"a fractional k must be in (0, 1], got {k}")
        return max(1, int(round(k * n)))
    if not 1 <= int(k) <= n:
        raise ValueError(f"k={k} heads requested but only {n} are eligible")
    return int(k)


def _ranked(relevance: np.ndarray, mask: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(mask)
    return idx[np.argsort(-relevance[idx], kind="stable")]


def top_k(relevance: Sequence[float], k: int | float, mask: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k most relevant eligible heads, most relevant first."""
    r = np.asarray(relevance, dtype=np.float64)
    mask = np.ones(len(r), bool) if mask is None else np.asarray(mask, bool)
    return _ranked(r, mask)[: resolve_k(k, int(mask.sum()))]


def bottom_k(relevance: Sequence[float], k: int | float, mask: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k least relevant eligible heads, least relevant first."""
    r = np.asarray(relevance, dtype=np.float64)
    mask = np.ones(len(r), bool) if mask is None else np.asarray(mask, bool)
    return _ranked(-r, mask)[: resolve_k(k, int(mask.sum()))]


def random_k(n_heads: int, k: int | float, seed: int, mask: np.ndarray | None = None) -> np.ndarray:
    """k eligible heads drawn uniformly without replacement (seeded)."""
    mask = np.ones(n_heads, bool) if mask is None else np.asarray(mask, bool)
    idx = np.flatnonzero(mask)
    return np.sort(np.random.default_rng(seed).choice(idx, resolve_k(k, len(idx)), replace=False))


def soft_weights(relevance: Sequence[float], mask: np.ndarray | None = None,
                 power: float = 1.0) -> np.ndarray:
    """Every eligible head weighted by its relevance (clamped at 0) to a power; sums to 1."""
    r = np.clip(np.asarray(relevance, dtype=np.float64), 0, None) ** power
    if mask is not None:
        r = r * np.asarray(mask, bool)
    if r.sum() <= 0:
        raise ValueError("no eligible head has positive relevance")
    return r / r.sum()


def head_set(method: str, heads: Sequence[HeadId], relevance: Sequence[float] | None = None,
             k: int | float = 0.25, include_mid: bool = False, seed: int = 0):
    """(heads, weights) for an aggregation method: 'all' (DAAM), 'top', 'bottom', 'random', 'soft'."""
    mask = eligible(heads, include_mid)
    heads = list(heads)
    if relevance is not None and len(relevance) != len(heads):
        raise ValueError(f"a relevance row of {len(relevance)} values for {len(heads)} heads: the row must come "
                         "from a Relevance over the same heads (Relevance.row on this UNet's heads)")
    if method == "all":
        return [h for h, m in zip(heads, mask) if m], None
    if method == "random":
        return [heads[i] for i in random_k(len(heads), k, seed, mask)], None
    if relevance is None:
        raise ValueError(f"method {method!r} needs a relevance row")
    if method == "top":
        return [heads[i] for i in top_k(relevance, k, mask)], None
    if method == "bottom":
        return [heads[i] for i in bottom_k(relevance, k, mask)], None
    if method == "soft":
        w = soft_weights(relevance, mask)
        keep = np.flatnonzero(w > 0)
        return [heads[i] for i in keep], w[keep]
    raise ValueError(f"unknown method {method!r}; use all, top, bottom, random or soft")
