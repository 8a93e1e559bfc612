"""Scoring: IoU, bootstrap confidence intervals, AUROC, and the two evaluation protocols.

Both protocols produce :class:`WordRecord` s: one attribute word of one image, its ground-truth
mask, and every head's map of the word (``[heads, h, w]`` at latent size). Any head set's map is
then a weighted mean over the first axis, so DAAM, top-k, bottom-k, random-k and soft are
scored on exactly the same captured attention.

- Generation protocol (DAAM's COCO-Gen style): generate from a caption; the analyzer finds the
  generated objects; a colour word's truth is the union of objects of that colour, a shape
  word's the union of objects of that shape, a size word's the union of objects of that size.
  A word with no such object is recorded as missing (``gt is None``), never silently dropped.
- Real-image protocol: a rendered scene (exact masks) is encoded, noised to ``strength`` of the
  schedule and denoised with its caption (img2img) while tracing; the truth of a word is the exact
  mask of the object it describes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .aggregate import DAAM_TAU, normalize, per_head_maps
from .capture import trace
from .heads import HeadId


@dataclass
class WordRecord:
    image: int
    caption: str
    word: str
    occurrence: int
    kind: str
    obj: int
    gt: np.ndarray | None          # (H, W) bool at image size; None = object missing
    maps: np.ndarray               # [heads, h, w] float16, per-head maps at latent size
    n_objects: int = 1
    bound: bool | None = None      # generation protocol: intended (colour, shape) object drawn?


# ------------------------------------------------------------------------------ metrics

def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = (pred | gt).sum()
    return float((pred & gt).sum() / union) if union else 1.0


def bootstrap_ci(values: Sequence[float], n: int = 2000, seed: int = 0, alpha: float = 0.05,
                 stat=np.mean) -> tuple[float, float, float]:
    """(statistic, low, high): percentile bootstrap over items (``scipy.stats.bootstrap``)."""
    from scipy.stats import bootstrap
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1 or np.all(v == v[0]):
        return float(stat(v)), float(stat(v)), float(stat(v))
    res = bootstrap((v,), stat, n_resamples=n, confidence_level=1 - alpha, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=False)
    return float(stat(v)), float(res.confidence_interval.low), float(res.confidence_interval.high)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); NaN without both classes."""
    from sklearn.metrics import roc_auc_score
    y = np.asarray(labels, bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, float)))


def auroc_ci(scores, labels, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(AUROC, low, high): stratified percentile bootstrap (positives and negatives resampled
    apart, so every resample has both classes)."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    a = auroc(s, y)
    if np.isnan(a):
        return a, float("nan"), float("nan")
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n):
        i = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        boots.append(auroc(s[i], y[i]))
    return a, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def roc(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) of the ROC curve (``sklearn.metrics.roc_curve``)."""
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(np.asarray(labels, bool), np.asarray(scores, float))
    return fpr, tpr


def combine(maps: np.ndarray, idx: Sequence[int], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Weighted mean of per-head maps over a head subset: the aggregate of that head set."""
    m = torch.as_tensor(np.asarray(maps[np.asarray(idx)], dtype=np.float32))
    w = torch.ones(len(idx)) if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    return (m * w.view(-1, 1, 1)).sum(0) / w.sum()


def record_iou(rec: WordRecord, idx, weights=None, tau: float = DAAM_TAU) -> float:
    m = normalize(combine(rec.maps, idx, weights), rec.gt.shape)
    return iou((m >= tau).numpy(), rec.gt)


# ---------------------------------------------------------------------------- protocols

def _records_for(hm, caption: str, words, image_idx: int, heads: list[HeadId], n_objects: int) -> list[WordRecord]:
    """WordRecords of one traced image; ``words``: (word, occurrence, kind, obj, truth, bound) tuples."""
    out = []
    for word, occurrence, kind, obj, gt, bound in words:
        pos = hm.token_positions(word, occurrence)
        maps = per_head_maps(hm, pos, heads).numpy().astype(np.float16)
        out.append(WordRecord(image_idx, caption, word, occurrence, kind, obj, gt, maps, n_objects, bound))
    return out


