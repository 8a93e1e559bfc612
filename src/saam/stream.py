"""Head relevance on MM-DiTs (SD3, SD3.5, FLUX.1, FLUX.2, Qwen-Image): HRV's vote, read from a concept stream.

HRV projects each concept word with a UNet layer's key projection. In an MM-DiT the text a block
attends to has been transformed by every block before it, so a word's key at block 10 is not its
encoder state projected. Here the concept words travel as a stream of their own: at every
denoising step each image draws one word per concept (from its own seeded stream, as the UNet
pass draws, so votes do not depend on the batch size); the drawn words' encoder states, put
through the transformer's ``context_embedder``, enter the first block as a second text sequence
and pass through every block with the text stream's own weights, beside the generation:

- at each block, a *side call* of that block (its own ``forward``, so QK-normalisation, Flux's
  rotary embedding, SD3.5's second attention and Flux's single-stream layout are the model's own
  code) takes the generation's image states and timestep embedding and the concept stream as its
  text; its text output is the concept stream's state at the next block, its image output is
  dropped: the concepts read the image and are never read by it (the generation is unchanged,
  tested bit for bit);
- in that side call, each head's image queries attend over image and concept keys (the joint
  softmax); averaged over image tokens and over each word's tokens this gives a [heads, concepts]
  score, and each head votes for its argmax concept, as in HRV.

``variant="direct"`` keeps HRV's own construction instead: at every block the concepts enter
afresh from the encoder (``context_embedder`` output), transformed by no earlier block. A side
call costs about one block of one image, so a pass costs about twice a generation.

Votes are counted per (image, step) and normalised as HRV does (``relevance.relevance_pass`` calls
:func:`stream_votes` for an MM-DiT and ``from_votes`` on what it returns); the result is the same
``Relevance`` as on UNets: histograms, concentration, selection and Table 1
use it unchanged.
"""
from __future__ import annotations

import random

import torch

from . import family
from .capture import Observer, install_joint
from .family import is_joint, of_model
from .models import guidance_arg
from .votes import VoteCounter

VARIANTS = ("stream", "direct")


@torch.no_grad()
def encode_stream_words(pipe, words: list[str], max_sequence_length: int | None = None) -> list[torch.Tensor]:
    """Each word encoded alone by the pipeline's own ``encode_prompt`` and put through the
    transformer's ``context_embedder``: the states its tokens (in every text encoder's segment,
    SD3: CLIP's and T5's) have when they enter the first block: [n_tokens, inner] per word."""
    from .words import WordNotFound, token_positions
    fam = family.of(pipe)
    kw = dict(prompt=words, device=pipe.transformer.device, num_images_per_prompt=1, **fam.encode_words_kwargs())
    if max_sequence_length is not None:
        kw["max_sequence_length"] = max_sequence_length
    emb = pipe.encode_prompt(**kw)[0]
    states = fam.embed_context(pipe.transformer, emb.to(pipe.transformer.dtype))
    out = []
    for i, w in enumerate(words):
        pos = []
        for offset, tok, length in family.of(pipe).text_segments(pipe, emb.shape[1]):
            try:
                pos += [offset + p for p in token_positions(w, w, tok, max_length=length)]
            except WordNotFound:
                pass
        if not pos:
            raise WordNotFound(f"{w!r}: none of its tokens survived the text encoders' windows")
        out.append(states[i, pos])
    return out


