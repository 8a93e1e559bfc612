"""The paper's experiments as cached steps; the notebooks call these and plot.

Every expensive step (fidelity generations, relevance votes, traced word maps) is cached under
``data/cache`` keyed by its parameters, the model's weight fingerprint and the package version,
so re-running a notebook (or restyling a figure) never recomputes what has not changed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from . import __version__, paths
from .cache import atomic_write, cached, fingerprint

KIND_CONCEPT = {"color": "color", "shape": "shape", "size": "size"}
REAL_MODELS = {"sd14": "CompVis/stable-diffusion-v1-4", "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
               "sd21": "stabilityai/stable-diffusion-2-1", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


def load_params(profile: str | None = None, overrides: dict | None = None) -> dict:
    """Parameters of a profile (``params/<profile>.yaml``, default from $PROFILE or 'paper')."""
    profile = profile or os.environ.get("PROFILE", "paper")
    f = paths.PARAMS / f"{profile}.yaml"
    if not f.exists():
        known = sorted(p.stem for p in paths.PARAMS.glob("*.yaml"))
        raise FileNotFoundError(f"no profile {profile!r} ({f}); known profiles: {known}")
    p = yaml.safe_load(f.read_text())
    p["profile"] = profile
    p.update(overrides or {})
    if p.get("model", "shapesworld") != "shapesworld":
        _require_weights(p)  # stop before any notebook writes anything
    return p


def _require_weights(params: dict) -> Path:
    model = params.get("model")
    path = os.environ.get("SAAM_MODEL_PATH") or params.get("model_path")
    if not path or not (Path(path) / "model_index.json").exists():
        raise FileNotFoundError(
            f"profile {params['profile']!r} needs the weights of {REAL_MODELS.get(model, model)} as a "
            f"local diffusers folder, and none was found at {path!r}. On a machine with internet: "
            f"`huggingface-cli download {REAL_MODELS.get(model, model)} --local-dir <dir>`, then "
            "`make all PROFILE=... SAAM_MODEL_PATH=<dir>` (a GPU is strongly advised).")
    return Path(path)


def load_model(params: dict, device: str = "cpu"):
    """The pipeline a profile names: the committed ShapesWorld model, or real SD from a local path.

    Real models are never downloaded here: the profile's ``model_path`` (or $SAAM_MODEL_PATH)
    must hold a diffusers folder; otherwise this stops at once saying how to get one.
    """
    model = params.get("model", "shapesworld")
    if model == "shapesworld":
        from .shapes.model import load_pipeline
        return load_pipeline(params.get("model_path") or paths.MODEL_DIR, device=device)
    path = _require_weights(params)
    import torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True,
                                             torch_dtype=torch.float16 if device != "cpu" else torch.float32)
    return pipe.to(device)


def model_fingerprint(params: dict) -> str:
    path = params.get("model_path") or (paths.MODEL_DIR if params.get("model", "shapesworld") == "shapesworld"
                                        else os.environ.get("SAAM_MODEL_PATH", ""))
    return fingerprint(Path(path)) if path and Path(path).exists() else str(path)


# the modules whose code decides what a cached artefact contains; editing one invalidates caches
_COMPUTE_MODULES = ("capture.py", "aggregate.py", "relevance.py", "evaluate.py", "words.py", "heads.py",
                    "shapes/analyzer.py", "shapes/world.py")


def code_fingerprint() -> str:
    import hashlib
    h = hashlib.sha256()
    for m in _COMPUTE_MODULES:
        h.update((Path(__file__).parent / m).read_bytes())
    return h.hexdigest()[:16]


def _key(params: dict, *names: str) -> dict:
    return dict({n: params[n] for n in names if n in params}, model=params.get("model", "shapesworld"),
                fingerprint=model_fingerprint(params), code=code_fingerprint(), version=__version__)


# ------------------------------------------------------------------------------ scenes

def eval_scenes(params: dict, split: str = "test", n: int | None = None, n_objects=None, seed_offset: int = 0):
    from .shapes.world import sample_scene
    n = n or params["n_eval"]
    return [sample_scene(params["seed"] + seed_offset + i, n_objects, split=split, p_color=1.0)
            for i in range(n)]


def relevance_prompts(params: dict) -> list[str]:
    # prompts for voting come from a seed stream disjoint from the evaluation scenes
    from .shapes.world import sample_scene
    return [sample_scene(10_000_000 + i, split="test").caption for i in range(params["n_relevance_prompts"])]


# ------------------------------------------------------------------------------ steps

def fidelity(pipe, params: dict) -> dict:
    """Analyzer-scored fidelity on held-out prompts; cached, and written to figures/fidelity.json."""
    def compute():
        import torch
        from tqdm.auto import tqdm
        from .shapes.analyzer import analyze
        out = {}
        for name, n_obj, split in (("single", 1, "test"), ("two", 2, "test"), ("unseen", 1, "unseen")):
            scenes = eval_scenes(params, split, params["n_fidelity"], n_obj, seed_offset=5_000_000)
            gen = torch.Generator("cpu").manual_seed(params["seed"])
            ok_c = ok_s = ok_b = ok_n = 0
            for b in tqdm(range(0, len(scenes), 32), desc=f"fidelity {name}"):
                batch = scenes[b:b + 32]
                imgs = pipe([s.caption for s in batch], num_inference_steps=params["steps"],
                            guidance_scale=params["guidance"], generator=gen, output_type="np").images
                for s, im in zip(batch, imgs):
                    det = analyze((im * 255).round().astype(np.uint8))
                    ok_n += len(det) == len(s.objects)
                    if n_obj == 1:
                        d = det[0] if det else None
                        ok_c += bool(d and d.color == s.objects[0].color)
                        ok_s += bool(d and d.shape == s.objects[0].shape)
                    else:
                        ok_b += all(any(d.color == o.color and d.shape == o.shape for d in det) for o in s.objects)
            n = len(scenes)
            if n_obj == 1:
                out[f"{name}_color_accuracy"], out[f"{name}_shape_accuracy"] = ok_c / n, ok_s / n
            else:
                out["two_object_binding"] = ok_b / n
            out[f"{name}_count_accuracy"], out[f"n_{name}"] = ok_n / n, n
        out.update(steps=params["steps"], guidance=params["guidance"],
                   targets=dict(single_color_accuracy=0.90, single_shape_accuracy=0.80, two_object_binding=0.50))
        return out
    res = cached("fidelity", _key(params, "seed", "steps", "guidance", "n_fidelity"), compute)
    write_json(paths.FIGURES / "fidelity.json", res)
    return res


def relevance(pipe, params: dict):
    from .relevance import load_concepts, relevance_pass
    concepts = load_concepts()
    key = dict(_key(params, "seed", "steps", "guidance", "n_relevance_prompts"), concepts=concepts)
    return cached("relevance", key, lambda: relevance_pass(
        pipe, concepts, relevance_prompts(params), steps=params["steps"], guidance=params["guidance"],
        seed=params["seed"], batch_size=16))


def records(pipe, params: dict, protocol: str, heads, strength: float | None = None):
    from .evaluate import generation_protocol, real_image_protocol
    scenes = eval_scenes(params)
    key = dict(_key(params, "seed", "steps", "guidance", "n_eval"), protocol=protocol, strength=strength)
    if protocol == "generation":
        return cached("records-gen", key, lambda: generation_protocol(
            pipe, scenes, heads, steps=params["steps"], guidance=params["guidance"], seed=params["seed"]))
    return cached("records-real", key, lambda: real_image_protocol(
        pipe, scenes, heads, strength=strength, steps=params["steps"], guidance=params["guidance"],
        seed=params["seed"]))


# ------------------------------------------------------------------------------ tables

def method_sets(rel, kind: str, k, include_mid: bool, seed: int = 0) -> dict:
    """{method: (head indices, weights)} for a word kind, on the relevance's head list."""
    from .select import bottom_k, eligible, random_k, soft_weights, top_k
    mask = eligible(rel.heads, include_mid)
    row = rel.row(KIND_CONCEPT[kind])
    w = soft_weights(row, mask)
    return {"DAAM (all heads)": (np.flatnonzero(mask), None),
            "top-k (selective)": (top_k(row, k, mask), None),
            "bottom-k": (bottom_k(row, k, mask), None),
            "random-k": (random_k(len(row), k, seed, mask), None),
            "soft (relevance-weighted)": (np.flatnonzero(w > 0), w[w > 0])}


