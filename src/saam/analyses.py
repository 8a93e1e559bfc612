"""Analyses beyond Table 1: does relevance rank heads by how well they localise, example maps,
the binding scores of chapter 05, the polysemy case study, and HRV's published reference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import paths
from .aggregate import mean_map, normalize, word_map
from .evaluate import binding_score, mask_ious, per_head_iou
from .models import guidance_arg
from .select import METHODS, head_set
from .steps import KINDS, generators
from .tables import eligible, head_sets


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


def relevance_vs_localisation(recs, rel, params: dict):
    """Does relevance rank heads by how well they localise? Per concept: Spearman rho between a
    head's relevance and its own single-head mIoU (``evaluate.per_head_iou``; eligible heads as the
    profile says), the best single head, the oracle top-k (k heads with the best single-head
    IoU, chosen on the same words: a ceiling, not a method), cross-fitted oracle-k (chosen on the
    other half of the images, ``saam.selection``), top-k's mIoU and the gap between the two.

    Returns:
        (table, {concept: per-head mIoU}).
    """
    from scipy.stats import spearmanr
    from .selection import oracle_ious, word_ious
    mask = eligible(params, rel.heads)
    head_iou = {c: per_head_iou(recs, c, params["tau"]) for c in kinds_of(recs)}
    crossfit = oracle_ious(recs, rel.heads, params["k"], params["tau"], mask)[0]
    rows = []
    for c, v in head_iou.items():
        if not len(v):
            continue
        # a head whose IoU is undefined on every word (NaN) ranks last, as it did before the finite check
        oracle = head_set("top", rel.heads, np.where(np.isnan(v), -1.0, v), params["k"], mask=mask)
        words = [r for r in recs if r.kind == c and r.gt is not None]
        ious = [mask_ious(mean_map(r.maps[oracle.index])[None], r.gt, [params["tau"]])[0, 0] for r in words]
        top = head_set("top", rel.heads, rel.row(c), params["k"], mask=mask, concept=c).index
        top_miou = float(np.mean(word_ious(words, [top], len(rel.heads), params["tau"])[0]))
        cf = float(np.mean([crossfit[(r.image, r.word, r.occurrence, r.kind)] for r in words]))
        rows.append(dict(concept=c, spearman_rho=float(spearmanr(rel.row(c)[mask], v[mask]).statistic),
                         best_single_head_miou=float(np.nanmax(v[mask])), oracle_top_k_miou=float(np.mean(ious)),
                         oracle_k_crossfit_miou=cf, top_k_miou=top_miou, gap_oracle_minus_top=cf - top_miou,
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
                img = pipe(prompt=it["prompt"], num_inference_steps=params["steps"], **guidance_arg(params["guidance"]),
                           generator=generators(params, 1, start=1000 * i + s), output_type="np").images[0]
            maps = {name: word_map(tc[0], it["word"], heads=h.heads, weights=h.weights) for name, h in sets.items()}
            mass = {name: float(m.mean()) for name, m in maps.items()}
            a, b = mass[f"{it['intended']} heads"], mass[f"{it['competing']} heads"]
            table.append(dict(prompt=it["prompt"], word=it["word"], seed=s, intended=it["intended"],
                              competing=it["competing"], mass_daam=mass["DAAM"], mass_intended=a, mass_competing=b,
                              competing_share=b / (a + b) if a + b > 0 else float("nan")))
            rows.append(dict(image=(img * 255).round().astype(np.uint8), title=f"'{it['word']}' in: {it['prompt']} (seed {s})",
                             maps={name: normalize(m, img.shape[:2]).numpy() for name, m in maps.items()}))
    return pd.DataFrame(table), rows


def misbound_records(recs, bind: pd.DataFrame, n: int) -> list:
    """The word records of the first ``n`` misbound colour words of :func:`binding_items` (chapter 05's
    case studies)."""
    at = {(r.image, r.kind, r.word, r.occurrence): r for r in recs}
    return [at[(it.image, "color", it.word, it.occurrence)] for it in bind[~bind.bound].head(n).itertuples()]


def mechanism(recs, rel, params: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Why relevance finds some kinds' localising heads and not others': per kind, the top-k heads
    against the cross-fitted oracle's (``selection.oracle_ious``: chosen with masks on the other half
    of the images; both folds' sets) and every eligible head.

    Per head and kind (``heads`` table): its relevance; on the evaluation words, its mean attention to
    the word over the image (``level``, relative to the eligible heads' mean), the share of that attention
    inside the word's object (``inside``), how concentrated its map is (``concentration``: 1 - H / log P of
    the map as a distribution over pixels) and its single-head IoU; on the relevance prompts, the
    concentration of its map of the word it voted for, over its votes for the kind (``rules``'
    statistic; NaN where it never voted the kind); its layer's downsampling factor and block; and the
    share of its votes for the kind in the later half of the schedule.

    Returns (per-group summary: kind x group in top-k / oracle-k / eligible, the heads table,
    {kind: [steps] vote share for the kind, mean over top-k's and oracle's heads and the eligible}).
    """
    import torch
    from scipy.stats import spearmanr
    from .heads import block_of, layer_factors
    from .models import denoiser_config
    from .selection import oracle_ious
    mask = eligible(params, rel.heads)
    config = denoiser_config(params)
    factors = layer_factors(config, {h.layer for h in rel.heads}) if "down_block_types" in config else {}
    _, chosen = oracle_ious(recs, rel.heads, params["k"], params["tau"], mask)
    share_t = None
    if rel.votes is not None:
        v = np.asarray(rel.votes, np.float64)  # [steps, heads, concepts]
        share_t = v / np.maximum(v.sum(-1, keepdims=True), 1)
    rows, groups, profiles = [], [], {}
    for c in kinds_of(recs):
        rs = [r for r in recs if r.kind == c and r.gt is not None]
        if not rs:
            continue
        level, inside, conc = [], [], []
        for r in rs:
            m = torch.as_tensor(np.asarray(r.maps, np.float32)).clamp_min(0)  # [heads, h, w]
            up = torch.nn.functional.interpolate(m[None], size=r.gt.shape, mode="bilinear", align_corners=False)[0]
            tot = up.flatten(1).sum(1)
            inside.append((up[:, torch.as_tensor(r.gt)].sum(1) / tot.clamp_min(1e-30)).numpy())
            level.append(m.flatten(1).mean(1).numpy())
            q = m.flatten(1) / m.flatten(1).sum(1, keepdim=True).clamp_min(1e-30)
            ent = -(q * q.clamp_min(1e-30).log()).sum(1)
            conc.append((1 - ent / np.log(q.shape[1])).numpy())
        level = np.mean(level, 0)
        single = per_head_iou(recs, c, params["tau"])
        ci = rel.index(c)
        at_vote = np.full(len(rel.heads), np.nan)
        if rel.prompt_stats and rel.prompt_votes is not None:
            won = np.asarray(rel.prompt_votes, np.float64)[..., ci].sum(0)
            at_vote = np.where(won > 0, np.asarray(rel.prompt_stats["conc"])[..., ci].sum(0) / np.maximum(won, 1), np.nan)
        late = np.full(len(rel.heads), np.nan)
        if share_t is not None:
            half = len(share_t) // 2
            votes_c = np.asarray(rel.votes, np.float64)[..., ci]
            late = np.where(votes_c.sum(0) > 0, votes_c[half:].sum(0) / np.maximum(votes_c.sum(0), 1), np.nan)
        top = head_set("top", rel.heads, rel.row(c), params["k"], mask=mask, concept=c).index
        oracle = np.concatenate([idx for (kind, _), idx in chosen.items() if kind == c])
        for i, h in enumerate(rel.heads):
            if not mask[i]:
                continue
            rows.append(dict(kind=c, head=str(h), layer=h.layer, block=block_of(h.layer), factor=factors.get(h.layer, 1),
                             relevance=float(rel.row(c)[i]), level=float(level[i] / level[mask].mean()),
                             inside=float(np.mean([x[i] for x in inside])), concentration=float(np.mean([x[i] for x in conc])),
                             concentration_at_vote=float(at_vote[i]), late_votes=float(late[i]), single_iou=float(single[i]),
                             top=bool(i in set(top)), oracle=int((oracle == i).sum())))
        heads_c = pd.DataFrame([r for r in rows if r["kind"] == c])
        for name, sel in (("top-k", heads_c[heads_c.top]), ("oracle-k", heads_c.loc[heads_c.index.repeat(heads_c.oracle)]),
                          ("eligible", heads_c)):
            groups.append(dict(kind=c, group=name, n_heads=int(sel["head"].nunique()), relevance=sel.relevance.mean(),
                               level=sel.level.mean(), inside=sel.inside.mean(), concentration=sel.concentration.mean(),
                               concentration_at_vote=sel.concentration_at_vote.mean(), late_votes=sel.late_votes.mean(),
                               finest_share=float((sel.factor == sel.factor.min()).mean()) if len(factors) else np.nan,
                               up_share=float((sel.block == "up").mean()), single_iou=sel.single_iou.mean()))
        rho = lambda col: float(spearmanr(heads_c.relevance, heads_c[col]).statistic)  # noqa: E731
        for g in groups[-3:]:
            g.update(rho_relevance_level=rho("level"), rho_relevance_inside=rho("inside"),
                     rho_relevance_concentration=rho("concentration"))
        if share_t is not None:
            profiles[c] = {name: share_t[:, idx, ci].mean(1) for name, idx in
                           (("top-k", top), ("oracle-k", oracle), ("eligible", np.flatnonzero(mask)))}
    return pd.DataFrame(groups), pd.DataFrame(rows), profiles


