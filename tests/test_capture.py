import numpy as np
import pytest
import torch
from conftest import run

from saam.family import UNET
from saam.aggregate import word_map
from saam.capture import CaptureError, MapRecorder, Observer, Tracker, install, trace
from saam.crossattn import CaptureProcessor, probs, project
from saam.words import WordNotFound


def test_probs_match_default_attention_and_sum_to_one(sd1):
    name, attn = next(iter(UNET.layers(sd1.unet).items()))
    hs = torch.randn(2, 64, attn.to_q.in_features)
    ctx = torch.randn(2, 77, attn.to_k.in_features)
    p = probs(attn, *project(attn, hs, ctx))
    assert p.shape == (2, attn.heads, 64, 77)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, attn.heads, 64))
    # probabilities times values, through the output projection, is the module's own output
    v = attn.to_v(ctx).view(2, 77, attn.heads, -1).transpose(1, 2)
    out = (p @ v).transpose(1, 2).reshape(2, 64, -1)
    torch.testing.assert_close(attn.to_out[0](out), attn(hs, ctx), rtol=1e-4, atol=1e-5)


def test_processor_output_is_the_default_output(sd1):
    name, attn = next(iter(UNET.layers(sd1.unet).items()))
    hs, ctx = torch.randn(2, 64, attn.to_q.in_features), torch.randn(2, 77, attn.to_k.in_features)
    expected = attn(hs, ctx)
    rec = MapRecorder(sd1)
    tracker = Tracker(sd1, rec, cfg=False)
    tracker.rows, tracker.n = slice(0, 2), 2
    rec.start(2, (8, 8), None)
    out = CaptureProcessor(attn.processor, name, tracker)(attn, hs, ctx)  # no hooks: projects again
    assert torch.equal(out, expected)
    assert rec._gen["sums"][name].shape == (2, attn.heads, 64, 77)  # [n, heads, pixels, tokens]
    torch.testing.assert_close(rec._gen["sums"][name], probs(attn, *project(attn, hs, ctx)))


def test_attention_mask_branch_drops_masked_tokens(sd1):
    """The additive mask the processor gets (as diffusers builds it from encoder_attention_mask)
    gives masked tokens probability 0, and the rest renormalise: the processor's own output."""
    name, attn = next(iter(UNET.layers(sd1.unet).items()))
    hs, ctx = torch.randn(2, 64, attn.to_q.in_features), torch.randn(2, 77, attn.to_k.in_features)
    keep = torch.zeros(2, 77)
    keep[:, :5] = 1
    bias = ((1 - keep) * -10000.0)[:, None]  # [n, 1, tokens], what UNet2DConditionModel passes
    rec = MapRecorder(sd1)
    tracker = Tracker(sd1, rec, cfg=False)
    tracker.rows, tracker.n = slice(0, 2), 2
    rec.start(2, (8, 8), None)
    out = CaptureProcessor(attn.processor, name, tracker)(attn, hs, ctx, bias)
    p = rec._gen["sums"][name]
    assert p[..., 5:].abs().max() == 0
    torch.testing.assert_close(p.sum(-1), torch.ones(2, attn.heads, 64))
    v = attn.to_v(ctx).view(2, 77, attn.heads, -1).transpose(1, 2)
    torch.testing.assert_close(attn.to_out[0]((p @ v).transpose(1, 2).reshape(2, 64, -1)), out, rtol=1e-4, atol=1e-5)


def test_observer_sees_the_processors_projections(sd1):
    """A custom observer gets each call's own q/k (from the to_q/to_k hooks) for the recorded rows."""
    class Count(Observer):
        def __init__(self):
            self.calls, self.steps, self.starts = 0, [], 0

        def start(self, n, latent, token_ids):
            self.starts += 1
            assert n == 2 and token_ids is not None

        def step(self, index, timestep):
            self.steps.append(index)

        def observe(self, attn, layer, q, k, attention_mask):
            self.calls += 1
            assert q.shape[0] == k.shape[0] == 2 and probs(attn, q, k).shape[:2] == (2, attn.heads)

    obs = Count()
    with install(sd1, obs):
        run(sd1, ["a red cat", "a dog"], guidance_scale=5.0)
    assert obs.starts == 1 and obs.steps == [0, 1] and obs.calls == 2 * len(UNET.layers(sd1.unet))
    assert all(not m.to_q._forward_hooks and not m.to_k._forward_hooks for m in UNET.layers(sd1.unet).values())


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_images_identical_with_and_without_capture(kind):
    from saam.testing import tiny_pipeline
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    plain = run(pipe, "a red cat", guidance_scale=5.0)
    with trace(pipe) as tc:
        traced = run(pipe, "a red cat", guidance_scale=5.0)
    assert np.array_equal(plain, traced)
    assert len(tc) == 1 and tc[0].steps == 2
    assert tc[0].token_positions("cat") == [3]  # CLIP BPE: <start> a red cat


