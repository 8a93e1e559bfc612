import numpy as np
import pytest
import torch
from conftest import run


from saam.family import UNET
from saam.heads import block_of, forward_order, from_hrv_names, head_ids, order


def hrv_name(head, layer_heads):
    """HRV's name for a head, as its published head index writes it: "up, layer: 8, head: 3"."""
    same = [l for l in forward_order(layer_heads) if block_of(l) == block_of(head.layer)]
    return f"{block_of(head.layer)}, layer: {same.index(head.layer)}, head: {head.head}"
from saam.relevance import Relevance, load_hrv, normalize_votes, relevance_pass
from saam.select import bottom_k, eligible, head_set, random_k, resolve_k, soft_weights, top_k

LH = {"up_blocks.1.attentions.0.transformer_blocks.0.attn2": 2,
      "down_blocks.10.attentions.0.transformer_blocks.0.attn2": 2,
      "down_blocks.2.attentions.1.transformer_blocks.0.attn2": 2,
      "mid_block.attentions.0.transformer_blocks.0.attn2": 2}


def test_orderings_are_explicit():
    hrv = order(LH, "hrv")
    # numeric, not lexical: down_blocks.2 before down_blocks.10
    assert [l.split(".attentions")[0] for l in hrv] == ["down_blocks.2", "down_blocks.10", "mid_block", "up_blocks.1"]
    assert order(LH, "daam")[0].startswith("up_blocks")
    heads = head_ids(LH)
    names = [hrv_name(h, LH) for h in heads]
    assert names[0] == "down, layer: 0, head: 0" and names[-1] == "up, layer: 0, head: 1"
    assert from_hrv_names(names, LH) == heads
    with pytest.raises(ValueError, match="does not exist"):
        from_hrv_names(["up, layer: 3, head: 0"], LH)


def test_selection_functions():
    r = np.array([0.1, 3.0, 2.0, 0.0, 1.0, 5.0])
    assert list(top_k(r, 2)) == [5, 1]
    assert list(bottom_k(r, 2)) == [3, 0]
    assert list(top_k(r, 0.5)) == [5, 1, 2]
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    assert list(top_k(r, 1, mask)) == [1]
    rk = random_k(6, 3, seed=1, mask=mask)
    assert len(rk) == 3 and 5 not in rk and list(rk) == list(random_k(6, 3, seed=1, mask=mask))
    w = soft_weights(r, mask)
    assert w[5] == 0 and np.isclose(w.sum(), 1) and w[1] > w[2] > w[4] > w[0]
    with pytest.raises(ValueError):
        resolve_k(7, 6)
    with pytest.raises(ValueError):
        resolve_k(1.5, 6)
    heads = head_ids(LH)
    no_mid = eligible(heads)
    assert no_mid.sum() == 6 and len(head_set("daam", heads, mask=no_mid).heads) == 6
    # DAAM never hooks the mid block: its set leaves it out even where the mask lets the others use it
    with_mid = eligible(heads, include_mid=True)
    assert with_mid.sum() == 8 and len(head_set("top", heads, np.arange(8.0), 8, mask=with_mid).heads) == 8
    assert len(head_set("daam", heads, mask=with_mid).heads) == 6 and len(head_set("daam", heads).heads) == 6
    # DAAM's layer rule drops layers at 1/8 of the latent resolution, whichever block they are in
    factors = {l: 8 if l.startswith("down_blocks.10") else 4 for l in LH}
    assert [h.layer for h, ok in zip(heads, eligible(heads, include_mid=True, factors=factors)) if not ok] == [
        "down_blocks.10.attentions.0.transformer_blocks.0.attn2"] * 2
    s = head_set("soft", heads, r[[0, 1, 2, 3, 4, 5, 0, 0]], mask=no_mid)
    assert np.isclose(s.weights.sum(), 1) and all(heads[i] == h for i, h in zip(s.index, s.heads))
    with pytest.raises(ValueError, match="unknown method 'all'; use one of daam, top"):
        head_set("all", heads)
    with pytest.raises(ValueError, match="needs a relevance row"):
        head_set("top", heads)
    with pytest.raises(ValueError, match="mask rules out every head"):
        head_set("daam", heads, mask=np.zeros(8, bool))


