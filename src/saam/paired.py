"""Every method against DAAM on the same words: paired differences, and the one rule that turns a
paired interval into a verdict.

Two means over the same words with independent CIs hide what matters: the methods are scored on
identical maps and masks, so the question is the per-word difference. :func:`paired_table` gives,
per method, k and tau (and word kind): the mean difference to DAAM with a paired bootstrap 95 % CI
(words resampled), the Wilcoxon signed-rank p (``scipy.stats.wilcoxon``), the share of words where
the method is better and worse, and the paired effect size d_z (mean difference / its SD).
:func:`paired_auroc` does the same for the binding diagnosis (items resampled, stratified).
:func:`verdict` is the rule, stated once: better or worse where the CI of the paired difference
excludes 0, not distinguishable where it does not. The README, the report and chapter 03 print the
sentence it wrote into ``results.json`` (:func:`verdict_lines`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .evaluate import WORD, auroc, auroc_resampled, bootstrap_ci, per_word, stratified_resamples
from .select import METHODS

BASE = "daam"
# the paper's own effect, for scale: a third-party summary's numbers (the paper's text was not available)
PAPER_EFFECT = ("For scale, the paper's own effect on SD v1.4 as a third-party summary reports it (secondary source, "
                "not the paper's text): DAAM 0.754 -> top-k 0.777 mIoU (+0.023).")


def paired_stats(diff, seed: int = 0, n_boot: int = 2000) -> dict:
    """Summary of per-item differences: mean [paired bootstrap CI], Wilcoxon p, shares, d_z."""
    from scipy.stats import wilcoxon
    d = np.asarray(diff, dtype=np.float64)
    d = d[~np.isnan(d)]
    if len(d) == 0:
        return dict(n=0, diff=np.nan, ci_low=np.nan, ci_high=np.nan, p_wilcoxon=np.nan, better=np.nan, worse=np.nan,
                    d_z=np.nan)
    mean, lo, hi = bootstrap_ci(d, n=n_boot, seed=seed)
    p = float(wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    return dict(n=len(d), diff=mean, ci_low=lo, ci_high=hi, p_wilcoxon=p, better=float((d > 0).mean()),
                worse=float((d < 0).mean()), d_z=mean / sd if sd > 0 else np.nan)


PAIRED_KEYS = ("n", "diff", "ci_low", "ci_high", "p_wilcoxon", "p_bootstrap", "better", "worse", "d_z")


def paired_table(df: pd.DataFrame, by_kind: bool = False, seed: int = 0, base: str = BASE) -> pd.DataFrame:
    """Each method minus ``base`` (a ``select.METHODS`` key) per word, at every k and tau of
    ``evaluate.score_records`` rows (random-k: each word's mean over its draws); words whose object
    is missing are left out, as in Table 1."""
    w = per_word(df)
    w = w[~w.missing]
    ref = w[w.method == METHODS[base]].set_index([*WORD, "k", "tau"]).iou
    groups = ["method", "kind", "k", "tau"] if by_kind else ["method", "k", "tau"]
    rows = []
    for key, g in w[w.method != METHODS[base]].groupby(groups, sort=False, dropna=False):
        d = g.set_index([*WORD, "k", "tau"]).iou - ref.reindex(g.set_index([*WORD, "k", "tau"]).index)
        rows.append(dict(zip(groups, key), **paired_stats(d.to_numpy(), seed)))
    return pd.DataFrame(rows)


def paired_auroc(scores: pd.DataFrame, labels, method: str, base: str = BASE, n: int = 2000, seed: int = 0) -> dict:
    """AUROC of ``method`` minus ``base`` on the same items (``scores``: one column per method key),
    with a stratified paired bootstrap CI (positives and negatives resampled apart, the same
    resample for both methods) and a two-sided bootstrap p (twice the smaller share of resampled
    differences on either side of 0)."""
    y = np.asarray(labels, bool)
    a, b = scores[method].to_numpy(float), scores[base].to_numpy(float)
    point = auroc(a, y) - auroc(b, y)
    if np.isnan(point):
        return dict(n=len(y), diff=np.nan, ci_low=np.nan, ci_high=np.nan, p_bootstrap=np.nan)
    idx = stratified_resamples(y, n, seed)
    boots = auroc_resampled(a, y, idx) - auroc_resampled(b, y, idx)
    p = min(1.0, 2 * min((boots <= 0).mean(), (boots >= 0).mean()))
    return dict(n=len(y), diff=point, ci_low=float(np.quantile(boots, 0.025)), ci_high=float(np.quantile(boots, 0.975)),
                p_bootstrap=float(p))


def verdict(row: dict, what: str, metric: str = "mIoU", method: str = "top", base: str = BASE,
            words_ci: tuple[float, float] | None = None) -> dict:
    """The rule, once: ``better`` / ``worse`` where the paired 95 % CI excludes 0, otherwise ``not
    distinguishable``; the sentence states the effect, its interval and which uncertainty that
    interval includes. ``what`` names the comparison's setting (protocol, k, tau, word kind).
    ``words_ci``: given where ``row``'s CI is the two-level one (relevance prompts, then words:
    ``saam.selection.two_level``); the words-only CI is then stated beside it."""
    lo, hi, d = row["ci_low"], row["ci_high"], row["diff"]
    call = "better than" if lo > 0 else "worse than" if hi < 0 else "not distinguishable from"
    extra = ""
    if "better" in row and not np.isnan(row.get("better", np.nan)):
        extra = (f"; better on {row['better']:.0%} and worse on {row['worse']:.0%} of {row['n']} words, "
                 f"Wilcoxon p = {row['p_wilcoxon']:.2g}, d_z = {row['d_z']:+.2f}")
    elif "p_bootstrap" in row and not np.isnan(row["p_bootstrap"]):
        p = row["p_bootstrap"]  # 0 means no resample crossed 0: below the resolution of 2,000 resamples
        extra = f"; paired bootstrap p {'< 0.001' if p < 0.001 else f'= {p:.2g}'}"
    which = ("95 % CI over relevance prompts and words" if words_ci is not None else
             "95 % CI over words" if "better" in row else "95 % CI over items")
    if words_ci is not None:
        which += f"; over words alone [{words_ci[0]:+.3f}, {words_ci[1]:+.3f}]"
    sentence = (f"{METHODS[method]} is **{call}** {METHODS[base]} ({what}): paired difference in {metric} "
                f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] ({which}){extra}.")
    out = dict(call=call.split(" ")[0] if call != "not distinguishable from" else "not distinguishable",
               sentence=sentence, **{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()
                                     if k in PAIRED_KEYS})
    if words_ci is not None:
        out["words_ci"] = [float(words_ci[0]), float(words_ci[1])]
    return out


def verdict_lines(results: dict) -> list[str]:
    """The verdict sentences ``results.json`` holds, in order: what the README, the report and
    chapter 03 print (one place, so they cannot disagree)."""
    v = results.get("verdict", {})
    kinds = v.get("table1_by_kind", {})
    lines = [kinds[c]["sentence"] for c in sorted(kinds)]  # by word kind first: the pooled mean can hide them
    if "table1" in v:
        calls = {kinds[c]["call"] for c in kinds}
        mixed = "better" in calls and "worse" in calls
        lines.append(("Pooled over kinds with opposite signs (the mean below mixes them): " if mixed else
                      "Pooled over kinds: " if kinds else "") + v["table1"]["sentence"])
    lines += [v[k]["sentence"] for k in ("bottom", "binding") if k in v]
    return lines + [PAPER_EFFECT] if lines else []