def mechanism_lines(summary: pd.DataFrame) -> str:
    """One sentence per kind from :func:`mechanism`'s summary: what top-k's heads are like against
    the oracle's, and whether relevance follows how much a head attends to the word or where."""
    out = []
    for c, g in summary.groupby("kind", sort=False):
        g = g.set_index("group")
        t, o = g.loc["top-k"], g.loc["oracle-k"]
        follows = ("how much a head attends to the word, not where" if t.rho_relevance_level > 0.3 and t.rho_relevance_inside < 0.3
                   else "where a head attends" if t.rho_relevance_inside >= 0.3 else "neither how much nor where a head attends")
        out.append(
            f"**{c}**: top-k's heads attend to the word {t.level:.2f}x as much as the eligible mean, "
            f"{t.inside:.0%} of it inside the object (the oracle's heads: {o.level:.2f}x, {o.inside:.0%}; single-head "
            f"IoU {t.single_iou:.3f} against {o.single_iou:.3f}); their maps' concentration {t.concentration:.3f} "
            f"against {o.concentration:.3f}, {t.late_votes:.0%} of their votes for the kind in the later half of the schedule "
            f"({o.late_votes:.0%}); {t.up_share:.0%} of them in the up blocks ({o.up_share:.0%}). Across the eligible heads "
            f"relevance follows {follows} (Spearman rho with the attention level {t.rho_relevance_level:+.2f}, with the "
            f"share inside the object {t.rho_relevance_inside:+.2f}, with concentration {t.rho_relevance_concentration:+.2f}).")
    return "\n\n".join(out)


