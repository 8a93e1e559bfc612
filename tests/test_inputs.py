"""Bad input gets a clear error before work starts, or the correct result: one test per input of
issue 19's probe (and the new ones of the same kinds). Errors name the file, the key and what to do."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from saam.datasets import DatasetError, read_captions, read_coco, read_image
from saam.profiles import ProfileError, load

POLY = [[0, 0, 10, 0, 10, 10, 0, 10]]


def _dataset(d, *, images=None, anns=None, cats=None, captions=None, split="x", size=(20, 30), mode="RGB"):
    (d / "img").mkdir(parents=True, exist_ok=True)
    arr = np.full((*size, 3), 200, np.uint8) if mode == "RGB" else None
    if mode == "RGB":
        Image.fromarray(arr).save(d / "img" / "a.png")
    images = images if images is not None else [dict(id=1, file_name="a.png", height=size[0], width=size[1])]
    cats = cats if cats is not None else [dict(id=1, name="dog")]
    anns = anns if anns is not None else [dict(id=1, image_id=1, category_id=1, segmentation=POLY, area=100,
                                               bbox=[0, 0, 10, 10], iscrowd=0)]
    captions = captions if captions is not None else [dict(id=1, image_id=1, caption="a dog on grass")]
    (d / f"instances_{split}.json").write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    (d / f"captions_{split}.json").write_text(json.dumps(dict(annotations=captions)))
    (d / "word_categories.yaml").write_text("dog: {concept: Animals, words: [dog, dogs]}\n")
    return d


def test_a_good_dataset_reads(tmp_path):
    items = read_coco(_dataset(tmp_path))
    assert len(items) == 1 and items[0].words[0].mask[:10, :10].all() and items.dropped["images_without_caption"] == 0


def test_train_and_val_files_in_one_folder_need_a_split(tmp_path):
    _dataset(tmp_path, split="train2017")
    _dataset(tmp_path, split="val2017", captions=[dict(id=1, image_id=1, caption="two dogs")])
    with pytest.raises(DatasetError, match=r"2 instances\*.json files .*data_split"):
        read_coco(tmp_path)
    assert read_coco(tmp_path, split="val2017")[0].caption == "two dogs"
    assert read_captions(tmp_path, "train2017") == ["a dog on grass"]
    assert load("sd14", "data_split=val2017")["data_split"] == "val2017"


@pytest.mark.parametrize("text,match", [('{"images": [', "not valid JSON .*line 1"), ("[]", "a COCO file needs the lists"),
                                        ('{"images": []}', "a COCO file needs the lists")])
def test_truncated_or_malformed_json_names_the_file(tmp_path, text, match):
    _dataset(tmp_path)
    (tmp_path / "instances_x.json").write_text(text)
    with pytest.raises(DatasetError, match=f"instances_x.json: {match}"):
        read_coco(tmp_path)


def test_annotations_without_segmentation_or_with_unknown_categories(tmp_path):
    ann = dict(id=7, image_id=1, category_id=1, area=1, bbox=[0, 0, 1, 1], iscrowd=0)
    _dataset(tmp_path, anns=[ann])
    with pytest.raises(DatasetError, match=r"annotations\[0\] \(id 7\) needs 'segmentation'"):
        read_coco(tmp_path)
    _dataset(tmp_path, anns=[dict(ann, segmentation=[])])
    with pytest.raises(DatasetError, match="id 7.*empty segmentation"):
        read_coco(tmp_path)
    _dataset(tmp_path, anns=[dict(ann, segmentation=POLY, category_id=9)])
    with pytest.raises(DatasetError, match="category_id 9, which is not among the file's categories"):
        read_coco(tmp_path)


def test_an_empty_dataset_says_why(tmp_path):
    _dataset(tmp_path, captions=[dict(id=1, image_id=1, caption="a cat on grass")])  # no mapped word
    with pytest.raises(DatasetError, match="nothing to score"):
        read_coco(tmp_path)
    _dataset(tmp_path, images=[], anns=[], captions=[])
    with pytest.raises(DatasetError, match="nothing to score"):
        read_coco(tmp_path)


def test_images_without_captions_are_counted(tmp_path):
    imgs = [dict(id=1, file_name="a.png", height=20, width=30), dict(id=2, file_name="a.png", height=20, width=30)]
    items = read_coco(_dataset(tmp_path, images=imgs))
    assert len(items) == 1 and items.dropped["images_without_caption"] == 1
    assert "1 images without caption" in items.notes()


@pytest.mark.parametrize("yaml_text,match", [("dog: [dog]\n", "must map to"), ("dog: {concept: [a], words: [dog]}\n", "concept must be"),
                                             ("dog: {concept: A, words: [hot dog]}\n", "one word"), ("- a\n", "expected a mapping"),
                                             ("dog: {concept: A, words: [dog\n", "not valid YAML")])
def test_a_bad_word_file(tmp_path, yaml_text, match):
    _dataset(tmp_path)
    (tmp_path / "word_categories.yaml").write_text(yaml_text)
    with pytest.raises(DatasetError, match=f"word_categories.yaml.*{match}"):
        read_coco(tmp_path)


def test_sixteen_bit_images_keep_their_contrast(tmp_path):
    a = np.zeros((20, 30), np.uint16)
    a[:, 15:] = 32768
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    img = read_image(tmp_path / "g16.png")
    assert img.shape == (20, 30, 3) and img[0, 0, 0] == 0 and img[0, 20, 0] == 128  # not a white image


def test_a_truncated_image_names_the_file(tmp_path):
    _dataset(tmp_path)
    data = (tmp_path / "img" / "a.png").read_bytes()
    (tmp_path / "img" / "a.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="a.png: unreadable image"):
        read_coco(tmp_path)


def test_an_image_whose_size_disagrees_with_its_json(tmp_path):
    _dataset(tmp_path, images=[dict(id=1, file_name="a.png", height=40, width=30)])
    with pytest.raises(DatasetError, match="a.png: 30x20 pixels, but .*instances_x.json says 30x40"):
        read_coco(tmp_path)


def test_export_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    run = lambda *a: subprocess.run([sys.executable, "-m", "saam.shapes.world", "--export-coco", str(tmp_path), "--n", "2", *a],
                                    capture_output=True, text=True)  # noqa: E731
    r = run()
    assert r.returncode != 0 and "is not empty" in r.stderr and not (tmp_path / "images").exists()
    assert run("--overwrite").returncode == 0 and (tmp_path / "keep.txt").read_text() == "mine"
    assert len(list(tmp_path.glob("instances*.json"))) == 1


@pytest.mark.parametrize("override,match", [("tau=7", "tau is a threshold"), ("n_eval=0", "n_eval must be at least 1"),
                                            ("n_eval=-3", "n_eval must be at least 1"), ("steps=0", "steps must be at least 1"),
                                            ("batch_size=0", "batch_size must be at least 1"), ("k=-1", "k must be a head count"),
                                            ("k=1.5", "k must be"), ("strengths=[0.01]", "leaves no denoising step"),
                                            ("k_sweep=[]", "k_sweep must be a non-empty list"),
                                            ("tau_sweep=[0,0.4]", "tau_sweep must be"), ("resolution=100", "multiple of 8"),
                                            ("ablation={n_eval: 0}", "is not a YAML value"),
                                            ("guidance=-1", "guidance must be >= 0"), ("guidance=high", "key .guidance. must be int or float or null")])
def test_profile_values_are_checked_by_range(override, match):
    with pytest.raises(ProfileError, match=match):
        load("smoke", override)


def test_guidance_null_leaves_the_pipeline_its_own():
    """``guidance: null`` (the qwenimage profile) hands the pipeline no guidance_scale at all; a number is passed as given."""
    from saam.models import guidance_arg
    assert load("smoke", "guidance=null")["guidance"] is None and load("qwenimage")["guidance"] is None
    assert guidance_arg(None) == {} and guidance_arg(0) == {"guidance_scale": 0} and guidance_arg(5.0) == {"guidance_scale": 5.0}


def test_overrides_get_folders_of_their_own_and_make_agrees(tmp_path):
    """A run with SET never overwrites a plain run's outputs (nor the committed figures/), and the
    Makefile names its folder as the package does, so changed overrides re-run every chapter."""
    from saam import paths
    assert paths.figures_dir("paper") == paths.ROOT / "figures"
    assert paths.figures_dir("mmdit") == paths.ROOT / "figures" / "mmdit"  # the MM-DiT organism's run, committed too
    tag = paths.overrides_tag("steps=4 n_eval=6")
    assert tag.startswith("set-") and tag != paths.overrides_tag("steps=4 n_eval=7")
    assert paths.figures_dir("paper", "steps=4 n_eval=6") == paths.BUILD / "paper" / tag / "figures"
    p = load("smoke", "steps=4 n_eval=6")
    assert p["overrides"] == "steps=4 n_eval=6" and p["figures"] == str(paths.BUILD / "smoke" / tag / "figures")
    assert load("smoke")["figures"] == str(paths.BUILD / "smoke" / "figures")
    out = subprocess.run(["make", "-n", "all", "PROFILE=smoke", "SET=steps=4 n_eval=6"], cwd=paths.ROOT,
                         capture_output=True, text=True).stdout
    assert f"build/smoke/{tag}/00-shapesworld-model.ipynb" in out
    paper = subprocess.run(["make", "-n", "all", "PROFILE=paper", "SET=steps=4"], cwd=paths.ROOT,
                           capture_output=True, text=True).stdout
    assert f"build/paper/{paths.overrides_tag('steps=4')}/03-miou.ipynb" in paper
    for profile, folder in paths.COMMITTED.items():  # make's reproduction check reads the folder the package writes
        plain = subprocess.run(["make", "-n", "all", f"PROFILE={profile}"], cwd=paths.ROOT, capture_output=True, text=True).stdout
        assert f"HEAD:{folder}/results.json" in plain and f"{folder}/results.json" in plain


def test_model_folders_are_checked_for_components_and_family(tmp_path):
    from saam.models import check_model_folder
    from saam.testing import save_tiny
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(FileNotFoundError, match="not a complete diffusers folder.*unet/config.json is missing.*names no vae"):
        check_model_folder(tmp_path / "only", "sd14", "sd14")
    xl = save_tiny("sdxl-layout", tmp_path / "xl")
    with pytest.raises(ValueError, match="profile 'sd14' expects SD v1.x, but .* holds SDXL; use PROFILE=sdxl"):
        check_model_folder(xl, "sd14", "sd14")
    check_model_folder(xl, "sdxl", "sdxl")
    from saam.chapter import load as load_params
    import os
    os.environ["SAAM_MODEL_PATH"] = str(tmp_path / "only")
    try:
        with pytest.raises(FileNotFoundError, match="not a complete diffusers folder"):
            load_params("sd14")  # what `make check` runs before any chapter
    finally:
        del os.environ["SAAM_MODEL_PATH"]


def test_empty_concepts_and_prompts_are_errors(sd1):
    from saam.relevance import relevance_pass
    for concepts in ({}, {"Color": []}, {"Color": [""]}):
        with pytest.raises(ValueError, match="non-empty list of words"):
            relevance_pass(sd1, concepts, ["a dog"], steps=1, progress=False)
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        relevance_pass(sd1, {"Color": ["red"]}, [], steps=1, progress=False)


def test_a_caption_longer_than_the_window_skips_the_cut_word_with_a_count(sd1, capsys):
    from saam.datasets import Item, Word
    from saam.evaluate import real_image_protocol
    from saam.family import UNET
    from saam.heads import head_ids
    heads = head_ids({l: m.heads for l, m in UNET.layers(sd1.unet).items()})
    img = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), bool)
    long = "a dog " + "and more " * 40 + "and a cat"
    items = [Item(img, long, [Word("dog", 0, "Animals", mask), Word("cat", 0, "Animals", mask)]),
             Item(img, "a cat", [Word("cat", 0, "Animals", mask)])]
    recs, _ = real_image_protocol(sd1, items, heads, strength=0.5, steps=2, guidance=5.0, seed=0, batch_size=2,
                                  progress=False)
    assert [(r.image, r.word) for r in recs] == [(0, "dog"), (1, "cat")]
    assert "1 caption word(s) lay beyond the text encoder's window and were skipped" in capsys.readouterr().err


# ------------------------------------------------------------------ round three (issue 29)

def test_cfg_forced_against_the_pipeline_is_refused_and_honoured_where_it_agrees(sd1):
    """guidance_scale=1 runs no negative half: cfg=True would label the second prompt's rows as the
    first's. Refused; where the pipeline agrees, forcing it gives what following it gives."""
    import torch
    from conftest import run
    from saam.capture import CaptureError, trace
    with pytest.raises(CaptureError, match=r"trace\(cfg=True\) contradicts StableDiffusionPipeline, which runs this call without"):
        with trace(sd1, cfg=True):
            run(sd1, ["a red cat", "a blue dog"], guidance_scale=1.0)
    with pytest.raises(CaptureError, match=r"trace\(cfg=False\) contradicts .* with classifier-free guidance"):
        with trace(sd1, cfg=False):
            run(sd1, ["a red cat", "a blue dog"], guidance_scale=5.0)
    with trace(sd1) as follow:
        run(sd1, ["a red cat", "a blue dog"], guidance_scale=1.0)
    with trace(sd1, cfg=False) as forced:
        run(sd1, ["a red cat", "a blue dog"], guidance_scale=1.0)
    assert [h.prompt for h in forced] == ["a red cat", "a blue dog"] == [h.prompt for h in follow]
    assert all(torch.equal(a.maps[l], b.maps[l]) for a, b in zip(follow, forced) for l in a.maps)


