"""Table 1 and its verdict: each method's mIoU on the same words, its paired difference to DAAM,
and the binding diagnosis's AUROC; the head sets they score.

Methods go by their keys (``select.METHODS``) everywhere; labels appear only in the tables.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .evaluate import WORD, auroc_ci, bootstrap_ci, miou_table, per_word, score_records
from .heads import layer_factors
from .models import denoiser_config
from .paired import paired_auroc, paired_table, verdict
from .selection import ORACLE
from .select import METHODS, head_set
from .select import eligible as rule


def eligible(params: dict, heads) -> np.ndarray:
    """The heads a profile's methods may use: DAAM's rule on the profile's UNet (no mid block, no
    layer at 1/8 of the latent resolution), with the mid block for the selective methods only if
    ``include_mid``. The UNet's config is read once per run (``models.denoiser_config``). An MM-DiT
    has neither a mid block nor downsampled layers (DAAM has no rule for it): every joint head."""
    config = denoiser_config(params)
    factors = layer_factors(config, {h.layer for h in heads}) if "down_block_types" in config else None
    return rule(heads, params["include_mid"], factors)


def check_k(params: dict) -> int:
    """The profile's k and k_sweep fit the model's eligible heads (``make check``, before any chapter):
    the denoiser is built from its config alone on the meta device (no weights, no memory), its heads
    counted as a trace would. Returns the number of eligible heads; a ValueError names the key."""
    import json
    import diffusers
    import torch
    from .family import of_model
    from .heads import head_ids
    from .models import denoiser_name, model_path
    from .select import resolve_k
    folder = model_path(params)
    config = denoiser_config(params)
    index = json.loads((folder / "model_index.json").read_text())
    cls = getattr(diffusers, index[denoiser_name(index)][1])
    with torch.device("meta"):
        den = cls.from_config(config)
    layers = of_model(den).layers(den)
    heads = head_ids({l: m.heads for l, m in layers.items()})
    n = int(eligible(params, heads).sum())
    for key, ks in (("k", [params["k"]]), ("k_sweep", params.get("k_sweep") or [])):
        for k in ks:
            try:
                resolve_k(k, n)
            except ValueError as e:
                raise ValueError(f"profile {params['profile']!r}: {key} {k}: {e} ({len(heads)} heads in {len(layers)} "
                                 "layers, the selection's eligible ones counted)") from None
    return n


def head_sets(rel, kind: str, params: dict, methods, seed: int = 0) -> dict:
    """{method key: ``select.HeadSet``} for one word kind, with the profile's k and eligible heads."""
    mask = eligible(params, rel.heads)
    return {m: head_set(m, rel.heads, rel.row(kind), params["k"], mask=mask, seed=seed, concept=kind) for m in methods}


def score(recs, rel, params: dict, ks=None, taus=None) -> pd.DataFrame:
    """``evaluate.score_records`` with the profile's eligible heads, k (or ``ks``) and tau (or ``taus``)."""
    return score_records(recs, rel, eligible(params, rel.heads), ks or [params["k"]], taus or [params["tau"]],
                         params["seed"])


TABLE1_COLUMNS = ["protocol", "method", "mIoU", "ci_low", "ci_high", "diff_daam", "diff_ci_low", "diff_ci_high",
                  "p_wilcoxon", "better", "worse", "d_z", "draw_sd", "n_words", "n_missing"]


def _with_paired(t: pd.DataFrame, df: pd.DataFrame, by_kind: bool, seed: int) -> pd.DataFrame:
    """A mIoU table with each method's paired difference to DAAM on the same words (``saam.paired``)."""
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
    t = paired_table(score(recs, rel, params, ks=params["k_sweep"], taus=params["tau_sweep"]), seed=params["seed"])
    return t[t.method == METHODS[method]].reset_index(drop=True)


def selection(recs, rel, params: dict, n_draws: int | None = None) -> dict:
    """What the head selection's own uncertainty and a bound add to Table 1 on one protocol's
    records (``saam.selection``): the two-level paired CI of top-k minus DAAM per kind and pooled
    (with each kind's selection frequencies and expected Jaccard), and cross-fitted oracle-k's
    per-word IoUs. Published relevance keeps no per-prompt votes: then only oracle-k."""
    from .selection import N_DRAWS, oracle_ious, two_level
    mask = eligible(params, rel.heads)
    kinds = sorted({r.kind for r in recs if r.gt is not None})
    out = dict(oracle=oracle_ious(recs, rel.heads, params["k"], params["tau"], mask)[0])
    if rel.prompt_votes is not None and kinds:
        daam = head_set("daam", rel.heads, None, params["k"], mask=mask).index
        out["two_level"] = two_level(recs, rel, kinds, params["k"], params["tau"], mask, daam,
                                     n_draws or N_DRAWS, params["seed"])
    return out


