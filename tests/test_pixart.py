"""A cross-attention DiT, PixArt-Sigma, on a tiny random-weight pipeline built offline (T5 from a
config, its tokenizer trained in code): the trace leaves the image bit for bit as it was (fp32 and
bf16 autocast), its maps are the probabilities diffusers' own attention code forms, words align
with T5's tokens (no start token), guidance is read where the pipeline tells it, HRV's pass runs,
and a slice of a word map is pinned."""
import logging

import numpy as np
import pytest
import torch

from saam.aggregate import word_map
from saam.capture import trace

RUN = dict(num_inference_steps=2, max_sequence_length=32)


@pytest.fixture(scope="module")
def pixart():
    from saam.testing import tiny_dit_pipeline
    logging.getLogger("diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma").setLevel(logging.ERROR)
    p = tiny_dit_pipeline("pixart")
    p.set_progress_bar_config(disable=True)
    return p


def gen(pipe, prompt, seed=0, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **{**RUN, **kw}).images


def test_the_family_is_a_cross_attention_dit(pixart):
    from saam import family
    fam = family.of(pixart)
    assert fam is family.PIXART and not fam.dit and not fam.start_token
    assert sorted(fam.layers(pixart.transformer)) == [f"transformer_blocks.{i}.attn2" for i in range(3)]


@pytest.mark.parametrize("bf16", [False, True])
def test_traced_images_equal_untraced(bf16):
    from saam.models import autocast_bf16
    from saam.testing import tiny_dit_pipeline
    pipe = tiny_dit_pipeline("pixart")
    pipe.set_progress_bar_config(disable=True)
    if bf16:
        autocast_bf16(pipe.transformer)
    plain = gen(pipe, ["a red cat", "a blue dog"])
    with trace(pipe) as tc:
        traced = gen(pipe, ["a red cat", "a blue dog"])
    assert np.array_equal(plain, traced)
    assert [h.prompt for h in tc] == ["a red cat", "a blue dog"] and tc[0].steps == 2


def test_maps_equal_the_probabilities_diffusers_forms(pixart):
    from saam.testing import as_probs, diffusers_attention_probs
    with diffusers_attention_probs(pixart) as ref, trace(pixart) as tc:
        gen(pixart, ["a red cat", "a dog"])
    assert len(tc) == 2 and set(ref) == set(tc[0].maps)
    for layer, r in ref.items():
        for i in range(2):  # [uncond; cond]: the prompts' rows are the second half
            torch.testing.assert_close(as_probs(tc[i].maps[layer]), r[2 + i], rtol=1e-5, atol=1e-6)
    assert tc[0].latent_size == (32, 32) and tc[0].maps[layer].shape[-2:] == (16, 16)  # 2 x 2 patches


def test_words_align_with_t5s_tokens_and_guidance_is_read_from_encode_prompt(pixart):
    with trace(pixart) as on:
        gen(pixart, "a red cat", guidance_scale=4.5)
    with trace(pixart) as off:
        gen(pixart, "a red cat", guidance_scale=1.0)
    tok = pixart.tokenizer
    ids = tok("a red cat").input_ids
    for tc in (on, off):
        hm = tc[0]
        pos = hm.token_positions("cat")
        assert tok.decode([ids[p] for p in pos]).strip() == "cat"
        assert hm.token_positions("a")[0] == 0  # no start token: the first word's tokens come first
        assert word_map(hm, "cat").shape == (32, 32)
    assert not torch.equal(next(iter(on[0].maps.values())), next(iter(off[0].maps.values())))


def test_hrv_pass_runs_without_a_start_token(pixart):
    from saam.relevance import load_concepts, relevance_pass
    rel = relevance_pass(pixart, load_concepts("hrv"), ["a red cat", "a dog"], steps=2, batch_size=2, progress=False)
    assert rel.matrix.shape == (34, 12) and rel.params["start_token"] is False
    assert int(rel.prompt_votes.sum()) == 2 * 2 * 12  # every head votes once per image and step
    sums = rel.matrix.sum(1)  # a concept's row sums to the head count, or is 0 where no head voted for it
    assert np.all(np.isclose(sums, 12, rtol=1e-5) | (sums == 0)) and np.isclose(sums, 12).sum() > 20


def test_pinned_word_map_slice(pixart):
    """The DAAM map of "cat" (seed 0, 2 steps, guidance 4.5), recorded when this test was written."""
    with trace(pixart) as tc:
        pixart("a red cat", generator=torch.Generator().manual_seed(0), output_type="latent", **RUN)
    m = word_map(tc[0], "cat")
    np.testing.assert_allclose(m.flatten()[:6].numpy(), PINNED[0], rtol=1e-3, atol=1e-6)
    assert float(m.sum()) == pytest.approx(PINNED[1], rel=1e-4)


PINNED = ([0.122145, 0.122552, 0.123213, 0.123924, 0.124282, 0.124552], 127.130463)


def test_hrv_pass_under_bf16_autocast_runs():
    """The concept words go through the caption projection in its weights' dtype (bf16 once
    ``models.autocast_bf16`` stored them so)."""
    from saam.models import autocast_bf16
    from saam.relevance import load_concepts, relevance_pass
    from saam.testing import tiny_dit_pipeline
    pipe = tiny_dit_pipeline("pixart")
    pipe.set_progress_bar_config(disable=True)
    autocast_bf16(pipe.transformer)
    rel = relevance_pass(pipe, load_concepts("hrv"), ["a red cat"], steps=2, batch_size=1, progress=False)
    assert int(rel.prompt_votes.sum()) == 2 * 12
