"""One aggregation for every method: a weighted mean of per-head word maps, then one mask.

The path from captured attention to a word's mask has three steps, each defined once here:

1. :func:`per_head_maps`: each head's map of the word (mean over its tokens and the steps),
   upsampled bicubically to the latent size and clamped at 0 (:func:`upsample`): ``[heads, h, w]``;
2. :func:`mean_map`: a weighted mean over the first axis (DAAM: every eligible head, equal
   weights; selective: the heads ``select.head_set`` picks);
3. :func:`to_mask`: upsampled to image size, min-max normalised, thresholded at tau (DAAM: 0.4).

The paper's tables run the same three steps on cached ``[heads, h, w]`` stacks
(``evaluate.WordRecord.maps``), so a README snippet and a table cell cannot disagree.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .headmaps import HeadMaps
from .heads import HeadId
from .select import eligible, head_set

DAAM_TAU = 0.4


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling of [..., h, w] maps to ``size``, clamped at 0 (DAAM's convention)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.clamp_min(0)
    lead = x.shape[:-2]
    y = F.interpolate(x.reshape(-1, 1, *x.shape[-2:]).float(), size=size, mode="bicubic",
                      align_corners=False)
    return y.reshape(*lead, *size).clamp_min(0)


def daam_heads(hm: HeadMaps) -> list[HeadId]:
    """DAAM's head set for a trace (``select.head_set("daam")``): every head of every hooked layer,
    where DAAM hooks no mid block and no layer at 1/8 of the latent resolution."""
    heads = hm.heads()
    return head_set("daam", heads, mask=eligible(heads, factors=hm.layer_factors)).heads


def per_head_maps(hm: HeadMaps, tokens: Sequence[int], heads: Sequence[HeadId],
                  size: tuple[int, int] | None = None, space: str = "attention") -> torch.Tensor:
    """Each head's map of the given tokens: mean over tokens and steps, upsampled, clamped.

    ``space``: ``attention`` (the attention probabilities, ``HeadMaps.maps``) or, on an MM-DiT,
    ``output`` (each head's own output-space softmax over the word tokens, ``HeadMaps.head_outputs``:
    the head-wise ConceptAttention maps, which head sets aggregate as they do attention maps).

    Returns:
        [len(heads), h, w] at ``size`` (default: the latent size).
    """
    source = {"attention": hm.maps, "output": hm.head_outputs}[space]
    if source is None:
        raise ValueError("head-wise output-space maps come from an MM-DiT trace; this trace has none")
    size = tuple(size or hm.latent_size)
    tok = torch.as_tensor(hm.columns(tokens), dtype=torch.long)
    out = torch.zeros(len(heads), *size)
    by_layer: dict[str, list[int]] = {}
    for i, h in enumerate(heads):
        by_layer.setdefault(h.layer, []).append(i)
    for layer, idx in by_layer.items():
        if layer not in source:
            raise KeyError(f"layer {layer!r} was not recorded")
        m = source[layer][[heads[i].head for i in idx]][:, tok].float().mean(1) / max(hm.steps, 1)
        out[idx] = upsample(m, size)
    return out


def mean_map(maps: torch.Tensor | np.ndarray, weights: Sequence[float] | np.ndarray | torch.Tensor | None = None
             ) -> torch.Tensor:
    """The weighted mean over the first axis of ``[heads, h, w]`` maps (default: equal weights):
    ``mean_maps`` with one row of weights.

    Returns:
        [h, w] float32 (not normalised).
    """
    m = torch.as_tensor(np.asarray(maps, dtype=np.float32) if isinstance(maps, np.ndarray) else maps).float()
    if m.ndim != 3 or len(m) == 0:
        raise ValueError("empty head set" if m.ndim == 3 else f"maps must be [heads, h, w], got {tuple(m.shape)}")
    w = torch.ones(len(m)) if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    if w.shape != (len(m),):
        raise ValueError(f"{len(m)} heads but weights of shape {tuple(w.shape)}")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    return mean_maps(m, w[None])[0]


def mean_maps(maps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Many weighted means of the same ``[heads, h, w]`` maps at once, one per row of ``weights``
    [sets, heads] (a head set: its weights, 0 elsewhere): [sets, h, w], each formed exactly as a
    single one is (the tables score every method of a word in one call): summed in float64, so the
    float32 result does not depend on how many zero-weight heads a row carries."""
    w = weights.double()
    return ((w[:, :, None, None] * maps.double()[None]).sum(1) / w.sum(1)[:, None, None]).float()


def aggregate(hm: HeadMaps, tokens: Sequence[int], heads: Sequence[HeadId],
              weights: Sequence[float] | torch.Tensor | None = None,
              size: tuple[int, int] | None = None) -> torch.Tensor:
    """``mean_map(per_head_maps(hm, tokens, heads, size), weights)``: the [h, w] aggregate."""
    return mean_map(per_head_maps(hm, tokens, heads, size), weights)  # raises on an empty head set


