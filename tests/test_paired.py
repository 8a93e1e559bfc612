"""Paired comparisons on the same words, the verdict rule stated once, and the three places that print it."""
import json
import sys

import numpy as np
import pandas as pd
import pytest

from saam import paths
from saam.paired import paired_auroc, paired_stats, paired_table, verdict, verdict_lines
from saam.select import METHODS


def _scores(top_minus_daam):
    """score_records-like rows: 6 words, DAAM's IoU by hand, top-k's = DAAM's + the given differences."""
    daam = np.array([0.2, 0.4, 0.1, 0.5, 0.3, 0.6])
    rows = []
    for i, (a, d) in enumerate(zip(daam, top_minus_daam)):
        for m, v in ((METHODS["daam"], a), (METHODS["top"], a + d)):
            rows.append(dict(image=i, word="red", occurrence=0, kind="color", method=m, k=0.25, tau=0.4, draw=0,
                             missing=False, iou=v))
    rows.append(dict(image=9, word="blue", occurrence=0, kind="color", method=METHODS["top"], k=0.25, tau=0.4, draw=0,
                     missing=True, iou=np.nan))  # a missing object: left out, as in Table 1
    return pd.DataFrame(rows)


def test_paired_differences_by_hand():
    t = paired_table(_scores([0.1] * 6)).iloc[0]
    assert t.method == METHODS["top"] and t.n == 6
    assert t["diff"] == pytest.approx(0.1) and t.ci_low == pytest.approx(0.1) and t.better == 1.0 and t.worse == 0.0
    mixed = paired_table(_scores([0.3, -0.1, 0.2, -0.2, 0.05, -0.05])).iloc[0]
    assert mixed["diff"] == pytest.approx(0.2 / 6) and mixed.ci_low < 0 < mixed.ci_high
    assert mixed.better == 0.5 and mixed.worse == 0.5 and 0 < mixed.p_wilcoxon <= 1
    s = paired_stats([0.0, 0.0])
    assert s["p_wilcoxon"] == 1.0 and s["diff"] == 0


def test_the_rule_is_the_paired_interval():
    row = dict(n=10, diff=0.02, ci_low=0.005, ci_high=0.03, p_wilcoxon=0.01, better=0.6, worse=0.3, d_z=0.4)
    assert verdict(row, "x")["call"] == "better" and "**better than**" in verdict(row, "x")["sentence"]
    assert verdict(dict(row, ci_low=-0.01), "x")["call"] == "not distinguishable"
    assert verdict(dict(row, diff=-0.02, ci_low=-0.03, ci_high=-0.001), "x")["call"] == "worse"
    assert "+0.020 [+0.005, +0.030]" in verdict(row, "x")["sentence"]


def test_paired_auroc_on_the_same_items():
    y = np.array([True] * 20 + [False] * 10)
    rng = np.random.default_rng(0)
    good = np.where(y, 1.0, 0.0) + rng.normal(0, 0.1, 30)
    noise = rng.normal(0, 1, 30)
    d = paired_auroc(pd.DataFrame(dict(top=good, daam=noise)), y, "top", n=300)
    assert d["diff"] > 0.2 and d["ci_low"] > 0 and d["p_bootstrap"] < 0.01
    same = paired_auroc(pd.DataFrame(dict(top=noise, daam=noise)), y, "top", n=100)
    assert same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0


def test_readme_report_and_chapter_print_the_same_verdict(tmp_path, monkeypatch):
    """Change the numbers in results.json: the README block and the report follow, and chapter 03 prints
    the same entry through the same function."""
    sys.path.insert(0, str(paths.ROOT / "scripts"))
    import readme_results
    import report
    res = json.loads((paths.ROOT / "figures" / "results.json").read_text())
    sentence = verdict(dict(n=5, diff=0.123, ci_low=0.1, ci_high=0.2, p_wilcoxon=0.03, better=0.8, worse=0.2, d_z=1.1),
                       "a test")["sentence"]
    res["verdict"] = {"table1": dict(sentence=sentence)}
    assert verdict_lines(res)[0] == sentence and "0.754" in verdict_lines(res)[-1]
    assert sentence in readme_results.block(res)
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "results.json").write_text(json.dumps(res))
    page = report.front_page("paper", figs, tmp_path, [])
    assert "+0.123 [+0.100, +0.200]" in page and "<b>better than</b>" in page
    chapter = json.loads((paths.ROOT / "notebooks" / "03-miou.ipynb").read_text())
    code = "".join("".join(c["source"]) for c in chapter["cells"])
    assert "verdict_lines(res)" in code and "beats DAAM" not in code  # no rule of its own
