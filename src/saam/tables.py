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
from .selection import ORACLE, ORACLE_OUTPUT
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
    per-word IoUs (on an MM-DiT also in output space, ``oracle_output``: head-wise ConceptAttention's
    bound). Published relevance keeps no per-prompt votes: then only oracle-k."""
    from .selection import N_DRAWS, oracle_ious, two_level
    mask = eligible(params, rel.heads)
    kinds = sorted({r.kind for r in recs if r.gt is not None})
    out = dict(oracle=oracle_ious(recs, rel.heads, params["k"], params["tau"], mask)[0])
    if recs and all(r.output_heads is not None for r in recs):
        out["oracle_output"] = oracle_ious(recs, rel.heads, params["k"], params["tau"], mask, space="output")[0]
    if rel.prompt_votes is not None and kinds:
        daam = head_set("daam", rel.heads, None, params["k"], mask=mask).index
        out["two_level"] = two_level(recs, rel, kinds, params["k"], params["tau"], mask, daam,
                                     n_draws or N_DRAWS, params["seed"])
    return out


def with_selection(tab: pd.DataFrame, df: pd.DataFrame, sel: dict, main: str, params: dict,
                   by_kind: bool = False) -> pd.DataFrame:
    """Table 1 (or by kind) with oracle-k's rows on protocol ``main`` (mIoU [CI], paired difference
    to DAAM on the same words; on an MM-DiT also oracle-k in output space) and the two-level CI of
    top-k's difference (``diff_ci2_low/high``)."""
    from .paired import paired_stats
    w = per_word(df)
    w = w[~w.missing & (w.method == METHODS["daam"])].set_index(WORD).iou
    rows = []
    for label, key in ((ORACLE, "oracle"), (ORACLE_OUTPUT, "oracle_output")):
        if key not in sel:
            continue
        oracle = pd.Series(sel[key]).reindex(w.index)
        for kind, idx in ([(k, w.index.get_level_values("kind") == k) for k in sorted(set(w.index.get_level_values("kind")))]
                          if by_kind else [(None, np.ones(len(w), bool))]):
            o, d = oracle[idx].to_numpy(float), w[idx].to_numpy(float)
            m, lo, hi = bootstrap_ci(o[~np.isnan(o)], seed=params["seed"])
            st = paired_stats(o - d, params["seed"])
            rows.append(dict(protocol=main, method=label, **({"kind": kind} if by_kind else {}), mIoU=m, ci_low=lo,
                             ci_high=hi, diff_daam=st["diff"], diff_ci_low=st["ci_low"], diff_ci_high=st["ci_high"],
                             p_wilcoxon=st["p_wilcoxon"], better=st["better"], worse=st["worse"], d_z=st["d_z"],
                             draw_sd=np.nan, n_words=st["n"], n_missing=int(tab[tab.protocol == main].n_missing.iloc[0])
                             if not by_kind else np.nan))
    out = pd.concat([tab, pd.DataFrame(rows)], ignore_index=True)
    if not by_kind:
        out.loc[out.method.isin([ORACLE, ORACLE_OUTPUT]), ["k", "tau", "include_mid"]] = [
            params["k"], params["tau"], params["include_mid"]]
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
        # every method per kind (the oracles too), for the README's answer: mIoU [CI] and minus DAAM [paired CI]
        label = {v: k for k, v in METHODS.items()} | {ORACLE: "oracle", ORACLE_OUTPUT: "oracle_output"}
        head["by_kind"] = {c: {label[r.method]: dict(miou=float(r.mIoU), miou_ci=[float(r.ci_low), float(r.ci_high)],
                                                      **({} if r.method == METHODS["daam"] else dict(
                                                          diff=float(r.diff_daam),
                                                          diff_ci=[float(r.diff_ci_low), float(r.diff_ci_high)])))
                               for r in g_.itertuples() if r.method in label}
                           for c, g_ in bykind[bykind.protocol == main].groupby("kind", sort=True)}
        bk = bykind[(bykind.protocol == main) & (bykind.method == METHODS["top"])].set_index("kind")
        verdicts["table1_by_kind"] = {c: call(r, "top", f"{c} words, {what}", two.get(c)) for c, r in bk.iterrows()}
    if sel and sel.get("oracle"):
        for label, key in ((ORACLE, "oracle"), (ORACLE_OUTPUT, "oracle_output")):
            if label in g.index:
                o = g.loc[label]
                head[f"miou_{key}"], head[f"miou_{key}_ci"] = float(o.mIoU), [float(o.ci_low), float(o.ci_high)]
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


