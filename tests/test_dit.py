"""MM-DiTs (SD3, SD3.5, FLUX.1, FLUX.2 [klein], Qwen-Image): the trace of joint attention on tiny random-weight pipelines."""
import pytest
import torch
import torch.nn.functional as F

from saam.family import is_joint, of_model
from saam import family
from saam.aggregate import word_map
from saam.capture import trace
from saam.testing import tiny_dit_pipeline

PROMPT = "a red circle next to a blue Square"
RUN = dict(num_inference_steps=2, guidance_scale=5.0, height=32, width=32, max_sequence_length=32, output_type="latent")


KINDS = ["sd3", "sd35", "flux", "flux2", "flux2-klein", "qwenimage"]


def extra(pipe) -> dict:
    """FLUX.2 [klein] (undistilled) runs guidance as a second call of its own: these tests read one call per
    step; FLUX.2 [dev]'s system prompt takes 30 of the text tokens."""
    if family.of(pipe).name != "flux2":
        return {}
    return dict(guidance_scale=1.0, **({"max_sequence_length": 64} if hasattr(pipe, "system_message") else {}))


@pytest.fixture(scope="module", params=KINDS)
def dit(request):
    pipe = tiny_dit_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def run(pipe, prompt=PROMPT, seed=0, **kw):
    return pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **{**RUN, **extra(pipe), **kw}).images


@pytest.fixture(scope="module")
def reference(dit):
    """The joint softmax as the processors themselves form it: every attention call of an untraced
    generation, its probabilities recomputed in float64 from the very queries and keys the
    processor hands to scaled_dot_product_attention (rotary embedding and QK-norm applied)."""
    kind, pipe = dit
    calls, outs, sdpa = [], [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):  # diffusers calls it positionally (SD3) or by keyword (Flux's dispatcher)
        q = args[0] if args else kwargs["query"]
        k = args[1] if len(args) > 1 else kwargs["key"]
        v = args[2] if len(args) > 2 else kwargs["value"]
        scale = kwargs.get("scale") or q.shape[-1] ** -0.5
        calls.append(torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, -1))
        outs.append(calls[-1] @ v.double())  # the attention output of every token, per head
        return sdpa(*args, **kwargs)
    F.scaled_dot_product_attention = spy
    try:
        latents = run(pipe)
    finally:
        F.scaled_dot_product_attention = sdpa
    return latents, calls, outs


def traced_joint_calls(pipe, reference):
    """A traced run of ``run(pipe)`` and the reference's joint-attention calls in forward order:
    (HeadMaps, layers, text tokens, image tokens, their probabilities, their outputs); the text
    encoders' and SD3.5's image-only attn2 calls are left out."""
    from saam.heads import forward_order
    _, calls, outs = reference
    with trace(pipe) as tc:
        run(pipe)
    hm = tc[0]
    layers = forward_order(of_model(pipe.transformer).layers(pipe.transformer))
    text = hm.maps[layers[0]].shape[1]
    n_img = hm.maps[layers[0]].shape[-1] * hm.maps[layers[0]].shape[-2]
    joint = [(c, o) for c, o in zip(calls, outs) if c.shape[-1] == n_img + text]
    return hm, layers, text, n_img, [c for c, _ in joint], [o for _, o in joint]


def test_traced_images_equal_untraced_and_layers_are_the_joint_ones(dit):
    kind, pipe = dit
    assert is_joint(pipe)
    plain = run(pipe)
    with trace(pipe) as tc:
        traced = run(pipe)
    assert torch.equal(plain, traced)
    layers = of_model(pipe.transformer).layers(pipe.transformer)
    want = {"sd3": 3, "sd35": 3, "flux": 4, "flux2": 4, "flux2-klein": 4, "qwenimage": 3}[kind]
    assert len(layers) == want and set(tc[0].maps) == set(layers)
    if kind in ("flux", "flux2", "flux2-klein"):
        assert sum(l.startswith("single_transformer_blocks.") for l in layers) == 2
    # processors restored: a second untraced run is still identical
    assert torch.equal(plain, run(pipe))


