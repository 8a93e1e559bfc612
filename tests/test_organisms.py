"""Profiles, the attention budget, relevance with the start token, and the organism variants."""
import json

import pandas as pd
import numpy as np
import pytest
import torch

from saam import profiles
from saam.capture import HeadMaps, trace
from saam.relevance import Relevance, concentration, concentration_table, normalize_votes, relevance_pass
from saam.sinks import CLASSES, attention_budget, token_classes


# ------------------------------------------------------------------ profiles

def test_profiles_validate_keys_types_and_overrides():
    p = profiles.load("smoke", "steps=4 n_eval=6 include_mid=true")
    assert (p["steps"], p["n_eval"], p["include_mid"]) == (4, 6, True)
    with pytest.raises(profiles.ProfileError, match=r"unknown key\(s\) \['stpes'\].*known keys"):
        profiles.load("smoke", "stpes=4")
    with pytest.raises(profiles.ProfileError, match="'k' must be int or float, got '0.25'"):
        profiles.load("smoke", {"k": "0.25"})
    with pytest.raises(profiles.ProfileError, match="not key=value"):
        profiles.load("smoke", "steps")
    with pytest.raises(profiles.ProfileError, match="relevance_variant must be stream or direct, got 'strem'"):
        profiles.load("sd3", "relevance_variant=strem")
    with pytest.raises(profiles.ProfileError, match="known profiles: .*smoke"):
        profiles.load("nope")


def test_profile_file_errors_name_the_file_and_key(tmp_path, monkeypatch):
    from saam import paths
    monkeypatch.setattr(paths, "PARAMS", tmp_path)
    (tmp_path / "typo.yaml").write_text("model: shapesworld\nseed: 0\nstpes: 3\n")
    with pytest.raises(profiles.ProfileError, match=r"typo.yaml: unknown key\(s\) \['stpes'\]"):
        profiles.load("typo")
    (tmp_path / "short.yaml").write_text("model: sd14\nseed: 0\n")
    with pytest.raises(profiles.ProfileError, match=r"short.yaml: missing key\(s\) \['steps'"):
        profiles.load("short")


def test_profile_decides_where_figures_go(monkeypatch):
    from saam import paths
    monkeypatch.delenv("SAAM_FIGURES", raising=False)
    assert profiles.load("smoke")["figures"] == str(paths.BUILD / "smoke" / "figures")
    assert profiles.load("paper")["figures"] == str(paths.ROOT / "figures")
    assert not hasattr(paths, "FIGURES")  # where outputs go is a parameter, never a global


# ------------------------------------------------------------------ attention budget

class _Tok:
    eos_token_id, sep_token_id, bos_token_id = 9, None, 0  # CLIP-like: a start token opens the ids


class _T5Tok:
    eos_token_id, sep_token_id, bos_token_id = 9, None, None  # T5-like: no start token


def _hm(maps, ids):
    return HeadMaps(maps=maps, steps=2, timesteps=[1, 0], token_ids=ids, prompt="x", latent_size=(4, 4),
                    image_size=(8, 8), tokenizer=_Tok())


def test_attention_budget_splits_mass_by_token_class_and_region():
    # 6 tokens: start, 2 words, end (id 9), 2 pads; head 0 looks at the start token on the
    # left half and at word 1 on the right half; head 1 puts everything on padding
    a = torch.zeros(2, 6, 4, 4)
    a[0, 0, :, :2] = 2.0
    a[0, 1, :, 2:] = 2.0
    a[1, 4] = 2.0
    hm = _hm({"down_blocks.0.attentions.0.transformer_blocks.0.attn2": a}, [0, 5, 6, 9, 9, 9])
    assert token_classes(hm) == dict(start=[0], words=[1, 2], end=[3], padding=[4, 5])
    t5 = HeadMaps(maps=hm.maps, steps=2, timesteps=[1, 0], token_ids=[4, 5, 6, 9, 9, 9], prompt="x", latent_size=(4, 4),
                  image_size=(8, 8), tokenizer=_T5Tok())
    assert token_classes(t5) == dict(start=[], words=[0, 1, 2], end=[3], padding=[4, 5])  # PixArt's T5: no start token
    obj = np.zeros((8, 8), bool)
    obj[:, 4:] = True  # the right half of the image is the object
    b = attention_budget(hm, obj).set_index(["head", "region"])
    np.testing.assert_allclose(b[list(CLASSES)].sum(axis=1), 1.0)
    h0 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2[0]"
    assert b.loc[(h0, "object"), "words"] == pytest.approx(1.0)
    assert b.loc[(h0, "background"), "start"] == pytest.approx(1.0)
    assert attention_budget(hm).region.unique().tolist() == ["all"]


# ------------------------------------------------------------------ relevance

