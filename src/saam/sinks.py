"""Where each head's cross-attention goes: start token, words, end token, padding.

HRV scores a head by the attention it gives concept words in a pseudo-context that holds the
start token and the words, and nothing else. Whether that ranks heads the way they behave on a
real prompt depends on where the model puts the attention it does not give to words (its
*sink*): on SD the start token takes most of it, and the pseudo-context carries that token; a
model that sinks into padding sees its idle attention spread over the concept words instead.
This module measures that budget per head, separately on object and background pixels.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .headmaps import HeadMaps
from .heads import HeadId, block_of
from .words import CLASSES, classes_of, segment_classes


def token_classes(hm: HeadMaps) -> dict[str, list[int]]:
    """Token positions of the prompt by class: the start token, the prompt's words, the end token
    (CLIP's first end-of-text, BERT's [SEP], T5's </s>) and the padding after it; on an MM-DiT, each
    text encoder's segment so (``words.segment_classes``)."""
    if hm.tokens is not None:
        raise ValueError("the attention budget needs every token's map: trace without words=...")
    if hm.token_ids is None or hm.tokenizer is None:
        raise ValueError("token classes need the prompt's token ids (trace a pipeline call with a prompt)")
    if hm.segments:
        return segment_classes(hm.prompt, hm.segments)
    n = next(iter(hm.maps.values())).shape[1]
    tok = hm.tokenizer  # CLIP's and BERT's ids open with a start token; T5's (PixArt) with the first word
    opens = hm.token_ids[0] in {getattr(tok, a, None) for a in ("bos_token_id", "cls_token_id")} - {None}
    return classes_of(list(hm.token_ids), tok, n, start=opens)


def attention_budget(hm: HeadMaps, object_mask: np.ndarray | None = None) -> pd.DataFrame:
    """Share of each head's attention on each token class, on object and on background pixels.

    Args:
        hm: one traced image.
        object_mask: (H, W) bool at image size, True on the objects the prompt names; None when
            no masks are known (one region, "all").
    Returns:
        One row per (head, region) with columns head, layer, block, region and one share per
        class in :data:`CLASSES` (shares of a row sum to 1; NaN where the region is empty); on an
        MM-DiT one more, ``image``: the share its joint softmax gives the image's own tokens.
    """
    cls = token_classes(hm)
    known = object_mask is not None
    obj = torch.as_tensor(np.asarray(object_mask if known else np.ones(hm.image_size), dtype=np.float32))[None, None]
    rows = []
    for layer, m in hm.maps.items():  # m: [heads, tokens, h, w], each pixel sums to steps
        frac = F.adaptive_avg_pool2d(obj, m.shape[-2:])[0, 0]  # object share of each cell
        per_class = torch.stack([m[:, idx].sum(1) if idx else torch.zeros_like(m[:, 0])
                                 for idx in cls.values()], 1)  # [heads, classes, h, w]
        for region, w in ((("object", frac), ("background", 1 - frac)) if known else (("all", frac),)):
            tot = w.sum()
            share = (per_class * w).sum((-1, -2)) / (tot * hm.steps) if tot > 0 else torch.full(per_class.shape[:2], float("nan"))
            for h in range(m.shape[0]):
                row = dict(head=str(HeadId(layer, h)), layer=layer, block=block_of(layer), region=region,
                           **dict(zip(CLASSES, share[h].tolist())))
                if hm.segments is not None:  # an MM-DiT's joint softmax: what the text does not take, the image does
                    row["image"] = 1.0 - float(share[h].sum())
                rows.append(row)
    return pd.DataFrame(rows)


def budget_summary(budget: pd.DataFrame) -> pd.DataFrame:
    """Mean share per region and class over heads (and images): the model's sink at a glance."""
    return budget.groupby("region", sort=False)[classes(budget)].mean()


def classes(budget: pd.DataFrame) -> list[str]:
    """The token classes a budget table has: :data:`CLASSES`, and ``image`` for an MM-DiT."""
    return list(CLASSES) + (["image"] if "image" in budget else [])
