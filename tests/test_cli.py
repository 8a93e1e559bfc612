"""The ``saam`` command line (a subprocess, as a user runs it) on tiny offline pipelines, the overlay
helper, and models named by Hugging Face id resolved from a local cache laid out by huggingface_hub."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

PROMPTS = "a red cat on a blue sofa\na green dog near a yellow ball\n"


def saam(*args, env=None, check=True):
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    r = subprocess.run([sys.executable, "-m", "saam.cli", *map(str, args)], capture_output=True, text=True, env=e)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from saam.testing import save_tiny
    root = tmp_path_factory.mktemp("tiny")
    (root / "prompts.txt").write_text(PROMPTS)
    return root, {k: save_tiny(k, root / k) for k in ("sd1", "sdxl", "sd3", "flux")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd1", "sdxl", "sd3", "flux"])
def test_heads_then_map_on_every_family(folders, kind, tmp_path):
    """`saam heads` runs HRV's pass (the concept stream on MM-DiTs) over the user's prompts; `saam map`
    reuses its relevance.npz and writes the image, each word's map and overlay, and the arrays."""
    root, f = folders
    dit = ["--max-sequence-length", 32] if kind in ("sd3", "flux") else []
    r = saam("heads", "--model", f[kind], "--prompts", root / "prompts.txt", "--steps", 2, "--top", 3, *dit, "-o", tmp_path / "h")
    assert r.stdout.startswith("Animals: ")  # HRV's first concept, its top heads
    for name in ("relevance.npz", "relevance.json", "top-heads.csv", "top-heads.md", "relevance-hist.png"):
        assert (tmp_path / "h" / name).stat().st_size > 0, name
    import pandas as pd
    top = pd.read_csv(tmp_path / "h" / "top-heads.csv")
    assert len(top) == 3 * 34 and list(top[top.concept == "Color"]["rank"]) == [1, 2, 3]
    assert top.groupby("concept").relevance.apply(lambda v: v.is_monotonic_decreasing).all()
    r = saam("map", "a red cat on a blue sofa", "--model", f[kind], "--word", "cat", "--word", "red", "--heads", "top",
             "--relevance", tmp_path / "h" / "relevance.npz", "--steps", 2, "--size", 64, "-q", *dit, "-o", tmp_path / "m")
    out = tmp_path / "m"
    for name in ("image.png", "cat-map.png", "cat-overlay.png", "red-map.png", "red-overlay.png", "maps.npz"):
        assert (out / name).stat().st_size > 0, name
    about = json.loads((out / "maps.json").read_text())
    assert about["words"]["red"]["concept"] == "Color" and about["words"]["cat"]["concept"] == "Animals"
    assert len(about["words"]["cat"]["heads"]) >= 1
    z = np.load(out / "maps.npz")
    assert z["cat@image"].shape == (64, 64) and z["cat@image"].min() == 0 and z["cat@image"].max() == 1


@pytest.mark.slow
def test_map_daam_and_published_vectors(tmp_path):
    """DAAM's heads need no relevance; SD v1.4's layout takes HRV's published vectors (no pass)."""
    from saam.testing import save_tiny
    sd14 = save_tiny("sd14-layout", tmp_path / "sd14")
    r = saam("map", "a photo of a dog", "--model", sd14, "--word", "dog", "--steps", 2, "--size", 64, "-q", "-o", tmp_path / "d")
    assert json.loads((tmp_path / "d" / "maps.json").read_text())["words"]["dog"]["heads"].startswith("DAAM")
    r = saam("map", "a photo of a dog", "--model", sd14, "--word", "dog", "--heads", "top", "--k", 5, "--steps", 2,
             "--size", 64, "-q", "-o", tmp_path / "t")
    assert "HRV's published sd14 vectors" in r.stderr and "relevance pass" not in r.stderr
    assert len(json.loads((tmp_path / "t" / "maps.json").read_text())["words"]["dog"]["heads"]) == 5