def test_concentration_and_its_ci():
    assert concentration(np.array([4.0, 0, 0, 0]), 0.25) == 1.0
    assert concentration(np.ones(8), 0.25) == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    pv = rng.integers(0, 3, size=(30, 8, 2))
    pv[:, :2, 0] += 20  # heads 0-1 win concept 0 in every prompt
    rel = Relevance(["a", "b"], [], normalize_votes(pv), pv.sum(0)[None], [0], {}, pv)
    t = concentration_table(rel, n_boot=200)
    row = t.set_index("concept").loc["a"]
    assert row.ci_low <= row.top_share <= row.ci_high and row.top_share > 0.3 and row.n_prompts == 30


def test_pseudo_context_starts_with_the_start_token_which_is_never_scored():
    """HRV's pseudo-context, by hand: the first concept's start state, then each concept's word
    tokens. The start token takes attention (mask 0) but belongs to no concept (segment -1); without
    it the context begins with the first word."""
    import random
    from types import SimpleNamespace
    from saam.relevance import VoteRecorder
    start, colour, animal = torch.full((1, 3), 7.0), torch.full((2, 3), 1.0), torch.full((1, 3), 2.0)
    words = [[(start, colour)], [(start, animal)]]  # one word per concept: "red" (2 tokens), "cat" (1)
    layers = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2": SimpleNamespace(heads=2)}
    rec = VoteRecorder(words, layers, start_token=True)
    rec.rngs = [random.Random(0)]
    ctx, seg, mask, c = rec.context("cpu", torch.float32)
    assert c == 2 and ctx[0, :, 0].tolist() == [7.0, 1.0, 1.0, 2.0]
    assert seg.tolist() == [[-1, 0, 0, 1]] and mask.tolist() == [[0.0] * 4]
    rec = VoteRecorder(words, layers, start_token=False)
    rec.rngs = [random.Random(0)]
    ctx, seg, mask, c = rec.context("cpu", torch.float32)
    assert ctx[0, :, 0].tolist() == [1.0, 1.0, 2.0] and seg.tolist() == [[0, 0, 1]]


def test_relevance_pass_keeps_start_token_and_per_prompt_votes(sd1):
    concepts = {"Color": ["red", "blue"], "Animals": ["cat", "dog"]}
    a = relevance_pass(sd1, concepts, ["a red cat", "a dog", "a tree"], steps=2, batch_size=2, progress=False)
    b = relevance_pass(sd1, concepts, ["a red cat", "a dog", "a tree"], steps=2, batch_size=2, progress=False,
                       start_token=False)
    assert a.prompt_votes.shape == (3, len(a.heads), 2)
    np.testing.assert_array_equal(a.prompt_votes.sum(0), a.votes.sum(0))
    assert a.params["start_token"] and not b.params["start_token"]
    assert a.votes.sum() == b.votes.sum()  # one vote per head, step and image either way
    assert a.row("color") is not None  # concept names match case-insensitively


# ------------------------------------------------------------------ organism variants

@pytest.fixture(scope="module")
def variant_c():
    from saam.shapes.model import load_pipeline, variant_folder
    return load_pipeline(variant_folder("C"))


def test_variant_c_hides_padding_from_cross_attention(variant_c):
    """Every step of every call gets its own prompts' padding mask (the mask is worked out once per
    call and reused while the UNet sees the same text batch: a second call with other prompt
    lengths must not inherit the first call's)."""
    pipe = variant_c
    assert pipe.text_encoder.config.is_decoder  # causal: the start token is prompt-independent
    for prompts in (["a red circle", "a large blue square and a pink cross"], ["two large green crosses", "a cross"]):
        with trace(pipe, per_step=True) as tc:
            pipe(prompts, num_images_per_prompt=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 output_type="latent")
        for hm in tc:
            cls = token_classes(hm)
            for m in list(hm.maps.values()) + [s for steps in hm.per_step.values() for s in steps]:  # every step
                assert m[:, cls["padding"]].sum() == 0
                assert m[:, cls["start"] + cls["words"]].sum() > 0


def test_causal_encoder_start_token_is_constant(variant_c):
    e = variant_c.encode_prompt(["a red circle", "two green crosses"], "cpu", 1, False)[0]  # as the pipeline encodes
    torch.testing.assert_close(e[0, 0], e[1, 0])


def test_variant_folders_share_weights_and_declare_themselves():
    from saam.shapes.model import VARIANTS, variant_folder, variant_of
    for v in VARIANTS:
        folder = variant_folder(v)
        assert variant_of(folder)["variant"] == v
        if v != "A":
            te = folder / "text_encoder" / "model.safetensors"
            assert te.is_symlink() and te.resolve() == (variant_folder("A") / "text_encoder" / "model.safetensors").resolve()


def test_bad_selection_inputs_say_what_is_wrong():
    from saam.heads import HeadId
    from saam.select import head_set, resolve_k
    with pytest.raises(TypeError, match="head count .* or a fraction .* got '0.25'"):
        resolve_k("0.25", 10)
    heads = [HeadId("down_blocks.0.a", i) for i in range(4)]
    with pytest.raises(ValueError, match="relevance row of 3 values for 4 heads"):
        head_set("top", heads, [1.0, 2.0, 3.0], k=2)


