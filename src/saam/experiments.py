"""The paper's experiments as cached steps; the notebooks call these and plot.

Every expensive step (fidelity generations, relevance votes, traced word maps, attention budgets)
generates in batches through ``runs.run_batches``: each batch is cached under ``data/cache``,
keyed by the step's parameters, the model's weight fingerprint, the code it runs, its items and
the random state it starts from. Re-running a notebook (or restyling a figure) recomputes nothing
that has not changed; a smaller grid on the same model (chapter 06's organism D) reuses the
batches of a larger one; an interrupted chapter resumes where it stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__, paths
from .cache import atomic_write, cached, code_fingerprint, digest, fingerprint

KINDS = ("color", "shape", "size")  # word kinds of ShapesWorld captions = the concepts they score against


def load_params(profile: str | None = None, overrides: str | dict | None = None) -> dict:
    """Parameters of a profile, validated (``saam.profiles.load``); real-model profiles also check
    that their weights are there before anything runs."""
    from .profiles import load
    p = load(profile, overrides)
    if p["model"] != "shapesworld":
        model_dir(p)  # real models: stop before any notebook writes anything if the weights are absent
    return p


def start_chapter(notebook: str, profile: str, overrides: str | dict | None = None) -> dict:
    """What every chapter does first: load and validate its profile (which also decides where its
    figures go), seed torch, show what the chapter produces. Returns the parameters."""
    import torch
    from IPython.display import Markdown, display
    from .artefacts import produces_markdown
    p = load_params(profile, overrides)
    update_results(run=dict(profile=profile, overrides=p["overrides"]))  # what made these outputs
    torch.manual_seed(p["seed"])
    where = paths.FIGURES.relative_to(paths.ROOT) if paths.FIGURES.is_relative_to(paths.ROOT) else paths.FIGURES
    display(Markdown(produces_markdown(notebook, str(where)) + f" Profile `{profile}`"
                     + (f" with overrides `{overrides}`" if overrides else "") + "."))
    return p


def shapesworld_only(params: dict, why: str) -> bool:
    """True on ShapesWorld profiles; otherwise says in one line why the chapter (or section) is skipped."""
    if params["model"] == "shapesworld":
        return True
    from IPython.display import Markdown, display
    display(Markdown(f"*Skipped for `{params['model']}`: {why}*"))
    return False


def model_dir(params: dict) -> Path:
    """The model folder of a profile (``saam.models.model_path``)."""
    from .models import model_path
    return model_path(params)


def generators(params: dict, n: int, start: int = 0):
    """One CPU generator per image, seeded from the profile (``runs.generators``): the same images on
    any device and at any batch size."""
    from .runs import generators
    return generators(params["seed"], start, n)


def samples(pipe, params: dict, n: int = 16):
    """``n`` held-out scenes and the model's images of their captions, uint8."""
    scenes = eval_scenes(params, "test", n, seed_offset=7_000_000)
    imgs = pipe([s.caption for s in scenes], num_inference_steps=params["steps"], guidance_scale=params["guidance"],
                generator=generators(params, n), output_type="np").images
    return scenes, [(i * 255).round().astype(np.uint8) for i in imgs]


def published_concentration(top: float = 0.25) -> pd.DataFrame:
    """Concentration of HRV's published SD v1.4 and SDXL vectors, per concept (the reference), and
    their head-count-free specialisation (``<model>_spec``)."""
    from .relevance import concentration, published, specialisation
    out = None
    for m in ("sd14", "sdxl"):
        names, mat = published(m)
        t = pd.DataFrame({"concept": names, f"{m}_published": [concentration(r, top) for r in mat],
                          f"{m}_spec": [specialisation(r) for r in mat]})
        out = t if out is None else out.merge(t, on="concept")
    return out


def load_model(params: dict):
    """The pipeline a profile names (``saam.models.load_model``)."""
    from .models import load_model
    return load_model(params)


def model_fingerprint(params: dict) -> str:
    return fingerprint(model_dir(params))


