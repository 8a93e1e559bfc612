import numpy as np
import pytest
import torch
from conftest import run

from saam.aggregate import word_map
from saam.aggregate import aggregate, daam_heads, mean_map, normalize, per_head_maps, to_mask, word_mask
from saam.capture import trace
from saam.evaluate import auroc, bootstrap_ci, iou


@pytest.fixture(scope="module")
def hm(sd1):
    with trace(sd1) as tc:
        run(sd1, "a red cat on a blue mat", steps=3, guidance_scale=5.0)
    return tc[0]


def test_daam_preset_means_the_heads_daam_hooks(hm):
    heads = daam_heads(hm)
    # daam 0.2.0 never hooks the mid block, here at 1/2 of the latent resolution: every other head
    assert heads == [h for h in hm.heads() if not h.layer.startswith("mid_block")]
    assert len(heads) == len(hm.heads()) - hm.layer_heads["mid_block.attentions.0.transformer_blocks.0.attn2"]
    pos = hm.token_positions("cat")
    per = per_head_maps(hm, pos, heads)
    torch.testing.assert_close(word_map(hm, "cat"), per.mean(0))
    w = torch.rand(len(heads))
    torch.testing.assert_close(aggregate(hm, pos, heads, w), (per * w.view(-1, 1, 1)).sum(0) / w.sum())
    torch.testing.assert_close(mean_map(per.numpy(), w.numpy()), (per * w.view(-1, 1, 1)).sum(0) / w.sum())


@pytest.mark.parametrize("kind", ["sd14-layout", "sdxl-layout"])
def test_daams_layer_rule_from_the_unets_config(kind):
    """The layer factors read from the config are the ones the trace measures; DAAM's preset drops
    the layers at 1/8 of the latent resolution (SD v1.4's mid block, none of SDXL's) and the mid
    block, which daam never hooks (SDXL's, at 1/4)."""
    from saam.heads import layer_factors
    from saam.testing import tiny_pipeline
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    with trace(pipe) as tc:
        run(pipe, "a red cat", steps=1, guidance_scale=5.0)
    hm = tc[0]
    assert layer_factors(pipe.unet.config, hm.maps) == hm.layer_factors
    dropped = {h.layer for h in set(hm.heads()) - set(daam_heads(hm))}
    mid = {l for l in hm.maps if l.startswith("mid_block.")}
    eighth = {l for l, f in hm.layer_factors.items() if f == 8}
    assert mid and dropped == mid and eighth == (mid if kind == "sd14-layout" else set())
    assert max(hm.layer_factors.values()) == (8 if kind == "sd14-layout" else 4)


def test_selected_heads_change_the_map(hm):
    heads = hm.heads()
    a = word_map(hm, "cat", heads=heads[:2])
    b = word_map(hm, "cat", heads=heads[-2:])
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="empty head set"):
        word_map(hm, "cat", heads=[])
    with pytest.raises(ValueError, match="weights"):
        word_map(hm, "cat", heads=heads[:2], weights=[1.0])


def test_normalize_threshold_and_mask(hm):
    m = normalize(torch.tensor([[0.0, 1.0], [2.0, 4.0]]), (4, 4))
    assert m.shape == (4, 4) and m.min() == 0 and m.max() == 1
    # min-max normalised [0, 0.39/0.9 ...]: thresholds at or above the value keep the pixel, by hand
    row = torch.tensor([[0.0, 0.39, 0.4, 0.9, 1.0]])
    assert to_mask(row, (1, 5)).tolist() == [[False, False, True, True, True]]
    assert to_mask(row, (1, 5), [0.4, 0.95]).tolist() == [[[False, False, True, True, True]],
                                                          [[False, False, False, False, True]]]
    mask = word_mask(hm, "mat")
    assert mask.shape == hm.image_size and mask.dtype == torch.bool and mask.any()


def test_metrics():
    a = np.zeros((4, 4), bool); a[:2] = True
    b = np.zeros((4, 4), bool); b[:, :2] = True
    assert iou(a, b) == pytest.approx(4 / 12)
    assert auroc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5, 0.5], [1, 0]) == 0.5
    m, lo, hi = bootstrap_ci(np.arange(100) / 100)
    assert lo < m < hi and m == pytest.approx(0.495)


# ------------------------------------------------------------------ Table 1 and Table 3 on hand-made records

def _blob(i: int, j: int) -> np.ndarray:
    """A 4 x 4 latent map that is 1 on the 2 x 2 quadrant (i, j) and 0 elsewhere."""
    m = np.zeros((4, 4), np.float16)
    m[2 * i:2 * i + 2, 2 * j:2 * j + 2] = 1
    return m


def _quadrant(i: int, j: int) -> np.ndarray:
    g = np.zeros((8, 8), bool)
    g[4 * i:4 * i + 4, 4 * j:4 * j + 4] = True
    return g