def test_two_prompts_several_images_give_one_result_per_image(sd1):
    with trace(sd1) as tc:
        run(sd1, ["a red cat", "a blue dog on a mat"], num_images_per_prompt=2, guidance_scale=5.0)
        run(sd1, "a green frog", guidance_scale=5.0)
    assert [r.prompt for r in tc] == ["a red cat"] * 2 + ["a blue dog on a mat"] * 2 + ["a green frog"]
    # different images of the same prompt differ (different noise), so maps differ
    l0 = next(iter(tc[0].maps))
    assert not torch.equal(tc[0].maps[l0], tc[1].maps[l0])
    assert word_map(tc[2], "dog").shape == tc[2].latent_size


def test_cfg_on_and_off_record_the_conditional_rows(sd1):
    """Without CFG the whole batch is conditional: nothing may be dropped (DAAM's bug)."""
    with trace(sd1) as on:
        run(sd1, "a red cat", guidance_scale=5.0)
    with trace(sd1) as off:
        run(sd1, "a red cat", guidance_scale=1.0)
    assert len(on) == len(off) == 1
    # same noise, same conditional input at step 1: the first step's conditional maps agree
    with trace(sd1, per_step=True) as a:
        run(sd1, "a red cat", guidance_scale=5.0)
    with trace(sd1, per_step=True) as b:
        run(sd1, "a red cat", guidance_scale=1.0)
    l0 = next(iter(a[0].per_step))
    torch.testing.assert_close(a[0].per_step[l0][0], b[0].per_step[l0][0])
    with trace(sd1, branch="uncond", per_step=True) as u:
        run(sd1, "a red cat", guidance_scale=5.0)
    assert not torch.allclose(u[0].per_step[l0][0], a[0].per_step[l0][0])


def test_per_step_maps_sum_to_the_accumulated_maps(sd1):
    with trace(sd1, per_step=True) as tc:
        run(sd1, "a red cat", steps=3)
    hm = tc[0]
    for l, m in hm.maps.items():
        assert hm.per_step[l].shape[0] == 3
        torch.testing.assert_close(hm.per_step[l].sum(0), m)
    assert len(hm.timesteps) == 3 and hm.timesteps == sorted(hm.timesteps, reverse=True)


def test_non_square_and_sdxl(sdxl):
    img = None
    with trace(sdxl) as tc:
        img = run(sdxl, "a red cat", height=64, width=32, guidance_scale=5.0)
    hm = tc[0]
    assert img.shape[1:3] == (64, 32)
    assert hm.latent_size == (32, 16) and hm.image_size == (64, 32)
    assert any(".transformer_blocks.1." in l for l in hm.maps)  # SDXL's stacked transformer blocks
    for m in hm.maps.values():
        assert m.shape[-2] / m.shape[-1] == 2.0


def test_processors_and_hooks_restored_after_exception(sd1):
    before = {k: type(v) for k, v in sd1.unet.attn_processors.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with trace(sd1):
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in sd1.unet.attn_processors.items()} == before
    assert not sd1.unet._forward_pre_hooks and not sd1.text_encoder._forward_pre_hooks
    assert all(not m.to_q._forward_hooks and not m.to_k._forward_hooks for m in UNET.layers(sd1.unet).values())
    with trace(sd1):  # usable again
        pass


def test_double_install_raises(sd1):
    with trace(sd1):
        with pytest.raises(CaptureError, match="already active"):
            with trace(sd1):
                pass
    assert not any(isinstance(p, CaptureProcessor) for p in sd1.unet.attn_processors.values())


def test_bad_inputs_are_clear_errors(sd1):
    with trace(sd1) as tc:
        run(sd1, "a red cat")
    with pytest.raises(WordNotFound, match=r"'dog' is not a word.*\['a', 'red', 'cat'\]"):
        word_map(tc[0], "dog")
    with pytest.raises(TypeError, match="needs a diffusers pipeline with a UNet or a DiT"):
        with trace(object()):
            pass
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="no cross-attention"):
        with trace(DDPMPipeline(unet=unet, scheduler=DDPMScheduler())):
            pass
    with pytest.raises(ValueError, match="branch"):
        with trace(sd1, branch="both"):
            pass


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_maps_equal_the_probabilities_diffusers_forms(kind):
    """Per-head maps are the probabilities diffusers' own attention code forms for each module
    (SD v2.1's upcast_attention and v-prediction included), conditional rows, summed over steps."""
    from saam.testing import as_probs, diffusers_attention_probs, tiny_pipeline
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    if kind == "sd2":
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        assert all(m.upcast_attention for m in UNET.layers(pipe.unet).values())
    with diffusers_attention_probs(pipe) as ref, trace(pipe) as tc:
        run(pipe, ["a red cat", "a dog"], steps=2, guidance_scale=5.0)
    assert len(tc) == 2 and set(ref) == set(tc[0].maps)
    for layer, r in ref.items():
        for i in range(2):
            torch.testing.assert_close(as_probs(tc[i].maps[layer]), r[2 + i], rtol=1e-5, atol=1e-6)