def _key(params: dict, *names: str, code: tuple[str, ...]) -> dict:
    """A cache key: the named parameters, the model's weights, and the source of the package code
    the step runs (``code``: its entry modules; what they import is followed automatically)."""
    return dict({n: params[n] for n in names if n in params}, model=params.get("model", "shapesworld"),
                fingerprint=model_fingerprint(params), code=code_fingerprint("models", *code), version=__version__)


# ------------------------------------------------------------------------------ scenes

def eval_scenes(params: dict, split: str = "test", n: int | None = None, n_objects=None, seed_offset: int = 0):
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
    folder = data_dir(params) if params["model"] != "shapesworld" else None
    if folder is not None:
        from .datasets import read_captions
        caps = read_captions(folder, params.get("data_split"))
        start = params.get("n_eval", 0) if len(caps) > params.get("n_eval", 0) + n else 0
        return caps[start:start + n]
    return [sample_scene(10_000_000 + i, split="test").caption for i in range(n)]


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


# ------------------------------------------------------------------------------ steps

def fidelity(pipe, params: dict, write: bool = True, groups=("single", "two", "unseen")) -> dict:
    """Analyzer-scored fidelity on held-out prompts (``shapes.analyzer.fidelity``): one-object
    captions (``single``), two-object captions (``two``: binding) and one-object captions of
    held-out (colour, shape) combinations (``unseen``). Cached per batch; written to
    <figures>/fidelity.json when ``write``."""
    from .shapes.analyzer import fidelity as score
    groups = {name: eval_scenes(params, split, params["n_fidelity"], n_obj, seed_offset=5_000_000)
              for name, n_obj, split in (("single", 1, "test"), ("two", 2, "test"), ("unseen", 1, "unseen"))
              if name in groups}
    key = _key(params, "seed", "steps", "guidance", code=("shapes.analyzer", "shapes.world"))
    res = score(pipe, groups, params["steps"], params["guidance"], params["seed"], cache=("fidelity", key))
    if write:
        write_json(paths.FIGURES / "fidelity.json", res)
    return res


def analyzer_check(params: dict) -> dict:
    """The analyzer's accuracy on 4 x ``n_fidelity`` degraded renders (cached)."""
    from .shapes.analyzer import analyzer_accuracy
    n = params["n_fidelity"] * 4
    return cached("analyzer", dict(n=n, seed=params["seed"], code=code_fingerprint("shapes.analyzer")),
                  lambda: analyzer_accuracy(n, params["seed"]))


def relevance(pipe, params: dict, concepts: str | None = None):
    """Head relevance for the profile's model.

    Profiles that name HRV's published vectors (``hrv_vectors``, ``hrv_head_index``: sd14, sdxl)
    get them, placed on this UNet's heads, exactly as the paper selected heads. Otherwise the
    HRV pass runs (cached) with ``concepts`` (default: the profile's; ``"hrv"`` for HRV's 34,
    ``"ours"`` for ``data/concepts.yaml``) over :func:`relevance_prompts`.
    """
    from .capture import cross_attention_layers
    from .relevance import load_concepts, load_hrv, relevance_pass
    if params.get("hrv_vectors") and params.get("hrv_head_index") and concepts in (None, "hrv"):
        lh = {l: m.heads for l, m in cross_attention_layers(pipe.unet).items()}
        root = lambda f: Path(f) if Path(f).is_absolute() else paths.ROOT / f  # noqa: E731
        return load_hrv(root(params["hrv_vectors"]), root(params["hrv_head_index"]), lh, paths.HRV_CONCEPTS)
    concepts = concepts or params.get("concepts", "hrv")
    words = load_concepts("hrv" if concepts == "hrv" else None)
    key = dict(_key(params, "seed", "steps", "guidance", code=("relevance", "shapes.world")),
               concepts=words, start_token=True)
    return relevance_pass(pipe, words, relevance_prompts(params), steps=params["steps"], guidance=params["guidance"],
                          seed=params["seed"], batch_size=params.get("batch_size", 16), cache=("relevance", key))