def test_errors_say_what_to_do(folders, tmp_path):
    root, f = folders
    r = saam("map", "a red cat", "--model", f["sd1"], "--word", "cat", "--heads", "top", "--steps", 2, "-o", tmp_path, check=False)
    assert r.returncode == 2 and "no published head relevance: give prompts for HRV's pass with --prompts FILE" in r.stderr
    r = saam("map", "a red cat", "--model", f["sd1"], "--word", "dog", "--steps", 1, "--size", 64, "-q", "-o", tmp_path, check=False)
    assert r.returncode == 2 and "--word 'dog'" in r.stderr
    r = saam("map", "a red cat", "--model", "nobody/no-such-model", "--word", "cat", "-o", tmp_path, check=False,
             env=dict(HF_HUB_CACHE=str(tmp_path / "hub")))
    assert r.returncode == 2 and "hf download nobody/no-such-model" in r.stderr
    r = saam("map", "a red cat", "--model", f["sd1"], "--word", "cat", "--k", "1.5", "-o", tmp_path, check=False)
    assert r.returncode == 2 and "a fraction in (0, 1] or a whole number of heads" in r.stderr
    r = saam("map", "a red cat", "--model", f["sd1"], "--word", "cat", "--concept", "Color", "-o", tmp_path, check=False)
    assert r.returncode == 2 and "use them with --heads top, bottom or soft" in r.stderr
    r = saam("--help")
    assert "saam map" in r.stdout and "saam heads" in r.stdout


def test_a_repo_id_resolves_from_the_local_hub_cache(folders, tmp_path, monkeypatch):
    """A cache laid out by huggingface_hub's functions: the id resolves to its snapshot, offline; a
    profile without model_path falls back to its model_id; a miss names the command to fetch it."""
    from huggingface_hub import constants, scan_cache_dir
    from saam.models import model_path, resolve
    from saam.testing import put_in_hub_cache
    root, f = folders
    snap = put_in_hub_cache(f["sd1"], "tiny-org/tiny-sd1", tmp_path / "hub")
    assert [r.repo_id for r in scan_cache_dir(tmp_path / "hub").repos] == ["tiny-org/tiny-sd1"]  # hub's own view
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("SAAM_MODEL_PATH", raising=False)
    assert resolve("tiny-org/tiny-sd1") == snap and (snap / "unet" / "config.json").is_symlink()
    assert resolve(f["sd1"]) == f["sd1"]  # a folder is a folder
    assert model_path(dict(profile="sd14", model="sd14", model_path=None, model_id="tiny-org/tiny-sd1")) == snap
    with pytest.raises(FileNotFoundError, match=r"tiny-org/other is neither a folder nor in the local Hugging Face cache.*hf download tiny-org/other"):
        model_path(dict(profile="sd14", model="sd14", model_path=None, model_id="tiny-org/other"))


@pytest.mark.slow
def test_map_by_repo_id(folders, tmp_path):
    from saam.testing import put_in_hub_cache
    root, f = folders
    put_in_hub_cache(f["sd1"], "tiny-org/tiny-sd1", tmp_path / "hub")
    saam("map", "a red cat", "--model", "tiny-org/tiny-sd1", "--word", "cat", "--steps", 1, "--size", 64, "-q",
         "-o", tmp_path / "o", env=dict(HF_HUB_CACHE=str(tmp_path / "hub")))
    assert (tmp_path / "o" / "cat-overlay.png").exists()


def test_plot_overlay_upsamples_normalises_and_refuses_bad_maps():
    import matplotlib.pyplot as plt
    from saam import plot_overlay
    img = np.zeros((32, 32, 3), np.uint8)
    m = np.arange(16, dtype=np.float32).reshape(4, 4) * 3 + 2
    ax = plot_overlay(img, m)
    shown = ax.get_images()[1].get_array()
    assert shown.shape == (32, 32) and float(shown.min()) == 0.0 and float(shown.max()) == 1.0
    with pytest.raises(ValueError, match="2-D map"):
        plot_overlay(img, np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="at the image's size"):
        plot_overlay(img, m, normalise=False)
    plt.close("all")


def test_words_that_sanitise_alike_get_distinct_files():
    from saam.cli import _stems
    stems = _stems(["🔴", "⭐", "?", "red", "red!"])
    assert len(set(stems.values())) == 5 and stems["red"] == "red"