def normalize(m: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Upsample [..., h, w] maps bicubically to ``size`` and min-max normalise each to [0, 1]
    (a constant map becomes 0)."""
    m = torch.as_tensor(m).float()
    if size is not None and tuple(m.shape[-2:]) != tuple(size):
        lead = m.shape[:-2]
        m = F.interpolate(m.reshape(-1, 1, *m.shape[-2:]), size=tuple(size), mode="bicubic",
                          align_corners=False).reshape(*lead, *size)
    lo, hi = m.amin((-2, -1), keepdim=True), m.amax((-2, -1), keepdim=True)
    return torch.where(hi > lo, (m - lo) / torch.where(hi > lo, hi - lo, 1.0), torch.zeros_like(m))


def to_mask(m: torch.Tensor, size: tuple[int, int], tau: float | Sequence[float] = DAAM_TAU) -> torch.Tensor:
    """The one map-to-mask step, for the README's snippet and every table: upsample [..., h, w] maps
    to ``size``, min-max normalise, threshold at ``tau`` (DAAM: 0.4). With a sequence of thresholds
    the masks of each are stacked first: [len(tau), ..., *size]."""
    m = normalize(m, size)
    if isinstance(tau, (int, float)):
        return m >= tau
    return torch.stack([m >= t for t in tau])


def word_map(hm: HeadMaps, word: str, heads: Sequence[HeadId] | None = None, weights=None,
             occurrence: int | str = 0) -> torch.Tensor:
    """The word's aggregated map at latent size [h, w]: :func:`aggregate` over ``heads`` (default
    DAAM's, :func:`daam_heads`) of the word's tokens. ``occurrence``: which occurrence of a
    repeated word (default the first), or ``"all"`` to merge them as DAAM does."""
    return aggregate(hm, hm.token_positions(word, occurrence), daam_heads(hm) if heads is None else heads, weights)


def concept_layers(layers: Sequence[str]) -> list[str]:
    """ConceptAttention's blocks among an MM-DiT's traced layers: the last max(1, n // 2) of its n
    joint (double-stream) blocks (FLUX.1's 19: blocks 10-18, the blocks its code averages; the MM-DiT
    organism's 6: blocks 3-5); single-stream blocks never. In the order given."""
    joint = [l for l in layers if l.startswith("transformer_blocks.")]
    later = set(sorted(joint, key=lambda l: int(l.split(".")[1]))[len(joint) - max(1, len(joint) // 2):])
    return [l for l in joint if l in later]


def output_block_maps(hm: HeadMaps, word: str, occurrence: int | str = 0) -> dict[str, torch.Tensor]:
    """Each traced joint layer's ConceptAttention map of a word, at latent size: its share of each
    pixel's output-space softmax over the prompt's word tokens (``HeadMaps.outputs``), averaged over
    the word's tokens and the steps, upsampled as :func:`per_head_maps` upsamples. {layer: [h, w]}."""
    if not hm.outputs:
        raise ValueError("output-space maps come from an MM-DiT trace (SD3, FLUX, Qwen-Image); this trace has none")
    cols = hm.columns(hm.token_positions(word, occurrence))
    maps = torch.stack([m[cols].float().mean(0) for m in hm.outputs.values()]) / max(hm.steps, 1)
    return dict(zip(hm.outputs, upsample(maps, tuple(hm.latent_size))))


def output_map(hm: HeadMaps, word: str, occurrence: int | str = 0, layers: Sequence[str] | None = None) -> torch.Tensor:
    """ConceptAttention's map of a word on an MM-DiT, at latent size [h, w]: the mean of
    :func:`output_block_maps` over its blocks (``layers``; default :func:`concept_layers`, the later
    half of the joint blocks, as its code takes them). Not a head set: every head's output enters
    the products (its construction, with the prompt's words as its concepts)."""
    maps = output_block_maps(hm, word, occurrence)
    layers = concept_layers(list(maps)) if layers is None else list(layers)
    if not layers:
        raise ValueError("no joint blocks to average: ConceptAttention reads the double-stream blocks")
    return torch.stack([maps[l] for l in layers]).mean(0)


def word_mask(hm: HeadMaps, word: str, heads: Sequence[HeadId] | None = None, weights=None,
              tau: float = DAAM_TAU, occurrence: int | str = 0) -> torch.Tensor:
    """The word's mask at image size (DAAM's heads when ``heads`` is None): ``to_mask(word_map(...))``."""
    return to_mask(word_map(hm, word, heads, weights, occurrence), hm.image_size, tau)