def sink_budget(pipe, params: dict, n: int | None = None):
    """Attention budget (``saam.sinks``) of every head over ``n`` traced held-out generations;
    on ShapesWorld object pixels are the analyzer's objects, elsewhere all pixels form one region.
    Cached per batch (``runs.run_batches``). Returns (per-head table, summary)."""
    from .capture import trace
    from .runs import run_batches
    from .shapes.analyzer import analyze
    from .sinks import attention_budget, budget_summary

    def batch(scenes, gens, start):
        with trace(pipe) as tc:
            imgs = pipe([s.caption for s in scenes], num_inference_steps=params["steps"],
                        guidance_scale=params["guidance"], generator=gens, output_type="np").images
        parts = []
        for hm, img in zip(tc, imgs):
            mask = None
            if params["model"] == "shapesworld":
                det = analyze((img * 255).round().astype(np.uint8))
                mask = np.any([d.mask for d in det], axis=0) if det else np.zeros(img.shape[:2], bool)
            parts.append(attention_budget(hm, mask))
        return parts
    scenes = eval_scenes(params, "test", n or params.get("n_sinks", 32), seed_offset=3_000_000)
    key = _key(params, "seed", "steps", "guidance", code=("sinks", "capture", "shapes.analyzer", "shapes.world"))
    parts = [df for b in run_batches(scenes, 16, params["seed"], batch, cache=("sinks", key), desc="attention budget")
             for df in b]
    per_head = pd.concat(parts).groupby(["head", "layer", "block", "region"], sort=False).mean().reset_index()
    return per_head, budget_summary(per_head)


def data_dir(params: dict) -> Path | None:
    """The profile's evaluation dataset (``data_dir``, or $SAAM_DATA), if any."""
    import os
    d = os.environ.get("SAAM_DATA") or params.get("data_dir")
    if not d:
        return None
    d = Path(d) if Path(d).is_absolute() else paths.ROOT / d
    if not d.is_dir():
        raise FileNotFoundError(f"evaluation data folder {d} does not exist (profile key data_dir or $SAAM_DATA)")
    return d


