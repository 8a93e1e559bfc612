"""One adapter per family (``saam.family``) and one observer contract: a custom observer that
overrides only ``add`` sees every traced layer's per-head probabilities on every family."""
import pytest
import torch

from saam import family


class Counting:
    """A user's observer: counts each layer's calls and keeps the probabilities' shapes and row sums."""

    def __init__(self):
        from saam.capture import Observer

        class Obs(Observer):
            def __init__(s):
                s.calls, s.shapes, s.sums, s.starts = {}, set(), [], 0

            def start(s, n, latent, token_ids):
                s.starts += 1

            def add(s, layer, p):
                s.calls[layer] = s.calls.get(layer, 0) + 1
                s.shapes.add(tuple(p.shape[:2]))
                s.sums.append(float(p.sum(-1).max()))
        self.obs = Obs()


def _pipe(kind):
    from saam.testing import DIT_KINDS, tiny_dit_pipeline, tiny_pipeline
    p = tiny_dit_pipeline(kind) if kind in DIT_KINDS else tiny_pipeline(kind)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("kind,name", [("sd1", "unet"), ("sd2", "unet"), ("sdxl", "unet"), ("sd3", "sd3"),
                                       ("sd35", "sd3"), ("flux", "flux"), ("flux2", "flux2"), ("flux2-klein", "flux2"), ("qwenimage", "qwenimage"),
                                       ("pixart", "pixart"), ("organism", "unet")])
def test_a_custom_observer_sees_every_layer_on_every_family(kind, name):
    from saam.capture import install
    if kind == "organism":
        from saam.shapes.model import load_pipeline
        from saam import paths
        pipe = load_pipeline(paths.DATA / "variants" / "D")
        pipe.set_progress_bar_config(disable=True)
        kw = {}
    else:
        pipe = _pipe(kind)
        kw = (dict(height=32, width=32, max_sequence_length=32) if kind in ("sd3", "sd35", "flux", "flux2-klein", "qwenimage") else dict(height=32, width=32, max_sequence_length=64) if kind == "flux2" else
              dict(max_sequence_length=32) if kind == "pixart" else dict(height=64, width=64))
    fam = family.of(pipe)
    assert fam.name == name
    c = Counting()
    with install(pipe, c.obs) as layers:
        pipe(prompt=["a red cat", "a blue dog"], num_inference_steps=2, guidance_scale=3.5,
             generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    assert c.obs.starts == 1 and set(c.obs.calls) == set(layers) == set(fam.layers(fam.denoiser(pipe)))
    assert set(c.obs.calls.values()) == {2}  # every traced layer, once per step
    assert {s[0] for s in c.obs.shapes} == {2}  # the prompts' rows only (not the negative half)
    if fam.dit:
        assert max(c.obs.sums) < 1.0  # the joint softmax gives the image's own tokens the rest
    else:
        assert max(c.obs.sums) == pytest.approx(1.0, abs=1e-4)


def test_families_are_told_apart_by_structure_and_refuse_what_they_do_not_know():
    assert family.of(_pipe("flux")).text_first and not family.of(_pipe("sd3")).text_first
    assert family.SD3.text_slice(10, 4) == slice(6, 10) and family.FLUX.text_slice(10, 4) == slice(0, 4)
    assert family.of(_pipe("flux2-klein")) is family.FLUX2 and family.of(_pipe("qwenimage")) is family.QWEN
    with pytest.raises(TypeError, match="neither a UNet nor a DiT"):
        family.of_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="neither a UNet nor a transformer"):
        family.of(object())


def test_no_module_outside_the_adapters_names_a_model_class():
    import re
    from saam import paths
    allowed = {"family.py", "testing.py"}  # the adapters; the tiny pipelines' builders
    pattern = re.compile(r"__name__\s*==|__name__\.startswith|\"(Flux|SD3|StableDiffusion\w*)(Attention|Pipeline|Transformer\w*)\"")
    bad = [f"{f.name}:{i}" for f in (paths.ROOT / "src" / "saam").rglob("*.py") if f.name not in allowed
           for i, line in enumerate(f.read_text().splitlines(), 1)
           if pattern.search(line) and "__main__" not in line and "shapes/dit.py" not in str(f)]
    assert not bad, bad
