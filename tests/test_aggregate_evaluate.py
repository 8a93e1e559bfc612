import numpy as np
import pytest
import torch
from conftest import run

from saam.aggregate import aggregate, daam_heads, normalize, per_head_maps, threshold, word_mask
from saam.capture import trace
from saam.evaluate import auroc, bootstrap_ci, combine, iou


@pytest.fixture(scope="module")
def hm(sd1):
    with trace(sd1) as tc:
        run(sd1, "a red cat on a blue mat", steps=3, guidance_scale=5.0)
    return tc[0]


def test_daam_preset_excludes_mid_and_means_all_heads(hm):
    heads = daam_heads(hm.layer_heads)
    assert not any(h.layer.startswith("mid") for h in heads)
    assert len(daam_heads(hm.layer_heads, include_mid=True)) == len(heads) + hm.layer_heads[
        next(l for l in hm.maps if l.startswith("mid"))]
    pos = hm.token_positions("cat")
    per = per_head_maps(hm, pos, heads)
    torch.testing.assert_close(hm.word_map("cat"), per.mean(0))
    w = torch.rand(len(heads))
    torch.testing.assert_close(aggregate(hm, pos, heads, w), (per * w.view(-1, 1, 1)).sum(0) / w.sum())
    torch.testing.assert_close(combine(per.numpy(), np.arange(len(heads)), w.numpy()),
                               (per * w.view(-1, 1, 1)).sum(0) / w.sum())


def test_selected_heads_change_the_map(hm):
    heads = hm.heads()
    a = hm.word_map("cat", heads=heads[:2])
    b = hm.word_map("cat", heads=heads[-2:])
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="empty head set"):
        hm.word_map("cat", heads=[])
    with pytest.raises(ValueError, match="weights"):
        hm.word_map("cat", heads=heads[:2], weights=[1.0])


def test_normalize_threshold_and_mask(hm):
    m = normalize(torch.tensor([[0.0, 1.0], [2.0, 4.0]]), (4, 4))
    assert m.shape == (4, 4) and m.min() == 0 and m.max() == 1
    assert threshold(torch.tensor([0.39, 0.4, 0.9])).tolist() == [False, True, True]
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