def _records():
    """Head 0 looks at the top-left quadrant, head 1 at top-right, heads 2 and 3 at the bottom."""
    from saam.evaluate import WordRecord
    maps = np.stack([_blob(0, 0), _blob(0, 1), _blob(1, 0), _blob(1, 1)])
    return [WordRecord(0, "a red circle", "red", 0, "color", 0, _quadrant(0, 0), maps),
            WordRecord(1, "a blue square", "blue", 0, "color", 0, _quadrant(0, 1), maps),
            WordRecord(2, "a green circle", "green", 0, "color", 0, None, maps)]  # object missing


def _relevance(row):
    from saam.heads import HeadId
    from saam.relevance import Relevance
    heads = [HeadId("down_blocks.0.attentions.0.transformer_blocks.0.attn2", h) for h in range(4)]
    return Relevance(["Color"], heads, np.array([row], float))


def test_mask_ious_batched_equal_one_at_a_time():
    from saam.evaluate import mask_ious
    rng = np.random.default_rng(0)
    maps, gt = rng.random((5, 4, 4)).astype(np.float32), _quadrant(0, 0)
    got = mask_ious(maps, gt, [0.3, 0.4, 0.6])
    want = [[iou(to_mask(torch.as_tensor(m), gt.shape, t).numpy(), gt) for t in (0.3, 0.4, 0.6)] for m in maps]
    np.testing.assert_array_equal(got, want)
    # a head on the object's quadrant localises it; one on the opposite quadrant does not overlap at all
    single = mask_ious(np.stack([_blob(0, 0), _blob(1, 1)]), gt)[:, 0]
    assert single[0] > 0.5 and single[1] == 0


def test_scoring_and_miou_table_on_hand_made_records():
    from saam.evaluate import RANDOM_DRAWS, miou_table, per_head_iou, score_records
    from saam.select import METHODS, NOT_HEAD_SETS, OUTPUT_HEAD_SETS
    recs, rel = _records(), _relevance([1.0, 1.0, 0.0, 0.0])  # the top heads are relevant to colour
    df = score_records(recs, rel, np.ones(4, bool), ks=[2], taus=[0.4])
    sets = len(METHODS) - len(NOT_HEAD_SETS) - len(OUTPUT_HEAD_SETS)  # UNet records carry no output-space maps
    rows_per_word = sets - 1 + RANDOM_DRAWS  # random-k: one row per draw
    assert len(df) == 3 * rows_per_word and df.missing.sum() == rows_per_word
    assert df[df.missing].iou.isna().all() and df[~df.missing].iou.notna().all()
    iou_of = df[df.draw == 0].set_index(["image", "method"]).iou
    # by hand: top-2 (heads 0 and 1) is 0.5 on the top half of the 4 x 4 map, so its mask is the top
    # half of the 8 x 8 image (32 pixels); the truth is its top-left quadrant (16): IoU 16 / 32.
    # Bottom-2 (heads 2 and 3) covers the bottom half: no overlap
    assert iou_of[0, METHODS["top"]] == 0.5 and iou_of[0, METHODS["bottom"]] == 0
    tab = miou_table(df, by_kind=False).set_index("method")
    assert (tab.n_words == 2).all() and (tab.n_missing == 1).all()
    assert tab.loc[METHODS["top"], "mIoU"] == pytest.approx(df[(df.method == METHODS["top"]) & ~df.missing].iou.mean())
    assert tab.loc[METHODS["top"], "ci_low"] <= tab.loc[METHODS["top"], "mIoU"] <= tab.loc[METHODS["top"], "ci_high"]
    # a k sweep is one call: one row per (record, method, k); DAAM and soft repeat at every k
    rnd = df[(df.method == METHODS["random"]) & ~df.missing]
    assert rnd.draw.nunique() == RANDOM_DRAWS and rnd.groupby("draw").iou.mean().nunique() > 1  # the draws differ
    assert tab.loc[METHODS["random"], "mIoU"] == pytest.approx(rnd.groupby("image").iou.mean().mean())
    assert tab.loc[METHODS["random"], "draw_sd"] == pytest.approx(rnd.groupby("draw").iou.mean().std(ddof=1))
    assert np.isnan(tab.loc[METHODS["top"], "draw_sd"])
    sweep = miou_table(score_records(recs, rel, np.ones(4, bool), ks=[1, 2, 4], taus=[0.4]), by_kind=False)
    assert len(sweep) == 3 * sets
    assert sweep[sweep.method == METHODS["daam"]].mIoU.nunique() == 1
    # single heads: head 0 localises the red circle, head 1 the blue square, heads 2 and 3 nothing
    per = per_head_iou(recs, "color", 0.4)
    assert per[2] == per[3] == 0 and per[0] == per[1] > 0


def test_binding_score_says_which_object_a_colour_sits_on():
    from saam.evaluate import binding_score
    left, right = torch.as_tensor(_blob(0, 0), dtype=torch.float32), torch.as_tensor(_blob(0, 1), dtype=torch.float32)
    assert binding_score(left, left, [right]) == pytest.approx(1.0)
    assert binding_score(left, right, [left]) == pytest.approx(-1.0)


