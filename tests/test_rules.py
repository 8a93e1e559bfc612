"""The pre-registered mask-free rules (``saam.rules``): what the relevance pass collects for them, how
their scores follow from it, and how they are scored against DAAM and top-k (``saam.selection``)."""
import numpy as np
import pytest
import torch

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def stats_of(maps, won, latent=(4, 4)):
    from saam.rules import RuleStats
    st = RuleStats({LAYER: 0}, maps.shape[1])
    st.start(maps.shape[0], latent)
    st.add(LAYER, maps, won)
    return st.take()


def test_each_rule_statistic_on_maps_whose_answer_is_known():
    maps = torch.zeros(1, 2, 16, 2)
    maps[0, 0, :, 0], maps[0, 0, :, 1] = 0.5, 0.1     # head 0: concept 0 over the whole image
    maps[0, 1, :, 0], maps[0, 1, 5, 1] = 0.05, 0.9    # head 1: concept 1 at one pixel
    s = stats_of(maps, torch.tensor([[0, 1]]))
    assert s["conc"][0, 0, 0] == pytest.approx(0, abs=1e-6)   # a uniform map: entropy log P
    assert s["conc"][0, 1, 1] == pytest.approx(1, abs=1e-6)   # one pixel: entropy 0
    assert s["conc"][0, 0, 1] == 0 and s["conc"][0, 1, 0] == 0  # only the voted concept's map counts
    # every token of head 0 votes concept 0 (ties: the whole map is its top quarter); head 1's
    # one bright token votes concept 1, the other 15 concept 0
    assert s["peak"][0].tolist() == [[16, 0], [15, 1]]
    # consensus: head 1's map of concept 1 is DAAM's up to a constant (r = 1); a flat map has no r (0)
    assert s["consensus"][0, 1, 1] == pytest.approx(1, abs=1e-6) and s["consensus"][0, 0, 1] == 0


def test_peak_votes_drop_tokens_below_the_top_quarter():
    maps = torch.zeros(1, 1, 16, 2)
    maps[0, 0, :, 0] = torch.linspace(0.2, 0.8, 16)  # concept 0 wins everywhere; 4 tokens are its top quarter
    maps[0, 0, :, 1] = 0.1
    s = stats_of(maps, torch.tensor([[0]]))
    assert s["peak"][0, 0].tolist() == [4, 0]


def test_consensus_is_against_daams_heads_only():
    """A mid-block layer is no part of DAAM's map: with only such a layer there is no reference."""
    from saam.rules import RuleStats
    st = RuleStats({"mid_block.attentions.0.transformer_blocks.0.attn2": 0}, 1)
    st.start(1, (4, 4))
    st.add("mid_block.attentions.0.transformer_blocks.0.attn2", torch.rand(1, 1, 16, 2), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="DAAM's heads"):
        st.take()


@pytest.fixture(scope="module")
def tiny_rel():
    from saam.relevance import relevance_pass
    from saam.testing import tiny_pipeline
    concepts = {"color": ["red", "blue"], "animal": ["cat", "dog"], "shape": ["circle", "square"]}
    return relevance_pass(tiny_pipeline("sd1"), concepts, ["a red cat", "a dog", "a blue square", "a cat"], steps=3,
                          guidance=5.0, progress=False, batch_size=3)


def test_the_relevance_pass_keeps_the_rules_statistics_per_prompt(tiny_rel, tmp_path):
    from saam.relevance import Relevance
    rel = tiny_rel
    pv = rel.prompt_votes
    assert set(rel.prompt_stats) == {"conc", "peak", "consensus"}
    assert all(v.shape == pv.shape for v in rel.prompt_stats.values())
    conc = rel.prompt_stats["conc"]
    assert ((conc > 0) <= (pv > 0)).all() and (conc <= pv + 1e-9).all()  # one term in [0, 1] per vote cast
    assert (np.abs(rel.prompt_stats["consensus"]) <= 1 + 1e-9).all()
    rel.save(tmp_path / "r.npz")
    back = Relevance.load(tmp_path / "r.npz")
    assert all(np.array_equal(back.prompt_stats[k], v) for k, v in rel.prompt_stats.items())


def test_rule_scores_follow_from_the_prompts_they_are_given(tiny_rel):
    """Counts that pick prompts give the scores of a pass over those prompts alone: what the
    two-level bootstrap relies on."""
    import dataclasses
    from saam.rules import RULES, rule_matrix
    from saam.votes import normalize_votes
    rel = tiny_rel
    counts = np.array([2, 0, 1, 0])
    pick = [0, 0, 2]
    sub = dataclasses.replace(rel, prompt_votes=rel.prompt_votes[pick],
                              prompt_stats={k: v[pick] for k, v in rel.prompt_stats.items()})
    for r in RULES:
        assert np.allclose(rule_matrix(rel, r, counts), rule_matrix(sub, r), atol=1e-6)
    base = normalize_votes(rel.prompt_votes)
    cons = np.maximum(rel.prompt_stats["consensus"].mean(0), 0).T
    assert np.allclose(rule_matrix(rel, "consensus"), base * cons, atol=1e-6)
    assert np.allclose(rule_matrix(rel, "peak_votes"), normalize_votes(rel.prompt_stats["peak"]))
    with pytest.raises(ValueError, match="per-prompt statistics"):
        rule_matrix(dataclasses.replace(rel, prompt_stats=None), "consensus")
    with pytest.raises(ValueError, match="unknown rule"):
        rule_matrix(rel, "oracle")