def rules_table(recs: dict, rel, params: dict, n_draws: int | None = None) -> pd.DataFrame:
    """The pre-registered mask-free rules (profile's ``rules``; ``saam.rules``) on every protocol's
    records, per kind and pooled, beside top-k and cross-fitted oracle-k: each rule's mIoU, its
    difference to DAAM and to top-k with two-level CIs at Holm's levels (``selection.rule_comparison``),
    and oracle-k's mIoU and paired difference to DAAM (words resampled; its heads come from masks)."""
    from .paired import paired_stats
    from .rules import RULES
    from .selection import N_DRAWS, oracle_ious, rule_comparison, word_ious
    mask = eligible(params, rel.heads)
    daam = head_set("daam", rel.heads, None, params["k"], mask=mask).index
    parts = []
    for name, rs in recs.items():
        kinds = sorted({r.kind for r in rs if r.gt is not None})
        t = rule_comparison(rs, rel, kinds, params["k"], params["tau"], mask, daam, params["rules"],
                            n_draws or N_DRAWS, params["seed"])
        oracle = oracle_ious(rs, rel.heads, params["k"], params["tau"], mask)[0]
        o, d = {}, {}
        for c in kinds:
            words = [r for r in rs if r.kind == c and r.gt is not None]
            o[c] = np.array([oracle[(r.image, r.word, r.occurrence, r.kind)] for r in words])
            d[c] = word_ious(words, [daam], len(rel.heads), params["tau"])[0]
        o["pooled"], d["pooled"] = np.concatenate([o[c] for c in kinds]), np.concatenate([d[c] for c in kinds])
        rows = []
        for g in [*kinds, "pooled"]:
            st = paired_stats(o[g] - d[g], params["seed"])
            rows.append(dict(kind=g, method="oracle", mIoU=float(o[g].mean()), diff_daam=st["diff"],
                             daam_ci_low=st["ci_low"], daam_ci_high=st["ci_high"], daam_level=0.95, n_words=st["n"]))
        parts.append(pd.concat([t, pd.DataFrame(rows)], ignore_index=True).assign(protocol=name))
    out = pd.concat(parts, ignore_index=True)
    out.insert(1, "label", out.method.map({"top": METHODS["top"], "oracle": ORACLE, **RULES}))
    return out[["protocol", "kind", "label", *[c for c in out.columns if c not in ("protocol", "kind", "label")]]]


def rules_results(tab: pd.DataFrame) -> dict:
    """The ``rules`` entry of results.json: per protocol and kind, each row's numbers by method key."""
    keep = ["mIoU", "diff_daam", "daam_ci_low", "daam_ci_high", "p_daam_holm", "diff_top", "top_ci_low", "top_ci_high",
            "p_top_holm", "helps"]
    out: dict = {}
    for r in tab.to_dict("records"):
        out.setdefault(r["protocol"], {}).setdefault(r["kind"], {})[r["method"]] = {
            k: (bool(r[k]) if k == "helps" else float(r[k])) for k in keep if k in r and pd.notna(r[k])}
    return out


