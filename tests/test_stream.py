"""Head relevance on MM-DiTs: the concept stream (saam.stream) on tiny SD3, SD3.5, FLUX.1, FLUX.2 [klein] and
Qwen-Image pipelines."""
import random

import numpy as np
import pytest
import torch

from saam.family import of_model
from saam import family

from saam.relevance import relevance_pass
from saam.stream import StreamVoter, blocks, concept_stream, encode_stream_words
from saam.testing import tiny_dit_pipeline

PROMPT = "a red circle next to a blue square"
RUN = dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="latent")


def msl(pipe) -> int:
    """The text length these tests run at: FLUX.2 [dev]'s system prompt takes 30 tokens of it."""
    return 64 if hasattr(pipe, "system_message") else 32
CONCEPTS = {"color": ["red", "blue", "green"], "shape": ["circle", "square"]}


@pytest.fixture(scope="module", params=["sd3", "sd35", "flux", "flux2", "flux2-klein", "qwenimage"])
def dit(request):
    pipe = tiny_dit_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def run(pipe, prompt=PROMPT, seed=0):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), max_sequence_length=msl(pipe), **RUN).images


def test_the_concept_stream_leaves_the_generation_unchanged(dit):
    """Bit for bit: the side calls read the image states and their image output is dropped. Every
    head votes once per step for one concept."""
    kind, pipe = dit
    plain = run(pipe)
    voter = StreamVoter(None, of_model(pipe.transformer).layers(pipe.transformer))
    with concept_stream(pipe, voter):
        voter.prepare(pipe, CONCEPTS, [random.Random(0)], max_sequence_length=msl(pipe))
        streamed = run(pipe)
    assert torch.equal(plain, streamed)
    assert torch.equal(plain, run(pipe))  # hooks and processors removed
    votes = voter.take()["votes"]  # [images, steps, heads, concepts]
    assert votes.shape == (1, 2, len(voter.heads), 2) and (votes.sum(-1) == 1).all()


def test_the_stream_is_the_text_stream_when_it_carries_the_prompt(dit):
    """Seeded with the prompt's own entering states, the concept stream's side calls reproduce the
    generation's text stream at every block (the model's own block code; Flux's rotary positions
    for the stream's tokens; SD3's last block ends the stream)."""
    kind, pipe = dit
    fam = family.of(pipe)
    emb = pipe.encode_prompt(prompt=PROMPT, device="cpu", num_images_per_prompt=1, max_sequence_length=msl(pipe),
                             **fam.encode_words_kwargs())[0]
    own = fam.embed_context(pipe.transformer, emb)[0].detach()
    real, bl = {}, blocks(pipe.transformer)
    row = 0 if fam.true_cfg else 1  # SD3 runs [negative; prompt] under guidance; the others one call per branch
    calls = []  # the transformer's calls: FLUX.2 [klein] runs its negative prompt as a second one per step
    second = kind == "flux2-klein"  # ([dev] is guidance-distilled: one call per step)

    def keep(name):
        def hook(module, args, kwargs, out):
            if getattr(voter, "side", None) or len(calls) % 2 == 0 and second:
                return  # a side call, or klein's negative-prompt call
            text = out[row, :len(own)] if torch.is_tensor(out) else (None if out[0] is None else out[0][row])
            if text is not None:
                real[name] = text.detach().clone()
        return hook
    handles = [pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))]
    voter = StreamVoter([[own]], of_model(pipe.transformer).layers(pipe.transformer), keep_states=True)
    handles += [m.register_forward_hook(keep(n), with_kwargs=True) for n, m in bl.items()]
    try:
        with concept_stream(pipe, voter):
            voter.prepare(pipe, {"prompt": [PROMPT]}, [random.Random(0)])
            run(pipe)
    finally:
        for h in handles:
            h.remove()
    assert set(voter.states[0]) == set(real) and len(real) >= len(bl) - 1
    for name in real:
        torch.testing.assert_close(voter.states[0][name], real[name], atol=1e-5, rtol=1e-4)


def test_stream_relevance_on_a_dit(dit):
    """relevance_pass on an MM-DiT: a Relevance over every joint head; votes per image do not depend
    on the batch size; the direct variant (concepts enter every block afresh) votes as the stream
    does at the first block, where both carry the encoder's states."""
    kind, pipe = dit
    prompts = ["a green square", "a red circle"]
    kw = dict(steps=2, guidance=5.0, seed=0, height=32, width=32, max_sequence_length=msl(pipe), progress=False)
    rel = relevance_pass(pipe, CONCEPTS, prompts, batch_size=2, **kw)
    one = relevance_pass(pipe, CONCEPTS, prompts, batch_size=1, **kw)
    direct = relevance_pass(pipe, CONCEPTS, prompts, batch_size=2, variant="direct", **kw)
    n = sum(m.heads for m in of_model(pipe.transformer).layers(pipe.transformer).values())
    assert len(rel.heads) == n and rel.matrix.shape == (2, n)
    assert (rel.prompt_votes.sum(-1) == 2).all()  # each head: one vote per step per prompt
    assert np.array_equal(rel.prompt_votes, one.prompt_votes)
    first = [i for i, h in enumerate(rel.heads) if h.layer == rel.heads[0].layer]
    assert np.array_equal(rel.prompt_votes[:, first], direct.prompt_votes[:, first])
    words = encode_stream_words(pipe, ["red", "circle"], max_sequence_length=msl(pipe))
    assert all(w.shape[-1] == pipe.transformer.inner_dim for w in words)
    with pytest.raises(ValueError, match="variant must be one of"):
        relevance_pass(pipe, CONCEPTS, prompts, batch_size=2, variant="sideways", **kw)


def test_a_concept_stream_longer_than_the_prompt_on_qwen_image():
    """Qwen-Image gives text tokens positions of their own after the image's: a concept stream with more
    tokens than the prompt has gets its table from the denoiser's own rotary embedding, whose first rows
    are the prompt's (a stream of the prompt's length is placed exactly where the prompt is)."""
    pipe = tiny_dit_pipeline("qwenimage")
    fam = family.of(pipe)
    shapes = [[(1, 4, 4)]]
    img, txt = pipe.transformer.pos_embed(shapes, max_txt_seq_len=5, device="cpu")
    img2, txt2 = fam.side_rotary((img, txt), 5, 12, pipe.transformer, dict(img_shapes=shapes))
    assert torch.equal(img2, img) and txt2.shape[0] == 12 and torch.equal(txt2[:5], txt)
    assert torch.equal(fam.side_rotary((img, txt), 5, 3)[1], txt[:3])
    words = ["red", "blue", "green", "yellow", "purple", "orange", "circle", "square", "triangle", "star", "large", "small"]
    many = {f"c{i}": [w] for i, w in enumerate(words)}
    n = sum(len(w) for ws in encode_stream_words(pipe, words) for w in [ws])
    assert n > len(pipe.tokenizer("a red circle").input_ids) + 5  # longer than the prompt's text (its template's tail included)
    rel = relevance_pass(pipe, many, ["a red circle"], batch_size=1, steps=2, guidance=1.0, seed=0, height=32,
                         width=32, max_sequence_length=32, progress=False)
    assert (rel.prompt_votes.sum(-1) == 2).all()