def generation_protocol(pipe, scenes, heads: list[HeadId], *, steps: int, guidance: float, seed: int,
                        batch_size: int = 16, progress: bool = True):
    """Generate each scene's caption, trace it, and score words against the analyzer's masks.

    Returns:
        (records, images): word records and the (N, H, W, 3) uint8 images.
    """
    from .progress import bar
    from .shapes.analyzer import analyze
    records, images = [], []
    gen = torch.Generator("cpu").manual_seed(seed)
    for b in bar(range(0, len(scenes), batch_size), desc="generate+trace", disable=not progress):
        batch = scenes[b:b + batch_size]
        with trace(pipe) as tc:
            out = pipe([s.caption for s in batch], num_inference_steps=steps, guidance_scale=guidance,
                       generator=gen, output_type="np").images
        for j, (scene, hm, img) in enumerate(zip(batch, tc, out)):
            img = (img * 255).round().astype(np.uint8)
            det = analyze(img)
            i = b + j

            words = []
            for w in scene.words:
                o = scene.objects[w.obj]
                hits = [d.mask for d in det if getattr(d, w.kind) == getattr(o, w.kind)]
                bound = any(d.color == o.color and d.shape == o.shape for d in det)
                words.append((w.word, w.occurrence, w.kind, w.obj, np.any(hits, axis=0) if hits else None, bound))
            records += _records_for(hm, scene.caption, words, i, heads, len(scene.objects))
            images.append(img)
    return records, np.stack(images)


def img2img(pipe):
    """The image-to-image pipeline sharing ``pipe``'s components (SD 1.x/2.x, SDXL, ShapesWorld)."""
    from .models import quiet
    with quiet():  # importing the auto pipelines also imports every pipeline's image processors
        from diffusers import AutoPipelineForImage2Image
        i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    return i2i


def real_image_protocol(pipe, items, heads: list[HeadId], *, strength: float, steps: int,
                        guidance: float, seed: int, batch_size: int = 16, progress: bool = True):
    """Noise each item's image to ``strength`` of the schedule and denoise it with its caption
    while tracing (DAAM's and the paper's real-image setting); score every word against its mask.

    Args:
        items: ``saam.datasets.Item`` s: ShapesWorld renders (``shapesworld_items``) or a COCO-format
            dataset (``read_coco``), at the model's native resolution.
    Returns:
        (records, images): word records and the (N, H, W, 3) uint8 input images.
    """
    from PIL import Image
    from .progress import bar
    i2i = img2img(pipe)
    records, images = [], []
    gen = torch.Generator("cpu").manual_seed(seed)
    for b in bar(range(0, len(items), batch_size), desc=f"img2img@{strength}", disable=not progress):
        batch = items[b:b + batch_size]
        with trace(i2i) as tc:
            i2i([it.caption for it in batch], image=[Image.fromarray(it.image) for it in batch],
                strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                generator=gen, output_type="latent")
        for j, (it, hm) in enumerate(zip(batch, tc)):
            words = [(w.word, w.occurrence, w.kind, w.obj, w.mask, None) for w in it.words]
            records += _records_for(hm, it.caption, words, b + j, heads, it.n_objects)
            images.append(it.image)
    return records, np.stack(images)


def binding_score(color_map: torch.Tensor, own_shape: torch.Tensor, other_shapes: list[torch.Tensor]) -> float:
    """How much more a colour word's map overlaps its own shape word's map than any other's.

    Cosine similarity of min-max normalised maps; a positive score says the colour sits on the
    object it was written for.
    """
    def cos(a, b):
        a, b = normalize(a).flatten(), normalize(b).flatten()
        return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-12))
    own = cos(color_map, own_shape)
    return own - max(cos(color_map, o) for o in other_shapes)
