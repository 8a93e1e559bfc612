"""The organism ablation (chapter 06): what each ShapesWorld organism's heads and images are like,
and the rule that picks the default organism, read off the CIs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .analyses import published_concentration, relevance_vs_localisation
from .evaluate import miou_table
from .models import load_model
from .relevance import concentration_table
from .select import METHODS
from .shapes.analyzer import FIDELITY_TARGETS
from .steps import KINDS, fidelity, records, relevance, sink_budget
from .tables import score


def organism_properties(params: dict, model_path: Path) -> dict:
    """The properties the ablation compares (issue 10) for one model folder, all cached.

    Attention sink (share of attention on start token / words / end / padding, object and
    background pixels), relevance concentration (top 25 % share, HRV's 34 concepts, bootstrap CI
    over prompts), Spearman rho between a head's relevance and its own localisation, image
    fidelity, and Table 1's DAAM vs top-k vs bottom-k (generation protocol) with CIs.
    """
    from .shapes.model import variant_of
    p = dict(params, model_path=str(model_path))
    pipe = load_model(p)
    v = variant_of(Path(model_path))
    out = dict(variant=v["variant"], about=v["about"])
    _, sinks = sink_budget(pipe, p)
    for region in sinks.index:
        for c in sinks.columns:
            out[f"sink_{region}_{c}"] = float(sinks.loc[region, c])
    rel = relevance(pipe, dict(p, concepts="hrv"))
    for r in concentration_table(rel, list(KINDS), seed=p["seed"]).itertuples():
        out[f"conc_{r.concept.lower()}"], out[f"conc_{r.concept.lower()}_ci"] = r.top_share, [r.ci_low, r.ci_high]
        out[f"spec_{r.concept.lower()}"], out[f"spec_{r.concept.lower()}_ci"] = r.spec, [r.spec_ci_low, r.spec_ci_high]
    out["n_heads"] = len(rel.heads)
    fid = fidelity(pipe, p, groups=("single", "two"))
    for k, n in (("single_color_accuracy", "n_single"), ("single_shape_accuracy", "n_single"), ("two_object_binding", "n_two")):
        out[k], out[f"{k}_ci"] = fid[k], wilson(fid[k], fid[n])
    recs = records(pipe, p, "generation", rel.heads)[0]
    diag, _ = relevance_vs_localisation(recs, rel, p)
    out.update({f"rho_{r.concept}": r.spearman_rho for r in diag.itertuples()})
    tab = miou_table(score(recs, rel, p), by_kind=False, seed=p["seed"])
    for m in ("daam", "top", "bottom"):
        r = tab[tab.method == METHODS[m]].iloc[0]
        out[f"miou_{m}"], out[f"miou_{m}_ci"] = r.mIoU, [r.ci_low, r.ci_high]
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
    and closest. Only the UNet variants (``shapes.model.VARIANTS``) are candidates: the MM-DiT organism
    is a second model beside the default one, not a choice for it."""
    from .shapes.model import VARIANTS
    targets = FIDELITY_TARGETS
    t = tab.set_index("variant")
    t = t[[v in VARIANTS for v in t.index]]
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


def sd14_reference(kinds=KINDS) -> dict[str, dict[str, float]]:
    """SD v1.4's head specialisation per ShapesWorld word kind, computed from HRV's published vectors
    (``analyses.published_concentration``): {kind: {"conc": top-25 % share, "spec": specialisation}}."""
    ref = published_concentration().set_index("concept")
    return {c: dict(conc=float(ref.loc[c.capitalize(), "sd14_published"]), spec=float(ref.loc[c.capitalize(), "sd14_spec"]))
            for c in kinds}


def compact(tab: pd.DataFrame) -> pd.DataFrame:
    """Chapter 06's table: one row per organism, the properties that decide and their CIs."""
    ci = lambda c: tab[c].map(lambda v: f"[{v[0]:.2f}, {v[1]:.2f}]")  # noqa: E731
    return pd.DataFrame({"variant": tab.variant, "heads": tab.n_heads, "start (bg)": tab.sink_background_start,
                         "padding (bg)": tab.sink_background_padding, "words (bg)": tab.sink_background_words,
                         "conc colour": tab.conc_color, "conc shape": tab.conc_shape, "conc size": tab.conc_size,
                         "spec colour": tab.spec_color, "spec shape": tab.spec_shape, "spec size": tab.spec_size,
                         "rho colour": tab.rho_color, "rho shape": tab.rho_shape,
                         "fid colour": tab.single_color_accuracy, "fid colour CI": ci("single_color_accuracy_ci"),
                         "fid binding": tab.two_object_binding, "fid binding CI": ci("two_object_binding_ci"),
                         "DAAM": tab.miou_daam, "top-k": tab.miou_top, "bottom-k": tab.miou_bottom})
