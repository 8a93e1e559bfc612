"""The real-SD path, offline: tiny pipelines with SD v1.4's and SDXL's exact cross-attention layout,
a ShapesWorld scene set exported as a COCO-format dataset, every chapter on the sd14 and sdxl
profiles, the README's snippet as printed, and one scoring path for two dataset readers."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from saam import paths

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    d = tmp_path_factory.mktemp("coco")
    subprocess.run([sys.executable, "-m", "saam.shapes.world", "--export-coco", str(d), "--n", "12"], check=True)
    return d


@pytest.fixture(scope="module")
def tiny_sd14(tmp_path_factory):
    from saam.testing import save_tiny
    return save_tiny("sd14-layout", tmp_path_factory.mktemp("sd14") / "pipe")


def test_export_and_native_protocol_give_the_same_table1(export, tmp_path, monkeypatch):
    """ShapesWorld renders read natively and read back from the COCO export: same records, same Table 1."""
    from saam import chapter, models, steps, tables
    from saam.evaluate import miou_table
    from saam.family import UNET
    from saam.heads import head_ids
    from saam.relevance import Relevance
    monkeypatch.setattr(paths, "CACHE", tmp_path)
    p = chapter.load("smoke", "n_eval=12 steps=3")
    pipe = models.load_model(p)
    heads = head_ids({l: m.heads for l, m in UNET.layers(pipe.unet).items()})
    rel = Relevance(["color", "shape", "size"], heads, np.random.default_rng(0).random((3, len(heads))).astype(np.float32))
    native = steps.records(pipe, p, "real", heads, 0.5)[0]
    data = steps.records(pipe, dict(p, data_dir=str(export)), "dataset", heads, 0.5)[0]
    assert [(r.image, r.word, r.occurrence, r.kind) for r in native] == [(r.image, r.word, r.occurrence, r.kind) for r in data]
    assert all(np.array_equal(a.gt, b.gt) and np.array_equal(a.maps, b.maps) for a, b in zip(native, data))
    tables = [miou_table(tables.score(r, rel, p), by_kind=False) for r in (native, data)]
    assert tables[0].equals(tables[1]) and tables[0].n_words.iloc[0] > 20


def test_dataset_reader_maps_synonyms_and_reports_unmapped(tmp_path):
    """A hand-made COCO file: plural and synonym words score against their category's masks."""
    import json
    from PIL import Image
    from saam.datasets import read_coco
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    poly = [[0, 0, 10, 0, 10, 10, 0, 10]]
    inst = dict(images=[dict(id=1, file_name="a.jpg", height=20, width=30)],
                categories=[dict(id=1, name="dog"), dict(id=2, name="cat"), dict(id=3, name="tie")],
                annotations=[dict(id=1, image_id=1, category_id=1, segmentation=poly, area=100, bbox=[0, 0, 10, 10], iscrowd=0),
                             dict(id=2, image_id=1, category_id=1, segmentation=[[20, 10, 29, 10, 29, 19, 20, 19]], area=81,
                                  bbox=[20, 10, 9, 9], iscrowd=0)])
    (tmp_path / "instances_x.json").write_text(json.dumps(inst))
    (tmp_path / "captions_x.json").write_text(json.dumps(dict(annotations=[dict(id=1, image_id=1, caption="Two puppies, a cat and a tie")])))
    (tmp_path / "word_categories.yaml").write_text("dog: {concept: Animals, words: [dog, puppies]}\n"
                                                    "cat: {concept: Animals, words: [cat]}\ntie: {concept: null, words: [tie]}\n")
    (item,) = read_coco(tmp_path, size=(40, 60))
    words = {w.word: w for w in item.words}
    assert set(words) == {"puppies", "cat"} and item.unmapped == ["tie"]
    assert words["puppies"].kind == "Animals" and words["puppies"].mask.shape == (40, 60)
    assert words["puppies"].mask[:20, :20].all() and words["puppies"].mask[25:, 45:].any()  # both dogs
    assert words["cat"].mask is None  # no cat in the image: scored apart as missing