def test_normalize_votes_like_hrv():
    votes = np.array([[10, 0], [5, 5], [0, 10]])  # 3 heads, 2 concepts
    rel = normalize_votes(votes)
    assert rel.shape == (2, 3)
    np.testing.assert_allclose(rel.sum(1), [3, 3])
    np.testing.assert_allclose(rel[0], [2.0, 1.0, 0.0])
    stacked = normalize_votes(np.stack([votes, votes]))
    np.testing.assert_allclose(stacked, rel)


def test_load_hrv_synthetic_files(tmp_path):
    heads = head_ids(LH)
    names = np.array([hrv_name(h, LH) for h in heads][::-1])  # published order may differ
    m = np.arange(2 * len(heads), dtype=np.float32).reshape(2, -1)
    np.save(tmp_path / "v.npy", m)
    np.save(tmp_path / "i.npy", names)
    rel = load_hrv(tmp_path / "v.npy", tmp_path / "i.npy", LH, ["color", "shape"])
    assert rel.heads == heads
    # column j of the file belongs to head names[j]
    j = list(names).index(hrv_name(heads[0], LH))
    assert rel.row("color")[0] == m[0, j]
    with pytest.raises(ValueError, match="does not exist"):
        load_hrv(tmp_path / "v.npy", tmp_path / "i.npy", {k: 1 for k in LH})


def test_relevance_pass_leaves_generation_untouched(sd1, tmp_path):
    concepts = {"color": ["red", "blue"], "animal": ["cat", "dog", "bird"]}
    plain = run(sd1, ["a red cat", "a dog"], steps=3, guidance_scale=5.0)
    rel = relevance_pass(sd1, concepts, ["a red cat", "a dog"], steps=3, guidance=5.0, progress=False)
    again = run(sd1, ["a red cat", "a dog"], steps=3, guidance_scale=5.0)
    assert np.array_equal(plain, again)
    n_heads = sum(m.heads for m in UNET.layers(sd1.unet).values())
    assert rel.votes.shape == (3, n_heads, 2)
    assert (rel.votes.sum(-1) == 2).all()  # every head votes once per image per step
    np.testing.assert_allclose(rel.matrix.sum(1)[rel.matrix.sum(1) > 0], n_heads, rtol=1e-5)
    assert rel.per_timestep().shape == (3, 2, n_heads)
    rel.save(tmp_path / "rel.npz")
    back = Relevance.load(tmp_path / "rel.npz")
    assert back.heads == rel.heads and np.array_equal(back.votes, rel.votes)


def test_real_model_profile_without_weights_stops_at_once(monkeypatch):
    from saam.chapter import load
    monkeypatch.delenv("SAAM_MODEL_PATH", raising=False)
    with pytest.raises(FileNotFoundError, match="CompVis/stable-diffusion-v1-4.*hf download"):
        load("sd14")
    with pytest.raises(ValueError, match="known profiles"):
        load("no-such-profile")


HRV_DIR = __import__("saam.paths").paths.HRV  # HRV's released files as shipped in data/hrv


def test_published_hrv_vectors_land_on_an_sd14_unet():
    """HRV's shipped SD v1.4 file on an SD v1.4-shaped UNet (built on the meta device: no weights)."""
    import csv
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
            attention_head_dim=8, layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    lh = {l: m.heads for l, m in UNET.layers(unet).items()}
    assert sum(lh.values()) == 128
    rel = load_hrv(HRV_DIR / "category_vectors_sd_v1_4.npy", HRV_DIR / "head_index_sd_v1_4.npy", lh,
                   HRV_DIR / "340_final_text_list.csv")
    assert len(rel.concepts) == 34 and rel.matrix.shape == (34, 128)
    np.testing.assert_allclose(rel.matrix.sum(1), 128, rtol=1e-4)
    roles = {r[0]: r[1] for r in csv.reader(open(HRV_DIR / "head_roles_ba_top_31_sd_v1_4.csv"))}  # shipped: runs in any clone
    published_top = [n.strip("'") for n in roles["Color"].strip("[]").replace("\n", " ").split("' '")][:5]
    ours = [hrv_name(rel.heads[i], lh) for i in np.argsort(-rel.row("Color"), kind="stable")[:5]]
    assert ours == [n.strip("'") for n in published_top]