def test_maps_are_the_processors_own_joint_softmax(dit, reference):
    """Per-head maps = each image query's probability on each text token, the softmax over image
    and text keys together, summed over steps (conditional rows only under guidance)."""
    kind, pipe = dit
    hm, layers, text, n_img, joint, _ = traced_joint_calls(pipe, reference)
    assert len(joint) == len(layers) * hm.steps
    for i, layer in enumerate(layers):
        ref = 0
        for s in range(hm.steps):
            p = joint[s * len(layers) + i][-1]  # the prompt's row (SD3: [uncond; cond]; the others: one row)
            text_first = family.of(pipe).text_first  # [text; image] (FLUX, Qwen-Image) or [image; text] (SD3)
            ref = ref + (p[:, text:, :text] if text_first else p[:, :n_img, n_img:])  # [heads, image, text]
        got = hm.maps[layer].flatten(2).transpose(1, 2)  # [heads, pixels, text]
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6)


def test_word_maps_on_a_dit(dit):
    """A word's positions are its tokens in every encoder the sequence holds (SD3: CLIP's and T5's;
    Flux: T5's), and its DAAM-style map is the mean over heads, layers and steps as on a UNet."""
    kind, pipe = dit
    with trace(pipe) as tc:
        run(pipe)
    hm = tc[0]
    pos = hm.token_positions("Square")
    if kind != "sd3" and kind != "sd35":  # one encoder's tokens
        assert all(p < next(iter(hm.maps.values())).shape[1] for p in pos)
        if kind != "flux":  # the prompt sits inside a chat template: its tokens, not the template's
            ids = pipe.tokenizer(PROMPT).input_ids
            assert pipe.tokenizer.decode(ids[-1:]).strip().lower() == "square"
            seq = hm.segments[0][1](PROMPT).input_ids
            assert [seq[p] for p in pos] == ids[-1:]
    else:
        assert any(p < 77 for p in pos) and any(p >= 77 for p in pos)  # CLIP's and T5's tokens
    m = word_map(hm, "red")
    assert m.shape == hm.latent_size and torch.isfinite(m).all() and m.sum() > 0
    assert not torch.allclose(word_map(hm, "red"), word_map(hm, "blue"))
    # the probabilities of one image query over all text tokens sum to less than one: image keys take the rest
    total = sum(v.sum(1).mean(0) for v in hm.maps.values()) / (len(hm.maps) * hm.steps)  # [h, w]: mean over heads
    assert (total < 1).all() and (total > 0).all()


def test_dit_trace_refuses_what_it_cannot_do(dit):
    kind, pipe = dit
    with pytest.raises(ValueError, match="UNet pipelines"):
        with trace(pipe, words=["red"]):
            pass
    with pytest.raises(ValueError, match="branch='cond'"):
        with trace(pipe, branch="uncond"):
            pass
    import inspect
    if "prompt_2" in inspect.signature(pipe.__call__).parameters:
        with pytest.raises(Exception, match="same prompt"):
            with trace(pipe):
                run(pipe, prompt_2="something else")
    plain = run(pipe)
    with trace(pipe):  # everything was restored after the errors
        pass
    assert torch.equal(plain, run(pipe))


def test_attention_budget_on_a_dit(dit):
    """Token classes per text encoder's segment (SD3: CLIP's start token, words, end, padding, then
    T5's, which has no start token; Flux: T5's alone), and the joint softmax's remainder on the
    image's own tokens: every head's shares sum to 1."""
    import numpy as np
    from saam.sinks import attention_budget, classes, token_classes
    kind, pipe = dit
    with trace(pipe) as tc:
        run(pipe)
    hm = tc[0]
    cls = token_classes(hm)
    if kind in ("flux2", "flux2-klein", "qwenimage"):  # the chat template around the prompt: "start" before, "end" after
        ids = hm.segments[0][1](PROMPT).input_ids
        tok = pipe.tokenizer
        assert tok.decode([ids[p] for p in cls["words"]]).strip() == PROMPT
        suffix = hm.segments[0][1].suffix
        assert tok.decode([ids[p] for p in cls["end"]]) == suffix
        seg = hm.segments[0][1]
        assert tok.decode([ids[p] for p in cls["start"]]) == ("" if seg.drop else seg.prefix)  # Qwen-Image drops it
        assert seg.prefix.startswith({"flux2": "<s>[SYSTEM_PROMPT]", "flux2-klein": "<|im_start|>user\n",
                                      "qwenimage": "<|im_start|>system\n"}[kind])
    else:
        assert len(cls["start"]) == (0 if kind == "flux" else 1)
        assert len(cls["end"]) == (1 if kind == "flux" else 2)  # one end token per encoder segment
    n = next(iter(hm.maps.values())).shape[1]
    assert sorted(p for ps in cls.values() for p in ps) == list(range(n))  # every text token has one class
    b = attention_budget(hm)
    assert classes(b)[-1] == "image"
    np.testing.assert_allclose(b[classes(b)].sum(axis=1), 1.0, atol=1e-4)
    assert (b.image > 0).all() and (b.words > 0).all()


