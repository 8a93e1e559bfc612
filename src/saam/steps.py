"""The paper's expensive steps, cached: what the chapters generate and trace.

Every step (fidelity generations, relevance votes, traced word records, attention budgets)
generates in batches through ``runs.run_batches``: each batch is cached under ``data/cache``,
keyed by the step's parameters, the model's weight fingerprint, the code it runs, its items and
the random state it starts from. Re-running a chapter (or restyling a figure) recomputes nothing
that has not changed; a smaller grid on the same model (chapter 06's organism D) reuses the
batches of a larger one; an interrupted chapter resumes where it stopped.

The scenes and prompts each step runs on are declared here too, once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__, paths
from .cache import cached, code_fingerprint, digest
from .models import data_dir, guidance_arg, model_fingerprint, precision, text_fingerprint
from .runs import generators as _generators
from .runs import run_batches

KINDS = ("color", "shape", "size")  # word kinds of ShapesWorld captions = the concepts they score against


def generators(params: dict, n: int, start: int = 0):
    """One CPU generator per image, seeded from the profile (``runs.generators``): the same images on
    any device and at any batch size."""
    return _generators(params["seed"], start, n)


def key(params: dict, *names: str, code: tuple[str, ...]) -> dict:
    """A cache key: the named parameters, the model's weights and precision, and the source of the
    package code the step runs (``code``: its entry modules; what they import is followed)."""
    return dict({n: params[n] for n in names if n in params}, model=params.get("model", "shapesworld"),
                fingerprint=model_fingerprint(params), precision=precision(params),
                code=code_fingerprint("models", *code), version=__version__)


# ------------------------------------------------------------------------------ what runs on what

def eval_scenes(params: dict, split: str = "test", n: int | None = None, n_objects=None, seed_offset: int = 0):
    """ShapesWorld scenes from the profile's seed stream (held-out ``split``)."""
    from .shapes.world import sample_scene
    n = n or params["n_eval"]
    return [sample_scene(params["seed"] + seed_offset + i, n_objects, split=split, p_color=1.0)
            for i in range(n)]


def relevance_prompts(params: dict) -> list[str]:
    """Prompts the relevance pass generates: ShapesWorld captions from a seed stream disjoint
    from the evaluation scenes, or, for a real model with evaluation data, the dataset's captions
    after the ones evaluated (HRV used unrelated prompts; the dataset's are at hand offline)."""
    from .shapes.world import sample_scene
    n = params.get("n_relevance_prompts") or 64
    offset = params.get("relevance_offset", 0)  # an independent re-estimate's own prompts (relevance_reestimate)
    folder = data_dir(params) if params["model"] != "shapesworld" else None
    if folder is not None:
        from .datasets import read_captions
        caps = read_captions(folder, params.get("data_split"))
        start = params.get("n_eval", 0) if len(caps) > params.get("n_eval", 0) + n else 0
        if offset:
            raise ValueError("independent relevance re-estimates need prompts of their own: ShapesWorld's stream has them, "
                             "a dataset's captions do not")
        return caps[start:start + n]
    return [sample_scene(10_000_000 + offset + i, split="test").caption for i in range(n)]


REESTIMATE_STRIDE = 100_000  # re-estimate j's prompts start j strides into the relevance stream (pools stay below it)


def relevance_reestimate(pipe, params: dict, j: int):
    """Independent re-estimate ``j`` (1, 2, ...) of the profile's relevance: the same pass with new prompts
    (ShapesWorld captions ``j`` x :data:`REESTIMATE_STRIDE` further into the relevance stream), new noise and new
    HRV word draws (seed + j); the evaluation records stay the same (chapter 03's coverage check)."""
    if j < 1:
        raise ValueError(f"re-estimates are numbered from 1, got {j}")
    if max(params.get("n_relevance_prompts") or 0, params.get("relevance_pool") or 0) > REESTIMATE_STRIDE:
        raise ValueError(f"relevance prompts past {REESTIMATE_STRIDE} would overlap the re-estimates' own")
    return relevance(pipe, dict(params, seed=params["seed"] + j, relevance_offset=j * REESTIMATE_STRIDE))


def protocol_runs(params: dict) -> list[tuple[str, str, float | None]]:
    """(table name, protocol, strength) of every protocol the profile can run: generation and
    ShapesWorld renders on ShapesWorld, the dataset protocol wherever evaluation data is given."""
    runs = []
    if params["model"] == "shapesworld":
        runs += [("generation", "generation", None)] + [(f"real (strength {s})", "real", s) for s in params["strengths"]]
    if data_dir(params) is not None:
        runs += [(f"dataset (strength {s})", "dataset", s) for s in params["strengths"]]
    return runs


def primary_run(params: dict) -> tuple[str, str, float | None] | None:
    """The run Table 1's headline and the k sweep use: generation on ShapesWorld (truth from the
    analyzer), the dataset protocol on real models (truth from the data's masks); None if none."""
    runs = protocol_runs(params)
    return runs[0] if runs else None