def test_flux_true_cfg_labels_the_maps_with_the_prompt_and_they_are_its_own():
    """FLUX.1 with true_cfg_scale > 1 and a negative prompt encodes and runs the negative prompt in
    calls of its own: the maps are the prompt's (at the first step, where both runs see the same
    latents, identical to a run without the negative prompt)."""
    import torch
    from saam.aggregate import word_map
    from saam.capture import trace
    from saam.testing import tiny_dit_pipeline
    pipe = tiny_dit_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=32, output_type="latent")
    with trace(pipe, per_step=True) as neg:
        pipe("a red cat", negative_prompt="a blue dog", true_cfg_scale=4.0, generator=torch.Generator().manual_seed(0), **run)
    with trace(pipe, per_step=True) as plain:
        pipe("a red cat", generator=torch.Generator().manual_seed(0), **run)
    assert len(neg) == 1 and neg[0].prompt == "a red cat" and neg[0].steps == 2
    assert word_map(neg[0], "cat").ndim == 2
    assert all(torch.equal(neg[0].per_step[l][0], plain[0].per_step[l][0]) for l in plain[0].maps)
    assert not all(torch.equal(neg[0].per_step[l][1], plain[0].per_step[l][1]) for l in plain[0].maps)  # CFG acted


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["top", "bottom", "soft", "daam", "random"])
def test_non_finite_relevance_names_the_concept_and_the_head(method, bad):
    from saam.heads import HeadId
    from saam.select import head_set
    heads = [HeadId("down_blocks.0.attn2", h) for h in range(4)] + [HeadId("up_blocks.1.attn2", h) for h in range(4)]
    row = np.linspace(0.1, 1.9, 8)
    row[5] = bad
    with pytest.raises(ValueError, match=r"relevance row of concept 'Color' is (nan|inf|-inf) at head up_blocks.1.attn2\[1\].*must be finite"):
        head_set(method, heads, row, 0.5, concept="Color")
    row[5] = 1.0
    assert len(head_set(method, heads, row, 0.5, concept="Color").index)  # finite: as before


