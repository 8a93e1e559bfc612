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