def test_make_names_the_known_profiles():
    import subprocess
    out = subprocess.run(["make", "all", "PROFILE=nope"], capture_output=True, text=True)
    assert out.returncode != 0 and "known profiles:" in out.stderr and "smoke" in out.stderr


def test_specialisation_does_not_depend_on_the_head_count():
    """The head-count-free measure beside the top-25 % share: a uniform row is 0 at 44 and at 88 heads
    (its top-25 % share is 0.25 at both), one head holding everything is 1, and doubling the heads of a
    row (each head split in two equal halves) barely moves it, where the top-25 % share cannot tell."""
    from saam.relevance import specialisation
    assert specialisation(np.ones(44)) == pytest.approx(0) == specialisation(np.ones(88))
    one = np.zeros(44)
    one[3] = 44
    assert specialisation(one) == pytest.approx(1)
    row = np.random.default_rng(0).gamma(0.5, size=44)
    assert 0 < specialisation(row) < 1 and specialisation(row) > specialisation(row + 1)


def test_fidelity_intervals_and_the_adoption_rule():
    from saam.ablation import adoption, wilson
    lo, hi = wilson(0.91, 32)
    assert lo < 0.90 < hi and wilson(1.0, 32)[1] == pytest.approx(1.0)
    ok = dict(single_color_accuracy_ci=[0.92, 0.99], single_shape_accuracy_ci=[0.85, 0.95], two_object_binding_ci=[0.6, 0.8])
    tab = pd.DataFrame([dict(variant="A", conc_color=0.6, conc_shape=0.6, **ok),
                        dict(variant="D", conc_color=0.8, conc_shape=0.85, **dict(ok, single_color_accuracy_ci=[0.76, 0.97])),
                        dict(variant="X", conc_color=0.9, conc_shape=0.9, **dict(ok, two_object_binding_ci=[0.1, 0.4]))])
    rule = adoption(tab, dict(color=0.77, shape=0.89))
    assert rule["fit"] == ["A", "D"] and rule["clearly_fit"] == ["A"] and rule["closest"] == "D"  # X misses binding


def test_the_mmdit_organism_recipe_trains_resumes_and_runs(tmp_path, monkeypatch):
    """``make model VARIANT=mmdit`` for a few steps on the CPU (no GPU was at hand to train it):
    flow-matching training resumes where it stopped, the assembled folder loads as a profile's
    model, and the chapters' steps run on it as on SD3: traced generations with output-space maps,
    the attention budget, the concept stream's relevance over HRV's concepts, Table 1's scoring."""
    from saam import chapter, models, paths, steps, tables
    from saam.select import METHODS
    from saam.shapes import dit
    monkeypatch.setattr(paths, "CACHE", tmp_path / "cache")
    run = tmp_path / "run"
    run.mkdir()
    kw = dict(minutes=5, batch=4, lr=1e-4, seed=0, pool_batches=1, fidelity_every=2, fidelity_n=2, stop_at_targets=False)
    assert dit.train(run, paths.MODEL_DIR, steps=2, **kw) == 2  # step 0 fills the pool, step 1 draws from it
    assert (run / "pool" / "built.json").exists() and (run / "mmdit-fidelity-log.jsonl").exists()
    packed = dit.pack(run, tmp_path / "resume.pt")
    again = tmp_path / "again"  # a new session: the ignored run folder is gone, the packed checkpoint committed
    again.mkdir()
    assert dit.train(again, paths.MODEL_DIR, steps=3, resume=packed, **kw) == 3  # resumed at 2, the pool rebuilt
    assert json.loads((again / "pool" / "built.json").read_text())["batches"] == 1
    np.testing.assert_array_equal(np.load(again / "pool" / "latents.npy"), np.load(run / "pool" / "latents.npy"))
    run = again
    out = dit.assemble(run, paths.MODEL_DIR, tmp_path / "mmdit")
    p = chapter.load("smoke", f"model_path={out} steps=2 n_eval=2 n_sinks=1 n_relevance_prompts=2 batch_size=2")
    pipe = models.load_model(p)
    assert type(pipe).__name__ == "ShapesDiTPipeline" and models.denoiser_config(p)["num_layers"] == 6
    heads = steps.denoiser_heads(pipe)
    assert len(heads) == 6 * 4
    recs, images, _ = steps.records(pipe, p, "generation", heads)
    assert images.shape[1:] == (64, 64, 3) and recs and all(r.output is not None for r in recs)
    _, summary = steps.sink_budget(pipe, p)
    assert "image" in summary.columns
    rel = steps.relevance(pipe, p)
    assert rel.matrix.shape == (34, len(heads)) and rel.params["variant"] == "stream"
    from saam.evaluate import score_records  # (a 3-step model may leave a kind without votes: soft-k has no set)
    df = score_records(recs, rel, tables.eligible(p, rel.heads), [p["k"]], [p["tau"]], methods=("daam", "top", "output"))
    assert set(df.method) == {METHODS[m] for m in ("daam", "top", "output")}
