"""Head sets for aggregation: DAAM's, top-k, bottom-k, random-k and relevance-weighted ("soft").

One function, :func:`head_set`, makes every method's set; the paper's tables, the examples and
the README's snippet all go through it. Pure functions over a relevance row (one value per head);
no model needed. ``k`` is a count (int) or a fraction of the eligible heads (float in (0, 1]).
Ties are broken by head order, so results are deterministic.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from .heads import HeadId, block_of

# every aggregation method: key (used in code) -> label (used in tables and figures), defined once
METHODS = {"daam": "DAAM (its heads)", "top": "top-k (selective)", "bottom": "bottom-k",
           "random": "random-k", "soft": "soft (relevance-weighted)", "output": "ConceptAttention (output space)",
           "output_top": "head-wise ConceptAttention, top-k", "output_soft": "head-wise ConceptAttention, soft"}
# methods that are not head sets: scored from the records' own maps (MM-DiTs only; absent elsewhere)
NOT_HEAD_SETS = ("output",)
# head sets over the head-wise output-space maps (MM-DiTs only): method -> the head set it takes
OUTPUT_HEAD_SETS = {"output_top": "top", "output_soft": "soft"}
# DAAM's own head rule (daam 0.2.0): its locator never hooks the mid block, and it drops every
# layer whose maps are at 1/8 of the latent resolution
DAAM_SKIPS_FACTOR = 8


class HeadSet(NamedTuple):
    """A method's heads: ``index`` into the head list it was chosen from, the ``heads`` themselves,
    and ``weights`` (None: equal weights). ``aggregate.mean_map(maps[s.index], s.weights)`` and
    ``word_map(hm, word, heads=s.heads, weights=s.weights)`` are its map."""
    index: np.ndarray
    heads: list[HeadId]
    weights: np.ndarray | None


def eligible(heads: Sequence[HeadId], include_mid: bool = False,
             factors: dict[str, int] | None = None) -> np.ndarray:
    """Boolean mask of the heads a set may use: DAAM's rule by default.

    ``factors`` (layer -> downsampling from the latent: ``heads.layer_factors`` or
    ``HeadMaps.layer_factors``) drops the layers at 1/8 of the latent resolution (on SD 1.x the
    mid block; SDXL's and ShapesWorld's UNets have none). The mid block is dropped too, as DAAM
    never hooks it, unless ``include_mid``: then the selective methods may pick its heads, while
    ``head_set("daam")`` still leaves them out.
    """
    factors = factors or {}
    return np.array([(include_mid or block_of(h.layer) != "mid") and factors.get(h.layer) != DAAM_SKIPS_FACTOR
                     for h in heads], dtype=bool)


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


def boundary_ties(relevance: Sequence[float], index: np.ndarray, mask: np.ndarray | None = None) -> int:
    """How many eligible heads left out of a top-k or bottom-k set ``index`` have exactly the relevance
    of its last head: where > 0 the set was completed by head order, not by relevance."""
    r = np.asarray(relevance, dtype=np.float64)
    mask = np.ones(len(r), bool) if mask is None else np.asarray(mask, bool)
    out = mask.copy()
    out[np.asarray(index)] = False
    return int((r[out] == r[np.asarray(index)[-1]]).sum()) if len(index) else 0


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


def check_finite(relevance: Sequence[float], heads: Sequence[HeadId], concept: str | None = None) -> np.ndarray:
    """The relevance row as float64, or a ValueError naming the concept and the first head whose
    relevance is NaN or infinite (a ranking would drop or misplace it silently)."""
    r = np.asarray(relevance, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(r))
    if len(bad):
        h = heads[bad[0]]
        raise ValueError(f"the relevance row{f' of concept {concept!r}' if concept else ''} is {r[bad[0]]} at head "
                         f"{h}" + (f" and {len(bad) - 1} other head(s)" if len(bad) > 1 else "")
                         + ": relevance must be finite (recompute it, or check the vectors it was loaded from)")
    return r


def head_set(method: str, heads: Sequence[HeadId], relevance: Sequence[float] | None = None,
             k: int | float = 0.25, *, mask: np.ndarray | None = None, seed: int = 0,
             concept: str | None = None) -> HeadSet:
    """The heads (and weights) a method aggregates.

    Args:
        method: a key of :data:`METHODS`: ``daam`` (every eligible head outside the mid block,
            which DAAM never hooks), ``top``, ``bottom``,
            ``random`` (k eligible heads) or ``soft`` (every eligible head, weighted by relevance).
        heads: the head list ``relevance`` is a row over (``Relevance.heads``).
        relevance: one value per head (``Relevance.row(concept)``); not needed for daam and random.
        mask: eligible heads (:func:`eligible`; default all).
        seed: random-k's draw.
        concept: the relevance row's concept, named in errors (a NaN or infinite value is one).
    """
    heads = list(heads)
    mask = np.ones(len(heads), bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != (len(heads),):
        raise ValueError(f"an eligibility mask of {mask.shape} for {len(heads)} heads")
    if relevance is not None and len(relevance) != len(heads):
        raise ValueError(f"a relevance row of {len(relevance)} values for {len(heads)} heads: the row must come "
                         "from a Relevance over the same heads (Relevance.row on this UNet's heads)")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if method in NOT_HEAD_SETS:
        raise ValueError(f"{method!r} is not a head set: it is scored from the output-space maps an MM-DiT trace "
                         "records (aggregate.output_map)")
    if method in OUTPUT_HEAD_SETS:
        raise ValueError(f"{method!r} aggregates head-wise output-space maps over {OUTPUT_HEAD_SETS[method]!r}'s heads: "
                         f"ask head_set({OUTPUT_HEAD_SETS[method]!r}, ...) and average aggregate.per_head_maps(..., "
                         "space='output') over it")
    if relevance is not None:
        relevance = check_finite(relevance, heads, concept)
    weights = None
    if method == "daam":
        idx = np.flatnonzero(mask & np.array([block_of(h.layer) != "mid" for h in heads], bool))
    elif method == "random":
        idx = random_k(len(heads), k, seed, mask)
    elif relevance is None:
        raise ValueError(f"method {method!r} needs a relevance row")
    elif method == "top":
        idx = top_k(relevance, k, mask)
    elif method == "bottom":
        idx = bottom_k(relevance, k, mask)
    else:
        w = soft_weights(relevance, mask)
        idx = np.flatnonzero(w > 0)
        weights = w[idx]
    if len(idx) == 0:
        raise ValueError("no eligible head: the mask rules out every head")
    return HeadSet(idx, [heads[i] for i in idx], weights)