def with_selection(tab: pd.DataFrame, df: pd.DataFrame, sel: dict, main: str, params: dict,
                   by_kind: bool = False) -> pd.DataFrame:
    """Table 1 (or by kind) with oracle-k's rows on protocol ``main`` (mIoU [CI], paired difference
    to DAAM on the same words) and the two-level CI of top-k's difference (``diff_ci2_low/high``)."""
    from .paired import paired_stats
    w = per_word(df)
    w = w[~w.missing & (w.method == METHODS["daam"])].set_index(WORD).iou
    oracle = pd.Series(sel["oracle"]).reindex(w.index)
    rows = []
    for kind, idx in ([(k, w.index.get_level_values("kind") == k) for k in sorted(set(w.index.get_level_values("kind")))]
                      if by_kind else [(None, np.ones(len(w), bool))]):
        o, d = oracle[idx].to_numpy(float), w[idx].to_numpy(float)
        m, lo, hi = bootstrap_ci(o[~np.isnan(o)], seed=params["seed"])
        st = paired_stats(o - d, params["seed"])
        rows.append(dict(protocol=main, method=ORACLE, **({"kind": kind} if by_kind else {}), mIoU=m, ci_low=lo,
                         ci_high=hi, diff_daam=st["diff"], diff_ci_low=st["ci_low"], diff_ci_high=st["ci_high"],
                         p_wilcoxon=st["p_wilcoxon"], better=st["better"], worse=st["worse"], d_z=st["d_z"],
                         draw_sd=np.nan, n_words=st["n"], n_missing=int(tab[tab.protocol == main].n_missing.iloc[0])
                         if not by_kind else np.nan))
    out = pd.concat([tab, pd.DataFrame(rows)], ignore_index=True)
    if not by_kind:
        out.loc[out.method == ORACLE, ["k", "tau", "include_mid"]] = [params["k"], params["tau"], params["include_mid"]]
    out["diff_ci2_low"], out["diff_ci2_high"] = np.nan, np.nan
    two = sel.get("two_level")
    if two:
        for i, r in out[(out.protocol == main) & (out.method == METHODS["top"])].iterrows():
            t = two.get(r["kind"] if by_kind else "pooled")
            if t:
                out.loc[i, ["diff_ci2_low", "diff_ci2_high"]] = [t["ci_low"], t["ci_high"]]
    return out


def table1_results(tab: pd.DataFrame, rel, params: dict, main: str, bykind: pd.DataFrame | None = None,
                   sel: dict | None = None) -> dict:
    """The ``table1`` entry of results.json and the verdicts (``saam.paired.verdict``) of top-k and
    bottom-k against DAAM on the primary protocol: top-k's per word kind and pooled, read from the
    two-level CI where ``sel`` (:func:`selection`) has one, with the words-only CI beside it."""
    g = tab[tab.protocol == main].set_index("method")
    head = dict(protocol=main, k=params["k"], tau=params["tau"], include_mid=params["include_mid"],
                n_words=int(g.n_words.iloc[0]), n_missing=int(g.n_missing.iloc[0]), n_heads=len(rel.heads),
                n_eligible=int(eligible(params, rel.heads).sum()), concepts=params["concepts"])
    for m in [m for m in METHODS if METHODS[m] in g.index]:  # ConceptAttention's on MM-DiTs only
        r = g.loc[METHODS[m]]
        head[f"miou_{m}"], head[f"miou_{m}_ci"] = float(r.mIoU), [float(r.ci_low), float(r.ci_high)]
        if m != "daam":
            head[f"diff_{m}"] = dict(diff=float(r.diff_daam), ci=[float(r.diff_ci_low), float(r.diff_ci_high)],
                                       p_wilcoxon=float(r.p_wilcoxon), better=float(r.better), worse=float(r.worse))
    head["random_draw_sd"] = float(g.loc[METHODS["random"], "draw_sd"])
    others = {name: t.set_index("method").mIoU for name, t in tab.groupby("protocol", sort=False) if name != main}
    head["other_protocols"] = {name: {f"miou_{m}": float(r[METHODS[m]]) for m in ("daam", "top")}
                               for name, r in others.items()}
    what = f"{main}, k = {params['k']:g}, tau = {params['tau']}"
    two = (sel or {}).get("two_level") or {}

    def call(r, m, what, two_ci):
        row = dict(n=int(r.n_words), diff=r.diff_daam, ci_low=r.diff_ci_low, ci_high=r.diff_ci_high,
                   p_wilcoxon=r.p_wilcoxon, better=r.better, worse=r.worse, d_z=r.d_z)
        if m == "top" and two_ci:
            return verdict(dict(row, ci_low=two_ci["ci_low"], ci_high=two_ci["ci_high"]), what, method=m,
                           words_ci=(r.diff_ci_low, r.diff_ci_high))
        return verdict(row, what, method=m)
    verdicts = {"table1": call(g.loc[METHODS["top"]], "top", what, two.get("pooled")),
                "bottom": call(g.loc[METHODS["bottom"]], "bottom", what, None)}
    if bykind is not None:
        bk = bykind[(bykind.protocol == main) & (bykind.method == METHODS["top"])].set_index("kind")
        verdicts["table1_by_kind"] = {c: call(r, "top", f"{c} words, {what}", two.get(c)) for c, r in bk.iterrows()}
    if sel and sel.get("oracle"):
        o = g.loc[ORACLE] if ORACLE in g.index else None
        if o is not None:
            head["miou_oracle"], head["miou_oracle_ci"] = float(o.mIoU), [float(o.ci_low), float(o.ci_high)]
    if two:
        head["selection"] = {c: dict(jaccard=v["jaccard"], distinct_sets=v["distinct_sets"])
                             for c, v in two["selection"].items()}
        head["n_relevance_prompts"] = int(rel.prompt_votes.shape[0])
    return dict(table1=head, verdict=verdicts)


def binding_table(bind: pd.DataFrame, params: dict, methods: list[str]) -> tuple[pd.DataFrame, dict | None]:
    """AUROC [stratified CI] of each method's binding score for bound vs misbound colour words, its
    paired difference to DAAM on the same items [paired CI], and the verdict for top-k (None without
    both classes)."""
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