def rules_lines(tab: pd.DataFrame, protocol: str) -> list[str]:
    """One sentence per kind (and pooled) on ``protocol``: top-k, the best rule and oracle-k's mIoU,
    the best rule's Holm-adjusted differences, and which rules help (none, if none does)."""
    lines = []
    t = tab[tab.protocol == protocol]
    for kind, g in t.groupby("kind", sort=False):
        g = g.set_index("method")
        rules = g.drop(index=["top", "oracle"], errors="ignore")
        if rules.empty:
            continue
        best = rules.mIoU.idxmax()
        b = rules.loc[best]
        helps = [g.loc[m, "label"] for m in rules.index if rules.loc[m, "helps"]]
        lines.append(
            f"**{kind}**: top-k {g.loc['top', 'mIoU']:.3f}, best rule *{b.label}* {b.mIoU:.3f} (minus DAAM {b.diff_daam:+.3f} "
            f"[{b.daam_ci_low:+.3f}, {b.daam_ci_high:+.3f}], Holm p {b.p_daam_holm:.3g}; minus top-k {b.diff_top:+.3f} "
            f"[{b.top_ci_low:+.3f}, {b.top_ci_high:+.3f}], Holm p {b.p_top_holm:.3g}), oracle-k {g.loc['oracle', 'mIoU']:.3f}; "
            + (f"helps: {', '.join(helps)}." if helps else "no rule helps (none beats both DAAM and top-k after Holm's adjustment)."))
    return lines


def coverage_lines(cover: pd.DataFrame, boot: dict, conv: pd.DataFrame | None = None,
                   within: pd.DataFrame | None = None) -> str:
    """The re-estimates' answer (``selection.reestimates``' summary), one sentence per kind: the
    independent estimates' Jaccard beside the bootstrap's and the disjoint subsets' (at the pass's
    prompt count), the set changes, the re-estimates outside the two-level CI, and the spread across
    estimates against the interval's first level; then which stability estimate the re-estimates
    side with (``within``: per estimate and kind, the disjoint-halves Jaccard inside its own prompts)."""
    at = {}
    if conv is not None and len(conv):
        n = cover.attrs.get("n_prompts")
        c_n = conv[conv.n_prompts == (n if n in set(conv.n_prompts) else conv.n_prompts.max())]
        at = {r.kind: r for r in c_n.itertuples()}
    lines = []
    for r in cover.itertuples():
        n_re = r.n_estimates - 1
        s = f"**{r.kind}**: "
        if r.kind != "pooled":
            b = boot.get(r.kind, {}).get("jaccard", float("nan"))
            s += (f"independent estimates' top-k sets agree with Jaccard {r.jaccard_pairwise:.2f} (lowest pair "
                  f"{r.jaccard_min:.2f}; the bootstrap's expected Jaccard {b:.2f}")
            if r.kind in at:
                d = at[r.kind]
                s += (f"; disjoint {d.n_prompts}-prompt subsets of the pool {d.jaccard:.2f}, two resamples with replacement "
                      f"of one subset {getattr(d, 'jaccard_bootstrap', float('nan')):.2f}")
            s += f"); the set changed in {r.set_changed * n_re:.0f} of {n_re} re-estimates. "
        s += (f"Top-k minus DAAM {r.diff_main:+.3f}, two-level CI [{r.ci_low:+.3f}, {r.ci_high:+.3f}]: "
              f"{r.outside_two_level} of {n_re} re-estimates fall outside it (about {r.expected_outside:.1f} would if the "
              f"interval were exactly right: a re-estimate differs from the verdict's estimate by both their errors; mean "
              f"of all {r.diff_mean:+.3f}); each estimate's two-level CI covers the mean of the others in "
              f"{r.two_covers_others:.0%} of {r.n_estimates}; the spread "
              f"across estimates (SD {r.sd_between:.3f}) against the first level's (relevance resampled, words fixed: "
              f"SD {r.sd_first_level:.3f}); each estimate's relevance-only interval covers the others' mean in "
              f"{r.rel_covers_others:.0%} of {r.n_estimates}.")
        lines.append(s)
    kinds = [r.kind for r in cover.itertuples() if r.kind != "pooled"]
    if at and kinds:
        closer = {c: "the bootstrap" if abs(cover.set_index("kind").loc[c, "jaccard_pairwise"] - boot.get(c, {}).get("jaccard", np.nan))
                  <= abs(cover.set_index("kind").loc[c, "jaccard_pairwise"] - at[c].jaccard) else "the disjoint subsets"
                  for c in kinds if c in at}
        by = {w: [c for c, v in closer.items() if v == w] for w in ("the bootstrap", "the disjoint subsets")}
        text = ("**Which stability estimate is right.** The independent re-estimates measure it directly; closer to them are "
                + " and ".join(f"{w} for {', '.join(cs)}" for w, cs in by.items() if cs) + ".")
        if within is not None and len(within):
            text += (f" The disjoint subsets all come from one pool of prompts, so they say how stable the selection is "
                     f"given that pool: the same check inside each of the {len(within)} independent passes (disjoint halves "
                     f"of its {cover.attrs.get('n_prompts', '')} prompts) ranges over " + ", ".join(f"{c} {within[c].min():.2f}-{within[c].max():.2f}"
                                                                for c in kinds if c in within)
                     + ", so one pool's figure can sit anywhere in such a range (the bootstrap's, from one sample, too).")
        ratio = (cover.sd_first_level / cover.sd_between).replace([np.inf], np.nan)
        calls = ["matches" if 0.75 <= q <= 4 / 3 else "overstates" if q > 4 / 3 else "understates" if q < 0.75 else "n/a"
                 for q in ratio]
        text += (" What the two-level CI needs is the spread of top-k minus DAAM across estimates, and its first level "
                 + ("matches it" if set(calls) == {"matches"} else "; ".join(f"{k}: {c}" for k, c in zip(cover.kind, calls)))
                 + " (first level's SD over the re-estimates': " + ", ".join(f"{k} {q:.2f}" for k, q in zip(cover.kind, ratio)) + ").")
        lines.append(text)
    return "\n\n".join(lines)


