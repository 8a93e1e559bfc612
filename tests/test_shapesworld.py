import numpy as np
import pytest
import torch

from saam.shapes.analyzer import analyze, analyzer_accuracy
from saam.shapes.world import BACKGROUND, COLORS, HELDOUT_COMBOS, render, sample_scene


def test_scenes_are_deterministic_and_splits_differ():
    a, b = sample_scene(5), sample_scene(5)
    assert a == b
    assert sample_scene(5, split="test") != a
    img1, m1 = render(a)
    img2, m2 = render(b)
    assert np.array_equal(img1, img2) and np.array_equal(m1, m2)


def test_masks_are_exact():
    for seed in range(20):
        s = sample_scene(seed)
        img, masks = render(s)
        assert masks.shape[0] == len(s.objects)
        assert (masks.sum(0) <= 1).all()  # disjoint
        for o, m in zip(s.objects, masks):
            assert m.any()
            assert (img[m] == COLORS[o.color]).all()
        assert (img[~masks.any(0)] == BACKGROUND).all()


def test_caption_words_map_to_their_objects():
    for seed in range(30):
        s = sample_scene(seed, split="test")
        words = s.caption.replace(",", " ").split()
        for w in s.words:
            assert getattr(s.objects[w.obj], w.kind) == w.word
            assert words.count(w.word) > w.occurrence
        assert all(any(w.kind == "shape" and w.obj == i for w in s.words) for i in range(len(s.objects)))
        _, masks = render(s)
        assert len(masks) == len(s.objects) and all(masks[w.obj].any() for w in s.words)  # every word's object drawn


def test_heldout_combos_never_in_training_and_always_in_unseen():
    for seed in range(300):
        assert not any((o.color, o.shape) in HELDOUT_COMBOS for o in sample_scene(seed).objects)
    for seed in range(30):
        o = sample_scene(seed, split="unseen").objects[0]
        assert (o.color, o.shape) in HELDOUT_COMBOS


def test_analyzer_meets_its_accuracy_targets():
    acc = analyzer_accuracy(150, seed=1)
    assert acc["attribute_accuracy"] >= 0.98
    assert acc["mean_mask_iou"] >= 0.95


def test_analyzer_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        analyze(np.zeros((64, 64)))
    assert analyze(np.full((64, 64, 3), BACKGROUND, np.uint8)) == []


def test_committed_model_loads_offline_and_generates(shapes_pipe):
    p = shapes_pipe
    assert type(p.text_encoder).__name__ == "BertModel" and p.tokenizer.model_max_length == 77
    img = p("a large red circle", num_inference_steps=10, guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all() and img.std() > 0.05