def native_size(pipe, params: dict) -> tuple[int, int]:
    """The image size evaluation runs at: the profile's ``resolution``, else the pipeline's own."""
    from .models import denoiser
    size = getattr(pipe, "default_sample_size", None) or denoiser(pipe).config.sample_size  # Flux: the pipeline's
    r = params.get("resolution") or size * pipe.vae_scale_factor
    return (r, r)


# ------------------------------------------------------------------------------ steps

def samples(pipe, params: dict, n: int = 16):
    """``n`` held-out scenes and the model's images of their captions, uint8."""
    scenes = eval_scenes(params, "test", n, seed_offset=7_000_000)
    imgs = pipe(prompt=[s.caption for s in scenes], num_inference_steps=params["steps"], **guidance_arg(params["guidance"]),
                generator=generators(params, n), output_type="np").images
    return scenes, [(i * 255).round().astype(np.uint8) for i in imgs]


def fidelity(pipe, params: dict, groups=("single", "two", "unseen")) -> dict:
    """Analyzer-scored fidelity on held-out prompts (``shapes.analyzer.fidelity``): one-object
    captions (``single``), two-object captions (``two``: binding) and one-object captions of
    held-out (colour, shape) combinations (``unseen``). Cached per batch."""
    from .shapes.analyzer import fidelity as score
    groups = {name: eval_scenes(params, split, params["n_fidelity"], n_obj, seed_offset=5_000_000)
              for name, n_obj, split in (("single", 1, "test"), ("two", 2, "test"), ("unseen", 1, "unseen"))
              if name in groups}
    k = key(params, "seed", "steps", "guidance", code=("shapes.analyzer", "shapes.world"))
    return score(pipe, groups, params["steps"], params["guidance"], params["seed"], cache=("fidelity", k))


def analyzer_check(params: dict) -> dict:
    """The analyzer's accuracy on 4 x ``n_fidelity`` degraded renders (cached)."""
    from .shapes.analyzer import analyzer_accuracy
    n = params["n_fidelity"] * 4
    return cached("analyzer", dict(n=n, seed=params["seed"], code=code_fingerprint("shapes.analyzer")),
                  lambda: analyzer_accuracy(n, params["seed"]))


def denoiser_heads(pipe) -> list:
    """Every cross-attention head of the pipeline's UNet (an MM-DiT's joint-attention heads), in
    HRV's order (what relevance rows and word records index)."""
    from .heads import head_ids
    from .family import of
    fam = of(pipe)
    layers = fam.layers(fam.denoiser(pipe))
    return head_ids({l: m.heads for l, m in layers.items()})


def generation_run(pipe, params: dict) -> list[dict]:
    """One traced generation of the evaluation scenes feeding two observers of it (ShapesWorld;
    cached per batch): each word's per-head maps against the analyzer's truth (the generation
    protocol, ``evaluate.generated_words``) and each head's attention budget on the analyzer's
    object and background pixels (``sinks``). It covers the first max(``n_eval``, ``n_sinks``)
    scenes, whichever step asks first, so the two share every batch.

    Relevance is not taken from these generations: HRV measures it over prompts unrelated to what
    is evaluated, and votes taken here (where every object is named with its colour) move the
    colour concentration outside its CI over prompts; :func:`relevance` keeps its own prompts.

    Returns one dict per batch: ``records``, ``images`` (uint8) and ``budgets`` (one table per image).
    """
    from .capture import trace
    from .evaluate import generated_words, records_of
    from .sinks import attention_budget
    heads = denoiser_heads(pipe)

    def batch(scenes, gens, start):
        with trace(pipe) as tc:
            out = pipe(prompt=[s.caption for s in scenes], num_inference_steps=params["steps"], **guidance_arg(params["guidance"]),
                       generator=gens, output_type="np").images
        records, images, budgets = [], [], []
        for j, (scene, hm, img) in enumerate(zip(scenes, tc, out)):
            img = (img * 255).round().astype(np.uint8)
            words, det = generated_words(scene, img)
            records += records_of(hm, scene.caption, words, start + j, heads, len(scene.objects))
            budgets.append(attention_budget(hm, np.any([d.mask for d in det], axis=0) if det else np.zeros(img.shape[:2], bool)))
            images.append(img)
        return dict(records=records, images=np.stack(images), budgets=budgets)
    k = dict(key(params, "seed", "steps", "guidance", code=("evaluate", "sinks", "shapes.analyzer", "shapes.world")),
             heads=digest([str(h) for h in heads]))
    n = max(params["n_eval"], params.get("n_sinks", 32))
    return run_batches(eval_scenes(params, n=n), params.get("batch_size", 16), params["seed"], batch,
                       cache=("generation", k), desc="generate+trace")