def test_bad_map_input_fails_before_any_work_and_loses_nothing(folders, tmp_path):
    """issue 37: every input checked before generating, the output folder replaced whole or not at all,
    maps.json saying what produced it, and relevance files refused on another model."""
    root, f = folders
    out = tmp_path / "m"
    base = ("map", "a red cat on a blue sofa", "--model", f["sd1"], "--steps", 1, "--size", 64, "-q")
    saam(*base, "--word", "cat", "--seed", 3, "-o", out)
    about = json.loads((out / "maps.json").read_text())
    assert about["steps"] == 1 and about["size"] == [64, 64] and about["seed"] == 3 and about["family"] == "unet"
    assert "pipeline's" in str(about["guidance"]) and about["words"]["cat"]["files"] == ["cat-map.png", "cat-overlay.png"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for args, match in [(("--word", "dog"), "--word 'dog'.*nothing was generated"), (("--word", ""), "--word ''"),
                        (("--word", "cat", "--size", 17), "--size 17: this model needs a multiple of"),
                        (("--word", "cat", "--device", "cuda"), "--device cuda")]:
        r = saam(*base, *args, "-o", out, check=False)
        assert r.returncode == 2 and match.split(".*")[0] in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-800:])
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier run intact
    for args in (("--k", "nan"), ("--guidance", "-5"), ("--k", "inf")):
        r = saam(*base, "--word", "cat", *args, "-o", out, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr
    (tmp_path / "file").write_text("x")
    r = saam(*base, "--word", "cat", "-o", tmp_path / "file", check=False)
    assert r.returncode == 2 and "a file is there" in r.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = saam(*base, "--word", "cat", "-o", other, check=False)
    assert r.returncode == 2 and "other files" in r.stderr and [p.name for p in other.iterdir()] == ["notes.txt"]
    long = " ".join(["a photo"] * 40) + " of a cat"  # 'cat' past the 77-token window
    r = saam("map", long, "--model", f["sd1"], "--word", "cat", "-o", tmp_path / "long", check=False)
    assert r.returncode == 2 and "nothing was generated" in r.stderr and not (tmp_path / "long").exists()


@pytest.mark.slow
def test_relevance_files_carry_their_model_and_are_refused_on_another(folders, tmp_path):
    root, f = folders
    saam("heads", "--model", f["sd1"], "--prompts", root / "prompts.txt", "--n-prompts", 1, "--steps", 1, "-o", tmp_path / "h")
    ident = json.loads((tmp_path / "h" / "relevance.json").read_text())["params"]["model_identity"]
    assert ident["family"] == "unet" and ident["fingerprint"] and ident["n_heads"] > 0
    base = ("map", "a red cat", "--word", "cat", "--heads", "top", "--steps", 1, "--size", 64, "-q")
    r = saam(*base, "--model", f["sdxl"], "--relevance", tmp_path / "h" / "relevance.npz", "-o", tmp_path / "x", check=False)
    assert r.returncode == 2 and "are not this model's" in r.stderr and "unet" in r.stderr and not (tmp_path / "x").exists()
    (tmp_path / "junk.npz").write_bytes(os.urandom(500))
    (tmp_path / "junk.json").write_text("{}")
    r = saam(*base, "--model", f["sd1"], "--relevance", tmp_path / "junk.npz", "-o", tmp_path / "y", check=False)
    assert r.returncode == 2 and "not a relevance file written by `saam heads`" in r.stderr
    r = saam(*base, "--model", f["sd1"], "--relevance", tmp_path / "h" / "relevance.npz", "--k", 1000, "-o", tmp_path / "z",
             check=False)
    assert r.returncode == 2 and "--k 1000" in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "z").exists()
    r = saam(*base, "--model", f["sd1"], "--relevance", tmp_path / "h" / "relevance.npz", "-o", tmp_path / "z")
    assert "fingerprint" not in r.stderr and "which model" not in r.stderr and (tmp_path / "z" / "cat-map.png").exists()


