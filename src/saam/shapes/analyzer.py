"""The analyzer: reads the objects of any ShapesWorld image, rendered or generated.

It stands in for the human annotators of DAAM's COCO-Gen. Each pixel takes the nearest palette
colour (or background; pixels far from every palette colour are left out), connected regions of
one colour become objects, and each object's shape is the template (rendered by the world's own
renderer at the size and position that match the region's area and centroid) with the highest
IoU. Size is read from the fitted radius. Its accuracy is measured in ``analyzer_accuracy`` on
rendered scenes degraded like generated ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage

from .world import BACKGROUND, COLORS, IMAGE_SIZE, SHAPES, SIZES, inside

_PALETTE = np.array([BACKGROUND] + list(COLORS.values()), dtype=np.float32)
_NAMES = ["background"] + list(COLORS)


@dataclass
class Detected:
    color: str
    shape: str
    size: str
    mask: np.ndarray  # (H, W) bool
    radius: float
    shape_iou: float  # how well the best template fits (low: a malformed object)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@lru_cache(maxsize=None)
def _template_stats() -> dict[str, tuple[float, float, float]]:
    """Per shape: area / r^2 and the centroid's offset from the centre in radii."""
    n = 801
    c = (torch.arange(n, dtype=torch.float32) - n // 2) / 200.0  # r = 200 pixels
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    out = {}
    for i, s in enumerate(SHAPES):
        m = inside(torch.full_like(xx, i, dtype=torch.long), xx, yy).float()
        area = m.sum() / 200.0 ** 2
        out[s] = (float(area), float((m * xx).sum() / m.sum()), float((m * yy).sum() / m.sum()))
    return out


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: tuple[int, int]) -> np.ndarray:
    ys = torch.arange(size[0], dtype=torch.float32) + 0.5
    xs = torch.arange(size[1], dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    idx = torch.full_like(xx, SHAPES.index(shape), dtype=torch.long)
    return inside(idx, (xx - cx) / r, (yy - cy) / r).numpy()


def classify_pixels(img: np.ndarray, max_dist: float = 90.0) -> np.ndarray:
    """(H, W) palette index per pixel: 0 background, 1.. colours, -1 unclear."""
    d = np.linalg.norm(img[..., None, :].astype(np.float32) - _PALETTE, axis=-1)
    lab = d.argmin(-1)
    lab[d.min(-1) > max_dist] = -1
    return lab


def _refine(img: np.ndarray, core: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Grow a region over its blurred rim: a pixel joins if it is at least half-way from the
    background towards the object's colour (the renderer's pixel-centre rule, seen through blur)."""
    ring = ndimage.binary_dilation(core, iterations=2) & ~core
    bg = _PALETTE[0]
    v = color - bg
    alpha = ((img.astype(np.float32) - bg) @ v) / float(v @ v)
    return core | (ring & (alpha >= 0.5))


def analyze(img: np.ndarray, min_pixels: int = 8) -> list[Detected]:
    """Objects in an (H, W, 3) uint8 image, largest first."""
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8) if img.max() <= 1.0 else img.astype(np.uint8)
    size = img.shape[:2]
    scale = size[0] / IMAGE_SIZE
    lab = classify_pixels(img)
    stats = _template_stats()
    found = []
    for ci in range(1, len(_NAMES)):
        # opening drops the 1-pixel rims that blur paints in an in-between colour around another
        # object (yellow's rim reads orange); the refinement then regrows the true rim
        core = ndimage.binary_opening(lab == ci, structure=np.ones((3, 3), bool))
        comp, n = ndimage.label(_refine(img, core, _PALETTE[ci]))
        for k in range(1, n + 1):
            m = comp == k
            area = int(m.sum())
            if area < min_pixels * scale ** 2:
                continue
            ys, xs = np.nonzero(m)
            gx, gy = xs.mean() + 0.5, ys.mean() + 0.5
            best = (-1.0, None, 0.0)
            for s, (a, ox, oy) in stats.items():
                r = float(np.sqrt(area / a))
                t = _shape_mask(s, gx - ox * r, gy - oy * r, r, size)
                iou = float((t & m).sum() / (t | m).sum())
                if iou > best[0]:
                    best = (iou, s, r)
            iou, s, r = best
            cut = (SIZES["small"] + SIZES["large"]) / 2 * scale
            found.append(Detected(_NAMES[ci], s, "large" if r >= cut else "small", m, r, iou))
    return sorted(found, key=lambda d: -d.area)


def degrade(img: np.ndarray, rng: np.random.Generator, blur: float = 0.7, noise: float = 6.0,
            hue_jitter: float = 12.0) -> np.ndarray:
    """Blur, per-image colour shift and pixel noise, comparable to the model's generations."""
    x = ndimage.gaussian_filter(img.astype(np.float32), sigma=(blur, blur, 0))
    x = x + rng.normal(0, hue_jitter, size=3) + rng.normal(0, noise, size=x.shape)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def analyzer_accuracy(n: int = 400, seed: int = 0) -> dict:
    """Score the analyzer on degraded rendered scenes with known truth.

    Each true object is matched to the detected object with the highest mask IoU. Targets (the
    ShapesWorld issue): attribute accuracy >= 0.98, mean mask IoU >= 0.95.
    """
    from .world import render, sample_scene
    rng = np.random.default_rng(seed)
    hits = {"color": 0, "shape": 0, "size": 0}
    ious, count_ok, n_obj = [], 0, 0
    for i in range(n):
        scene = sample_scene(seed + 3_000_000 + i, split="test")
        img, masks = render(scene)
        det = analyze(degrade(img, rng))
        count_ok += len(det) == len(scene.objects)
        for o, m in zip(scene.objects, masks):
            n_obj += 1
            scores = [float((d.mask & m).sum() / (d.mask | m).sum()) for d in det]
            if not scores:
                ious.append(0.0)
                continue
            d = det[int(np.argmax(scores))]
            ious.append(max(scores))
            for a in hits:
                hits[a] += getattr(d, a) == getattr(o, a)
    out = {f"{a}_accuracy": v / n_obj for a, v in hits.items()}
    out.update(attribute_accuracy=sum(hits.values()) / (3 * n_obj), mean_mask_iou=float(np.mean(ious)),
               count_accuracy=count_ok / n, n_scenes=n, n_objects=n_obj)
    return out


FIDELITY_TARGETS = dict(single_color_accuracy=0.90, single_shape_accuracy=0.80, two_object_binding=0.50)


def fidelity(pipe, groups: dict, steps: int, guidance: float, seed: int,
             cache: tuple[str, dict] | None = None) -> dict:
    """Score a model's images of scene captions with the analyzer.

    Args:
        groups: name -> scenes; one-object groups score colour and shape accuracy, multi-object
            groups score binding (every object drawn with its colour *and* shape). Each group
            is generated in batches of 32, image i from its own generator (``runs.item_seed(seed, i)``).
        cache: cache each batch's outcomes under this (name, key) (``saam.runs.run_batches``).
    Returns:
        ``<name>_color_accuracy``, ``<name>_shape_accuracy`` or ``two_object_binding`` (for a
        group named "two"; ``<name>_binding`` otherwise), ``<name>_count_accuracy``, ``n_<name>``.
    """
    from ..runs import run_batches

    def batch(scenes, gens, start):
        imgs = pipe([s.caption for s in scenes], num_inference_steps=steps, guidance_scale=guidance,
                    generator=gens, output_type="np").images
        rows = []
        for s, im in zip(scenes, imgs):
            det = analyze((im * 255).round().astype(np.uint8))
            d = det[0] if det else None
            rows.append([len(det) == len(s.objects), bool(d and d.color == s.objects[0].color),
                         bool(d and d.shape == s.objects[0].shape),
                         all(any(d.color == o.color and d.shape == o.shape for d in det) for o in s.objects)])
        return np.array(rows, bool)  # per scene: count, colour, shape, binding right
    out = {}
    for name, scenes in groups.items():
        ok = np.concatenate(run_batches(scenes, 32, seed, batch, cache=cache, desc=f"fidelity {name}"))
        n = len(scenes)
        if max(len(s.objects) for s in scenes) == 1:
            out[f"{name}_color_accuracy"], out[f"{name}_shape_accuracy"] = ok[:, 1].sum() / n, ok[:, 2].sum() / n
        else:
            out["two_object_binding" if name == "two" else f"{name}_binding"] = ok[:, 3].sum() / n
        out[f"{name}_count_accuracy"], out[f"n_{name}"] = ok[:, 0].sum() / n, n
    out.update(steps=steps, guidance=guidance,
               targets=dict(FIDELITY_TARGETS))
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in out.items()}