@pytest.mark.slow
def test_readme_snippet_runs_as_printed(tiny_sd14):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Using it on your own model\n.*?```python\n(.*?)```", text, re.S).group(1)
    env = dict(os.environ, SAAM_MODEL_PATH=str(tiny_sd14))
    out = subprocess.run([sys.executable, "-c", block + "\nprint(tuple(selective.shape), len(top.heads))"], env=env,
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(16, 16) 30" in out.stdout  # tiny SD v1.4 layout: 16x16 latents; 25 % of the 120 heads outside its 1/8-resolution mid block


@pytest.mark.slow
def test_readme_first_screen_snippet_runs_as_printed(tiny_sd14):
    """The snippet on the README's first screen, with ``pipe`` a tiny SD v1.4-layout folder."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- answer:end -->.*?```python\n(.*?)```", text, re.S).group(1)
    pre = ("import os\nfrom diffusers import StableDiffusionPipeline\n"
           "pipe = StableDiffusionPipeline.from_pretrained(os.environ['SAAM_MODEL_PATH'])\n"
           "pipe.set_progress_bar_config(disable=True)\n")
    env = dict(os.environ, SAAM_MODEL_PATH=str(tiny_sd14), MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, "-c", pre + block + "\nprint(len(top.heads), hm.prompt)"], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "30 a dog on a sofa" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("profile,kind", [("sd14", "sd14-layout"), ("sdxl", "sdxl-layout"), ("sd15", "sd14-layout"),
                                          ("sd21", "sd2"), ("sd3", "sd3"), ("sd35", "sd35"), ("flux", "flux"),
                                          ("pixart", "pixart"), ("flux2", "flux2"), ("flux2-klein", "flux2-klein"),
                                          ("qwenimage", "qwenimage")])
def test_every_chapter_runs_on_a_real_model_profile(profile, kind, export, tmp_path):
    """sd15 and sd21 run the HRV pass (HRV's 340 words, McDonald's included, through CLIP's real
    vocabulary); sd21's tiny pipeline has SD v2.1's flags (v-prediction, upcast_attention); sd3,
    sd35 and flux are MM-DiTs: the joint-attention trace, the concept stream's relevance, flow
    matching, Flux's distilled guidance and its img2img sibling."""
    from saam.testing import save_tiny
    model = save_tiny(kind, tmp_path / "pipe")
    env = {k: v for k, v in os.environ.items() if k not in ("SAAM_FIGURES", "PROFILE")}
    env.update(SAAM_MODEL_PATH=str(model), SAAM_DATA=str(export), SAAM_CACHE=str(tmp_path / "cache"))
    overrides = "steps=2 n_eval=6 n_sinks=2 k_sweep=[0.25,1.0] tau_sweep=[0.4] n_examples=2"
    out = paths.BUILD / profile / paths.overrides_tag(overrides)  # a run with overrides has a folder of its own
    subprocess.run(["rm", "-rf", str(out)], check=True)
    subprocess.run(["make", "all", f"PROFILE={profile}", f"SET={overrides}"], check=True, env=env, cwd=ROOT)
    assert len(list(out.glob("[0-9][0-9]-*.ipynb"))) == len(list((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb")))
    import pandas as pd
    t1 = pd.read_csv(out / "figures" / "tab1-miou.csv")
    from saam.select import METHODS
    dit = profile in ("sd3", "sd35", "flux", "flux2", "flux2-klein", "qwenimage")  # ConceptAttention's output-space maps
    # on MM-DiTs three more methods: ConceptAttention's, and the head-wise one over top-k's and soft's heads
    from saam.selection import ORACLE, ORACLE_OUTPUT  # the cross-fitted bounds (MM-DiTs: in output space too)
    assert set(t1.protocol) == {"dataset (strength 0.5)"} and len(t1) == 6 + 4 * dit and (t1.n_words > 0).all()
    assert all((METHODS[m] in set(t1.method)) == dit for m in ("output", "output_top", "output_soft")) and ORACLE in set(t1.method)
    assert (ORACLE_OUTPUT in set(t1.method)) == dit
    # where grounding lives: each joint block in both spaces (chapter 04), on MM-DiTs only
    assert all((out / "figures" / f"{n}.{s}").exists() == dit for n, s in (("fig4-blocks", "png"), ("tab2-blocks", "csv")))
    assert t1.diff_daam.isna().tolist() == [m == METHODS["daam"] for m in t1.method]  # paired to DAAM
    poly = pd.read_csv(out / "figures" / "tab5-polysemy.csv")  # chapter 05's case study on SD profiles
    assert len(poly) == 2 * 2 and poly.competing_share.between(0, 1).all()
    assert (out / "figures" / "fig5-polysemy.png").exists()
    import nbformat  # no pipeline was handed an argument it has no use for (Qwen-Image warned at every call)
    for nb in sorted(out.glob("[0-9][0-9]-*.ipynb")):
        err = "".join(o.get("text", "") for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "code"
                      for o in c.outputs if o.get("output_type") == "stream" and o.get("name") == "stderr")
        assert "ignored" not in err, f"{nb.name}: {err[-600:]}"


def test_real_profile_without_weights_stops_at_once():
    env = {k: v for k, v in os.environ.items() if k != "SAAM_MODEL_PATH"}
    out = subprocess.run(["make", "all", "PROFILE=sd14"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "needs the weights of CompVis/stable-diffusion-v1-4" in out.stdout + out.stderr


def test_the_full_size_checks_run(tmp_path):
    """scripts/fullsize.py (the full-size numerics and memory checks) on the tiny SD v2.1 pipeline: traced
    equals untraced and the maps equal diffusers' own probabilities in every dtype it runs."""
    import json
    import subprocess
    import sys
    from saam import paths
    out = tmp_path / "fs.json"
    subprocess.run([sys.executable, str(paths.ROOT / "scripts" / "fullsize.py"), "--tiny", "--models", "sd21",
                    "--steps", "1", "--out", str(out)], check=True, capture_output=True, text=True)
    res = json.loads(out.read_text())["models"]["sd21"]
    assert res["float32"]["identical"] and res["bfloat16"]["identical"]
    assert res["float32"]["max_abs_diff"] < 1e-5 and res["float32"]["word_tokens"] == 10
    assert res["float32"]["trace_mb_words_fp16"] * 77 == pytest.approx(res["float32"]["trace_mb_all_tokens_fp32"] * 10 / 2)


@pytest.mark.slow
def test_the_gpu_benchmark_script_runs_on_the_cpu(tmp_path):
    """scripts/gpu_bench.py (make gpu-bench) on a tiny pipeline and the CPU: throughput and a Table 1 run."""
    import json
    out = tmp_path / "gb.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "--tiny", "--device", "cpu", "--models",
                    "sd14", "--table1", "4", "--steps", "1", "--repeats", "1", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    res = json.loads(out.read_text())["models"]["sd14"]
    assert res["images_per_s_plain"] > 0 and res["table1"]["images"] == 4 and res["table1"]["words"] > 0
