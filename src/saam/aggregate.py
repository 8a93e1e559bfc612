"""One aggregation for every method: a weighted mean of per-head word maps.

DAAM is ``aggregate`` over all down- and up-block heads with equal weights; selective
aggregation is the same call over the heads most relevant to the word's concept. Keeping them
one function is what makes the comparison fair.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .capture import HeadMaps, upsample
from .heads import HeadId, block_of, head_ids

DAAM_TAU = 0.4


def daam_heads(layer_heads: dict[str, int], include_mid: bool = False) -> list[HeadId]:
    """DAAM's head set: every head of the down and up blocks (mid block only if asked)."""
    return [h for h in head_ids(layer_heads) if include_mid or block_of(h.layer) != "mid"]


def aggregate(hm: HeadMaps, tokens: Sequence[int], heads: Sequence[HeadId],
              weights: Sequence[float] | torch.Tensor | None = None,
              size: tuple[int, int] | None = None) -> torch.Tensor:
    """Weighted mean over ``heads`` of each head's map for the given token positions.

    Each head's map is the mean over ``tokens`` (sub-words of one word), upsampled bicubically
    to ``size`` (default: the latent size) and clamped at 0, then averaged with ``weights``
    (default: equal).

    Returns:
        [h, w] float32 map (not normalised).
    """
    if len(heads) == 0:
        raise ValueError("empty head set")
    w = torch.ones(len(heads)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (len(heads),):
        raise ValueError(f"{len(heads)} heads but weights of shape {tuple(w.shape)}")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    maps = per_head_maps(hm, tokens, heads, size)
    return (maps * w.view(-1, 1, 1)).sum(0) / w.sum()


def per_head_maps(hm: HeadMaps, tokens: Sequence[int], heads: Sequence[HeadId],
                  size: tuple[int, int] | None = None) -> torch.Tensor:
    """Each head's map of the given tokens: mean over tokens and steps, upsampled, clamped.

    Returns:
        [len(heads), h, w]; a weighted mean over its first axis is :func:`aggregate`.
    """
    size = tuple(size or hm.latent_size)
    tok = torch.as_tensor(list(tokens), dtype=torch.long)
    out = torch.zeros(len(heads), *size)
    by_layer: dict[str, list[int]] = {}
    for i, h in enumerate(heads):
        by_layer.setdefault(h.layer, []).append(i)
    for layer, idx in by_layer.items():
        if layer not in hm.maps:
            raise KeyError(f"layer {layer!r} was not recorded")
        m = hm.maps[layer][[heads[i].head for i in idx]][:, tok].mean(1) / max(hm.steps, 1)
        out[idx] = upsample(m, size)
    return out


def normalize(m: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Upsample (bicubic) to ``size`` and min-max normalise to [0, 1]."""
    if size is not None and tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m[None, None].float(), size=size, mode="bicubic", align_corners=False)[0, 0]
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def threshold(m: torch.Tensor, tau: float = DAAM_TAU) -> torch.Tensor:
    """Binary mask of a normalised map (DAAM: tau = 0.4)."""
    return m >= tau


def word_mask(hm: HeadMaps, word: str, heads: Sequence[HeadId] | None = None, weights=None,
              tau: float = DAAM_TAU, occurrence: int = 0, include_mid: bool = False) -> torch.Tensor:
    """The word's mask at image size: aggregate, upsample, normalise, threshold."""
    m = hm.word_map(word, heads=heads, weights=weights, occurrence=occurrence, include_mid=include_mid)
    return threshold(normalize(m, hm.image_size), tau)