def test_broken_folders_and_thin_prompt_files_are_explained(folders, tmp_path):
    import shutil
    root, f = folders
    bare = tmp_path / "bare"
    shutil.copytree(f["sd1"], bare)
    (bare / "unet" / "config.json").unlink()
    r = saam("map", "a red cat", "--model", bare, "--word", "cat", "-o", tmp_path / "o", check=False)
    assert r.returncode == 2 and "cannot tell the model family" in r.stderr and "Traceback" not in r.stderr
    cut = tmp_path / "cut"
    shutil.copytree(f["sd1"], cut)
    w = next((cut / "unet").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    r = saam("map", "a red cat", "--model", cut, "--word", "cat", "-o", tmp_path / "o", check=False)
    assert r.returncode == 2 and "do not load" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "same.txt").write_text("a red cat\n" * 1000)
    r = saam("heads", "--model", f["sd1"], "--prompts", tmp_path / "same.txt", "--steps", 1, "-o", tmp_path / "h")
    assert "999 of the 1000 prompts repeat an earlier one" in r.stderr and "over 1 prompt(s)" in r.stderr
    assert "few votes" in r.stderr
    r = saam("map", "a red cat", "--model", f["sd1"], "--word", "cat", "--heads", "top", "--k", 20, "--steps", 1, "--size", 64,
             "-q", "--relevance", tmp_path / "h" / "relevance.npz", "-o", tmp_path / "m")
    about = json.loads((tmp_path / "m" / "maps.json").read_text())["words"]["cat"]
    assert ("tied_left_out" in about) == ("completed by head order" in r.stderr)


@pytest.mark.slow
def test_explore_on_ones_own_dit_in_chromium(folders, tmp_path):
    """issue 38: `saam explore` for a user's model and prompts (no masks), here a tiny SD3, the page
    working in Chromium: a button per word, every eligible head's map, IoU left out."""
    root, f = folders
    dit = ["--max-sequence-length", 32]
    saam("heads", "--model", f["sd3"], "--prompts", root / "prompts.txt", "--steps", 2, *dit, "-o", tmp_path / "h")
    r = saam("explore", "a red cat on a blue sofa", "a green dog", "--model", f["sd3"], "--relevance",
             tmp_path / "h" / "relevance.npz", "--steps", 2, "--size", 64, "-q", *dit, "-o", tmp_path / "e")
    page = tmp_path / "e" / "explorer.html"
    assert "explorer.html" in r.stdout and page.exists()
    words = json.loads((tmp_path / "e" / "explore.json").read_text())["words"]
    assert words[0] == {"red": "Color", "cat": "Animals", "blue": "Color", "sofa": "Furniture"} and words[1] == {"green": "Color", "dog": "Animals"}
    from conftest import chromium
    drv = chromium()
    try:
        drv.get(page.as_uri())
        assert [b.text.split(" ")[0] for b in drv.find_elements("css selector", "#img0 .words button")] == ["red", "cat", "blue", "sofa"]
        figs = drv.find_elements("css selector", "#img1 .grid figure")
        assert len(figs) == int(drv.execute_script("return document.getElementById('k').max")) > 0
        assert "IoU -" in figs[0].text
        assert not [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        drv.quit()
    r = saam("explore", "zebraa qwerty", "--steps", 1, "--model", f["sd3"], "--relevance", tmp_path / "h" / "relevance.npz", *dit,
             "-o", tmp_path / "none", check=False)
    assert r.returncode == 2 and "no word to explore" in r.stderr


@pytest.mark.slow
def test_a_dit_users_defaults_words_and_sizes(folders, tmp_path):
    """issue 38: maps.json speaks the family's words, `saam heads` runs at the pipeline's own guidance
    (Qwen-Image warns of none ignored), PixArt generates at the size asked (no resolution binning)."""
    from saam.testing import save_tiny
    root, f = folders
    r = saam("map", "a red cat", "--model", f["sd3"], "--word", "cat", "--steps", 1, "--size", 64, "-q",
             "--max-sequence-length", 32, "-o", tmp_path / "sd3")
    heads = json.loads((tmp_path / "sd3" / "maps.json").read_text())["words"]["cat"]["heads"]
    assert "joint-attention" in heads and "down" not in heads
    qwen = save_tiny("qwenimage", tmp_path / "qwen")
    r = saam("heads", "--model", qwen, "--prompts", root / "prompts.txt", "--n-prompts", 1, "--steps", 1, "-o", tmp_path / "qh")
    assert "ignored" not in r.stderr
    assert json.loads((tmp_path / "qh" / "relevance.json").read_text())["params"]["guidance"] is None  # the pipeline's own
    pixart = save_tiny("pixart", tmp_path / "pixart")
    saam("map", "a red cat", "--model", pixart, "--word", "cat", "--steps", 1, "--size", 64, "-q", "-o", tmp_path / "px")
    from PIL import Image
    assert Image.open(tmp_path / "px" / "image.png").size == (64, 64)
    z = np.load(tmp_path / "px" / "maps.npz")
    assert z["cat"].shape == (8, 8) and z["cat@image"].shape == (64, 64)