def blocks(recs, rel, mask: np.ndarray, k, tau: float, seed: int = 0) -> pd.DataFrame:
    """Where grounding lives on an MM-DiT (Seg4Diff's question), per word kind (and pooled) and
    joint block: the mIoU [bootstrap 95 % CI] of the block's cross-attention map (the mean of its
    eligible heads' maps: DAAM's construction on one block) and of its own ConceptAttention map
    (output space, ``WordRecord.output_blocks``), the block's mean relevance to the kind and its
    share of top-k's heads (``k`` of the heads ``mask`` allows), and whether the block is one of
    ConceptAttention's (``aggregate.concept_layers``). Masks at ``tau``. The best block is chosen on
    these same words: a bound, not a method.

    Returns one row per (kind, layer, space); empty without output-space records (UNets)."""
    import torch
    from .aggregate import concept_layers, mean_maps
    from .evaluate import bootstrap_ci
    scored = [r for r in recs if r.gt is not None]
    if not scored or any(r.output_blocks is None for r in scored):
        return pd.DataFrame()
    layers = list(scored[0].output_layers)
    w = torch.zeros(len(layers), len(rel.heads))
    for i, h in enumerate(rel.heads):
        if mask[i] and h.layer in layers:
            w[layers.index(h.layer), i] = 1.0
    have = w.sum(1) > 0
    ious = {}
    for r in scored:
        att = mask_ious(mean_maps(torch.as_tensor(r.maps), w[have]), r.gt, [tau])[:, 0]
        full = np.full(len(layers), np.nan)
        full[have.numpy()] = att
        ious.setdefault(r.kind, []).append((full, mask_ious(r.output_blocks, r.gt, [tau])[:, 0]))
    ious = {c: ious[c] for c in sorted(ious)} | {"pooled": [x for c in sorted(ious) for x in ious[c]]}
    ca = set(concept_layers(layers))
    rows = []
    for c, per in ious.items():
        top = (set(head_set("top", rel.heads, rel.row(c), k, mask=mask, concept=c).index)
               if c != "pooled" else set())
        for j, layer in enumerate(layers):
            idx = [i for i, h in enumerate(rel.heads) if h.layer == layer and mask[i]]
            for space, col in (("attention", 0), ("output", 1)):
                v = np.array([x[col][j] for x in per], float)
                m, lo, hi = bootstrap_ci(v, seed=seed) if not np.isnan(v).all() else (np.nan,) * 3
                rows.append(dict(kind=c, layer=layer, block=j, space=space, mIoU=m, ci_low=lo, ci_high=hi, n_words=len(v),
                                 relevance=float(np.mean(rel.row(c)[idx])) if c != "pooled" and idx else np.nan,
                                 top_share=len(top & set(idx)) / max(len(top), 1) if c != "pooled" else np.nan,
                                 concept_block=layer in ca))
    return pd.DataFrame(rows)


