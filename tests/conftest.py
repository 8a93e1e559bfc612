import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def sd1():
    from saam.testing import tiny_pipeline
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="session")
def sdxl():
    from saam.testing import tiny_pipeline
    p = tiny_pipeline("sdxl")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="session")
def shapes_pipe():
    from saam.shapes.model import load_pipeline
    return load_pipeline()


def run(pipe, prompt, steps=2, seed=0, **kw):
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np", **kw).images


def chromium():
    """Headless Debian Chromium through selenium, its console log kept (the report and explorer tests)."""
    import shutil
    webdriver = pytest.importorskip("selenium.webdriver")
    chrome, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chrome and driver_bin):
        pytest.fail("Debian's chromium and chromium-driver are needed (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_bin), options=opts)


@pytest.fixture(scope="module")
def smoke_run():
    """The smoke profile's organism run (cached): (params, relevance, generation records, images)."""
    from saam import steps
    from saam.chapter import load
    from saam.models import load_model
    p = load("smoke")
    pipe = load_model(p)
    rel = steps.relevance(pipe, p)
    recs, images, _ = steps.records(pipe, p, "generation", rel.heads)
    return p, rel, recs, images
