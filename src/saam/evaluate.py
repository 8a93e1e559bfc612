"""Scoring: IoU, bootstrap confidence intervals, AUROC, and the two evaluation protocols.

Both protocols produce :class:`WordRecord` s: one attribute word of one image, its ground-truth
mask, and every head's map of the word (``[heads, h, w]`` at latent size). Any head set's map is
then a weighted mean over the first axis, so DAAM, top-k, bottom-k, random-k and soft are
scored on exactly the same captured attention.

- Generation protocol (DAAM's COCO-Gen style; ``steps.generation_run`` runs it): generate from a
  caption; the analyzer finds the generated objects (:func:`generated_words`); a colour word's truth is the union of objects of that colour, a shape
  word's the union of objects of that shape, a size word's the union of objects of that size.
  A word with no such object is recorded as missing (``gt is None``), never silently dropped.
- Real-image protocol: a rendered scene (exact masks) is encoded, noised to ``strength`` of the
  schedule and denoised with its caption (img2img) while tracing; the truth of a word is the exact
  mask of the object it describes.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .aggregate import DAAM_TAU, mean_maps, normalize, output_block_maps, output_map, per_head_maps, to_mask
from .capture import trace
from .heads import HeadId
from .models import guidance_arg
from .select import METHODS, NOT_HEAD_SETS, OUTPUT_HEAD_SETS, head_set
from .words import WordNotFound


@dataclass
class WordRecord:
    image: int
    caption: str
    word: str
    occurrence: int
    kind: str
    obj: int
    gt: np.ndarray | None          # (H, W) bool at image size; None = object missing
    maps: np.ndarray               # [heads, h, w] float32, per-head maps at latent size (as word_map forms them)
    n_objects: int = 1
    bound: bool | None = None      # generation protocol: intended (colour, shape) object drawn?
    output: np.ndarray | None = None  # MM-DiTs: ConceptAttention's output-space map [h, w] (aggregate.output_map)
    output_heads: np.ndarray | None = None  # MM-DiTs: each head's own output-space map [heads, h, w] (per_head_maps(space="output"))
    output_blocks: np.ndarray | None = None  # MM-DiTs: each joint layer's ConceptAttention map [layers, h, w] (output_block_maps)
    output_layers: tuple[str, ...] | None = None  # the layers of ``output_blocks``, in order


# ------------------------------------------------------------------------------ metrics

def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = (pred | gt).sum()
    return float((pred & gt).sum() / union) if union else 1.0


def bootstrap_ci(values: Sequence[float], n: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean over items (``scipy.stats.bootstrap``,
    all resamples at once)."""
    from scipy.stats import bootstrap
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1 or np.all(v == v[0]):
        return float(v.mean()), float(v.mean()), float(v.mean())
    res = bootstrap((v,), np.mean, n_resamples=n, confidence_level=1 - alpha, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True, axis=-1)
    return float(v.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve, NaN without both classes: :func:`auroc_resampled` of the items as
    they are (equal to ``sklearn.metrics.roc_auc_score``, ties counted half; tested)."""
    y = np.asarray(labels, bool)
    if y.all() or not y.any():
        return float("nan")
    return float(auroc_resampled(scores, y, np.arange(len(y))[None])[0])


def auroc_resampled(scores, labels, index: np.ndarray) -> np.ndarray:
    """AUROC of each resample (rows of ``index``, each holding both classes) at once, from the
    Mann-Whitney statistic over mid-ranks: (rank sum of the positives - n+(n+ + 1)/2) / (n+ n-)."""
    from scipy.stats import rankdata
    s, y = np.asarray(scores, float)[index], np.asarray(labels, bool)[index]
    ranks = rankdata(s, axis=1)
    pos = y.sum(1)
    neg = y.shape[1] - pos
    return ((ranks * y).sum(1) - pos * (pos + 1) / 2) / (pos * neg)


def stratified_resamples(labels, n: int = 2000, seed: int = 0) -> np.ndarray:
    """``n`` bootstrap resamples (rows of item indices) of labelled items, positives and negatives
    resampled apart, so every resample has both classes."""
    y = np.asarray(labels, bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    return np.stack([np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(n)])


def auroc_ci(scores, labels, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(AUROC, low, high): stratified percentile bootstrap (:func:`stratified_resamples`)."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    a = auroc(s, y)
    if np.isnan(a):
        return a, float("nan"), float("nan")
    boots = auroc_resampled(s, y, stratified_resamples(y, n, seed))
    return a, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def roc(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) of the ROC curve (``sklearn.metrics.roc_curve``)."""
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(np.asarray(labels, bool), np.asarray(scores, float))
    return fpr, tpr


def mask_ious(maps: torch.Tensor | np.ndarray, gt: np.ndarray, taus: Sequence[float] = (DAAM_TAU,)) -> np.ndarray:
    """IoU against ``gt`` of each map's mask (``aggregate.to_mask`` at the truth's size) at each
    threshold, for a stack of [n, h, w] maps at once: [n, len(taus)] float64."""
    m = torch.as_tensor(np.asarray(maps, dtype=np.float32) if isinstance(maps, np.ndarray) else maps)
    pred = to_mask(m, gt.shape, list(taus)).flatten(-2)  # [taus, n, H * W]
    g = torch.as_tensor(np.asarray(gt, bool)).flatten()
    # counted, not summed: a bool tensor's sum goes through int64 (3x slower on the tables' grids)
    inter = torch.count_nonzero(pred[..., g], -1)
    union = torch.count_nonzero(pred, -1) + int(g.sum()) - inter
    inter, union = inter.numpy().T, union.numpy().T
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


RANDOM_DRAWS = 20  # random head sets per word: random-k is a distribution, not one draw


def random_seed(seed: int, image: int, draw: int) -> int:
    """The seed of random-k's draw ``draw`` for the words of ``image`` (draw 0: ``seed + image``)."""
    return seed + image + 1_000_003 * draw


def score_records(recs: Sequence[WordRecord], rel, mask: np.ndarray, ks: Sequence[float], taus: Sequence[float],
                  seed: int = 0, methods: Sequence[str] = tuple(METHODS), draws: int = RANDOM_DRAWS):
    """One row per (word record, method, k, tau, draw) with the IoU of the method's mask.

    Every method's map is ``aggregate.mean_map`` of the record's per-head maps over its
    ``select.head_set`` (relevance row of the record's word kind; random-k drawn ``draws`` times,
    draw d seeded with :func:`random_seed`; the other methods have one row, draw 0), masked by
    ``aggregate.to_mask``. Words whose object is missing are kept with NaN IoU. ``method`` holds
    the method's label (``select.METHODS``); :func:`per_word` averages random-k's draws.
    ``output`` (ConceptAttention's output-space map, not a head set) is scored where the records
    carry it (MM-DiTs) and left out where they do not; so are ``output_top`` and ``output_soft``
    (head-wise ConceptAttention: the mean of the top-k heads' own output-space maps, or every head's
    weighted by relevance, over the very head sets ``top`` and ``soft`` use).
    """
    import pandas as pd
    rows = []
    n = len(rel.heads)
    known: dict[tuple, np.ndarray] = {}  # a head set depends on its method, k and kind (random-k: image and draw)

    def weights_of(m, k, d, r):
        key = (m, k, d, r.image if m == "random" else r.kind if m in ("top", "bottom", "soft") else None)
        if key not in known:
            row = rel.row(r.kind) if m in ("top", "bottom", "soft") else None
            s = head_set(m, rel.heads, row, k, mask=mask, seed=random_seed(seed, r.image, d), concept=r.kind)
            known[key] = w = np.zeros(n, np.float32)
            w[s.index] = 1.0 if s.weights is None else s.weights
        return known[key]
    for r in recs:
        sets, weights, out_weights = [], {}, {}
        for k in ks:
            for m in methods:
                if m in OUTPUT_HEAD_SETS:
                    if r.output_heads is not None:
                        base = OUTPUT_HEAD_SETS[m]
                        key = (m, None if base == "soft" else k, 0)
                        if key not in out_weights:
                            out_weights[key] = weights_of(base, k, 0, r)
                        sets.append((m, k, key))
                    continue
                if m in NOT_HEAD_SETS:
                    if r.output is not None:
                        sets.append((m, k, (m, None, 0)))
                    continue
                for d in range(draws if m == "random" else 1):
                    key = (m, None if m in ("daam", "soft") else k, d)  # DAAM and soft do not depend on k
                    if key not in weights:
                        weights[key] = weights_of(m, k, d, r)
                    sets.append((m, k, key))
        keys = list(weights)
        stack = mean_maps(torch.as_tensor(r.maps), torch.as_tensor(np.stack(list(weights.values()))))
        if r.output is not None and any(m in NOT_HEAD_SETS for m, _, _ in sets):
            keys.append(("output", None, 0))
            stack = torch.cat([stack, torch.as_tensor(r.output, dtype=stack.dtype)[None]])
        if out_weights:
            keys += list(out_weights)
            stack = torch.cat([stack, mean_maps(torch.as_tensor(r.output_heads),
                                                torch.as_tensor(np.stack(list(out_weights.values())))).to(stack.dtype)])
        scores = np.full((len(keys), len(taus)), np.nan) if r.gt is None else mask_ious(stack, r.gt, taus)
        at = {key: i for i, key in enumerate(keys)}
        for j, tau in enumerate(taus):  # tau, then k, then method: the order tables list them in
            for m, k, key in sets:
                rows.append((r.image, r.word, r.occurrence, r.kind, METHODS[m], k, tau, key[2], r.gt is None,
                             scores[at[key], j]))
    return pd.DataFrame.from_records(rows, columns=["image", "word", "occurrence", "kind", "method", "k", "tau", "draw",
                                                    "missing", "iou"])


WORD = ["image", "word", "occurrence", "kind"]  # what identifies a scored word


def per_word(df):
    """One row per (word, method, k, tau): random-k's IoU is the mean over its draws."""
    keys = [*WORD, "method", "k", "tau", "missing"]
    return df.groupby(keys, sort=False, dropna=False).iou.mean().reset_index()


def per_head_iou(recs: Sequence[WordRecord], kind: str, tau: float) -> np.ndarray:
    """Mean IoU of each single head's map over the words of one kind: which heads localise.

    A diagnostic, not a method: it looks at the ground truth, so it is an upper reference for
    what any truth-free head ranking (such as HRV relevance) could pick.
    """
    rs = [r for r in recs if r.kind == kind and r.gt is not None]
    if not rs:
        return np.full(0, np.nan)
    per = np.stack([mask_ious(r.maps, r.gt, [tau])[:, 0] for r in rs])  # [words, heads]
    return np.ascontiguousarray(per.T).mean(1)


def miou_table(df, by_kind: bool = True, seed: int = 0):
    """mIoU with bootstrap 95 % CI per method, k and tau (and per word kind) of
    :func:`score_records` rows (random-k: each word's mean over the draws, and ``draw_sd``, the
    standard deviation of the mIoU across draws); words with their object missing counted apart."""
    import pandas as pd
    out = []
    groups = ["method", "kind", "k", "tau"] if by_kind else ["method", "k", "tau"]
    spread = {key: g[~g.missing].groupby("draw").iou.mean().std(ddof=1) if g.draw.nunique() > 1 else np.nan
              for key, g in df.groupby(groups, sort=False, dropna=False)}
    for key, g in per_word(df).groupby(groups, sort=False, dropna=False):
        v = g.loc[~g.missing, "iou"].to_numpy()
        m, lo, hi = bootstrap_ci(v, seed=seed)
        out.append(dict(zip(groups, key), mIoU=m, ci_low=lo, ci_high=hi, draw_sd=spread[key], n_words=len(v),
                        n_missing=int(g.missing.sum())))
    return pd.DataFrame(out, columns=[*groups, "mIoU", "ci_low", "ci_high", "draw_sd", "n_words", "n_missing"])


# ---------------------------------------------------------------------------- protocols

def records_of(hm, caption: str, words, image_idx: int, heads: list[HeadId], n_objects: int,
                 cut: list | None = None) -> list[WordRecord]:
    """WordRecords of one traced image; ``words``: (word, occurrence, kind, obj, truth, bound) tuples.
    A word the text encoder's window cut off is skipped and appended to ``cut`` (counted, not fatal)."""
    out = []
    for word, occurrence, kind, obj, gt, bound in words:
        try:
            pos = hm.token_positions(word, occurrence)
        except WordNotFound:
            if cut is None or not hm.truncated:
                raise
            cut.append((image_idx, word))
            continue
        maps = per_head_maps(hm, pos, heads).numpy()
        space = blocks = None
        if hm.outputs:
            blocks = output_block_maps(hm, word, occurrence)
            space = output_map(hm, word, occurrence).numpy()  # ConceptAttention's blocks (aggregate.concept_layers)
        heads_space = per_head_maps(hm, pos, heads, space="output").numpy() if hm.head_outputs else None
        out.append(WordRecord(image_idx, caption, word, occurrence, kind, obj, gt, maps, n_objects, bound, space,
                              heads_space, None if blocks is None else torch.stack(list(blocks.values())).numpy(),
                              None if blocks is None else tuple(blocks)))
    return out


def generated_words(scene, image: np.ndarray) -> tuple[list[tuple], list]:
    """The generation protocol's truth for one generated image of a ShapesWorld scene: the
    analyzer's detections, and for each caption word a (word, occurrence, kind, obj, truth, bound)
    tuple for :func:`records_of` (truth: the union of detected objects with the word's attribute,
    None if there is none; bound: whether the word's object was drawn with its colour and shape)."""
    from .shapes.analyzer import analyze
    det = analyze(image)
    words = []
    for w in scene.words:
        o = scene.objects[w.obj]
        hits = [d.mask for d in det if getattr(d, w.kind) == getattr(o, w.kind)]
        bound = any(d.color == o.color and d.shape == o.shape for d in det)
        words.append((w.word, w.occurrence, w.kind, w.obj, np.any(hits, axis=0) if hits else None, bound))
    return words, det


class _Img2Img:
    """What both image-to-image stand-ins share: the pipeline a trace wraps, and the inputs of a call."""

    def __init__(self, pipe):
        self.pipe = pipe

    def inputs(self, image, strength: float, steps: int, generator):
        """(steps kept, the images as the pipeline preprocesses them, one generator per image)."""
        keep = min(steps, int(steps * strength))
        if keep < 1:
            raise ValueError(f"strength {strength} of {steps} steps leaves no denoising step")
        p = self.pipe
        x = p.image_processor.preprocess(image).to(p.vae.device, p.vae.dtype)
        return keep, x, generator if isinstance(generator, list) else [generator] * len(x)


class LatentImg2Img(_Img2Img):
    """Image-to-image for a pipeline diffusers gives none (PixArt-Sigma), as SD's img2img does it:
    the image encoded by the VAE, noised to ``strength`` of the schedule (the scheduler's own
    ``add_noise`` at the first kept timestep), and denoised by the pipeline itself from there (its
    ``latents`` argument; its scheduler's timesteps cut to the last ``int(steps * strength)``).
    ``pipe`` is the pipeline a trace wraps."""

    @torch.no_grad()
    def __call__(self, prompt, image, strength: float, num_inference_steps: int, generator,
                 guidance_scale: float | None = None, output_type: str = "latent", **kw):
        from .family import of
        p = self.pipe
        keep, x, gens = self.inputs(image, strength, num_inference_steps, generator)
        den = of(p).denoiser(p)
        z = torch.cat([p.vae.encode(x[i:i + 1]).latent_dist.sample(gens[i]) for i in range(len(x))]) * p.vae.config.scaling_factor
        noise = torch.cat([torch.randn(z[i:i + 1].shape, generator=gens[i], dtype=z.dtype) for i in range(len(x))])
        sched = p.scheduler
        sched.set_timesteps(num_inference_steps)
        t0 = sched.timesteps[num_inference_steps - keep]
        latents = sched.add_noise(z, noise.to(z.device), t0.reshape(1)).to(den.dtype)
        original = sched.set_timesteps

        def tail(n, *a, **k):  # the pipeline asks for its schedule: it gets the last `keep` steps of it
            original(n, *a, **k)
            sched.timesteps = sched.timesteps[n - keep:]
        sched.set_timesteps = tail
        try:
            return p(prompt=prompt, latents=latents, num_inference_steps=num_inference_steps, **guidance_arg(guidance_scale),
                     generator=generator, output_type=output_type, height=z.shape[-2] * p.vae_scale_factor,
                     width=z.shape[-1] * p.vae_scale_factor, **kw)
        finally:
            del sched.set_timesteps


class FlowImg2Img(_Img2Img):
    """Image-to-image for a flow-matching pipeline diffusers gives none (FLUX.2: its ``image`` is a
    reference to edit from, not a start): the image encoded as the pipeline encodes its reference
    images (``_encode_vae_image``), handed over as its ``latents``; the pipeline's own schedule (with
    the shift it picks for this image size) cut to its last ``int(steps * strength)`` steps; and at the
    first kept step the latents replaced by ``(1 - sigma) z + sigma noise``, flow matching's
    interpolation at that step's sigma, in whatever layout the pipeline packs them (the first
    denoiser call's input and the scheduler's first step both get it). ``pipe`` is what a trace wraps."""

    @torch.no_grad()
    def __call__(self, prompt, image, strength: float, num_inference_steps: int, generator,
                 guidance_scale: float | None = None, output_type: str = "latent", **kw):
        from .family import of
        p = self.pipe
        keep, x, gens = self.inputs(image, strength, num_inference_steps, generator)
        z = torch.cat([p._encode_vae_image(x[i:i + 1], gens[i]) for i in range(len(x))])
        sched, state = p.scheduler, {}
        set_timesteps, step = sched.set_timesteps, sched.step

        def tail(*a, **k):  # the pipeline's own schedule, its last `keep` steps
            set_timesteps(*a, **k)
            n = len(sched.timesteps)
            sched.timesteps, sched.sigmas = sched.timesteps[n - keep:], sched.sigmas[n - keep:]

        def noised(clean):  # once per call, in the layout the pipeline packed the clean latents in
            if "x" not in state:  # (a guided denoiser call stacks the images' rows once per branch: each branch alike)
                sigma, z = float(sched.sigmas[0]), clean[:len(gens)]
                noise = torch.cat([torch.randn(z[i:i + 1].shape, generator=gens[i], dtype=torch.float32)
                                   for i in range(len(z))]).to(z.device)
                state["x"] = ((1 - sigma) * z.float() + sigma * noise).to(z.dtype)
            return state["x"].repeat(len(clean) // len(state["x"]), *[1] * (clean.dim() - 1))

        def first_call(module, args, kwargs):
            if "stepped" not in state:
                kwargs["hidden_states"] = noised(kwargs["hidden_states"]).to(kwargs["hidden_states"].dtype)
            return args, kwargs

        def first_step(model_output, t, sample, *a, **k):
            if "stepped" not in state:
                state["stepped"], sample = True, noised(sample).to(sample.dtype)
            return step(model_output, t, sample, *a, **k)
        import inspect
        tail.__signature__ = inspect.signature(set_timesteps)  # pipelines read which arguments it takes (sigmas, mu)
        sched.set_timesteps, sched.step = tail, first_step
        hook = of(p).denoiser(p).register_forward_pre_hook(first_call, with_kwargs=True)
        try:
            return p(prompt=prompt, latents=z, num_inference_steps=num_inference_steps, **guidance_arg(guidance_scale),
                     generator=generator, output_type=output_type, height=x.shape[-2], width=x.shape[-1], **kw)
        finally:
            hook.remove()
            del sched.set_timesteps, sched.step


def img2img(pipe):
    """The image-to-image pipeline sharing ``pipe``'s components (SD 1.x/2.x, SDXL, SD3, Flux,
    ShapesWorld's UNets: diffusers' own), or where diffusers has none :class:`LatentImg2Img`
    (PixArt-Sigma) or :class:`FlowImg2Img` (FLUX.2; a pipeline of its own on a flow-matching
    scheduler, such as the MM-DiT organism's)."""
    from .family import of
    if of(pipe).img2img == "latents":
        return LatentImg2Img(pipe)
    if of(pipe).img2img == "flow":
        return FlowImg2Img(pipe)
    from .progress import quiet
    with quiet():  # importing the auto pipelines also imports every pipeline's image processors
        from diffusers import AutoPipelineForImage2Image
        try:
            i2i = AutoPipelineForImage2Image.from_pipe(pipe)
        except ValueError:  # no image-to-image sibling registered for this pipeline class
            if "FlowMatch" in type(pipe.scheduler).__name__ and hasattr(pipe, "_encode_vae_image"):
                return FlowImg2Img(pipe)
            raise
    i2i.set_progress_bar_config(disable=True)
    return i2i


def real_image_protocol(pipe, items, heads: list[HeadId], *, strength: float, steps: int,
                        guidance: float, seed: int, batch_size: int = 16, progress: bool = True,
                        cache: tuple[str, dict] | None = None):
    """Noise each item's image to ``strength`` of the schedule and denoise it with its caption
    while tracing (DAAM's and the paper's real-image setting); score every word against its mask.

    Args:
        items: ``saam.datasets.Item`` s: ShapesWorld renders (``shapesworld_items``) or a COCO-format
            dataset (``read_coco``), at the model's native resolution.
        cache: cache each batch under this (name, key) (``runs.run_batches``).
    Returns:
        (records, images): word records and the (N, H, W, 3) uint8 input images.
    """
    from PIL import Image
    from .runs import run_batches
    i2i = img2img(pipe)
    import inspect
    h, w = items[0].image.shape[:2] if len(items) else (None, None)
    # pipelines that take a size (Qwen-Image's img2img) would otherwise resize the image to their default
    takes = {"height", "width"} <= set(inspect.signature(i2i.__call__).parameters) and not isinstance(i2i, FlowImg2Img)
    size = dict(height=h, width=w) if takes else {}

    def batch(items, gens, start):
        records, cut = [], []
        with trace(getattr(i2i, "pipe", i2i)) as tc:  # LatentImg2Img: its pipeline is what runs
            i2i(prompt=[it.caption for it in items], image=[Image.fromarray(it.image) for it in items],
                strength=strength, num_inference_steps=steps, **guidance_arg(guidance),
                generator=gens, output_type="latent", **size)
        for j, (it, hm) in enumerate(zip(items, tc)):
            words = [(w.word, w.occurrence, w.kind, w.obj, w.mask, None) for w in it.words]
            records += records_of(hm, it.caption, words, start + j, heads, it.n_objects, cut)
        return dict(records=records, cut=[list(c) for c in cut])
    parts = run_batches(items, batch_size, seed, batch, cache=cache, desc=f"img2img@{strength}" if progress else None)
    cut = [c for p in parts for c in p["cut"]]
    if cut:
        print(f"{len(cut)} caption word(s) lay beyond the text encoder's window and were skipped "
              f"(first: {cut[0][1]!r} of image {cut[0][0]})", file=sys.stderr)
    return [r for p in parts for r in p["records"]], np.stack([it.image for it in items])


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