def blocks_lines(df: pd.DataFrame) -> list[str]:
    """One sentence per kind (and pooled) from :func:`blocks`: the best block in each space against
    ConceptAttention's blocks, and where the kind's top-k heads sit and its relevance peaks."""
    out = []
    for c, g in df.groupby("kind", sort=False):
        att, outp = g[g.space == "attention"].dropna(subset=["mIoU"]), g[g.space == "output"]
        ba, bo = att.loc[att.mIoU.idxmax()], outp.loc[outp.mIoU.idxmax()]
        ca = outp[outp.concept_block]
        s = (f"**{c}**: the best block for cross-attention is block {ba.block} ({ba.mIoU:.3f} [{ba.ci_low:.3f}, {ba.ci_high:.3f}]), "
             f"in output space block {bo.block} ({bo.mIoU:.3f} [{bo.ci_low:.3f}, {bo.ci_high:.3f}]); ConceptAttention's blocks "
             f"({', '.join(map(str, ca.block))}) score {', '.join(f'{v:.3f}' for v in ca.mIoU)} one by one")
        if c != "pooled":
            tops = att[att.top_share > 0]
            s += ("; the kind's top-k heads sit in blocks " + ", ".join(f"{r.block} ({r.top_share:.0%})" for r in tops.itertuples())
                  + f", its relevance peaks in block {att.loc[att.relevance.idxmax()].block}")
        out.append(s + ".")
    return out