def test_a_trace_of_some_words_in_half_precision(sd1):
    """words= keeps only those words' tokens, dtype= stores maps in half precision: the word maps are
    the full trace's up to fp16 rounding, memory falls with the tokens kept, the image is unchanged."""
    plain = run(sd1, ["a red cat on a mat", "a dog and a red ball"], guidance_scale=5.0)
    with trace(sd1) as full:
        run(sd1, ["a red cat on a mat", "a dog and a red ball"], guidance_scale=5.0)
    with trace(sd1, words=["red", "cat", "ball"], dtype=torch.float16) as few:
        small = run(sd1, ["a red cat on a mat", "a dog and a red ball"], guidance_scale=5.0)
    assert np.array_equal(plain, small)
    assert few[0].tokens == [2, 3] and few[1].tokens == [5, 6]  # red, cat (prompt 0); red, ball (prompt 1)
    assert next(iter(few[0].maps.values())).dtype == torch.float16
    assert few[0].nbytes * 77 == full[0].nbytes * 2 // 2
    for i, w in [(0, "red"), (0, "cat"), (1, "ball"), (1, "red")]:
        torch.testing.assert_close(word_map(few[i], w), word_map(full[i], w), rtol=2e-3, atol=1e-4)
    with pytest.raises(CaptureError, match="were not kept"):
        word_map(few[1], "dog")
    with pytest.raises(ValueError, match="list of non-empty words"):
        with trace(sd1, words="red"):
            pass


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_the_uncond_branch_is_labelled_with_the_negative_prompt(kind, sd1, sdxl):
    """branch='uncond' records the negative prompt's maps under the negative prompt's words; the
    conditional branch keeps the prompt's. Without a negative prompt the uncond branch is "" (SD) or
    zeros (SDXL: no text, so no words)."""
    pipe = sd1 if kind == "sd1" else sdxl
    with trace(pipe, branch="uncond") as neg:
        run(pipe, "a red cat", guidance_scale=5.0, negative_prompt="a blue dog")
    with trace(pipe) as pos:
        run(pipe, "a red cat", guidance_scale=5.0, negative_prompt="a blue dog")
    assert neg[0].prompt == "a blue dog" and pos[0].prompt == "a red cat"
    assert word_map(neg[0], "dog").shape == word_map(pos[0], "cat").shape
    with pytest.raises(WordNotFound):
        word_map(neg[0], "cat")
    with trace(pipe, branch="uncond") as empty:
        run(pipe, "a red cat", guidance_scale=5.0)
    assert empty[0].prompt in ("", None)
    with pytest.raises((WordNotFound, CaptureError)):
        word_map(empty[0], "cat")
    assert "encode_prompt" not in vars(pipe)  # the wrapper is gone


def test_an_exception_keeps_the_calls_that_finished(sd1):
    """A body that raises after a finished call keeps its maps; a call interrupted mid-denoising is dropped."""
    with pytest.raises(RuntimeError, match="after"):
        with trace(sd1) as tc:
            run(sd1, "a red cat")
            raise RuntimeError("after the call")
    assert len(tc) == 1 and tc[0].steps == 2

    def stop(pipe, i, t, kw):
        if i == 1:
            raise RuntimeError("mid-call")
        return kw
    with pytest.raises(RuntimeError, match="mid-call"):
        with trace(sd1) as tc:
            run(sd1, "a red cat")
            run(sd1, "a dog", steps=3, callback_on_step_end=stop)
    assert len(tc) == 1 and tc[0].prompt == "a red cat"


@pytest.mark.parametrize("kind,shape,head,total", [
    ("sd1", (16, 16), [0.012452, 0.012465, 0.012218, 0.013082, 0.01298, 0.011792], 3.206371),
    ("sd2", (16, 16), [0.011513, 0.012073, 0.012827, 0.014183, 0.014272, 0.014526], 3.423343),
    ("sdxl", (16, 16), [0.01384, 0.013844, 0.013855, 0.013684, 0.013421, 0.013406], 3.49014)])
def test_pinned_word_map_slices(kind, shape, head, total):
    """As diffusers pins a slice of every pipeline's output: the DAAM word map of "cat" on each tiny
    pipeline (seed 0, 2 steps, guidance 5), recorded when this test was written. A change in capture,
    aggregation, head eligibility or seeding that moves these values fails here."""
    from saam.testing import tiny_pipeline
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    with trace(pipe) as tc:
        pipe("a red cat", num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
             output_type="latent")
    m = word_map(tc[0], "cat")
    assert tuple(m.shape) == shape
    np.testing.assert_allclose(m.flatten()[:6].numpy(), head, rtol=1e-3, atol=1e-6)
    assert float(m.sum()) == pytest.approx(total, rel=1e-4)