def test_trace_with_no_layers_lists_the_layer_names(sd1):
    from saam.capture import trace
    from saam.family import UNET
    for layers in ([], (), "down_blocks.0.attentions.0.transformer_blocks.0.attn2"):
        with pytest.raises(ValueError, match="one or more cross-attention layer names.*down_blocks"):
            with trace(sd1, layers=layers):
                pass
    names = sorted(UNET.layers(sd1.unet))
    with pytest.raises(ValueError) as e:
        with trace(sd1, layers=[]):
            pass
    assert all(n in str(e.value) for n in names)


def test_duplicate_image_ids_are_reported_as_duplicates(tmp_path):
    two = [dict(id=1, file_name="a.png", height=20, width=30), dict(id=1, file_name="b.png", height=20, width=30)]
    with pytest.raises(DatasetError, match=r"images\[1\] repeats id 1 of images\[0\]; ids must be unique"):
        read_coco(_dataset(tmp_path / "img", images=two))
    anns = [dict(id=7, image_id=1, category_id=1, segmentation=POLY, area=100, bbox=[0, 0, 10, 10], iscrowd=0)] * 2
    with pytest.raises(DatasetError, match=r"annotations\[1\] repeats id 7"):
        read_coco(_dataset(tmp_path / "ann", anns=anns))