def test_hrv_files_are_never_unpickled(tmp_path):
    """A pickled .npy (loading it could run code) and a text file given as HRV's .npy are clear errors."""
    heads = head_ids(LH)
    np.save(tmp_path / "v.npy", np.ones((2, len(heads)), np.float32))
    np.save(tmp_path / "obj.npy", np.array([hrv_name(h, LH) for h in heads], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("down, layer: 0, head: 0\n")
    for bad in ("obj.npy", "text.npy"):
        with pytest.raises(ValueError, match=f"{bad}: not a plain .npy file of head names.*refused"):
            load_hrv(tmp_path / "v.npy", tmp_path / bad, LH)
    np.save(tmp_path / "i.npy", np.array([hrv_name(h, LH) for h in heads]))
    with pytest.raises(ValueError, match="must hold numbers"):
        load_hrv(tmp_path / "i.npy", tmp_path / "i.npy", LH)


def test_no_unsafe_load_anywhere():
    """No allow_pickle=True and no torch.load without weights_only=True in the package or scripts."""
    import re
    from saam import paths
    for f in [*(paths.ROOT / "src").rglob("*.py"), *(paths.ROOT / "scripts").glob("*.py")]:
        text = f.read_text()
        assert "allow_pickle=True" not in text, f
        for call in re.findall(r"torch\.load\([^\n]*", text):
            assert "weights_only=True" in call, (f, call)


def test_cached_concept_words_give_the_same_votes(sd1, tmp_path, monkeypatch):
    """The encoded concept words, cached (float32 on disk) and read back, vote exactly as freshly
    encoded ones; the second pass reads them and never encodes."""
    import saam.relevance as R
    from saam import paths
    monkeypatch.setattr(paths, "CACHE", tmp_path)
    concepts = {"color": ["red", "blue"], "animal": ["cat", "dog", "bird"]}
    kw = dict(steps=2, guidance=5.0, progress=False)
    fresh = relevance_pass(sd1, concepts, ["a red cat", "a dog"], **kw)
    first = relevance_pass(sd1, concepts, ["a red cat", "a dog"], words_cache=("words", {"t": 1}), **kw)
    assert list((tmp_path / "words").glob("*.npz"))
    monkeypatch.setattr(R, "encode_words", lambda *a: (_ for _ in ()).throw(AssertionError("encoded again")))
    again = relevance_pass(sd1, concepts, ["a red cat", "a dog"], words_cache=("words", {"t": 1}), **kw)
    assert np.array_equal(fresh.votes, first.votes) and np.array_equal(fresh.votes, again.votes)


def test_specialisation_does_not_depend_on_the_allocator():
    """``make all`` preloads tcmalloc where the system has it; numpy's vectorised log rounds some last
    bits by where its arrays start, so the specialisation index once came out different in the 16th
    digit under glibc's malloc and tcmalloc. It is computed on aligned memory now: the same bits
    under either (a fresh process each; skipped where the system has no tcmalloc)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    lib = subprocess.run(["make", "-s", "--no-print-directory", "print-tcmalloc"], cwd=root, capture_output=True,
                         text=True).stdout.strip()
    if not lib:
        pytest.skip("no tcmalloc on this system (Debian: libtcmalloc-minimal4)")
    code = ("import numpy as np, hashlib; from saam.relevance import specialisation\n"
            "rng = np.random.default_rng(0); h = hashlib.sha256()\n"
            "for n in (44, 88, 320, 1300):\n"
            "    for r in rng.gamma(0.5, size=(200, n)): h.update(np.float64(specialisation(r)).tobytes())\n"
            "print(h.hexdigest())")
    out = {pre: subprocess.run([sys.executable, "-c", code], env=dict(os.environ, LD_PRELOAD=pre),
                               capture_output=True, text=True, check=True).stdout for pre in ("", lib)}
    assert out[""] == out[lib] and len(out[""]) > 60