@pytest.mark.parametrize("kind", ["sd3", "flux", "flux2", "flux2-klein", "qwenimage"])
def test_the_trace_reads_the_kernels_own_queries_keys_and_normaliser(kind, monkeypatch):
    """On the CPU the trace takes the queries, keys and log-sum-exp of the attention kernel the
    processor runs (never projecting again), in float32 and under bf16 autocast alike, and the
    traced images stay identical to untraced ones."""
    import saam.joint as C
    from saam.models import autocast_bf16
    monkeypatch.setattr(C, "joint_queries_keys", lambda *a, **k: (_ for _ in ()).throw(AssertionError("projected again")))
    monkeypatch.setattr(C, "text_probs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no log-sum-exp")))
    for bf16 in (False, True):
        pipe = tiny_dit_pipeline(kind)
        pipe.set_progress_bar_config(disable=True)
        if bf16:
            autocast_bf16(pipe.transformer)
        plain = run(pipe)
        with trace(pipe) as tc:
            traced = run(pipe)
        assert torch.equal(plain, traced) and plain.dtype == torch.float32
        assert all(torch.isfinite(m).all() and m.sum() > 0 for m in tc[0].maps.values())


def test_output_space_maps_are_conceptattentions(dit, reference):
    """ConceptAttention's output space, with the prompt's words as its concepts: at each joint layer
    and step, each image token's softmax over the prompt's word tokens of the products of its
    attention output (every head's, before the output projection) with theirs, summed over steps and
    0 at other positions; checked against outputs recomputed in float64 from the kernel's own
    queries, keys and values. ``output_map`` averages a word's tokens, the layers and the steps, and
    Table 1 scores it as one more method (``evaluate.score_records``)."""
    import numpy as np
    from saam.aggregate import output_map
    from saam.evaluate import WordRecord, score_records
    from saam.select import METHODS
    from saam.words import segment_classes
    kind, pipe = dit
    hm, layers, text, n_img, _, joint = traced_joint_calls(pipe, reference)
    words = torch.zeros(text, dtype=torch.bool)
    words[segment_classes(hm.prompt, hm.segments)["words"]] = True
    for i, layer in enumerate(layers):
        ref = 0
        for s in range(hm.steps):
            o = joint[s * len(layers) + i][-1]  # the prompt's row: [heads, sequence, d]
            img, txt = (o[:, text:], o[:, :text]) if family.of(pipe).text_first else (o[:, :n_img], o[:, n_img:])
            ref = ref + torch.softmax(torch.einsum("hid,htd->it", img, txt).masked_fill(~words, float("-inf")), -1)
        got = hm.outputs[layer].flatten(1).T  # [pixels, text]
        torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-5)
        assert (got[:, ~words] == 0).all()
        ref_h = 0  # head-wise: each head's own softmax over the words of its own products
        for s in range(hm.steps):
            o = joint[s * len(layers) + i][-1]
            img, txt = (o[:, text:], o[:, :text]) if family.of(pipe).text_first else (o[:, :n_img], o[:, n_img:])
            ref_h = ref_h + torch.softmax(torch.einsum("hid,htd->hit", img, txt).masked_fill(~words, float("-inf")), -1)
        got_h = hm.head_outputs[layer].flatten(2).transpose(1, 2)  # [heads, pixels, text]
        torch.testing.assert_close(got_h.double(), ref_h, rtol=1e-3, atol=1e-5)
    red = output_map(hm, "red")
    assert red.shape == hm.latent_size and not torch.allclose(red, output_map(hm, "blue"))
    # ConceptAttention's blocks: the later half of the joint (double-stream) blocks, never a single-stream one
    from saam.aggregate import concept_layers, output_block_maps, upsample
    blocks, ca = output_block_maps(hm, "red"), concept_layers(layers)
    joint_layers = [l for l in layers if l.startswith("transformer_blocks.")]
    assert ca == joint_layers[len(joint_layers) - max(1, len(joint_layers) // 2):] and list(blocks) == list(hm.outputs)
    cols = hm.columns(hm.token_positions("red"))
    for layer in layers:  # each block's own map: its share of the softmax, the word's tokens and the steps averaged
        want = upsample((hm.outputs[layer][cols].mean(0) / hm.steps)[None], tuple(hm.latent_size))[0]
        torch.testing.assert_close(blocks[layer], want)
    torch.testing.assert_close(red, torch.stack([blocks[l] for l in ca]).mean(0))
    from saam.aggregate import per_head_maps
    hw = per_head_maps(hm, hm.token_positions("red"), hm.heads(), space="output")
    assert hw.shape == (len(hm.heads()), *hm.latent_size) and (hw >= 0).all() and (hw <= 1).all()
    gt = np.zeros(hm.image_size, bool)
    gt[: hm.image_size[0] // 2] = True
    heads = hm.heads()
    rec = WordRecord(0, PROMPT, "red", 0, "color", 0, gt, np.stack([word_map(hm, "red", heads=[h]).numpy() for h in heads]),
                     output=red.numpy(), output_heads=hw.numpy())
    rel = type("R", (), dict(heads=heads, row=lambda self, kind: np.arange(len(heads), dtype=float)))()
    df = score_records([rec], rel, np.ones(len(heads), bool), [0.25], [0.4])
    assert {METHODS[m] for m in ("output", "output_top", "output_soft")} <= set(df.method)
    got = df[df.method == METHODS["output"]].iou.iloc[0]
    from saam.aggregate import mean_map, to_mask
    from saam.select import head_set
    def iou_of(mp):
        m = to_mask(mp, hm.image_size, 0.4).numpy()
        return (m & gt).sum() / (m | gt).sum()
    assert got == iou_of(red)
    # head-wise ConceptAttention: the top-k (soft) heads' own output-space maps, over top-k's (soft's) heads
    for method, base in (("output_top", "top"), ("output_soft", "soft")):
        s = head_set(base, heads, rel.row("color"), 0.25)
        want = iou_of(mean_map(hw[s.index], s.weights))
        assert df[df.method == METHODS[method]].iou.iloc[0] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("kind", ["flux", "flux2", "flux2-klein", "qwenimage"])
def test_capture_goes_through_the_dispatcher_with_any_cpu_backend(kind):
    """FLUX and Qwen-Image processors call diffusers' attention dispatcher: the trace catches the call
    there, for that call only (torch's and diffusers' functions are the originals while a traced
    processor runs), and the backend a user selects still runs: with "_native_math" the traced
    images equal the untraced ones under that backend and the maps equal the native backend's."""
    import diffusers.models.attention_dispatch as ad
    pipe = tiny_dit_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    originals = (F.scaled_dot_product_attention, ad.dispatch_attention_fn)
    seen = []

    def inside(module, args, out):  # runs inside the processor's call
        seen.append((F.scaled_dot_product_attention, ad.dispatch_attention_fn) == originals)
    attn = next(iter(of_model(pipe.transformer).layers(pipe.transformer).values()))
    handle = attn.norm_q.register_forward_hook(inside)
    maps = {}
    try:
        for backend in ("native", "_native_math"):
            pipe.transformer.set_attention_backend(backend)
            plain = run(pipe)
            with trace(pipe) as tc:
                traced = run(pipe)
            assert torch.equal(plain, traced), backend
            maps[backend] = tc[0].maps
    finally:
        handle.remove()
        pipe.transformer.set_attention_backend("native")
    assert seen and all(seen)
    for layer, m in maps["native"].items():
        torch.testing.assert_close(maps["_native_math"][layer], m, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,shape,head,total", [
    ("sd3", (16, 16), [0.004527, 0.004578, 0.004661, 0.004749, 0.004801, 0.004691], 1.207471),
    ("flux", (16, 16), [0.005215, 0.006276, 0.00805, 0.008258, 0.00676, 0.006405], 1.935397),
    ("flux2", (16, 16), [0.008939, 0.0093, 0.009971, 0.009034, 0.007025, 0.005678], 2.024553),
    ("flux2-klein", (16, 16), [0.008161, 0.007862, 0.007414, 0.007248, 0.007589, 0.007258], 1.971286),
    ("qwenimage", (8, 8), [0.060021, 0.051658, 0.038154, 0.042437, 0.062888, 0.066369], 2.850035)])
def test_pinned_word_map_slices_on_dits(kind, shape, head, total):
    """As diffusers pins a slice of every pipeline's output: the DAAM word map of "cat" on each tiny MM-DiT
    (seed 0, 2 steps, guidance 5: FLUX.2 [klein]'s negative prompt runs as a call of its own, FLUX.2
    [dev]'s and FLUX.1's guidance is distilled, Qwen-Image ignores it), recorded when this test was written."""
    import numpy as np
    pipe = tiny_dit_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    with trace(pipe) as tc:
        pipe(prompt="a red cat", num_inference_steps=2, guidance_scale=5.0, height=32, width=32, max_sequence_length=64,
             generator=torch.Generator().manual_seed(0), output_type="latent")
    m = word_map(tc[0], "cat")
    assert tuple(m.shape) == shape
    np.testing.assert_allclose(m.flatten()[:6].numpy(), head, rtol=1e-3, atol=1e-6)
    assert float(m.sum()) == pytest.approx(total, rel=1e-4)


def test_flux2_img2img_denoises_the_last_steps_of_the_pipelines_own_schedule():
    """FLUX.2 has no img2img pipeline (evaluate.FlowImg2Img): at strength s of n steps it runs the last
    int(n * s) timesteps of the schedule the pipeline itself picks at this size, and its first denoiser
    input is flow matching's interpolation (1 - sigma) z + sigma noise of the image's packed latents."""
    import numpy as np
    from PIL import Image
    from saam.evaluate import FlowImg2Img, img2img
    pipe = tiny_dit_pipeline("flux2-klein")
    pipe.set_progress_bar_config(disable=True)
    i2i = img2img(pipe)
    assert isinstance(i2i, FlowImg2Img)
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    with trace(pipe) as full:
        run(pipe, prompt="a red cat", num_inference_steps=4)
    first = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, k: first.append(k["hidden_states"].clone()),
                                                      with_kwargs=True)
    try:
        with trace(pipe) as tc:
            i2i(prompt="a red cat", image=[image], strength=0.5, num_inference_steps=4, guidance_scale=1.0,
                generator=[torch.Generator().manual_seed(0)], output_type="latent")
    finally:
        hook.remove()
    assert tc[0].steps == 2 and tc[0].timesteps == full[0].timesteps[-2:]
    x = pipe.image_processor.preprocess([image])
    clean = pipe._pack_latents(pipe._encode_vae_image(x, torch.Generator().manual_seed(0)))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    sigma = tc[0].timesteps[0] / 1000
    torch.testing.assert_close(first[0], (1 - sigma) * clean + sigma * noise, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        i2i(prompt="a red cat", image=[image], strength=0.1, num_inference_steps=4, guidance_scale=1.0,
            generator=[torch.Generator().manual_seed(0)])
    # guidance: null in a profile hands the stand-in no guidance_scale; the pipeline's own runs
    assert i2i(prompt="a red cat", image=[image], strength=0.5, num_inference_steps=4,
               generator=[torch.Generator().manual_seed(0)], output_type="latent").images.shape[0] == 1


@pytest.mark.parametrize("kind", ["flux2-klein", "qwenimage"])
def test_a_missing_word_lists_the_prompts_words_on_templated_dits(kind):
    """issue 38: on FLUX.2 [klein] and Qwen-Image the word-not-found error names the prompt's words too."""
    import torch
    from saam.capture import trace
    from saam.testing import tiny_dit_pipeline
    from saam.words import WordNotFound
    pipe = tiny_dit_pipeline(kind)
    with trace(pipe) as tc:
        pipe(prompt="a red cat", num_inference_steps=1, height=32, width=32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(WordNotFound, match="the prompt's words: a, red, cat"):
        tc[0].token_positions("zebraa")