HOSTILE = ['steps=4" ; touch {m} ; echo "', "steps=4' ; touch {m} ; echo '", "steps=$(touch {m})", "steps=`touch {m}`",
           "steps=4;touch {m}", "steps=$(shell touch {m})", "steps=4 $$(touch {m})", "steps=4\\'; touch {m} #"]


@pytest.mark.parametrize("text", HOSTILE)
def test_set_reaches_the_program_as_data_never_through_a_shell(tmp_path, text):
    """Quotes, $(), backticks, semicolons (and make's own $(shell ...)) in SET run no command: make
    check sees them as the override text, and the folder make names is the one the package names."""
    from saam import paths
    marker = tmp_path / "ran"
    value = text.format(m=marker)
    for target in (["check"], ["-n", "all"]):
        r = subprocess.run(["make", *target, "PROFILE=smoke", f"SET={value}"], cwd=paths.ROOT, capture_output=True, text=True)
        assert not marker.exists(), (value, r.stdout, r.stderr)
    assert f"build/smoke/{paths.overrides_tag(value)}/00-shapesworld-model.ipynb" in r.stdout
    r = subprocess.run(["make", "check", "PROFILE=smoke", f"SET={value}"], cwd=paths.ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "error:" in r.stderr and not marker.exists()


def test_a_profile_name_is_one_known_word(tmp_path):
    from saam import paths
    marker = tmp_path / "ran"
    r = subprocess.run(["make", "check", f"PROFILE=smoke ; touch {marker}"], cwd=paths.ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "no profile 'smoke ; touch" in r.stderr and not marker.exists()


@pytest.mark.parametrize("override,match", [
    ("model_path=/nonexistent", "no ShapesWorld organism at /nonexistent"),
    ("variants=[Z]", "variants: unknown variant 'Z'; known: \\['A', 'B', 'C', 'D'\\]"),
    ("k_sweep=[0.25,0.25]", "k_sweep lists 0.25 more than once"),
    ("tau_sweep=[0.3,0.4,0.3]", "tau_sweep lists 0.3 more than once"),
    ("variants=[A,A]", "variants lists A more than once")])
def test_make_check_refuses_what_cannot_run(override, match):
    from saam import paths
    r = subprocess.run(["make", "check", "PROFILE=smoke", f"SET={override}"], cwd=paths.ROOT, capture_output=True, text=True)
    assert r.returncode != 0, r.stdout
    import re
    assert re.search(match, r.stderr), r.stderr


def test_make_check_counts_cached_batches_once():
    """Chapter 06 generates nothing for the organism the other chapters ran when its ablation counts
    are whole batches of theirs (saam.runs keys a batch on its start, size and items); the other
    organisms cost their generation run, two fidelity groups and their relevance prompts."""
    from saam.profiles import load as load_profile, run_size
    p = load_profile("paper")
    a, steps = p["ablation"], p["steps"]
    size = run_size(p)
    own = (max(a["n_eval"], a["n_sinks"]) + 2 * a["n_fidelity"] + a["n_relevance_prompts"]) * steps
    assert "organism D" not in size and size["organism A"] == size["organism C"] == own
    assert size["generation"] == max(p["n_eval"], p["n_sinks"]) * steps
    assert size["relevance"] == p["relevance_pool"] * steps  # the relevance pass's prompts open the pool
    assert size["relevance re-estimates"] == p["relevance_reestimates"] * p["n_relevance_prompts"] * steps  # new prompts each
    odd = dict(p, ablation=dict(a, n_eval=p["batch_size"] + 1))  # a batch of its own: generated again
    assert run_size(odd)["organism D"] == (p["batch_size"] + 1 + 2 * a["n_fidelity"] + a["n_relevance_prompts"]) * steps
    assert "organism D" in run_size(load_profile("smoke"))  # 6 of 12 scenes in batches of 16: not the same batch


def test_measured_times_are_declared_once():
    """The README quotes the measured `make all` times as saam.profiles.MEASURED_RUNS has them, each with
    its machine, and `make check`'s rate for an arithmetic is its slowest measured machine's."""
    import sys
    from saam import paths
    from saam.profiles import MEASURED_RUNS, RATES
    sys.path.insert(0, str(paths.ROOT / "scripts"))
    import readme_results
    block = readme_results.times()
    assert f"{readme_results.TIMES_START}\n{block}\n{readme_results.TIMES_END}" in (paths.ROOT / "README.md").read_text()
    for r in MEASURED_RUNS:
        assert f"{r['minutes']:.1f} min in {r['arithmetic']} on {r['machine']}" in block
        assert RATES[("shapesworld", r["arithmetic"])] >= r["minutes"] * 60 / r["image_steps"]


def test_make_check_estimates_the_run_and_warns_past_an_hour():
    from saam import paths
    from saam.profiles import estimate, load as load_profile, run_size
    small = load_profile("smoke")
    big = load_profile("smoke", "steps=100000")
    assert sum(run_size(big).values()) == sum(run_size(small).values()) // 8 * 100000  # linear in the steps
    assert estimate(small, "bf16", "cpu")[1] is None
    line, warn = estimate(big, "fp32", "cpu")
    assert f"{sum(run_size(big).values()):,} image-steps" in line and "more than an hour" in warn
    assert "memory grows" in estimate(load_profile("smoke", "n_eval=500 batch_size=1000"), "bf16", "cpu")[1]
    assert "batch_size 1,000,000 is more than any pass holds" in estimate(load_profile("smoke", "batch_size=1000000"), "bf16", "cpu")[0]
    assert estimate(big, "fp16", "cuda")[1] is None  # no rate measured on a GPU: the size alone
    r = subprocess.run(["make", "check", "PROFILE=smoke", "SET=steps=100000"], cwd=paths.ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "image-steps" in r.stdout and "more than an hour" in r.stderr


def test_a_folder_whose_denoiser_and_text_encoder_disagree_in_width(tmp_path):
    """An SD1 folder whose UNet expects another text width than its encoder gives fails in make
    check, naming both numbers (it used to fail later, inside diffusers, with a shape error)."""
    from saam.models import check_model_folder
    from saam.testing import save_tiny
    for kind, profile, den, key in (("sd1", "sd14", "unet", "cross_attention_dim"), ("sdxl", "sdxl", "unet", "cross_attention_dim"),
                                    ("sd3", "sd3", "transformer", "joint_attention_dim"), ("flux", "flux", "transformer", "joint_attention_dim")):
        folder = save_tiny(kind, tmp_path / kind)
        check_model_folder(folder, profile, profile)
        f = folder / den / "config.json"
        cfg = json.loads(f.read_text())
        cfg[key] = (cfg[key][0] if isinstance(cfg[key], list) else cfg[key]) + 8
        f.write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=f"{den}/config.json has {key} .* but .* is .*different models"):
            check_model_folder(folder, profile, profile)


# issue 37: file names that leave the dataset folder, case and Unicode in words, malformed RLE

@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "img/../../outside.png", "C:\\x.png", ""])
def test_coco_file_names_stay_inside_the_dataset_folder(tmp_path, name):
    d = tmp_path / "ds"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "outside.png")
    _dataset(d, images=[dict(id=1, file_name=name, height=20, width=30)])
    with pytest.raises(DatasetError, match=r"images\[0\] has file_name .*relative path inside the dataset folder") as e:
        read_coco(d)
    assert "exist" not in str(e.value)  # nothing said about files outside


