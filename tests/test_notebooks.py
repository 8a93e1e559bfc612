"""Every chapter runs with the smoke profile, writes what it declares, shows its figures inline,
never touches the committed figures/; the HTML report built from them loads in a real browser."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saam import artefacts, paths

ROOT = Path(__file__).resolve().parents[1]
SMOKE = paths.BUILD / "smoke"


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def smoke_chapters(tmp_path_factory):
    """Run every chapter as `make all PROFILE=smoke` does (papermill, -p profile smoke), from a cold
    cache, into build/smoke; the committed figures/ must come out unchanged."""
    before = _tree_hash(ROOT / "figures")
    shutil.rmtree(SMOKE, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("SAAM_FIGURES", "PROFILE")}
    env["SAAM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb")):
        subprocess.run([sys.executable, str(ROOT / "scripts/run_notebook.py"), str(nb), str(SMOKE / nb.name),
                        "--profile", "smoke"], check=True, env=env, cwd=ROOT)
    assert _tree_hash(ROOT / "figures") == before, "a smoke run wrote into the committed figures/"
    return env


@pytest.mark.slow
def test_chapters_write_what_they_declare(smoke_chapters):
    import nbformat
    figs = SMOKE / "figures"
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))
    assert notebooks == [c.notebook for c in artefacts.CHAPTERS], "notebooks and artefacts.CHAPTERS disagree"
    for c in artefacts.CHAPTERS:
        for name in c.produces:
            if name in c.real_only or name in c.dit_only:
                continue  # the SD and MM-DiT profiles' chapters are checked in test_real_sd
            for f in artefacts.files(name):
                if f == "fig5-case-studies.png" and not (figs / f).exists():
                    continue  # drawn only when the smoke generations contain a misbound colour word
                assert (figs / f).exists(), f"{c.notebook} did not write {f}"
        nb = nbformat.read(SMOKE / f"{c.notebook}.ipynb", as_version=4)
        outs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
        n_png = sum("image/png" in o.get("data", {}) for o in outs)
        n_figs = sum(1 for n in c.produces if n.startswith("fig") and (figs / f"{n}.png").exists())
        assert n_png >= n_figs, f"{c.notebook}: {n_figs} figures saved but {n_png} shown inline"
        text = "".join(o.get("text", "") for o in outs if o.get("output_type") == "stream")
        for noise in ("Warning", "it/s]", "Loading"):
            assert noise not in text, f"{c.notebook} prints {noise!r} into the chapter"
    res = json.loads((figs / "results.json").read_text())
    assert res["run"] == dict(profile="smoke", overrides="")  # what made these outputs
    t1 = res["table1"]
    assert t1["n_words"] > 0 and 0 <= t1["miou_daam"] <= 1 and 0 <= t1["miou_top"] <= 1
    assert set(res["concentration_top25_hrv34"]) >= {"Color", "Shape", "Size"}
    assert set(res["organisms"]) == {"A", "D"}
    sys.path.insert(0, str(ROOT / "scripts"))
    from run_notebook import timings_report
    from saam.chapter import load
    from saam.models import machine, precision
    head, *rows = timings_report(SMOKE).splitlines()  # every time names the machine and arithmetic it ran on
    assert machine()["cpu"] in head and head.endswith(f", {precision(load('smoke'))}):")
    assert all(any(r.split()[0] == n for r in rows) for n in notebooks)


@pytest.mark.slow
def test_rerun_reproduces_table1(smoke_chapters):
    """Same seed, same profile: a re-run (from the cache) reproduces Table 1 byte for byte."""
    before = (SMOKE / "figures/tab1-miou.csv").read_bytes()
    subprocess.run([sys.executable, str(ROOT / "scripts/run_notebook.py"), str(ROOT / "notebooks/03-miou.ipynb"),
                    str(SMOKE / "again" / "03-miou.ipynb"), "--profile", "smoke"], check=True, env=smoke_chapters, cwd=ROOT)
    assert (SMOKE / "figures/tab1-miou.csv").read_bytes() == before


@pytest.mark.slow
def test_report_loads_in_chromium(smoke_chapters):
    """The report opens from disk in headless Chromium: every page loads, every image has a
    natural width, the console has no errors. Leaves a screenshot of the front page."""
    from conftest import chromium
    subprocess.run([sys.executable, str(ROOT / "scripts/report.py"), "--profile", "smoke"], check=True,
                   env=smoke_chapters, cwd=ROOT)
    report = SMOKE / "report"
    drv = chromium()
    try:
        pages = ["index.html"] + [f"{c.notebook}.html" for c in artefacts.CHAPTERS]
        n_img = 0
        for page in pages:
            drv.get((report / page).as_uri())
            assert drv.execute_script("return document.readyState") == "complete"
            widths = drv.execute_script("return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
            assert all(w > 0 for w in widths), f"{page}: an image did not load ({widths})"
            n_img += len(widths)
            errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, f"{page}: console errors {errors}"
            if page == "03-miou.html":  # code folds behind the toggle
                shown = "return Array.from(document.querySelectorAll('.jp-CodeCell .jp-Cell-inputWrapper'))" \
                        ".filter(e => e.offsetParent !== null).length"
                assert drv.execute_script(shown) == 0
                drv.find_element("id", "code-toggle").click()
                assert drv.execute_script(shown) > 0
            if page == "index.html":
                assert "Table 1" in drv.page_source
                assert drv.find_element("id", "explorer").get_attribute("href").endswith("explorer.html")  # chapter 04's page
                drv.save_screenshot(str(report / "front-page.png"))
        assert n_img >= 10, f"only {n_img} images in the whole report"
    finally:
        drv.quit()


@pytest.mark.slow
def test_tables_identical_when_recomputed_from_scratch(tmp_path):
    """Determinism without the cache: two fresh computations of a small grid agree."""
    code = ("from saam import chapter, models, steps, tables; from saam.evaluate import miou_table; p=chapter.load('smoke', 'n_eval=4 n_relevance_prompts=4 steps=4');"
            "pipe=models.load_model(p); rel=steps.relevance(pipe,p); r=steps.records(pipe,p,'generation',rel.heads)[0];"
            "print(miou_table(tables.score(r,rel,p),by_kind=False).to_csv())")
    outs = []
    for i in range(2):
        env = dict(os.environ, SAAM_CACHE=str(tmp_path / f"c{i}"), SAAM_FIGURES=str(tmp_path / "f"))
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                                   capture_output=True, text=True).stdout)
    assert outs[0] == outs[1] and "DAAM" in outs[0]


def test_pinned_smoke_table1(tmp_path, monkeypatch):
    """As diffusers pins a slice of every pipeline's output: Table 1 of the smoke profile (organism D,
    fp32 so that any CPU gives these numbers up to float noise), recorded when this test was written
    (2026-11-29). A change in generation, capture, relevance, head selection, aggregation or scoring
    that moves a method's mIoU fails here; a deliberate one updates the numbers and says why."""
    from saam import chapter, models, paths, steps, tables
    from saam.evaluate import miou_table
    from saam.select import METHODS
    monkeypatch.setattr(paths, "CACHE", tmp_path)
    p = chapter.load("smoke", "precision=fp32")
    pipe = models.load_model(p)
    rel = steps.relevance(pipe, p)
    recs, _, _ = steps.records(pipe, p, "generation", rel.heads)
    t = miou_table(tables.score(recs, rel, p), by_kind=False, seed=p["seed"]).set_index("method")
    want = {"daam": 0.32397, "top": 0.283075, "bottom": 0.199651, "random": 0.245459, "soft": 0.260886}
    assert len(recs) == 48 and int(t.n_words.iloc[0]) == 47
    for m, v in want.items():
        assert t.loc[METHODS[m], "mIoU"] == pytest.approx(v, abs=2e-3), m