def test_holm():
    from saam.selection import holm
    assert np.allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    assert np.allclose(holm([0.5, 0.001]), [0.5, 0.002])


def test_rules_are_scored_on_top_ks_draws_and_words(smoke_run):
    """Top-k's row is its two-level result (the same draws); each rule's interval is at its Holm
    level, and 'helps' needs both Holm-adjusted comparisons."""
    from saam import tables
    from saam.rules import RULES
    from saam.select import head_set
    from saam.selection import rule_comparison, two_level
    p, rel, recs, _ = smoke_run
    mask = tables.eligible(p, rel.heads)
    daam = head_set("daam", rel.heads, None, p["k"], mask=mask).index
    kinds = ["color", "shape", "size"]
    t = rule_comparison(recs, rel, kinds, p["k"], p["tau"], mask, daam, list(RULES), n_draws=60, seed=2)
    two = two_level(recs, rel, kinds, p["k"], p["tau"], mask, daam, n_draws=60, seed=2)
    top = t[t.method == "top"].set_index("kind")
    for g in [*kinds, "pooled"]:
        assert top.loc[g, "diff_daam"] == pytest.approx(two[g]["diff"], abs=1e-12)
        assert (top.loc[g, "daam_ci_low"], top.loc[g, "daam_ci_high"]) == pytest.approx((two[g]["ci_low"], two[g]["ci_high"]))
    r = t[t.method != "top"]
    assert set(r.method) == set(RULES) and len(r) == 3 * 4
    assert sorted(r[r.kind == "color"].daam_level.round(6)) == pytest.approx(sorted([1 - 0.05, 1 - 0.025, 1 - 0.05 / 3]))
    assert (r.p_daam_holm >= r.p_daam).all() and (r.p_top_holm >= r.p_top).all()
    assert (r.helps == ((r.diff_daam > 0) & (r.p_daam_holm < 0.05) & (r.diff_top > 0) & (r.p_top_holm < 0.05))).all()


def test_reestimates_of_the_same_relevance_agree_and_a_shifted_one_is_caught(smoke_run):
    """Two copies of one relevance: every set kept, Jaccard 1, no spread; a re-estimate whose
    relevance is reversed selects other heads and moves top-k minus DAAM."""
    import dataclasses
    from saam import tables
    from saam.select import head_set
    from saam.selection import reestimates
    p, rel, recs, _ = smoke_run
    mask = tables.eligible(p, rel.heads)
    daam = head_set("daam", rel.heads, None, p["k"], mask=mask).index
    kinds = ["color", "shape", "size"]
    per, cover = reestimates([rel, rel], recs, kinds, p["k"], p["tau"], mask, daam, n_draws=40)
    c = cover.set_index("kind")
    assert (c.loc[kinds, "set_changed"] == 0).all() and (c.loc[kinds, "jaccard_pairwise"] == 1).all()
    assert (c.sd_between == 0).all() and (c.outside_two_level == 0).all() and (c.n_estimates == 2).all()
    assert cover.attrs["n_prompts"] == len(rel.prompt_votes)
    flipped = dataclasses.replace(rel, matrix=-rel.matrix, prompt_votes=rel.prompt_votes[::-1])
    per, cover = reestimates([rel, flipped], recs, kinds, p["k"], p["tau"], mask, daam, n_draws=40)
    c = cover.set_index("kind")
    assert (c.loc[kinds, "set_changed"] == 1).all() and (c.loc[kinds, "jaccard_pairwise"] < 1).all()
    e = per.set_index(["estimate", "kind"])
    assert (e.ci_low <= e.ci_high).all() and (e.rel_low <= e.rel_high).all()


def test_the_mechanism_compares_top_k_with_the_oracles_heads(smoke_run):
    from saam import analyses, tables
    from saam.select import head_set, resolve_k
    p, rel, recs, _ = smoke_run
    summary, heads, profiles = analyses.mechanism(recs, rel, p)
    mask = tables.eligible(p, rel.heads)
    k = resolve_k(p["k"], int(mask.sum()))
    for c, g in heads.groupby("kind"):
        assert len(g) == mask.sum() and g.top.sum() == k and g.oracle.sum() == 2 * k  # both folds' oracle sets
        top = head_set("top", rel.heads, rel.row(c), p["k"], mask=mask).heads
        assert set(g[g.top]["head"]) == {str(h) for h in top}
        assert g.inside.between(0, 1).all() and g.concentration.between(-1e-6, 1).all()
        assert abs(g.level.mean() - 1) < 1e-6  # relative to the eligible heads' mean
        assert set(profiles[c]) == {"top-k", "oracle-k", "eligible"} and len(profiles[c]["top-k"]) == len(rel.timesteps)
    s = summary.set_index(["kind", "group"])
    assert set(s.index.get_level_values("group")) == {"top-k", "oracle-k", "eligible"}
    assert "**color**" in analyses.mechanism_lines(summary)
