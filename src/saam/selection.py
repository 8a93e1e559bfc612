"""The head set is an estimate: its uncertainty, and what a selection could reach at best.

Top-k's heads come from HRV's votes over a finite set of relevance prompts, so Table 1's
words-only CI understates what a rerun with other prompts would give. Here:

- :func:`resampled_sets`: relevance re-estimated from relevance prompts resampled with
  replacement (HRV's votes are kept per prompt, ``Relevance.prompt_votes``), and each draw's
  top-k set per word kind; :func:`selection_summary` turns them into how often each head is
  selected and the expected Jaccard between the sets of two independent draws.
- :func:`two_level`: the paired difference to DAAM with a *two-level* bootstrap: each draw
  resamples relevance prompts (re-selecting the heads), then the evaluation words; per kind and
  pooled. The verdict rule (``paired.verdict``) reads this interval.
- :func:`oracle_ious`: "oracle-k", an upper reference no user can run without masks: per kind,
  the k eligible heads with the best single-head IoU, chosen on the other half of the images
  (cross-fitted: no word scores a selection its own mask chose).

Every IoU here is the one Table 1 computes (``aggregate.mean_maps`` of a record's per-head maps,
``evaluate.mask_ious`` at the profile's tau), so at the full relevance the point estimates are
Table 1's (tested).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .aggregate import mean_maps
from .evaluate import WordRecord, mask_ious
from .relevance import Relevance
from .rules import rule_matrix
from .votes import normalize_votes
from .select import head_set

N_DRAWS = 1000  # two-level bootstrap draws (each: relevance prompts, then words)
ORACLE = "oracle-k (a bound: heads chosen with masks)"  # its label in Table 1
ORACLE_OUTPUT = "oracle-k, output space (a bound: heads chosen with masks)"  # MM-DiTs: head-wise ConceptAttention's bound


def head_maps(r: WordRecord, space: str = "attention") -> np.ndarray:
    """A record's per-head maps [heads, h, w] in ``space``: ``attention`` (``maps``) or, on an
    MM-DiT, ``output`` (each head's own output-space map, ``output_heads``)."""
    m = {"attention": r.maps, "output": r.output_heads}[space]
    if m is None:
        raise ValueError("head-wise output-space maps come from an MM-DiT's records; these have none")
    return m


def word_ious(recs: Sequence[WordRecord], sets: Sequence[Sequence[int]], n_heads: int, tau: float,
              space: str = "attention") -> np.ndarray:
    """[sets, words] IoU of each word's mask from the plain mean of its per-head maps (in ``space``,
    :func:`head_maps`) over each head set (indices into the heads), as Table 1 scores a set; NaN
    where the object is missing."""
    w = np.zeros((len(sets), n_heads), np.float32)
    for i, s in enumerate(sets):
        w[i, list(s)] = 1.0
    w = torch.as_tensor(w)
    out = np.full((len(sets), len(recs)), np.nan)
    for j, r in enumerate(recs):
        if r.gt is not None:
            out[:, j] = mask_ious(mean_maps(torch.as_tensor(head_maps(r, space)), w), r.gt, [tau])[:, 0]
    return out


def prompt_draws(rel: Relevance, n_draws: int = N_DRAWS, seed: int = 0) -> np.ndarray:
    """[n_draws, prompts]: relevance prompts resampled with replacement (indices into ``rel.prompt_votes``)."""
    if rel.prompt_votes is None:
        raise ValueError("this relevance keeps no per-prompt votes (published vectors, or an old cache): "
                         "the head selection's uncertainty needs HRV's pass")
    n = len(rel.prompt_votes)
    return np.random.default_rng(seed).integers(0, n, (n_draws, n))


def score_matrix(rel: Relevance, counts: np.ndarray, rule: str | None = None) -> np.ndarray:
    """[concepts, heads]: relevance (``rule`` None) or a pre-registered rule's scores (``saam.rules``)
    from the relevance prompts weighted by ``counts``."""
    if rule is not None:
        return rule_matrix(rel, rule, counts)
    return normalize_votes(np.tensordot(counts, np.asarray(rel.prompt_votes, np.float64), axes=1))


def resampled_sets(rel: Relevance, kinds: Sequence[str], k, mask: np.ndarray, n_draws: int = N_DRAWS,
                   seed: int = 0, method: str = "top", rule: str | None = None
                   ) -> tuple[np.ndarray, dict[str, list[tuple[int, ...]]]]:
    """(prompt draws [n_draws, prompts], {kind: each draw's head set as sorted indices}): the
    relevance of each draw is :func:`votes.normalize_votes` of the resampled prompts' votes (or,
    with ``rule``, that rule's scores from the resampled prompts)."""
    draws = prompt_draws(rel, n_draws, seed)
    n = len(rel.prompt_votes)
    rows = [rel.index(c) for c in kinds]
    sets: dict[str, list[tuple[int, ...]]] = {c: [] for c in kinds}
    for d in draws:
        m = score_matrix(rel, np.bincount(d, minlength=n), rule)
        for c, i in zip(kinds, rows):
            sets[c].append(tuple(sorted(head_set(method, rel.heads, m[i], k, mask=mask, concept=c).index.tolist())))
    return draws, sets


def selection_summary(sets: dict[str, list[tuple[int, ...]]], n_heads: int) -> dict[str, dict]:
    """Per kind: each head's selection frequency over the draws, and the expected Jaccard index of
    two independent draws' sets (consecutive draws paired)."""
    out = {}
    for c, ss in sets.items():
        freq = np.zeros(n_heads)
        for s in ss:
            freq[list(s)] += 1
        jac = [len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in zip(ss[::2], ss[1::2])]
        out[c] = dict(frequency=freq / len(ss), jaccard=float(np.mean(jac)) if jac else float("nan"),
                      distinct_sets=len(set(ss)))
    return out


def _drawn_diffs(recs, rel: Relevance, kinds, k, tau: float, mask, daam, n_draws: int, seed: int, method: str = "top",
                 rules: Sequence[str] = ()) -> tuple[dict, dict, dict, dict]:
    """The two-level bootstrap's first level, shared by every selection scored on the same draws of
    relevance prompts: relevance's ``method`` sets (key None), then each rule's top-k. Returns
    (sets {sel: {kind: per-draw sets}}, point {sel: {kind: [words] IoU at the full relevance}},
    boots {sel: {kind: [draws, words] difference to DAAM}}, daam {kind: [words] DAAM's IoU})."""
    words = [r for r in recs if r.gt is not None and r.kind in kinds]
    sels = [None, *rules]
    sets, full = {}, {}
    for rule in sels:
        _, sets[rule] = resampled_sets(rel, kinds, k, mask, n_draws, seed, method, rule)
        m = rel.matrix if rule is None else rule_matrix(rel, rule)
        full[rule] = {c: tuple(sorted(head_set(method, rel.heads, m[rel.index(c)], k, mask=mask, concept=c).index.tolist()))
                      for c in kinds}
    point, boots, base = {r: {} for r in sels}, {r: {} for r in sels}, {}
    for c in kinds:
        rs = [r for r in words if r.kind == c]
        if not rs:
            continue
        unique = sorted(set().union(*({*sets[r][c], full[r][c]} for r in sels)))
        at = {s: i for i, s in enumerate(unique)}
        iou = word_ious(rs, [*unique, tuple(daam)], len(rel.heads), tau)
        base[c] = iou[-1]
        for r in sels:
            point[r][c] = iou[at[full[r][c]]]
            boots[r][c] = iou[[at[s] for s in sets[r][c]]] - iou[-1]  # [draws, words]: the draw's selection on every word
    return sets, point, boots, base


def _word_draws(boots: dict, seed: int) -> dict:
    """The second level: each draw's resample of the words, per kind and pooled (kinds concatenated)."""
    rng = np.random.default_rng(seed + 1)
    idx = {c: rng.integers(0, b.shape[1], b.shape) for c, b in boots.items()}
    if boots:
        n = sum(b.shape[1] for b in boots.values())
        idx["pooled"] = rng.integers(0, n, (len(next(iter(boots.values()))), n))
    return idx


def _resampled_means(b: dict, idx: dict) -> dict:
    """{kind | "pooled": [draws]} mean difference of each draw on its resampled words."""
    out = {c: np.take_along_axis(v, idx[c], 1).mean(1) for c, v in b.items()}
    if b:
        out["pooled"] = np.take_along_axis(np.concatenate(list(b.values()), 1), idx["pooled"], 1).mean(1)
    return out


def two_level(recs: Sequence[WordRecord], rel: Relevance, kinds: Sequence[str], k, tau: float, mask: np.ndarray,
              daam: Sequence[int], n_draws: int = N_DRAWS, seed: int = 0, method: str = "top") -> dict:
    """Top-k (or ``method``) minus DAAM, per kind and pooled, with the two-level bootstrap 95 % CI.

    Returns ``{"pooled" | kind: dict(diff, ci_low, ci_high, n)}`` (``diff``: the point estimate at
    the full relevance, Table 1's), plus ``"selection"``: :func:`selection_summary` per kind.
    """
    sets, point, boots, base = _drawn_diffs(recs, rel, kinds, k, tau, mask, daam, n_draws, seed, method)
    means = _resampled_means(boots[None], _word_draws(boots[None], seed))
    diffs = {c: point[None][c] - base[c] for c in boots[None]}
    if diffs:
        diffs["pooled"] = np.concatenate(list(diffs.values()))
    out: dict = {c: dict(diff=float(diffs[c].mean()), ci_low=float(np.quantile(m, 0.025)),
                         ci_high=float(np.quantile(m, 0.975)), n=int(len(diffs[c]))) for c, m in means.items()}
    out["selection"] = selection_summary(sets[None], len(rel.heads))
    return out


def bootstrap_p(means: np.ndarray) -> float:
    """Two-sided bootstrap p of a mean difference: twice the smaller share of draws on either side
    of 0, at least 1 / draws (a draw count can show no smaller p)."""
    m = np.asarray(means)
    return float(min(1.0, max(2 * min((m <= 0).mean(), (m >= 0).mean()), 1 / len(m))))


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p values (family-wise error), in the order given."""
    p = np.asarray(p, np.float64)
    m, order = len(p), np.argsort(p, kind="stable")
    adj = np.empty(m)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        adj[j] = running
    return adj


def rule_comparison(recs: Sequence[WordRecord], rel: Relevance, kinds: Sequence[str], k, tau: float,
                    mask: np.ndarray, daam: Sequence[int], rules: Sequence[str], n_draws: int = N_DRAWS,
                    seed: int = 0, alpha: float = 0.05):
    """The pre-registered mask-free rules (``saam.rules``) against DAAM and against top-k, per kind
    and pooled, on the same words and the same relevance draws as top-k's two-level CI.

    Each rule's difference to DAAM and to top-k gets a two-level bootstrap p; within each kind (and
    pooled) the rules are one family, adjusted with Holm's step-down procedure; each interval is
    the percentile interval at the level Holm's step gives the rule (alpha / (m - i + 1) for the
    i-th smallest p), so an interval excludes 0 exactly where its Holm-adjusted p < alpha (up to
    the draws' resolution). ``helps``: better than DAAM and than top-k, both Holm-adjusted.

    Returns a table: kind, method (``"top"`` or a rule), mIoU (full relevance), diff_daam
    [daam_ci_low, daam_ci_high] at ``daam_level``, p_daam, p_daam_holm, diff_top [top_ci_low,
    top_ci_high] at ``top_level``, p_top, p_top_holm, helps, n_words.
    """
    import pandas as pd
    _, point, boots, base = _drawn_diffs(recs, rel, kinds, k, tau, mask, daam, n_draws, seed, "top", rules)
    idx = _word_draws(boots[None], seed)
    means = {r: _resampled_means(boots[r], idx) for r in boots}
    groups = list(means[None])
    iou = {r: dict(point[r], pooled=np.concatenate([point[r][c] for c in groups if c != "pooled"])) for r in point}
    base = dict(base, pooled=np.concatenate([base[c] for c in groups if c != "pooled"]))
    rows = []
    for g in groups:
        t = means[None][g]
        rows.append(dict(kind=g, method="top", mIoU=float(iou[None][g].mean()), diff_daam=float((iou[None][g] - base[g]).mean()),
                         daam_ci_low=float(np.quantile(t, alpha / 2)), daam_ci_high=float(np.quantile(t, 1 - alpha / 2)),
                         p_daam=bootstrap_p(t), n_words=len(base[g]), daam_level=1 - alpha))
        part = []
        for r in rules:
            vs_top = means[r][g] - t
            part.append(dict(kind=g, method=r, mIoU=float(iou[r][g].mean()), diff_daam=float((iou[r][g] - base[g]).mean()),
                             p_daam=bootstrap_p(means[r][g]), diff_top=float((iou[r][g] - iou[None][g]).mean()),
                             p_top=bootstrap_p(vs_top), n_words=len(base[g])))
        for key, draws in (("daam", lambda r: means[r][g]), ("top", lambda r: means[r][g] - t)):
            ps = [row[f"p_{key}"] for row in part]
            for rank, j in enumerate(np.argsort(ps, kind="stable")):
                a = alpha / (len(part) - rank)
                part[j][f"{key}_ci_low"], part[j][f"{key}_ci_high"] = (float(np.quantile(draws(part[j]["method"]), a / 2)),
                                                                       float(np.quantile(draws(part[j]["method"]), 1 - a / 2)))
                part[j][f"{key}_level"] = 1 - a
            for row, adj in zip(part, holm(ps)):
                row[f"p_{key}_holm"] = float(adj)
        for row in part:
            row["helps"] = bool(row["diff_daam"] > 0 and row["p_daam_holm"] < alpha and row["diff_top"] > 0
                                and row["p_top_holm"] < alpha)
        rows += part
    return pd.DataFrame(rows)


def oracle_ious(recs: Sequence[WordRecord], heads, k, tau: float, mask: np.ndarray,
                folds: int = 2, space: str = "attention") -> tuple[dict[tuple, float], dict[tuple, np.ndarray]]:
    """Cross-fitted oracle-k: ({(image, word, occurrence, kind): IoU}, {(kind, fold): head indices}).
    Per kind, images fall into ``folds`` folds by their index; a fold's words are scored with the k
    eligible heads whose single-head maps scored best (mean IoU at ``tau``) on the other folds'
    words of that kind. ``space``: the heads' attention maps, or on an MM-DiT their own output-space
    maps (:func:`head_maps`; the bound for head-wise ConceptAttention)."""
    return _oracle(recs, heads, [k], tau, mask, folds, space)[0]


def _oracle(recs, heads, ks, tau, mask, folds: int = 2, space: str = "attention") -> list[tuple[dict, dict]]:
    """:func:`oracle_ious` at each of ``ks``, the single-head IoUs computed once."""
    out = [({}, {}) for _ in ks]
    for c in sorted({r.kind for r in recs}):
        rs = [r for r in recs if r.kind == c and r.gt is not None]
        if not rs:
            continue
        single = np.stack([mask_ious(head_maps(r, space), r.gt, [tau])[:, 0] for r in rs])  # [words, heads]
        fold = np.array([r.image % folds for r in rs])
        for f in range(folds):
            train, test = fold != f, np.flatnonzero(fold == f)
            if not len(test):
                continue
            if not train.any():
                raise ValueError(f"oracle-k for {c!r}: every scored word's image is in one fold; more images are needed")
            score = single[train].mean(0)
            for (ious, chosen_sets), k in zip(out, ks):
                chosen = chosen_sets[(c, f)] = head_set("top", heads, score, k, mask=mask, concept=c).index
                iou = word_ious([rs[i] for i in test], [chosen], len(heads), tau, space)[0]
                for i, v in zip(test, iou):
                    r = rs[i]
                    ious[(r.image, r.word, r.occurrence, r.kind)] = float(v)
    return out


def oracle_sweep(recs: Sequence[WordRecord], heads, ks: Sequence, tau: float, mask: np.ndarray, seed: int = 0):
    """Cross-fitted oracle-k's mIoU [bootstrap 95 % CI over words] at each k: rows in the layout of
    ``evaluate.miou_table`` (method, k, tau, mIoU, ci_low, ci_high, n_words), for the k sweep."""
    import pandas as pd
    from .evaluate import bootstrap_ci
    rows = []
    for k, (ious, _) in zip(ks, _oracle(recs, heads, list(ks), tau, mask)):
        v = np.array(list(ious.values()))
        m, lo, hi = bootstrap_ci(v, seed=seed)
        rows.append(dict(method=ORACLE, k=k, tau=tau, mIoU=m, ci_low=lo, ci_high=hi, n_words=len(v)))
    return pd.DataFrame(rows)


def convergence(rel: Relevance, recs: Sequence[WordRecord], kinds: Sequence[str], k, tau: float, mask: np.ndarray,
                ns: Sequence[int] | None = None, splits: int = 20, seed: int = 0):
    """How the top-k sets and top-k's mIoU settle as relevance prompts are added, from one pool of
    per-prompt votes (``rel.prompt_votes``, P prompts). For each n (default P/8, P/4, P/2) and
    kind, over ``splits`` random pairs of *disjoint* n-prompt subsets: the mean (and lowest)
    Jaccard index of the two subsets' top-k sets, and top-k's mIoU on the kind's words with the
    heads each subset selects (mean and SD over the 2 x ``splits`` subsets). Beside it,
    ``jaccard_bootstrap``: the Jaccard of two resamples *with replacement* of the first subset's n
    prompts, what the two-level CI's bootstrap reports at n, on the same prompts."""
    import pandas as pd
    if rel.prompt_votes is None:
        raise ValueError("the convergence check needs per-prompt votes (HRV's pass), not published vectors")
    pv = np.asarray(rel.prompt_votes, np.float64)
    n_pool = len(pv)
    ns = [n for n in (ns or (n_pool // 8, n_pool // 4, n_pool // 2)) if 1 <= n <= n_pool // 2]
    rng = np.random.default_rng(seed)
    words = {c: [r for r in recs if r.kind == c and r.gt is not None] for c in kinds}
    memo: dict[tuple, float] = {}

    def miou(c, s):
        if (c, s) not in memo:
            memo[(c, s)] = float(np.mean(word_ious(words[c], [s], len(rel.heads), tau)[0])) if words[c] else np.nan
        return memo[(c, s)]
    boot_rng = np.random.default_rng(seed + 2)  # its own stream: the disjoint subsets stay those of rng
    jac = lambda ss: [len(set(a) & set(b)) / len(set(a) | set(b)) for a, b in zip(ss[::2], ss[1::2])]  # noqa: E731

    def top_sets(votes):
        m = normalize_votes(votes)
        return {c: tuple(sorted(head_set("top", rel.heads, m[rel.index(c)], k, mask=mask, concept=c).index.tolist()))
                for c in kinds}
    rows = []
    for n in ns:
        sets, boot = {c: [] for c in kinds}, {c: [] for c in kinds}
        for _ in range(splits):
            perm = rng.permutation(n_pool)
            for half in (perm[:n], perm[n:2 * n]):
                for c, s in top_sets(pv[half].sum(0)).items():
                    sets[c].append(s)
            for _ in range(2):
                for c, s in top_sets(pv[perm[:n][boot_rng.integers(0, n, n)]].sum(0)).items():
                    boot[c].append(s)
        for c in kinds:
            j = jac(sets[c])
            ious = [miou(c, s) for s in sets[c]]
            rows.append(dict(n_prompts=n, kind=c, jaccard=float(np.mean(j)), jaccard_min=float(np.min(j)),
                             jaccard_bootstrap=float(np.mean(jac(boot[c]))),
                             top_k_miou=float(np.mean(ious)), top_k_miou_sd=float(np.std(ious)), splits=splits))
    return pd.DataFrame(rows)


def reestimates(rels: Sequence[Relevance], recs: Sequence[WordRecord], kinds: Sequence[str], k, tau: float,
                mask: np.ndarray, daam: Sequence[int], n_draws: int = N_DRAWS, seed: int = 0):
    """Does the two-level CI keep its promise? ``rels[0]`` is the verdict's relevance, ``rels[1:]``
    independent re-estimates of it (new prompts, noise and HRV word draws; ``steps.relevance_reestimate``),
    all scored on the same evaluation records.

    Returns (per-estimate table, per-kind summary). Per estimate and kind (and pooled): its top-k set,
    top-k minus DAAM, its two-level 95 % CI and its relevance-only 95 % interval (the first level alone:
    the draws' mean over the fixed words). Per kind: how often a re-estimate's set differs from the
    verdict's, the mean pairwise Jaccard of independent estimates' sets (what the bootstrap's expected
    Jaccard and the convergence check's disjoint subsets both estimate), how many re-estimates fall
    outside the verdict's two-level CI, the spread of top-k minus DAAM across estimates against the
    spread the first level claims (mean SD of its draws), how often an estimate's relevance-only
    interval and its two-level CI cover the mean of the other estimates, and how many re-estimates
    would fall outside the verdict's CI were its first level exactly right (``expected_outside``).
    """
    import pandas as pd
    from scipy.stats import norm
    rows, sets_of = [], {}
    for j, rel in enumerate(rels):
        sets, point, boots, base = _drawn_diffs(recs, rel, kinds, k, tau, mask, daam, n_draws, seed)
        two = _resampled_means(boots[None], _word_draws(boots[None], seed))
        diffs = {c: point[None][c] - base[c] for c in boots[None]}
        first = {c: b.mean(1) for c, b in boots[None].items()}
        if diffs:
            diffs["pooled"] = np.concatenate(list(diffs.values()))
            first["pooled"] = np.concatenate(list(boots[None].values()), 1).mean(1)
        for c in diffs:
            if c != "pooled":
                sets_of[(j, c)] = set(head_set("top", rel.heads, rel.row(c), k, mask=mask, concept=c).index.tolist())
            rows.append(dict(estimate=j, kind=c, diff=float(diffs[c].mean()), ci_low=float(np.quantile(two[c], 0.025)),
                             ci_high=float(np.quantile(two[c], 0.975)), rel_low=float(np.quantile(first[c], 0.025)),
                             rel_high=float(np.quantile(first[c], 0.975)), rel_sd=float(first[c].std(ddof=1)),
                             n_prompts=int(len(rel.prompt_votes)),
                             heads=",".join(map(str, sorted(sets_of[(j, c)]))) if c != "pooled" else ""))
    per = pd.DataFrame(rows)
    summary = []
    for c, g in per.groupby("kind", sort=False):
        g = g.set_index("estimate")
        main, others = g.loc[0], g.drop(index=0)
        jac = lambda a, b: len(a & b) / len(a | b)  # noqa: E731
        est = sorted(g.index)
        pairs = [(a, b) for i, a in enumerate(est) for b in est[i + 1:]]
        loo = [g.drop(index=j)["diff"].mean() for j in est]
        summary.append(dict(
            kind=c, n_estimates=len(g),
            set_changed=(float(np.mean([sets_of[(j, c)] != sets_of[(0, c)] for j in others.index]))
                         if c != "pooled" and len(others) else np.nan),
            jaccard_pairwise=float(np.mean([jac(sets_of[(a, c)], sets_of[(b, c)]) for a, b in pairs])) if c != "pooled" and pairs else np.nan,
            jaccard_min=float(np.min([jac(sets_of[(a, c)], sets_of[(b, c)]) for a, b in pairs])) if c != "pooled" and pairs else np.nan,
            outside_two_level=int(((others["diff"] < main.ci_low) | (others["diff"] > main.ci_high)).sum()),
            sd_between=float(g["diff"].std(ddof=1)), sd_first_level=float(g.rel_sd.mean()),
            rel_covers_others=float(np.mean([(g.loc[j, "rel_low"] <= m <= g.loc[j, "rel_high"]) for j, m in zip(est, loo)])),
            two_covers_others=float(np.mean([(g.loc[j, "ci_low"] <= m <= g.loc[j, "ci_high"]) for j, m in zip(est, loo)])),
            # a re-estimate against an interval around another estimate: their difference has sqrt(2) x the first
            # level's spread, so even a right interval leaves some outside (normal approximation)
            expected_outside=float(len(others) * 2 * norm.sf((main.ci_high - main.ci_low) / 2 / (np.sqrt(2) * g.rel_sd.mean())))
            if g.rel_sd.mean() > 0 else 0.0,
            diff_main=float(main["diff"]), diff_mean=float(g["diff"].mean()), ci_low=float(main.ci_low), ci_high=float(main.ci_high)))
    summary = pd.DataFrame(summary)
    summary.attrs["n_prompts"] = int(len(rels[0].prompt_votes))
    return per, summary