def with_rules(tab: pd.DataFrame, rules: pd.DataFrame | None, params: dict, by_kind: bool = False) -> pd.DataFrame:
    """Table 1 (or by kind) with the pre-registered rules' rows (:func:`rules_table`): mIoU and the
    difference to DAAM with its two-level CI at the rule's Holm level in ``diff_ci2_low/high``
    (pooled rows in Table 1, per-kind rows in the by-kind table)."""
    from .rules import RULES
    if rules is None or rules.empty:
        return tab
    r = rules[rules.method.isin(list(RULES)) & ((rules.kind != "pooled") if by_kind else (rules.kind == "pooled"))]
    rows = pd.DataFrame(dict(protocol=r.protocol, method=r.label, mIoU=r.mIoU, diff_daam=r.diff_daam,
                             diff_ci2_low=r.daam_ci_low, diff_ci2_high=r.daam_ci_high, n_words=r.n_words))
    if by_kind:
        rows.insert(2, "kind", r.kind)
    else:
        rows["k"], rows["tau"], rows["include_mid"] = params["k"], params["tau"], params["include_mid"]
    return pd.concat([tab, rows], ignore_index=True)


def pool_diffs(rels: dict, recs, params: dict) -> pd.DataFrame:
    """Top-k minus DAAM per kind (and pooled) on the same words with the heads each relevance selects
    (``rels``: label -> Relevance, e.g. the verdict's 96 prompts and the whole convergence pool)."""
    from .selection import word_ious
    mask = eligible(params, next(iter(rels.values())).heads)
    kinds = sorted({r.kind for r in recs if r.gt is not None})
    rows = []
    for name, rel in rels.items():
        daam = head_set("daam", rel.heads, None, params["k"], mask=mask).index
        d = {}
        for c in kinds:
            words = [r for r in recs if r.kind == c and r.gt is not None]
            top = head_set("top", rel.heads, rel.row(c), params["k"], mask=mask, concept=c).index
            iou = word_ious(words, [top, daam], len(rel.heads), params["tau"])
            d[c] = iou[0] - iou[1]
            rows.append(dict(relevance=name, n_prompts=len(rel.prompt_votes), kind=c, diff=float(d[c].mean()), n_words=len(words)))
        allw = np.concatenate(list(d.values()))
        rows.append(dict(relevance=name, n_prompts=len(rel.prompt_votes), kind="pooled", diff=float(allw.mean()), n_words=len(allw)))
    return pd.DataFrame(rows)