def score(recs, rel, k, tau: float, include_mid: bool, seed: int = 0) -> pd.DataFrame:
    """One row per (word record, method) with its IoU; missing objects kept with NaN IoU."""
    from .evaluate import record_iou
    rows = []
    for r in recs:
        sets = method_sets(rel, r.kind, k, include_mid, seed + r.image)
        for m, (idx, w) in sets.items():
            rows.append(dict(image=r.image, word=r.word, kind=r.kind, method=m, missing=r.gt is None,
                             iou=np.nan if r.gt is None else record_iou(r, idx, w, tau)))
    return pd.DataFrame(rows)


def miou_table(df: pd.DataFrame, by_kind: bool = True, seed: int = 0) -> pd.DataFrame:
    """mIoU with bootstrap 95 % CI per method (and per word kind), missing words counted apart."""
    from .evaluate import bootstrap_ci
    out = []
    groups = ["method", "kind"] if by_kind else ["method"]
    for key, g in df.groupby(groups, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        v = g.loc[~g.missing, "iou"].to_numpy()
        m, lo, hi = bootstrap_ci(v, seed=seed)
        out.append(dict(zip(groups, key), mIoU=m, ci_low=lo, ci_high=hi, n_words=len(v),
                        n_missing=int(g.missing.sum())))
    return pd.DataFrame(out)


def write_table(df: pd.DataFrame, name: str, floatfmt: str = ".3f") -> None:
    """figures/<name>.csv, .md and .tex, written atomically."""
    atomic_write(paths.FIGURES / f"{name}.csv", df.to_csv(index=False).encode())
    atomic_write(paths.FIGURES / f"{name}.md", df.to_markdown(index=False, floatfmt=floatfmt).encode())
    atomic_write(paths.FIGURES / f"{name}.tex", df.to_latex(index=False, float_format=lambda x: format(x, floatfmt)).encode())


def write_json(path: Path, data: dict) -> None:
    atomic_write(Path(path), json.dumps(data, indent=1, sort_keys=True, default=float).encode())


def update_results(**entries) -> dict:
    """Merge headline numbers into figures/results.json."""
    f = paths.FIGURES / "results.json"
    cur = json.loads(f.read_text()) if f.exists() else {}
    cur.update(entries)
    write_json(f, cur)
    return cur


def per_head_iou(recs, kind: str, tau: float) -> np.ndarray:
    """Mean IoU of each single head's map over the words of one kind: which heads localise.

    A diagnostic, not a method: it looks at the ground truth, so it is an upper reference for
    what any truth-free head ranking (such as HRV relevance) could pick.
    """
    from .evaluate import record_iou
    rs = [r for r in recs if r.kind == kind and r.gt is not None]
    if not rs:
        return np.full(0, np.nan)
    n = rs[0].maps.shape[0]
    return np.array([np.mean([record_iou(r, [h], None, tau) for r in rs]) for h in range(n)])