def relevance(pipe, params: dict):
    """Head relevance for the profile's model, over the profile's ``concepts`` (``"hrv"``: HRV's 34,
    ``"ours"``: ``data/concepts.yaml``).

    Profiles that name HRV's published vectors (``hrv_vectors``, ``hrv_head_index``: sd14, sdxl)
    get them, placed on this UNet's heads, exactly as the paper selected heads. Otherwise HRV's
    pass (``relevance.relevance_pass``, cached per batch) over :func:`relevance_prompts`.
    """
    from .family import UNET
    from .relevance import load_concepts, load_hrv, relevance_pass
    if params.get("hrv_vectors") and params.get("hrv_head_index") and params.get("concepts", "hrv") == "hrv":
        lh = {l: m.heads for l, m in UNET.layers(pipe.unet).items()}
        root = lambda f: Path(f) if Path(f).is_absolute() else paths.ROOT / f  # noqa: E731
        return load_hrv(root(params["hrv_vectors"]), root(params["hrv_head_index"]), lh, paths.HRV_CONCEPTS)
    concepts = load_concepts("hrv" if params.get("concepts", "hrv") == "hrv" else None)
    k = dict(key(params, "seed", "steps", "guidance", "relevance_variant", code=("relevance", "stream", "shapes.world")),
             concepts=concepts, start_token=True)
    words = dict(text=text_fingerprint(params), precision=precision(params), concepts=concepts,
                 code=code_fingerprint("relevance", "stream"), version=__version__)
    return relevance_pass(pipe, concepts, relevance_prompts(params), steps=params["steps"], guidance=params["guidance"],
                          seed=params["seed"], batch_size=params.get("batch_size", 16), cache=("relevance", k),
                          words_cache=("concept-words", words), variant=params.get("relevance_variant"))


def sink_budget(pipe, params: dict, n: int | None = None):
    """Attention budget (``saam.sinks``) of every head over ``n`` (default ``n_sinks``) traced
    generations: on ShapesWorld the first of :func:`generation_run`'s (object pixels: the analyzer's
    objects); elsewhere traced generations of held-out ShapesWorld captions of their own, all
    pixels one region (cached). Returns (per-head table, summary)."""
    from .sinks import budget_summary
    n = n or params.get("n_sinks", 32)
    if params["model"] == "shapesworld":
        parts = [df for b in generation_run(pipe, params) for df in b["budgets"]][:n]
    else:
        parts = _budgets(pipe, params, n)
    per_head = pd.concat(parts).groupby(["head", "layer", "block", "region"], sort=False).mean().reset_index()
    return per_head, budget_summary(per_head)


def _budgets(pipe, params: dict, n: int) -> list[pd.DataFrame]:
    from .capture import trace
    from .sinks import attention_budget

    def batch(scenes, gens, start):
        with trace(pipe) as tc:
            pipe(prompt=[s.caption for s in scenes], num_inference_steps=params["steps"], **guidance_arg(params["guidance"]),
                 generator=gens, output_type="latent")
        return [attention_budget(hm) for hm in tc]
    scenes = eval_scenes(params, "test", n, seed_offset=3_000_000)
    k = key(params, "seed", "steps", "guidance", code=("sinks", "capture", "shapes.world"))
    return [df for b in run_batches(scenes, params.get("batch_size", 16), params["seed"], batch, cache=("sinks", k),
                                    desc="attention budget")
            for df in b]


def records(pipe, params: dict, protocol: str, heads, strength: float | None = None):
    """Word records and images of a protocol (cached): ``generation`` (ShapesWorld, analyzer truth),
    ``real`` (ShapesWorld renders, exact truth) or ``dataset`` (the profile's COCO-format data); the
    last two go through the same real-image protocol and scoring. Returns (records, images, notes):
    notes say what the dataset reader kept and dropped (None for the other protocols)."""
    from .datasets import read_coco, shapesworld_items
    from .evaluate import real_image_protocol
    if protocol == "generation":
        if [str(h) for h in heads] != [str(h) for h in denoiser_heads(pipe)]:
            raise ValueError("the generation protocol records every head of the UNet (steps.denoiser_heads)")
        n = params["n_eval"]
        parts = generation_run(pipe, params)
        recs = [r for b in parts for r in b["records"] if r.image < n]
        return recs, np.concatenate([b["images"] for b in parts])[:n], None
    k = dict(key(params, "seed", "steps", "guidance", "resolution",
                 code=("evaluate", "datasets", "shapes.world", "shapes.analyzer")),
             protocol=protocol, strength=strength, heads=digest([str(h) for h in heads]))
    run = dict(steps=params["steps"], guidance=params["guidance"], seed=params["seed"],
               batch_size=params.get("batch_size", 16))
    if protocol == "real":
        return (*real_image_protocol(pipe, shapesworld_items(eval_scenes(params)), heads, strength=strength,
                                     cache=("records-real", k), **run), None)
    if protocol == "dataset":
        folder = data_dir(params)
        if folder is None:
            raise FileNotFoundError("the dataset protocol needs evaluation data: set data_dir in the profile or "
                                    "$SAAM_DATA to a COCO-format folder (see saam.datasets)")
        items = read_coco(folder, native_size(pipe, params), params["n_eval"], split=params.get("data_split"))
        notes = dict(notes=items.notes(), dropped=items.dropped, n_items=len(items))
        return (*real_image_protocol(pipe, items, heads, strength=strength, cache=("records-data", k), **run), notes)
    raise ValueError(f"unknown protocol {protocol!r}; use generation, real or dataset")