def test_a_link_out_of_the_dataset_folder_is_refused(tmp_path):
    d = tmp_path / "ds"
    _dataset(d)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "outside.png")
    (d / "img" / "a.png").unlink()
    (d / "img" / "a.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(DatasetError, match="links outside the dataset folder"):
        read_coco(d)


def test_category_names_and_caption_words_match_across_case_and_unicode(tmp_path):
    _dataset(tmp_path, cats=[dict(id=1, name="Dog")])  # the word map says "dog"
    assert read_coco(tmp_path)[0].words[0].mask is not None
    (tmp_path / "word_categories.yaml").write_text("circulo: {concept: Geometry, words: [círculo]}\n")
    import unicodedata
    nfd = unicodedata.normalize("NFD", "un círculo rojo")
    assert nfd != "un círculo rojo"
    _dataset(tmp_path, cats=[dict(id=1, name="circulo")], captions=[dict(id=1, image_id=1, caption=nfd)])
    (tmp_path / "word_categories.yaml").write_text("circulo: {concept: Geometry, words: [círculo]}\n")
    items = read_coco(tmp_path)
    assert [w.word for w in items[0].words] == ["círculo"] and items[0].words[0].mask is not None


def test_rle_that_does_not_cover_its_image_is_an_error(tmp_path):
    ann = dict(id=3, image_id=1, category_id=1, area=1, bbox=[0, 0, 1, 1], iscrowd=1)
    _dataset(tmp_path, anns=[dict(ann, segmentation=dict(size=[20, 30], counts=[100, 50, 10]))])
    with pytest.raises(DatasetError, match=r"id 3: RLE counts sum to 160 pixels, not the image's 20 x 30 = 600"):
        read_coco(tmp_path)
    _dataset(tmp_path, anns=[dict(ann, segmentation=dict(size=[30, 20], counts=[100, 500]))])
    with pytest.raises(DatasetError, match=r"RLE size \[30, 20\] is not .*swapped"):
        read_coco(tmp_path)
    _dataset(tmp_path, anns=[dict(ann, segmentation=dict(size=[20, 30], counts=[100, 500]))])
    assert read_coco(tmp_path)[0].words[0].mask.sum() == 500


def test_a_key_given_twice_is_an_error(tmp_path, monkeypatch):
    from saam import paths
    smoke = (paths.PARAMS / "smoke.yaml").read_text()
    (tmp_path / "twice.yaml").write_text(smoke + "steps: 3\n")
    monkeypatch.setattr(paths, "PARAMS", tmp_path)
    with pytest.raises(ProfileError, match="key 'steps' is given twice"):
        load("twice")
    (tmp_path / "smoke.yaml").write_text(smoke)
    assert load("smoke", "steps=3")["steps"] == 3
    with pytest.raises(ProfileError, match="'steps' is given twice"):
        load("smoke", "steps=3 steps=4")
    _dataset(tmp_path / "ds")
    (tmp_path / "ds" / "word_categories.yaml").write_text("dog: {concept: Animals}\ndog: {concept: Pets}\n")
    with pytest.raises(DatasetError, match="given twice"):
        read_coco(tmp_path / "ds")


@pytest.mark.parametrize("over,match", [("variants=[]", "must list at least one organism variant"),
                                        ("rules=[concentration,oracle]", "pre-registered rules"),
                                        ("rules=[consensus,consensus]", "at most once"),
                                        ("relevance_reestimates=-1", "0 .none. or more")])
def test_profile_values_that_would_fail_later_fail_at_check(over, match):
    with pytest.raises(ProfileError, match=match):
        load("smoke", over)


def test_saam_model_path_on_an_organism_profile_is_an_error(monkeypatch):
    from saam.models import model_path
    monkeypatch.setenv("SAAM_MODEL_PATH", "/models/sd14")
    with pytest.raises(ValueError, match="SAAM_MODEL_PATH is set .* ShapesWorld organism.*SET='model_path=<dir>'"):
        model_path(load("smoke"))


def test_make_check_refuses_a_k_past_the_models_heads(tmp_path):
    from saam.tables import check_k
    assert check_k(load("smoke")) == 40
    with pytest.raises(ValueError, match="k 1000: .* only 40 are eligible"):
        check_k(load("smoke", "k=1000"))
    from saam.testing import save_tiny
    folder = save_tiny("sd3", tmp_path / "sd3")
    n = check_k(load("sd3", f"model_path={folder}"))
    with pytest.raises(ValueError, match=f"k_sweep {n + 1}"):
        check_k(load("sd3", f"model_path={folder} k_sweep=[2,{n + 1}]"))
    r = subprocess.run([sys.executable, "scripts/run_notebook.py", "--check", "--profile", "smoke", "--set", "k=1000"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "only 40 are eligible" in r.stderr + r.stdout


def test_published_vectors_on_an_mmdit_say_what_to_do_instead():
    """issue 38: HRV's vectors are a UNet's; on a DiT's heads the error points to the concept stream."""
    from saam.relevance import load_published
    with pytest.raises(ValueError, match=r"MM-DiT's \(transformer blocks\).*relevance_pass.*saam heads"):
        load_published("sd14", {f"transformer_blocks.{i}.attn": 4 for i in range(6)})