def native_size(pipe, params: dict) -> tuple[int, int]:
    """The image size evaluation runs at: the profile's ``resolution``, else the pipeline's own."""
    r = params.get("resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return (r, r)


def records(pipe, params: dict, protocol: str, heads, strength: float | None = None):
    """Word records of a protocol (cached): ``generation`` (ShapesWorld, analyzer truth), ``real``
    (ShapesWorld renders, exact truth) or ``dataset`` (the profile's COCO-format data); the last
    two go through the same real-image protocol and scoring."""
    from .datasets import read_coco, shapesworld_items
    from .evaluate import generation_protocol, real_image_protocol
    key = dict(_key(params, "seed", "steps", "guidance", "resolution",
                    code=("evaluate", "datasets", "shapes.world", "shapes.analyzer")),
               protocol=protocol, strength=strength, heads=digest([str(h) for h in heads]))
    run = dict(steps=params["steps"], guidance=params["guidance"], seed=params["seed"],
               batch_size=params.get("batch_size", 16))
    if protocol == "generation":
        return generation_protocol(pipe, eval_scenes(params), heads, cache=("records-gen", key), **run)
    if protocol == "real":
        return real_image_protocol(pipe, shapesworld_items(eval_scenes(params)), heads, strength=strength,
                                   cache=("records-real", key), **run)
    if protocol == "dataset":
        folder = data_dir(params)
        if folder is None:
            raise FileNotFoundError("the dataset protocol needs evaluation data: set data_dir in the profile or "
                                    "$SAAM_DATA to a COCO-format folder (see saam.datasets)")
        items = read_coco(folder, native_size(pipe, params), params["n_eval"], split=params.get("data_split"))
        update_results(dataset=dict(notes=items.notes(), dropped=items.dropped, n_items=len(items)))
        return real_image_protocol(pipe, items, heads,
                                   strength=strength, cache=("records-data", key), **run)
    raise ValueError(f"unknown protocol {protocol!r}; use generation, real or dataset")


# ------------------------------------------------------------------------------ tables

def eligible(params: dict, heads) -> np.ndarray:
    """The heads a profile's methods may use: DAAM's layer rule on the profile's UNet (no layer at
    1/8 of the latent resolution), and the mid block only if ``include_mid``."""
    from .heads import layer_factors
    from .select import eligible as rule
    config = json.loads((model_dir(params) / "unet" / "config.json").read_text())
    return rule(heads, params["include_mid"], layer_factors(config, {h.layer for h in heads}))


def head_sets(rel, kind: str, params: dict, methods, seed: int = 0) -> dict:
    """{method key: ``select.HeadSet``} for one word kind, with the profile's k and eligible heads."""
    from .select import head_set
    mask = eligible(params, rel.heads)
    return {m: head_set(m, rel.heads, rel.row(kind), params["k"], mask=mask, seed=seed) for m in methods}


def score(recs, rel, params: dict, ks=None, taus=None) -> pd.DataFrame:
    """``evaluate.score_records`` with the profile's eligible heads, k (or ``ks``) and tau (or ``taus``)."""
    from .evaluate import score_records
    return score_records(recs, rel, eligible(params, rel.heads), ks or [params["k"]], taus or [params["tau"]],
                         params["seed"])


def miou_table(df: pd.DataFrame, by_kind: bool = True, seed: int = 0) -> pd.DataFrame:
    """``evaluate.miou_table``: mIoU with bootstrap CI per method, k, tau (and word kind)."""
    from .evaluate import miou_table
    return miou_table(df, by_kind, seed)


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


def add_verdicts(**verdicts) -> dict:
    """Merge verdicts (``saam.paired.verdict``) into results.json's ``verdict`` entry; the results."""
    f = paths.FIGURES / "results.json"
    cur = json.loads(f.read_text()).get("verdict", {}) if f.exists() else {}
    return update_results(verdict={**cur, **verdicts})


def relevance_vs_localisation(recs, rel, params: dict):
    """Does relevance rank heads by how well they localise? Per concept: Spearman rho between a
    head's relevance and its own single-head mIoU (``evaluate.per_head_iou``; eligible heads as the
    profile says), the best single head, and the oracle top-k (k heads with the best single-head
    IoU, chosen on the same words: a ceiling, not a method).

    Returns:
        (table, {concept: per-head mIoU}).
    """
    from scipy.stats import spearmanr
    from .aggregate import mean_map
    from .evaluate import mask_ious, per_head_iou
    from .select import head_set
    mask = eligible(params, rel.heads)
    head_iou = {c: per_head_iou(recs, c, params["tau"]) for c in kinds_of(recs)}
    rows = []
    for c, v in head_iou.items():
        if not len(v):
            continue
        oracle = head_set("top", rel.heads, v, params["k"], mask=mask)
        words = [r for r in recs if r.kind == c and r.gt is not None]
        ious = [mask_ious(mean_map(r.maps[oracle.index])[None], r.gt, [params["tau"]])[0, 0] for r in words]
        rows.append(dict(concept=c, spearman_rho=float(spearmanr(rel.row(c)[mask], v[mask]).statistic),
                         best_single_head_miou=float(np.nanmax(v[mask])), oracle_top_k_miou=float(np.mean(ious)),
                         n_heads=int(mask.sum())))
    return pd.DataFrame(rows), head_iou


def kinds_of(recs, top: int = 3) -> list[str]:
    """The word kinds (concepts) of records with truth: ShapesWorld's colour, shape, size in that
    order, else the ``top`` most frequent."""
    import collections
    n = collections.Counter(r.kind for r in recs if r.gt is not None)
    if set(n) <= set(KINDS):
        return [k for k in KINDS if k in n]
    return [k for k, _ in n.most_common(top)]


def example_records(recs, n: int) -> list:
    """One word per image, alternating the two main word kinds (colour and shape on ShapesWorld)."""
    kinds = kinds_of(recs)[:2]
    seen, ex = set(), []
    for r in recs:
        if r.gt is not None and r.image not in seen and r.kind == kinds[len(ex) % len(kinds)]:
            seen.add(r.image)
            ex.append(r)
    return ex[:n]


def map_rows(recs, rel, images, params: dict, methods: list[str], title=None) -> list[dict]:
    """For each record: the image, its truth and each method's normalised map (keys of
    ``select.METHODS``, rows keyed by label), for ``plots.examples``."""
    from .aggregate import mean_map, normalize
    from .select import METHODS
    rows = []
    for r in recs:
        sets = head_sets(rel, r.kind, params, methods, params["seed"] + r.image)
        size = images.shape[1:3]
        row = dict(image=images[r.image], gt=r.gt if r.gt is not None else np.zeros(size, bool),
                   title=title(r) if title else f"{r.word} ({r.kind}) in: {r.caption}")
        row.update({METHODS[m]: normalize(mean_map(r.maps[s.index], s.weights), size).numpy() for m, s in sets.items()})
        rows.append(row)
    return rows


def binding_items(recs, rel, params: dict, methods: list[str]) -> pd.DataFrame:
    """Every colour word of a multi-object caption with its binding score under each method
    (keys of ``select.METHODS``; colour maps from the colour heads, shape maps from the shape
    heads) and whether the model drew the intended (colour, shape) object (``bound``, from the
    analyzer)."""
    from .aggregate import mean_map
    from .evaluate import binding_score
    sets = {kind: head_sets(rel, kind, params, methods, params["seed"]) for kind in ("color", "shape")}
    agg = lambda r, s: mean_map(r.maps[s.index], s.weights)  # noqa: E731
    by_img: dict[int, list] = {}
    for r in recs:
        by_img.setdefault(r.image, []).append(r)
    items = []
    for i, rs in by_img.items():
        shapes = [r for r in rs if r.kind == "shape"]
        for c in (r for r in rs if r.kind == "color" and r.n_objects > 1):
            own = [s for s in shapes if s.obj == c.obj]
            others = [s for s in shapes if s.obj != c.obj]
            if not own or not others:
                continue
            item = dict(image=i, word=c.word, occurrence=c.occurrence, caption=c.caption, bound=bool(c.bound))
            for m in methods:
                cs, ss = sets["color"][m], sets["shape"][m]
                item[m] = binding_score(agg(c, cs), agg(own[0], ss), [agg(o, ss) for o in others])
            items.append(item)
    return pd.DataFrame(items, columns=["image", "word", "occurrence", "caption", "bound", *methods])


def binding_table(bind: pd.DataFrame, params: dict, methods: list[str]) -> tuple[pd.DataFrame, dict | None]:
    """AUROC [stratified CI] of each method's binding score for bound vs misbound colour words, its
    paired difference to DAAM on the same items [paired CI], and the verdict for top-k (None without
    both classes)."""
    from .evaluate import auroc_ci
    from .paired import paired_auroc, verdict
    from .select import METHODS
    both = len(bind) > 0 and bind.bound.nunique() == 2
    rows = []
    for m in methods:
        a, lo, hi = auroc_ci(bind[m], bind.bound, seed=params["seed"]) if both else (np.nan,) * 3
        d = paired_auroc(bind, bind.bound, m, seed=params["seed"]) if both and m != "daam" else {}
        rows.append(dict(method=METHODS[m], auroc=a, ci_low=lo, ci_high=hi, diff_daam=d.get("diff", np.nan),
                         diff_ci_low=d.get("ci_low", np.nan), diff_ci_high=d.get("ci_high", np.nan),
                         p_bootstrap=d.get("p_bootstrap", np.nan), n=len(bind),
                         n_misbound=int((~bind.bound).sum())))
    auc = pd.DataFrame(rows)
    if not both or "top" not in methods:
        return auc, None
    r = auc.set_index("method").loc[METHODS["top"]]
    return auc, verdict(dict(n=int(r.n), diff=r.diff_daam, ci_low=r.diff_ci_low, ci_high=r.diff_ci_high,
                             p_bootstrap=r.p_bootstrap),
                        f"binding diagnosis, {int(r.n)} colour words of which {int(r.n_misbound)} misbound",
                        metric="AUROC")


def load_polysemy(path: Path | None = None) -> list[dict]:
    """The polysemous colour prompts (``data/polysemous-colours.yaml``), checked."""
    import yaml
    path = Path(path or paths.POLYSEMY)
    items = yaml.safe_load(path.read_text())
    need = ("prompt", "word", "intended", "competing")
    if not isinstance(items, list) or not all(isinstance(i, dict) and all(isinstance(i.get(k), str) for k in need)
                                              for i in items):
        raise ValueError(f"{path}: expected a list of {{{', '.join(need)}}} entries")
    return items


def polysemy(pipe, rel, params: dict, n_prompts: int | None = None, n_seeds: int = 2):
    """The misinterpretation case study on any model (the paper's and HRV's kind): each polysemous
    colour word's map from DAAM's heads, from the top-k heads of its intended concept (Color) and of
    its competing one (Plants, Fruits ...), per seed. Where the image shows the other reading, the
    competing concept's heads should hold more of the word's attention.

    Returns:
        (table: one row per prompt and seed with each head set's attention mass on the word (mean
        attention probability per pixel) and the competing share = competing / (intended + competing),
        rows for ``plots.polysemy``: image and the min-max normalised maps).
    """
    from .aggregate import normalize
    from .capture import trace
    items = load_polysemy()[: n_prompts or None]
    unknown = sorted({c for it in items for c in (it["intended"], it["competing"])} - set(rel.concepts))
    if unknown:
        raise ValueError(f"{paths.POLYSEMY}: concepts {unknown} are not among the relevance's {rel.concepts}")
    table, rows = [], []
    for i, it in enumerate(items):
        sets = {"DAAM": head_sets(rel, it["intended"], params, ["daam"])["daam"],
                f"{it['intended']} heads": head_sets(rel, it["intended"], params, ["top"])["top"],
                f"{it['competing']} heads": head_sets(rel, it["competing"], params, ["top"])["top"]}
        for s in range(n_seeds):
            with trace(pipe) as tc:
                img = pipe(it["prompt"], num_inference_steps=params["steps"], guidance_scale=params["guidance"],
                           generator=generators(params, 1, start=1000 * i + s), output_type="np").images[0]
            maps = {name: tc[0].word_map(it["word"], heads=h.heads, weights=h.weights) for name, h in sets.items()}
            mass = {name: float(m.mean()) for name, m in maps.items()}
            a, b = mass[f"{it['intended']} heads"], mass[f"{it['competing']} heads"]
            table.append(dict(prompt=it["prompt"], word=it["word"], seed=s, intended=it["intended"],
                              competing=it["competing"], mass_daam=mass["DAAM"], mass_intended=a, mass_competing=b,
                              competing_share=b / (a + b) if a + b > 0 else float("nan")))
            rows.append(dict(image=(img * 255).round().astype(np.uint8), title=f"'{it['word']}' in: {it['prompt']} (seed {s})",
                             maps={name: normalize(m, img.shape[:2]).numpy() for name, m in maps.items()}))
    return pd.DataFrame(table), rows


# ------------------------------------------------------------------------------ organisms

def organism_properties(params: dict, model_path: Path) -> dict:
    """The properties the ablation compares (issue 10) for one model folder, all cached.

    Attention sink (share of attention on start token / words / end / padding, object and
    background pixels), relevance concentration (top 25 % share, HRV's 34 concepts, bootstrap CI
    over prompts), Spearman rho between a head's relevance and its own localisation, image
    fidelity, and Table 1's DAAM vs top-k vs bottom-k (generation protocol) with CIs.
    """
    from .relevance import concentration_table
    from .select import METHODS
    from .shapes.model import variant_of
    p = dict(params, model_path=str(model_path))
    pipe = load_model(p)
    v = variant_of(model_dir(p))
    out = dict(variant=v["variant"], about=v["about"])
    _, sinks = sink_budget(pipe, p)
    for region in sinks.index:
        for c in sinks.columns:
            out[f"sink_{region}_{c}"] = float(sinks.loc[region, c])
    rel = relevance(pipe, p, "hrv")
    for r in concentration_table(rel, list(KINDS), seed=p["seed"]).itertuples():
        out[f"conc_{r.concept.lower()}"], out[f"conc_{r.concept.lower()}_ci"] = r.top_share, [r.ci_low, r.ci_high]
        out[f"spec_{r.concept.lower()}"], out[f"spec_{r.concept.lower()}_ci"] = r.spec, [r.spec_ci_low, r.spec_ci_high]
    out["n_heads"] = len(rel.heads)
    fid = fidelity(pipe, p, write=False, groups=("single", "two"))
    for k, n in (("single_color_accuracy", "n_single"), ("single_shape_accuracy", "n_single"), ("two_object_binding", "n_two")):
        out[k], out[f"{k}_ci"] = fid[k], wilson(fid[k], fid[n])
    recs = records(pipe, p, "generation", rel.heads)[0]
    diag, _ = relevance_vs_localisation(recs, rel, p)
    out.update({f"rho_{r.concept}": r.spearman_rho for r in diag.itertuples()})
    tab = miou_table(score(recs, rel, p), by_kind=False, seed=p["seed"])
    for key, m in (("daam", "daam"), ("topk", "top"), ("bottomk", "bottom")):
        r = tab[tab.method == METHODS[m]].iloc[0]
        out[f"miou_{key}"], out[f"miou_{key}_ci"] = r.mIoU, [r.ci_low, r.ci_high]
    return out


def wilson(p: float, n: int, z: float = 1.96) -> list[float]:
    """Wilson score 95 % interval of a proportion ``p`` observed in ``n`` trials."""
    if not n:
        return [float("nan"), float("nan")]
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [float(c - h), float(c + h)]


def adoption(tab: pd.DataFrame, sd_concentration: dict[str, float]) -> dict:
    """The adoption rule of the ablation, read off the CIs: a variant is *fit* when no fidelity target
    is shown to be missed (each target at or below the upper end of the Wilson CI; *clearly* fit
    when at or below the lower end too), and among the fit ones the closest to SD v1.4 is the one with
    the smallest total shortfall in colour and shape concentration. Returns fit, clearly fit, shortfall
    and closest."""
    from .shapes.analyzer import FIDELITY_TARGETS as targets
    t = tab.set_index("variant")
    fit = [v for v in t.index if all(t.loc[v, f"{k}_ci"][1] >= x for k, x in targets.items())]
    clearly = [v for v in fit if all(t.loc[v, f"{k}_ci"][0] >= x for k, x in targets.items())]
    gap = {v: float(sum(max(0.0, sd_concentration[c] - t.loc[v, f"conc_{c}"]) for c in sd_concentration)) for v in fit}
    return dict(fit=fit, clearly_fit=clearly, shortfall=gap, closest=min(gap, key=gap.get) if gap else None,
                targets=dict(targets))


def organisms(params: dict) -> pd.DataFrame:
    """``organism_properties`` of every variant the profile lists (``variants``), each at the
    ablation's sizes (``ablation``), one row per variant."""
    from .shapes.model import variant_folder
    p = dict(params, **params.get("ablation", {}))
    return pd.DataFrame([organism_properties(p, variant_folder(v)) for v in params["variants"]])


# ------------------------------------------------------------------------------ the verdict

TABLE1_COLUMNS = ["protocol", "method", "mIoU", "ci_low", "ci_high", "diff_daam", "diff_ci_low", "diff_ci_high",
                  "p_wilcoxon", "better", "worse", "d_z", "draw_sd", "n_words", "n_missing"]


def _with_paired(t: pd.DataFrame, df: pd.DataFrame, by_kind: bool, seed: int) -> pd.DataFrame:
    """A mIoU table with each method's paired difference to DAAM on the same words (``saam.paired``)."""
    from .paired import paired_table
    keys = ["method", "kind", "k", "tau"] if by_kind else ["method", "k", "tau"]
    pt = paired_table(df, by_kind, seed).rename(columns=dict(diff="diff_daam", ci_low="diff_ci_low", ci_high="diff_ci_high"))
    return t.merge(pt[[*keys, "diff_daam", "diff_ci_low", "diff_ci_high", "p_wilcoxon", "better", "worse", "d_z"]], on=keys,
                   how="left")


def table1(scores: dict[str, pd.DataFrame], params: dict, by_kind: bool = False) -> pd.DataFrame:
    """Table 1 over protocols: mIoU [CI] per method and its paired difference to DAAM [CI], Wilcoxon p and
    the share of words each way; random-k over ``evaluate.RANDOM_DRAWS`` draws (``draw_sd``: its spread)."""
    parts = []
    for name, df in scores.items():
        t = _with_paired(miou_table(df, by_kind, seed=params["seed"]), df, by_kind, params["seed"])
        parts.append(t.assign(protocol=name))
    tab = pd.concat(parts)
    cols = TABLE1_COLUMNS[:2] + (["kind"] if by_kind else []) + TABLE1_COLUMNS[2:]
    tab = tab[cols].copy()
    if not by_kind:
        tab["k"], tab["tau"], tab["include_mid"] = params["k"], params["tau"], params["include_mid"]
    return tab.reset_index(drop=True)


def paired_grid(recs, rel, params: dict, method: str = "top") -> pd.DataFrame:
    """``method`` minus DAAM on the same words over the profile's whole k x tau grid."""
    from .paired import paired_table
    from .select import METHODS
    t = paired_table(score(recs, rel, params, ks=params["k_sweep"], taus=params["tau_sweep"]), seed=params["seed"])
    return t[t.method == METHODS[method]].reset_index(drop=True)


def table1_results(tab: pd.DataFrame, rel, params: dict, main: str) -> dict:
    """The ``table1`` entry of results.json and the verdicts (``saam.paired.verdict``) of top-k and
    bottom-k against DAAM on the primary protocol."""
    from .paired import verdict
    from .select import METHODS
    g = tab[tab.protocol == main].set_index("method")
    head = dict(protocol=main, k=params["k"], tau=params["tau"], include_mid=params["include_mid"],
                n_words=int(g.n_words.iloc[0]), n_missing=int(g.n_missing.iloc[0]), n_heads=len(rel.heads),
                n_eligible=int(eligible(params, rel.heads).sum()), concepts=params["concepts"])
    for key, m in (("daam", "daam"), ("selective", "top"), ("bottom", "bottom"), ("random", "random"), ("soft", "soft")):
        r = g.loc[METHODS[m]]
        head[f"miou_{key}"], head[f"miou_{key}_ci"] = float(r.mIoU), [float(r.ci_low), float(r.ci_high)]
        if m != "daam":
            head[f"diff_{key}"] = dict(diff=float(r.diff_daam), ci=[float(r.diff_ci_low), float(r.diff_ci_high)],
                                       p_wilcoxon=float(r.p_wilcoxon), better=float(r.better), worse=float(r.worse))
    head["random_draw_sd"] = float(g.loc[METHODS["random"], "draw_sd"])
    others = {name: t.set_index("method").mIoU for name, t in tab.groupby("protocol", sort=False) if name != main}
    head["other_protocols"] = {name: {"miou_daam": float(r[METHODS["daam"]]), "miou_selective": float(r[METHODS["top"]])}
                               for name, r in others.items()}
    what = f"{main}, k = {params['k']:g}, tau = {params['tau']}"
    verdicts = {}
    for key, m in (("table1", "top"), ("bottom", "bottom")):
        r = g.loc[METHODS[m]]
        row = dict(n=int(r.n_words), diff=r.diff_daam, ci_low=r.diff_ci_low, ci_high=r.diff_ci_high,
                   p_wilcoxon=r.p_wilcoxon, better=r.better, worse=r.worse, d_z=r.d_z)
        verdicts[key] = verdict(row, what, method=m)
    return dict(table1=head, verdict=verdicts)