def test_timings_name_the_machine_of_each_chapter(tmp_path):
    """One machine: named once, in the heading; chapters run on different ones: each names its own."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from run_notebook import record, timings_report
    amx = dict(cpu="Intel(R) Xeon(R) Processor", capability="AVX512", bf16=True, cores=2, cuda=None, precision="bf16")
    record(tmp_path / "timings.json", "00-a", 0.0, 10.0, amx)
    record(tmp_path / "timings.json", "01-b", 10.0, 15.0, amx)
    assert timings_report(tmp_path).splitlines()[0].endswith("; 2 cores of an Intel(R) Xeon(R) Processor, torch at AVX512, bf16):")
    record(tmp_path / "timings.json", "01-b", 10.0, 40.0, dict(amx, capability="AVX2", bf16=False, precision="fp32"))
    head, a, b, total, wall = timings_report(tmp_path).splitlines()
    assert "torch at" not in head and a.endswith("torch at AVX512, bf16)") and b.endswith("torch at AVX2, fp32)")
    assert total.split()[-2] == "40.0" and wall.split()[-2] == "40.0"


@pytest.mark.slow
def test_every_chapter_runs_on_the_mmdit_organism(tmp_path):
    """`make all PROFILE=mmdit-smoke`: every chapter on the committed MM-DiT organism at the smoke
    sizes, as `make all PROFILE=mmdit` runs them at the paper's: Table 1 with ConceptAttention, the
    head-wise rows and both oracles; chapter 04's per-block figure; chapter 06 with organism D beside it;
    the training and fidelity curves of chapter 00; every declared artefact, the MM-DiT ones included."""
    import pandas as pd
    from saam.select import METHODS
    from saam.selection import ORACLE, ORACLE_OUTPUT
    out = paths.BUILD / "mmdit-smoke"
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("SAAM_FIGURES", "PROFILE")}
    env["SAAM_CACHE"] = str(tmp_path / "cache")
    subprocess.run(["make", "all", "PROFILE=mmdit-smoke"], check=True, env=env, cwd=ROOT)
    figs = out / "figures"
    for c in artefacts.CHAPTERS:
        for name in c.produces:
            if name in c.real_only or name in ("fig5-case-studies", "tab1-rules"):
                continue  # SD profiles only; drawn only with a misbound word; the rules read HRV's own pass
            for f in artefacts.files(name):
                assert (figs / f).exists(), f"{c.notebook} did not write {f} on the MM-DiT organism"
    t1 = pd.read_csv(figs / "tab1-miou.csv")
    want = {METHODS[m] for m in ("daam", "top", "bottom", "random", "soft", "output", "output_top", "output_soft")}
    assert want | {ORACLE, ORACLE_OUTPUT} <= set(t1.method)
    blk = pd.read_csv(figs / "tab2-blocks.csv")
    assert sorted(blk.block.unique()) == list(range(6)) and blk[blk.concept_block].block.unique().tolist() == [3, 4, 5]
    res = json.loads((figs / "results.json").read_text())
    assert set(res["organisms"]) == {"D", "mmdit"} and res["organisms"]["mmdit"]["n_heads"] == 24