class StreamVoter(Observer):
    """The concept stream and its votes (see the module doc). Installed by :func:`concept_stream`."""

    generation = False  # only the side calls' attention counts

    def __init__(self, words: list[list[torch.Tensor]] | None, layers: dict[str, object], variant: str = "stream",
                 keep_states: bool = False):
        """``words``: per concept, each word's entering states (:func:`encode_stream_words`); may be set
        by :meth:`prepare`. ``keep_states``: keep each side call's text output (``states``; tests)."""
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.words, self.variant, self.keep_states = words, variant, keep_states
        self.counter = VoteCounter(layers)  # HRV's vote, counted as the UNet pass counts it
        self.heads = self.counter.heads
        self.block_layer = {l.rsplit(".", 1)[0]: l for l in layers}
        self.rngs: list[random.Random] = []
        self.states: list[dict[str, torch.Tensor]] = []  # keep_states: per image, block -> text output
        self.tracker = None
        self.side: tuple[int, torch.Tensor] | None = None  # (image, concept of each stream token) during a side call
        self._stream: list[torch.Tensor] | None = None
        self._segs: list[torch.Tensor] = []

    def attach(self, tracker) -> None:
        self.tracker = tracker

    def prepare(self, pipe, concepts: dict[str, list[str]], rngs: list[random.Random], max_sequence_length=None) -> None:
        if self.words is None:
            self.words = [encode_stream_words(pipe, ws, max_sequence_length) for ws in concepts.values()]
        self.rngs = rngs

    def start(self, n, latent, token_ids):
        if len(self.rngs) != n:
            raise RuntimeError(f"the concept stream has {len(self.rngs)} random streams for {n} images")
        self.counter.start(n)
        self.states = [{} for _ in range(n)] if self.keep_states else []

    def step(self, index, timestep):
        self.counter.step(index, timestep)
        self._stream = None  # drawn afresh at this step's first block

    def _draw(self) -> None:
        self._stream, self._segs = [], []
        for rng in self.rngs:
            picks = [ws[rng.randrange(len(ws))] for ws in self.words]
            self._stream.append(torch.cat(picks))
            self._segs.append(torch.cat([torch.full((len(t),), c) for c, t in enumerate(picks)]))
        self._entry = list(self._stream)

    def on_block(self, block, args, kwargs):
        """Forward pre-hook of every MM-DiT block: the side call of this block for each recorded image."""
        tr = self.tracker
        if self.side is not None or tr is None or tr.rows is None:
            return None  # inside a side call, or a call that is not recorded (Flux's true-CFG negative)
        name = self._names[id(block)]
        if self._stream is None:
            self._draw()
        fam, text_len = tr.family, tr.text_len
        for j, r in enumerate(range(tr.rows.start, tr.rows.stop)):
            stream = self._entry[j] if self.variant == "direct" else self._stream[j]
            self.side, tr.side_len = (j, self._segs[j]), len(stream)
            try:
                text = fam.side_call(block, kwargs, r, stream, text_len, fam.denoiser(tr.pipe), tr.call_kwargs)
            finally:
                self.side, tr.side_len = None, None
            if text is not None:
                self._stream[j] = text
                if self.keep_states:
                    self.states[j][name] = text.detach().clone()
        return None

    def add(self, layer, probs) -> None:
        if self.side is None:
            return  # the generation's own attention: not a vote
        j, seg = self.side
        c = len(self.words)
        p = probs[0].float().mean(1)  # [heads, stream tokens]: mean over image tokens
        one = torch.nn.functional.one_hot(seg.to(p.device), c).float()
        per = (p @ one) / one.sum(0).clamp_min(1)  # mean over each word's tokens: [heads, concepts]
        self.counter.vote(layer, per[None], slice(j, j + 1))

    def take(self) -> dict:
        return self.counter.take()


def blocks(transformer) -> dict[str, torch.nn.Module]:
    """The blocks holding the joint-attention layers (SD3's joint blocks; Flux's double- and single-stream ones)."""
    mods = dict(transformer.named_modules())
    return {l.rsplit(".", 1)[0]: mods[l.rsplit(".", 1)[0]] for l in of_model(transformer).layers(transformer)}


class concept_stream:
    """``with concept_stream(pipe, voter):`` the MM-DiT trace (``capture.install_joint``) with the
    voter as its observer and a pre-hook on every block running the side calls; all removed on exit."""

    def __init__(self, pipe, voter: StreamVoter):
        if not is_joint(pipe):
            raise TypeError(f"the concept stream is for MM-DiT pipelines (SD3, FLUX, Qwen-Image), got {type(pipe).__name__}")
        self.pipe, self.voter = pipe, voter

    def __enter__(self):
        self._trace = install_joint(self.pipe, self.voter)
        self._trace.__enter__()
        bl = blocks(self.pipe.transformer)
        self.voter._names = {id(m): n for n, m in bl.items()}
        self._handles = [m.register_forward_pre_hook(self.voter.on_block, with_kwargs=True) for m in bl.values()]
        return self.voter

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return self._trace.__exit__(*exc)


def stream_votes(pipe, concepts: dict[str, list[str]], prompts: list[str], *, steps: int, guidance: float, seed: int,
                 batch_size: int, variant: str = "stream", height=None, width=None, max_sequence_length=None,
                 progress: bool = True, cache=None, words_cache=None):
    """The concept stream's votes over the generation of ``prompts`` on an MM-DiT pipeline, batch by
    batch (``runs.run_batches``, cached under ``cache``): (heads, one ``StreamVoter.take()`` per batch),
    what ``relevance.relevance_pass`` turns into a ``Relevance``."""
    from .cache import cached
    from .runs import item_rngs, run_batches
    voter = StreamVoter(None, of_model(pipe.transformer).layers(pipe.transformer), variant)
    if words_cache:  # encoded once per text encoder (float32 on disk holds any half-precision state exactly)
        dtype = pipe.transformer.dtype
        enc = cached(*words_cache, lambda: [[w.float().cpu().numpy() for w in encode_stream_words(pipe, ws, max_sequence_length)]
                                            for ws in concepts.values()])
        voter.words = [[torch.as_tensor(w).to(pipe.transformer.device, dtype) for w in ws] for ws in enc]
    extra = {} if max_sequence_length is None else dict(max_sequence_length=max_sequence_length)

    def batch(prompts, gens, start):
        voter.prepare(pipe, concepts, item_rngs(seed, start, len(prompts)), max_sequence_length)
        pipe(prompt=prompts, num_inference_steps=steps, **guidance_arg(guidance), generator=gens, height=height, width=width,
             output_type="latent", **extra)
        return voter.take()
    with concept_stream(pipe, voter):
        parts = run_batches(prompts, batch_size, seed, batch, cache=cache, desc=f"relevance ({variant})" if progress else None)
    return voter.heads, parts
