"""The head selection's own uncertainty (two-level bootstrap), selection frequencies, and the
cross-fitted oracle-k bound (``saam.selection``), on the smoke profile's cached organism run."""
import numpy as np
import pytest


@pytest.fixture(scope="module")
def run(smoke_run):
    from saam import tables
    p, rel, recs, _ = smoke_run
    return p, rel, recs, tables.score(recs, rel, p)


def test_point_estimates_are_table1s_and_the_resampled_votes_reproduce_the_relevance(run):
    from saam import tables
    from saam.paired import paired_table
    from saam.relevance import normalize_votes
    from saam.select import METHODS
    p, rel, recs, df = run
    assert np.allclose(normalize_votes(rel.prompt_votes), rel.matrix)  # all prompts once: the relevance itself
    sel = tables.selection(recs, rel, p, n_draws=50)
    two = sel["two_level"]
    pooled = paired_table(df)
    pooled = pooled[pooled.method == METHODS["top"]].iloc[0]
    assert two["pooled"]["diff"] == pytest.approx(pooled["diff"], abs=1e-9) and two["pooled"]["n"] == pooled["n"]
    bk = paired_table(df, by_kind=True).set_index(["method", "kind"])
    for c in ("color", "shape", "size"):
        assert two[c]["diff"] == pytest.approx(bk.loc[(METHODS["top"], c), "diff"], abs=1e-9)
        assert two[c]["ci_low"] <= two[c]["ci_high"]


def test_selection_frequency_and_jaccard(run):
    from saam import tables
    from saam.select import resolve_k
    from saam.selection import resampled_sets, selection_summary
    p, rel, recs, df = run
    mask = tables.eligible(p, rel.heads)
    draws, sets = resampled_sets(rel, ["color", "shape"], p["k"], mask, n_draws=40, seed=3)
    k = resolve_k(p["k"], int(mask.sum()))
    assert draws.shape == (40, rel.prompt_votes.shape[0]) and all(len(s) == k for s in sets["color"])
    s = selection_summary(sets, len(rel.heads))
    f = s["color"]["frequency"]
    assert f.sum() == pytest.approx(k) and f.max() <= 1 and not f[~mask].any()  # ineligible heads never selected
    assert 0 < s["color"]["jaccard"] <= 1
    same = selection_summary({"x": [(1, 2, 3)] * 4}, 8)["x"]
    assert same["jaccard"] == 1.0 and same["distinct_sets"] == 1
    with pytest.raises(ValueError, match="no per-prompt votes"):
        resampled_sets(type(rel)(rel.concepts, rel.heads, rel.matrix), ["color"], p["k"], mask)


def test_oracle_k_is_cross_fitted(run):
    """A fold's heads are chosen on the other fold only: spoiling fold 1's masks leaves fold 1's
    heads as they were (chosen on fold 0) and changes fold 0's; the IoUs are those of the chosen heads."""
    import dataclasses
    from saam import tables
    from saam.selection import oracle_ious, word_ious
    p, rel, recs, df = run
    mask = tables.eligible(p, rel.heads)
    a, sa = oracle_ious(recs, rel.heads, p["k"], p["tau"], mask)
    spoilt = [dataclasses.replace(r, gt=np.roll(r.gt, 7, axis=1)) if r.gt is not None and r.image % 2 == 1 else r for r in recs]
    b, sb = oracle_ious(spoilt, rel.heads, p["k"], p["tau"], mask)
    for c in ("color", "shape", "size"):
        assert list(sa[(c, 1)]) == list(sb[(c, 1)])
    assert any(list(sa[(c, 0)]) != list(sb[(c, 0)]) for c in ("color", "shape", "size"))
    r = next(r for r in spoilt if r.gt is not None and r.image % 2 == 1)
    assert b[(r.image, r.word, r.occurrence, r.kind)] == word_ious([r], [sb[(r.kind, 1)]], len(rel.heads), p["tau"])[0, 0]


def test_table1_carries_oracle_and_two_level_ci_and_the_verdict_reads_it(run):
    from saam import tables
    from saam.paired import verdict_lines
    from saam.select import METHODS
    from saam.selection import ORACLE
    p, rel, recs, df = run
    sel = tables.selection(recs, rel, p, n_draws=50)
    tab = tables.with_selection(tables.table1({"generation": df}, p), df, sel, "generation", p)
    bk = tables.with_selection(tables.table1({"generation": df}, p, by_kind=True), df, sel, "generation", p, by_kind=True)
    assert ORACLE in set(tab.method) and set(bk[bk.method == ORACLE].kind) == {"color", "shape", "size"}
    top = tab[tab.method == METHODS["top"]].iloc[0]
    assert top.diff_ci2_low == sel["two_level"]["pooled"]["ci_low"]
    res = tables.table1_results(tab, rel, p, "generation", bk, sel)
    v = res["verdict"]
    assert set(v["table1_by_kind"]) == {"color", "shape", "size"}
    assert v["table1"]["ci_low"] == sel["two_level"]["pooled"]["ci_low"] and v["table1"]["words_ci"][0] == top.diff_ci_low
    lines = verdict_lines(res)
    assert lines[0].startswith("top-k (selective) is **") and "(color words" in lines[0]
    assert "95 % CI over relevance prompts and words" in lines[0] and "Pooled over kinds" in lines[3]
    assert "miou_oracle" in res["table1"] and "selection" in res["table1"]


def test_convergence_compares_disjoint_subsets(run):
    from saam import tables
    from saam.relevance import Relevance
    from saam.selection import convergence
    p, rel, recs, df = run
    mask = tables.eligible(p, rel.heads)
    n = rel.prompt_votes.shape[0]
    conv = convergence(rel, recs, ["color", "shape"], p["k"], p["tau"], mask, splits=5)
    assert sorted(conv.n_prompts.unique()) == [m for m in (n // 8, n // 4, n // 2) if m >= 1]
    assert ((conv.jaccard >= conv.jaccard_min) & (conv.jaccard <= 1)).all()
    same = Relevance(rel.concepts, rel.heads, rel.matrix, prompt_votes=np.repeat(rel.prompt_votes[:1], n, 0))
    c = convergence(same, recs, ["color"], p["k"], p["tau"], mask, splits=5)
    assert (c.jaccard == 1).all() and (c.top_k_miou_sd < 1e-12).all()  # identical prompts: identical sets
    assert (c.jaccard_bootstrap == 1).all() and conv.jaccard_bootstrap.between(0, 1).all()


def test_boundary_ties_count_the_heads_a_set_left_out_by_head_order():
    from saam.select import boundary_ties, bottom_k, top_k
    r = np.array([3.0, 0.0, 0.0, 2.0, 0.0, 1.0])
    assert boundary_ties(r, top_k(r, 3)) == 0
    assert boundary_ties(r, top_k(r, 4)) == 2  # the 4th head (relevance 0) is one of three
    assert boundary_ties(r, bottom_k(r, 2)) == 1
    assert boundary_ties(r, top_k(r, 4), mask=np.array([1, 1, 0, 1, 1, 1], bool)) == 1