def test_auroc_and_its_ci():
    from saam.evaluate import auroc_ci
    a, lo, hi = auroc_ci([0.9, 0.8, 0.7, 0.1, 0.2], [1, 1, 1, 0, 0])
    assert a == lo == hi == 1.0
    rng = np.random.default_rng(0)
    a, lo, hi = auroc_ci(rng.random(200), rng.random(200) < 0.3)
    assert lo < 0.5 < hi and lo < a < hi
    assert all(np.isnan(auroc_ci([0.1, 0.2], [1, 1])))


def test_binding_items_carry_the_bound_flag():
    """Table 3's items: colour words of multi-object captions only, with the analyzer's bound flag."""
    from saam import analyses, chapter, models
    from saam.evaluate import WordRecord
    maps = np.stack([_blob(0, 0), _blob(0, 1), _blob(1, 0), _blob(1, 1)])
    recs = [WordRecord(0, "a red circle and a blue square", "red", 0, "color", 0, _quadrant(0, 0), maps, 2, True),
            WordRecord(0, "a red circle and a blue square", "circle", 0, "shape", 0, _quadrant(0, 0), maps, 2, True),
            WordRecord(0, "a red circle and a blue square", "blue", 0, "color", 1, _quadrant(0, 1), maps, 2, False),
            WordRecord(0, "a red circle and a blue square", "square", 0, "shape", 1, _quadrant(0, 1), maps, 2, False),
            WordRecord(1, "a green circle", "green", 0, "color", 0, _quadrant(0, 0), maps, 1, True)]
    from saam.heads import HeadId
    from saam.relevance import Relevance
    heads = [HeadId("down_blocks.0.attentions.0.transformer_blocks.0.attn2", h) for h in range(4)]
    rel = Relevance(["Color", "Shape"], heads, np.array([[2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    params = dict(k=2, seed=0, include_mid=True, model="shapesworld", model_path=str(models.model_path(chapter.load("smoke"))))
    items = analyses.binding_items(recs, rel, params, ["daam", "top"])
    assert list(items.word) == ["red", "blue"] and list(items.bound) == [True, False]


def test_readme_snippet_and_table_make_the_same_mask(hm):
    """The README's ``word_mask(hm, word)`` and Table 1's DAAM cell (per-head maps stored in a word
    record, ``mean_map`` over DAAM's heads, ``mask_ious``) go through one ``to_mask``: equal exactly."""
    from saam.evaluate import mask_ious, records_of
    from saam.select import eligible, head_set
    heads = hm.heads()
    gt = np.zeros(hm.image_size, bool)
    gt[: hm.image_size[0] // 2] = True
    rec = records_of(hm, hm.prompt, [("cat", 0, "animal", 0, gt, None)], 0, heads, 1)[0]
    daam = head_set("daam", heads, mask=eligible(heads, factors=hm.layer_factors))
    table = mean_map(rec.maps[daam.index])
    assert torch.equal(table, word_map(hm, "cat"))
    assert torch.equal(to_mask(table, hm.image_size), word_mask(hm, "cat"))
    assert mask_ious(table[None], gt)[0, 0] == iou(word_mask(hm, "cat").numpy(), gt)


def test_auroc_is_sklearns_with_ties_and_resampled_at_once():
    from sklearn.metrics import roc_auc_score
    from saam.evaluate import auroc_resampled, stratified_resamples
    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.3
    s = np.round(rng.random(60) + 0.3 * y, 1)  # rounded: many ties
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    idx = stratified_resamples(y, 50, seed=1)
    assert (y[idx].sum(1) == y.sum()).all()  # every resample keeps both classes' counts
    np.testing.assert_allclose(auroc_resampled(s, y, idx), [roc_auc_score(y[i], s[i]) for i in idx], atol=1e-12)


def test_table_scores_are_the_snippets_masks(hm):
    """Table 1's scoring (every method of a word at once, ``evaluate.score_records``) gives each
    method the IoU of the mask the README's path makes from the same heads."""
    from saam.evaluate import random_seed, records_of, score_records
    from saam.relevance import Relevance
    from saam.select import METHODS, eligible, head_set
    heads = hm.heads()
    gt = np.zeros(hm.image_size, bool)
    gt[:, : hm.image_size[1] // 3] = True
    rec = records_of(hm, hm.prompt, [("cat", 0, "animal", 0, gt, None)], 0, heads, 1)[0]
    rel = Relevance(["animal"], heads, np.random.default_rng(0).random((1, len(heads))))
    mask = eligible(heads, factors=hm.layer_factors)
    df = score_records([rec], rel, mask, ks=[0.25, 0.5], taus=[0.3, 0.4], draws=3).set_index(["method", "k", "tau", "draw"]).iou
    for m in ("daam", "top", "bottom", "soft", "random"):
        for k in (0.25, 0.5):
            for tau in (0.3, 0.4):
                for d in range(3 if m == "random" else 1):
                    s = head_set(m, heads, rel.row("animal"), k, mask=mask, seed=random_seed(0, 0, d))
                    want = iou(word_mask(hm, "cat", heads=s.heads, weights=s.weights, tau=tau).numpy(), gt)
                    assert df[METHODS[m], k, tau, d] == want, (m, k, tau, d)
