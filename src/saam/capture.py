"""Record per-head cross-attention maps from a diffusers UNet pipeline.

    with trace(pipe) as tc:
        pipe(["a red circle", "a blue square"], num_images_per_prompt=2)
    word_map(tc[0], "red")           # DAAM-style map of image 0 (saam.aggregate)
    tc[3].maps["up_blocks.1.attentions.0.transformer_blocks.0.attn2"]   # [heads, tokens, h, w]

How it works. ``trace`` swaps the processor of every cross-attention module (``attn2`` in SD)
for a :class:`CaptureProcessor` that first calls the original processor, so the UNet's output
is untouched bit for bit, and then recomputes that layer's softmax attention probabilities from
its own query and key projections for the recorded branch only. Probabilities are summed online
per (image, layer, head, token, pixel) at the layer's native resolution, so memory does not
grow with the number of steps (per-step maps are opt-in). Forward pre-hooks on the UNet count
denoising steps and read the pipeline's own ``do_classifier_free_guidance`` flag to find the
conditional half of the batch; a pre-hook on the text encoder records the prompts' token ids.
Everything is removed on exit, also after an exception.
"""
from __future__ import annotations

import contextvars
import inspect
import types
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from . import family
from .headmaps import CaptureError, HeadMaps

_ACTIVE = "_saam_trace_active"


class Observer:
    """What a trace shows an observer: override the methods you need (all are no-ops here). One
    contract for every family (UNets, MM-DiTs, the organisms), installed with ``install``.

    ``trace`` installs a :class:`MapRecorder`; ``relevance_pass`` a vote recorder. The tracker
    calls, in order: ``start`` at the first denoiser call of each pipeline call, ``step`` at every
    denoiser call, then at every attention call of a traced layer (recorded rows only) ``add``
    with that call's per-head probabilities of each image query on each text token, the same
    layout on every family; ``finish`` when the next pipeline call starts or the trace closes.
    On a UNet the tracker calls ``observe`` with the raw projections first (HRV's pass needs them);
    its default turns them into probabilities and calls ``add``, so overriding ``add`` alone is
    enough to see attention on any model.
    """

    generation = True  # MM-DiTs: whether it is shown the generation's own attention (``add``), or only side calls
    outputs = False    # MM-DiTs: whether it wants the attention outputs' image-text products (``add_output``)

    def start(self, n: int, latent: tuple[int, int], token_ids: list[list[int]] | None) -> None:
        """A new pipeline call: ``n`` recorded images of latent size ``latent``; the prompts' ids."""

    def text_layout(self, prompts: list[str], segments: list[tuple[int, object, int]]) -> None:
        """An MM-DiT call's text sequence, told before ``start``: the prompts as given, and the
        (offset, tokenizer, length) of each text encoder's tokens in the sequence."""

    def step(self, index: int, timestep: int) -> None:
        """Denoising step ``index`` (0-based within the call) at scheduler ``timestep``."""

    def observe(self, attn, layer: str, q: torch.Tensor, k: torch.Tensor, attention_mask) -> None:
        """UNets: one cross-attention call of ``layer`` (module ``attn``), recorded rows only.

        Args:
            q: [n, pixels, inner] the processor's own query projection (``attn.to_q`` output).
            k: [n, tokens, inner] its key projection of the text context.
            attention_mask: [n, 1 or pixels, tokens] additive mask as the processor got it, or None.
        By default: ``add(layer, probs(attn, q, k, attention_mask))`` where ``add`` is overridden.
        """
        if type(self).add is not Observer.add:
            self.add(layer, probs(attn, q, k, attention_mask))

    def add(self, layer: str, p: torch.Tensor) -> None:
        """One attention call of ``layer`` on any family, recorded rows only: ``p`` [n, heads, image
        tokens, text tokens], each image query's probability on each text token (on a UNet the
        cross-attention's softmax, rows summing to 1; on an MM-DiT the joint softmax over image and
        text keys restricted to the text keys, rows summing to less than 1)."""

    def add_output(self, layer: str, logits: torch.Tensor) -> None:
        """MM-DiTs, when ``outputs``: [n, image tokens, text tokens] dot products of the attention's
        per-token outputs (every head's, before the output projection), recorded rows only."""

    def attach(self, tracker: "Tracker") -> None:
        """The tracker that will call this observer (told once, when the trace is installed)."""

    def finish(self) -> None:
        """The pipeline call is over (or the trace closes)."""

    def abort(self) -> None:
        """The pipeline call was interrupted before its last step (an exception): drop what it began."""


class Tracker:
    """Shared state of one trace: which batch rows to record, the step, and the observer.

    Forward pre-hooks on the UNet count denoising steps and read the pipeline's own
    ``do_classifier_free_guidance`` to find the conditional half; a pre-hook on the text encoder
    records the token ids of each call the pipeline's ``encode_prompt`` makes (the prompts first,
    then, under guidance, the negative prompts: the recorded branch takes its own); forward hooks on
    each traced layer's ``to_q`` / ``to_k`` keep the projections the processor computes, so
    probabilities cost only a softmax more.
    """

    def __init__(self, pipe, observer: Observer, branch: str = "cond", cfg: bool | None = None):
        self.pipe, self.observer, self.branch, self.cfg = pipe, observer, branch, cfg
        self.rows: slice | None = None
        self.n: int | None = None
        self.steps = 0
        self._calls: list[list[list[int]]] = []  # token ids of each text-encoder call of this prompt encoding
        self._fresh = False                      # a prompt was encoded since the last UNet call
        self.proj: dict[str, torch.Tensor] = {}
        self.side_len: int | None = None          # MM-DiTs: a concept-stream side call is running (saam.stream)
        self.family = family.of(pipe)
        self.encode_cfg: bool | None = None        # guidance as the pipeline told its encode_prompt (PixArt)
        observer.attach(self)

    def on_encode(self, args, kwargs) -> None:
        """``pipe.encode_prompt`` is called with ``args``, ``kwargs``."""
        self.on_encode_prompt()
        self.encode_cfg = self.family.encode_cfg(args, kwargs)

    def on_encode_prompt(self) -> None:
        """``pipe.encode_prompt`` starts: the text-encoder calls that follow are this encoding's."""
        self._calls, self._fresh = [], True

    def on_text_encoder(self, module, args, kwargs):
        if not self._fresh:  # a pipeline without encode_prompt: the first call after the UNet starts anew
            self.on_encode_prompt()
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None:
            self._calls.append(ids.tolist())

    def branch_ids(self, cfg: bool) -> list[list[int]] | None:
        """The recorded branch's prompt ids: the first encoding call (the prompts), or under guidance
        with branch 'uncond' the second (the negative prompts; None where the pipeline used zeros)."""
        if self.branch == "cond" or not cfg:
            return self._calls[0] if self._calls else None
        return self._calls[1] if len(self._calls) > 1 else None

    @property
    def complete(self) -> bool:
        """Whether the current pipeline call ran all its steps (unknown: assumed so)."""
        total = getattr(self.pipe, "_num_timesteps", None)
        return not isinstance(total, int) or self.steps >= total

    def on_unet(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.begin_call(sample.shape[0], tuple(sample.shape[-2:]), t)

    def begin_call(self, batch: int, latent: tuple[int, int], t) -> None:
        """A denoiser call on ``batch`` rows at latent size ``latent``: which rows to record; a new
        pipeline call starts the observer afresh."""
        # true-CFG families run the negative prompt as a call of its own: the batch never holds it
        own = None if self.family.true_cfg else getattr(self.pipe, "do_classifier_free_guidance", None)
        if own is None:
            own = self.encode_cfg
        if self.cfg is not None and own is not None and bool(own) != self.cfg:
            raise CaptureError(
                f"trace(cfg={self.cfg}) contradicts {type(self.pipe).__name__}, which runs this call "
                + ("with" if own else "without") + " classifier-free guidance (its batch of " + str(batch) + " rows is "
                + ("[negative; prompt]" if own else "the prompts alone, no negative half")
                + "): leave cfg=None to follow the pipeline, or change guidance_scale")
        cfg = own if self.cfg is None else self.cfg
        if cfg is None:
            raise CaptureError(f"cannot tell whether {type(self.pipe).__name__} uses classifier-free "
                               "guidance; pass trace(pipe, cfg=True/False)")
        if cfg and batch % 2:
            raise CaptureError(f"classifier-free guidance with an odd batch ({batch})")
        if not cfg and self.branch == "uncond":
            raise CaptureError("branch='uncond' needs classifier-free guidance (guidance_scale > 1)")
        half = batch // 2
        self.rows = (slice(half, batch) if self.branch == "cond" else slice(0, half)) if cfg else slice(0, batch)
        n = self.rows.stop - self.rows.start
        if self.n is None or self._fresh or self.n != n:
            self.finish()
            self.n, self.steps = n, 0
            self.observer.start(n, latent, self.branch_ids(cfg))
            self._fresh = False
        self.observer.step(self.steps, int(t.flatten()[0]) if torch.is_tensor(t) else int(t))
        self.steps += 1

    def projection_hook(self, layer: str, which: str):
        def hook(module, args, output):
            self.proj[which + layer] = output
        return hook

    def finish(self) -> None:
        if self.n is not None:
            self.observer.finish()
        self.n = None

    def close_after_error(self) -> None:
        """The body of the trace raised: keep the current call's maps if it ran all its steps."""
        if self.n is not None and not self.complete:
            self.observer.abort()
            self.n = None
        self.finish()


class MapRecorder(Observer):
    """Sums each layer's attention probabilities per (image, head, token, pixel): :class:`HeadMaps`.

    On an MM-DiT also ConceptAttention's output-space shares per (image, token, pixel): at each
    joint layer and step, the softmax over the prompt's word tokens of the dot products between each
    image token's attention output and theirs (``HeadMaps.outputs``; ``aggregate.output_map``)."""

    outputs = True

    def __init__(self, pipe, per_step: bool = False, store_device=None, words: list[str] | None = None,
                 dtype: torch.dtype = torch.float32):
        self.pipe, self.per_step, self.store_device = pipe, per_step, store_device
        self.words, self.dtype = (None if words is None else list(words)), dtype
        self.results: list[HeadMaps] = []
        self._gen: dict | None = None
        self._layout: tuple[list[str], list] | None = None

    def text_layout(self, prompts, segments):
        self._layout = (list(prompts), list(segments))

    def kept_tokens(self, token_ids: list[list[int]] | None) -> tuple[list[int], list[list[int]]] | None:
        """Which positions to keep: (those of ``words`` (every occurrence) in any of the call's
        prompts, those in each prompt), or None to keep all."""
        if self.words is None:
            return None
        from .words import WordNotFound, token_positions
        tok = getattr(self.pipe, "tokenizer", None)
        if not token_ids or tok is None:
            raise CaptureError("trace(words=...) needs the prompts' text (not prompt embeddings) and a tokenizer")
        own = []
        for ids in token_ids:
            prompt, mine = tok.decode(ids, skip_special_tokens=True), set()
            for w in self.words:
                try:
                    mine.update(token_positions(prompt, w, tok, "all"))
                except WordNotFound:
                    pass
            own.append(sorted(mine))
        return sorted(set().union(*own)), own

    def start(self, n, latent, token_ids):
        self._gen = dict(n=n, latent=latent, steps=0, timesteps=[], sums={}, per_step={}, ids=token_ids,
                         keep=self.kept_tokens(token_ids), outs={}, words=None)
        if self._layout is not None:  # an MM-DiT: which positions of each image's text sequence are words
            from .words import segment_classes
            prompts, segments = self._layout
            length = sum(s[2] for s in segments)
            masks = []
            for pr in prompts:
                m = torch.zeros(length, dtype=torch.bool)
                m[segment_classes(pr, segments)["words"]] = True
                masks.append(m)
            per = max(1, n // len(prompts))
            self._gen["words"] = torch.stack([masks[min(i // per, len(masks) - 1)] for i in range(n)])

    def step(self, index, timestep):
        self._gen["steps"] += 1
        self._gen["timesteps"].append(timestep)

    def add(self, layer: str, p: torch.Tensor) -> None:
        """p: [n, heads, pixels, tokens] for the recorded rows at this step.

        Summed in the layout attention produces it; the [heads, tokens, h, w] view is made once,
        in ``finish``, instead of at every step.
        """
        g = self._gen
        if g["keep"] is not None:
            p = p[..., g["keep"][0]]
        p = p.to(self.store_device or p.device, torch.float32)
        if layer in g["sums"]:
            g["sums"][layer] += p
        else:
            g["sums"][layer] = p.clone()
        if self.per_step:
            g["per_step"].setdefault(layer, []).append(p.to("cpu", copy=True))

    def add_output(self, layer: str, logits: torch.Tensor) -> None:
        """The softmax over each image's word tokens (other positions get 0), summed over steps."""
        g = self._gen
        words = g["words"]
        if words is None or words.shape[1] != logits.shape[-1]:
            return
        w = words.to(logits.device)[:, None, :]
        s = torch.softmax(logits.masked_fill(~w, float("-inf")), -1).nan_to_num(0.0)  # a prompt without words: 0
        s = s.to(self.store_device or s.device, torch.float32)
        if layer in g["outs"]:
            g["outs"][layer] += s
        else:
            g["outs"][layer] = s.clone()

    def abort(self) -> None:
        self._gen = None

    def finish(self) -> None:
        g, self._gen = self._gen, None
        if g is None or g["steps"] == 0:
            return
        tok = getattr(self.pipe, "tokenizer", None)
        ids = g["ids"]
        n_prompts = len(ids) if ids else None
        vae_scale = getattr(self.pipe, "vae_scale_factor", 8)
        image = (g["latent"][0] * vae_scale, g["latent"][1] * vae_scale)

        def spatial(t: torch.Tensor) -> torch.Tensor:  # [..., pixels, tokens] -> [..., tokens, h, w]
            h, w = _grid(t.shape[-2], g["latent"])
            return t.transpose(-1, -2).reshape(*t.shape[:-2], t.shape[-1], h, w)

        for i in range(g["n"]):
            pi = i // max(1, g["n"] // n_prompts) if ids else None
            pid = ids[pi] if ids else None
            kept, cols = None, slice(None)
            if g["keep"] is not None:  # this image's own words' tokens, of those the batch kept
                kept = g["keep"][1][pi]
                cols = [g["keep"][0].index(p) for p in kept]
            prompt = tok.decode(pid, skip_special_tokens=True) if (pid and tok is not None) else None
            segments = None
            if self._layout is not None:  # an MM-DiT: the prompt as given, tokens of several encoders
                prompt, segments = self._layout[0][pi], self._layout[1]
            per = ({l: spatial(torch.stack([s[i][..., cols] for s in v])).to(self.dtype)
                    for l, v in g["per_step"].items()} if self.per_step else None)
            self.results.append(HeadMaps(
                maps={l: spatial(s[i][..., cols]).to("cpu", self.dtype) for l, s in g["sums"].items()},
                steps=g["steps"], timesteps=list(g["timesteps"]), token_ids=pid, prompt=prompt,
                latent_size=g["latent"], image_size=image, tokenizer=tok, per_step=per, tokens=kept,
                segments=segments,
                outputs={l: spatial(s[i]).to("cpu", self.dtype) for l, s in g["outs"].items()} or None))


def _grid(n: int, latent: tuple[int, int]) -> tuple[int, int]:
    """Height and width of a layer whose sequence has n pixels, given the latent size."""
    for d in (1, 2, 4, 8, 16, 32, 64):
        h, w = -(-latent[0] // d), -(-latent[1] // d)
        if h * w == n:
            return h, w
    raise CaptureError(f"cannot place {n} pixels on a grid for latent size {latent}")


def project(attn, hidden_states: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and key projections a diffusers ``Attention`` processor forms (group norm and
    cross-attention norm included): ([n, pixels, inner], [n, tokens, inner])."""
    if hidden_states.ndim == 4:
        n, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(n, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return attn.to_q(hidden_states), attn.to_k(context)


def keys(attn, context: torch.Tensor) -> torch.Tensor:
    """A layer's key projection of any text context [n, tokens, dim] (e.g. HRV's pseudo-context),
    without triggering the trace's projection hooks: [n, tokens, inner]."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return attn.to_k.forward(context)


def probs(attn, q: torch.Tensor, k: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Softmax attention probabilities from projected queries and keys, as the processor forms them.

    Args:
        q: [n, pixels, inner]; k: [n, tokens, inner].
        attention_mask: the processor's additive mask over tokens, or None; masked tokens get
            probability 0.
    Returns:
        [n, heads, pixels, tokens] float32 (each row sums to 1 over tokens).
    """
    n, heads = q.shape[0], attn.heads
    q = q.view(n, -1, heads, q.shape[-1] // heads).transpose(1, 2)
    k = k.view(n, -1, heads, k.shape[-1] // heads).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        m = attention_mask.float()
        if m.ndim == 2:  # [n, tokens] of 1 (keep) / 0 (drop)
            m = (1 - m) * -10000.0
        m = m.view(n, -1, m.shape[-1])[:, None]  # [n, 1, 1 or pixels, tokens]: same for every head
        scores = scores + m
    return scores.softmax(dim=-1)


class CaptureProcessor:
    """Wraps a module's original processor: same output; the projections it computed (kept by
    hooks on ``to_q`` / ``to_k``) go to the tracker's observer for the recorded rows."""

    def __init__(self, base, layer: str, tracker: Tracker):
        self.base, self.layer, self.tracker = base, layer, tracker
        params = inspect.signature(base.__call__).parameters
        self._base_kwargs = (None if any(p.kind == p.VAR_KEYWORD for p in params.values())
                             else set(params))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        if self._base_kwargs is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self._base_kwargs}
        tr = self.tracker
        out = self.base(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        q, k = tr.proj.pop("q" + self.layer, None), tr.proj.pop("k" + self.layer, None)
        if encoder_hidden_states is not None and tr.rows is not None and tr.n is not None:
            with torch.no_grad():
                if q is None or k is None:  # a processor that bypasses to_q / to_k: project again
                    q, k = project(attn, hidden_states, encoder_hidden_states)
                mask = None
                if attention_mask is not None:
                    b = hidden_states.shape[0]
                    mask = attn.prepare_attention_mask(attention_mask, k.shape[1], b)
                    mask = mask.view(b, attn.heads, -1, mask.shape[-1])[:, 0][tr.rows]
                tr.observer.observe(attn, self.layer, q[tr.rows], k[tr.rows], mask)
        return out


def cross_attention_layers(unet) -> dict[str, object]:
    """Cross-attention modules of a UNet by layer name (module path without ``.processor``)."""
    return family.UNET.layers(unet)


class Trace:
    """The object ``trace`` yields: a list of :class:`HeadMaps`, one per generated image."""

    def __init__(self, recorder: MapRecorder):
        self._rec = recorder

    @property
    def results(self) -> list[HeadMaps]:
        return self._rec.results

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> HeadMaps:
        return self.results[i]

    def __iter__(self) -> Iterator[HeadMaps]:
        return iter(self.results)


def check_pipeline(pipe):
    """The denoiser of a pipeline whose layers cross-attend to text (a UNet, or a cross-attention
    DiT such as PixArt-Sigma), or a clear error when ``pipe`` has none to trace."""
    try:
        fam = family.of(pipe)
    except TypeError:
        fam = None
    if fam is None or fam.dit:
        raise TypeError(f"trace() needs a diffusers pipeline with a UNet or a DiT ({type(pipe).__name__} is "
                        + ("an MM-DiT: its joint attention is traced by install_joint)" if fam else "neither)"))
    unet = fam.denoiser(pipe)
    if not hasattr(unet, "attn_processors"):
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers to trace")
    return unet


def _select_layers(model, available: dict[str, object], layers: list[str] | None, what: str) -> dict[str, object]:
    """The traced layers: ``layers`` (checked against ``available``) or all of them."""
    if not available:
        raise ValueError(f"{type(model).__name__} has no {what} layers to trace")
    if layers is None:
        return available
    if isinstance(layers, str) or not len(layers):
        raise ValueError(f"layers={layers!r}: give a list of one or more {what} layer names of this "
                         f"{type(model).__name__}, or None for all: {sorted(available)}")
    unknown = set(layers) - set(available)
    if unknown:
        raise ValueError(f"not {what} layers of this {type(model).__name__}: {sorted(unknown)}")
    return {l: available[l] for l in layers}


@contextmanager
def _installed(pipe, model, tracker, cross: dict[str, object], wrap, hooks, on_encode):
    """The one install-and-remove sequence of every trace: ``wrap`` (a capture processor class) around
    the processors of ``cross``, ``pipe.encode_prompt`` wrapped to call ``on_encode(args, kwargs)``
    first, ``hooks`` ((module, hook, pre) triples) registered; all removed on exit, also after an
    exception, when the tracker keeps every pipeline call that ran all its steps and drops an
    interrupted one. Yields ``cross``."""
    if getattr(model, _ACTIVE, False):
        raise CaptureError("a trace is already active on this pipeline; nested traces would double count")
    original = model.attn_processors
    new = dict(original)
    for name in cross:
        new[name + ".processor"] = wrap(original[name + ".processor"], name, tracker)
    handles = []
    setattr(model, _ACTIVE, True)
    encode = getattr(pipe, "encode_prompt", None)
    if callable(encode):
        def encode_prompt(*args, **kwargs):
            on_encode(args, kwargs)
            return encode(*args, **kwargs)
        pipe.encode_prompt = encode_prompt
    try:
        model.set_attn_processor(new)
        for module, hook, pre in hooks:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True) if pre
                           else module.register_forward_hook(hook))
        try:
            yield cross
        except BaseException:
            tracker.close_after_error()
            raise
        tracker.finish()
    finally:
        if callable(encode):
            del pipe.encode_prompt
        for h in handles:
            h.remove()
        model.set_attn_processor(original)
        setattr(model, _ACTIVE, False)
        tracker.proj.clear()


# ------------------------------------------------------------------ MM-DiTs (SD3, SD3.5, FLUX.1, FLUX.2, Qwen-Image)

def is_dit(pipe) -> bool:
    """Whether ``pipe`` denoises with an MM-DiT (joint attention: SD3 / SD3.5 / FLUX / Qwen-Image) rather than a UNet
    or a cross-attention DiT (``family.is_joint``)."""
    return family.is_joint(pipe)


def joint_attention_layers(transformer) -> dict[str, object]:
    """The joint-attention modules of an MM-DiT, where image queries meet text keys: SD3's joint
    blocks (``transformer_blocks.i.attn``; SD3.5's extra ``attn2`` sees no text), Flux's
    double-stream blocks and its single-stream blocks (``single_transformer_blocks.i.attn``)."""
    return family.of_model(transformer).layers(transformer)


def joint_queries_keys(attn, hidden_states, encoder_hidden_states, rotary, text_len: int, fam=None):
    """The image queries and all keys of a joint-attention call, formed as its processor forms them
    (QK-normalisation and Flux's rotary embedding included), and where the text keys lie.

    Returns:
        (queries [n, heads, image tokens, d], keys [n, heads, all tokens, d], text: slice of the keys).
    """
    if fam is not None and fam.name not in ("flux", "sd3"):
        raise CaptureError(f"{type(attn).__name__}'s processor ({type(attn.processor).__name__}) handed its attention "
                           "kernel no call this trace could see (neither diffusers' dispatch_attention_fn nor "
                           "F.scaled_dot_product_attention, once): its maps cannot be recorded")
    if fam is not None and fam.text_first:  # Flux's attention: [text; image], rotary embedding
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections
        q, k, _, eq, ek, _ = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim))), attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
        if encoder_hidden_states is not None:  # double stream: [text; image]
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            q, k, text_len = torch.cat([eq, q], 1), torch.cat([ek, k], 1), ek.shape[1]
        if rotary is not None:  # single stream: the sequence is [text; image] already
            q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q[:, :, text_len:], k, slice(0, text_len)
    if getattr(attn, "add_k_proj", None) is None or encoder_hidden_states is None:
        raise CaptureError(f"{type(attn).__name__} is not a joint attention over image and text")
    n, heads = hidden_states.shape[0], attn.heads

    def split(x):
        return x.view(n, -1, heads, x.shape[-1] // heads).transpose(1, 2)
    q, k, ek = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.add_k_proj(encoder_hidden_states))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if attn.norm_added_k is not None:
        ek = attn.norm_added_k(ek)
    return q, torch.cat([k, ek], 2), slice(k.shape[2], k.shape[2] + ek.shape[2])  # SD3: [image; text]


def text_segments(pipe, text_len: int) -> list[tuple[int, object, int]]:
    """Where each text encoder's tokens lie in an MM-DiT's text sequence of ``text_len`` tokens:
    (offset, tokenizer, length) each (``family.Family.text_segments``)."""
    return family.of(pipe).text_segments(pipe, text_len)


def text_probs(q: torch.Tensor, k: torch.Tensor, text: slice, mask=None, scale: float | None = None) -> torch.Tensor:
    """Each image query's attention probability on each text key, the softmax taken over *all*
    keys (image and text) as the joint attention takes it: [n, heads, image tokens, text tokens].

    Computed by the fused attention kernel itself: attention of the queries on the keys with, as
    values, the indicator of each text key (a text key's one-hot row, zero for image keys); ``mask``:
    the call's own attention mask (masked keys get 0)."""
    t = text.stop - text.start
    v = torch.zeros(*k.shape[:3], t, dtype=q.dtype, device=q.device)
    v[:, :, text] = torch.eye(t, dtype=q.dtype, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---- catching the queries and keys a joint-attention processor hands to its attention kernel
#
# A processor's ``__call__`` is run as a copy of itself whose globals map ``dispatch_attention_fn``
# (diffusers' attention dispatcher: FLUX.1, FLUX.2, Qwen-Image) and ``F`` (torch.nn.functional: SD3's
# processor calls scaled_dot_product_attention itself) to the spies below. Nothing outside that one
# call changes: no torch or diffusers function is replaced, other threads and models are untouched,
# and the attention backend a user selected (``model.set_attention_backend``, ``attention_backend``)
# still runs; only the default ("native") on the CPU runs the same kernel through a door that also
# returns the log-sum-exp.

_SEEN: contextvars.ContextVar = contextvars.ContextVar("saam_seen", default=None)


def _sdpa_spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """``F.scaled_dot_product_attention`` that also leaves (queries, keys, log-sum-exp over all keys or
    None, scale, output, mask) in the current call's list. On the CPU, an unmasked call runs the very
    kernel the function itself would (``_scaled_dot_product_flash_attention_for_cpu``, with autocast's
    casts made first), which returns the log-sum-exp as well (tested: outputs identical)."""
    seen = _SEEN.get()
    s = scale if scale is not None else query.shape[-1] ** -0.5
    plain = not kw or kw == {"enable_gqa": False}
    if seen is not None and query.device.type == "cpu" and attn_mask is None and not is_causal \
            and dropout_p == 0.0 and plain and not torch.is_grad_enabled():
        if torch.is_autocast_enabled("cpu"):  # what autocast does to this function's float32 inputs
            low = torch.get_autocast_dtype("cpu")
            query, key, value = (x.to(low) if x.dtype == torch.float32 else x for x in (query, key, value))
        if query.dtype == key.dtype == value.dtype:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False,
                                                                                   scale=scale)
            seen.append((query, key, lse, s, out, None))
            return out
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale, **kw)
    if seen is not None:
        seen.append((query, key, None, s, out, attn_mask))
    return out


def _dispatch_spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
    """diffusers' ``dispatch_attention_fn`` ([n, tokens, heads, d] layout) that also records what it
    attended (in [n, heads, tokens, d], as :func:`_sdpa_spy`). The native backend runs as diffusers
    runs it (permute, scaled_dot_product_attention, permute back) through :func:`_sdpa_spy`; any other
    backend runs through the dispatcher itself."""
    from diffusers.models import attention_dispatch as ad
    name = backend if backend is not None else ad._AttentionBackendRegistry.get_active_backend()[0]
    if str(getattr(name, "value", name)) == "native" and parallel_config is None and not attention_kwargs:
        mask = attn_mask
        if mask is not None and mask.ndim == 2 and mask.shape == (query.shape[0], key.shape[1]):
            mask = mask[:, None, None, :]  # as diffusers' native backend reshapes it
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        kw = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return _sdpa_spy(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         **kw).permute(0, 2, 1, 3)
    out = ad.dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                   scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs,
                                   backend=backend, parallel_config=parallel_config)
    seen = _SEEN.get()
    if seen is not None:
        mask = attn_mask[:, None, None, :] if attn_mask is not None and attn_mask.ndim == 2 else attn_mask
        seen.append((query.transpose(1, 2), key.transpose(1, 2), None,
                     scale if scale is not None else query.shape[-1] ** -0.5, out.transpose(1, 2), mask))
    return out


class _SpiedF:
    """torch.nn.functional as a spied processor sees it: scaled_dot_product_attention is :func:`_sdpa_spy`."""
    scaled_dot_product_attention = staticmethod(_sdpa_spy)

    def __getattr__(self, name):
        return getattr(F, name)


_SPIED: dict = {}


def _spied(processor):
    """The processor's ``__call__`` as a function whose globals see the spies, or None where it calls
    neither the dispatcher nor ``F`` (then its queries and keys are formed again)."""
    fn = type(processor).__call__
    if fn is torch.nn.Module.__call__:
        fn = type(processor).forward
    fn = getattr(fn, "__func__", fn)
    if fn not in _SPIED:
        g = getattr(fn, "__globals__", {})
        swap = {}
        if "dispatch_attention_fn" in g:
            swap["dispatch_attention_fn"] = _dispatch_spy
        if g.get("F") is F:
            swap["F"] = _SpiedF()
        if not swap or not hasattr(fn, "__code__"):
            _SPIED[fn] = None
        else:
            copy = types.FunctionType(fn.__code__, {**g, **swap}, fn.__name__, fn.__defaults__, fn.__closure__)
            copy.__kwdefaults__ = fn.__kwdefaults__
            _SPIED[fn] = copy
    return _SPIED[fn]


def _run_spied(processor, seen: list, *args, **kwargs):
    """``processor(*args, **kwargs)`` with what its attention kernel saw appended to ``seen``."""
    fn = _spied(processor)
    token = _SEEN.set(seen)
    try:
        return processor(*args, **kwargs) if fn is None else fn(processor, *args, **kwargs)
    finally:
        _SEEN.reset(token)


def _rows_mask(mask, rows, image: slice):
    """An attention mask ([n, 1 or heads, 1 or queries, keys], bool or additive) for the recorded
    rows and the image queries; None stays None."""
    if mask is None:
        return None
    m = mask[rows] if mask.shape[0] > 1 else mask
    return m[:, :, image] if m.shape[2] > 1 else m


class JointCaptureProcessor:
    """Wraps a joint-attention module's processor: the same output; the text probabilities of the
    recorded rows go to the tracker's observer (``MapRecorder.add``).

    The probabilities come from the queries and keys the processor hands to its attention kernel
    (after QK-normalisation and rotary embeddings), caught at diffusers' dispatcher or at
    ``F.scaled_dot_product_attention`` as that one call sees them (:func:`_run_spied`): with the native
    backend on the CPU with the kernel's own log-sum-exp, so only the image-to-text logits are formed
    again; with any other backend or a mask by one more fused attention (:func:`text_probs`). A
    processor that calls no such kernel (or several) gets its queries and keys projected again
    (:func:`joint_queries_keys`; SD3 and FLUX.1 only)."""

    def __init__(self, base, layer: str, tracker: "JointTracker"):
        self.base, self.layer, self.tracker = base, layer, tracker
        self._sig = inspect.signature(base.__call__)  # (attn, hidden_states, ...) as the base declares them

        def call(*args, **kwargs):
            return self._capture(*args, **kwargs)
        # what an attention module inspects to choose the arguments it passes (FLUX.2, Qwen-Image): the base's
        call.__signature__ = self._sig
        self.__call__ = call

    def __call__(self, *args, **kwargs):
        return self._capture(*args, **kwargs)

    def _capture(self, attn, *args, **kwargs):
        tr = self.tracker
        if tr.side_len is not None:  # a concept-stream side call (saam.stream): all its rows, the concepts as text
            r, text_len = slice(None), tr.side_len
        elif tr.rows is not None and tr.n is not None and tr.observer.generation:
            r, text_len = tr.rows, tr.text_len
        else:
            return self.base(attn, *args, **kwargs)
        named = self._sig.bind(attn, *args, **kwargs).arguments
        hidden_states = named["hidden_states"]
        encoder_hidden_states, image_rotary_emb = named.get("encoder_hidden_states"), named.get("image_rotary_emb")
        seen: list = []
        out = _run_spied(self.base, seen, attn, *args, **kwargs)
        with torch.no_grad():
            outputs = None
            if len(seen) == 1:
                q, k, lse, scale, o, mask = seen[0]
                t = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else text_len
                text = tr.family.text_slice(k.shape[2], t)
                image = slice(t, None) if text.start == 0 else slice(0, text.start)
                q, k = q[r], k[r]
                if lse is None:
                    p = text_probs(q[:, :, image], k, text, _rows_mask(mask, r, image), scale)
                else:  # the joint softmax on the text keys: exp(logit - log-sum-exp over all keys)
                    logits = (q[:, :, image].float() @ k[:, :, text].float().transpose(-1, -2)) * scale
                    p = torch.exp(logits - lse[r][:, :, image, None].float())
                if tr.observer.outputs:  # ConceptAttention's output space: image outputs . text outputs, all heads
                    o = o[r].float()
                    outputs = torch.einsum("nhid,nhtd->nit", o[:, :, image], o[:, :, text])
            else:
                q, k, text = joint_queries_keys(attn, hidden_states[r], None if encoder_hidden_states is None
                                                else encoder_hidden_states[r], image_rotary_emb, text_len, tr.family)
                p = text_probs(q, k, text)
            tr.observer.add(self.layer, p)
            if outputs is not None:
                tr.observer.add_output(self.layer, outputs)
        return out


class JointTracker(Tracker):
    """A :class:`Tracker` for an MM-DiT: a pre-hook on the transformer counts steps, finds the
    conditional rows (SD3's classifier-free guidance; Flux's distilled guidance has none) and the
    latent grid, and the prompts come from the pipeline's ``encode_prompt``."""

    def __init__(self, pipe, observer, branch="cond", cfg=None):
        super().__init__(pipe, observer, branch, cfg)
        self.text_len = 0
        self.call_kwargs: dict = {}  # the transformer call's keyword arguments (the concept stream's side calls)
        self.prompts: list[str] | None = None
        self._last_t = None

    def on_encode(self, args, kwargs) -> None:
        if self._fresh and self.prompts is not None:
            # a second encoding before the first denoiser call: FLUX.1's true CFG encodes the negative
            # prompt with a call of its own; the recorded branch stays the prompt's (its ids came first)
            return
        self.on_encode_prompt()
        prompt = kwargs.get("prompt", args[0] if args else None)
        others = [kwargs.get(k) for k in ("prompt_2", "prompt_3")]
        if any(o is not None and o != prompt for o in others):
            raise CaptureError("trace() aligns words with one prompt: give every text encoder the same prompt "
                               "(leave prompt_2 / prompt_3 unset)")
        self.prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)


    def on_transformer(self, module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        t = kwargs.get("timestep")
        ehs = kwargs.get("encoder_hidden_states")
        latent, cfg = self.family.call_layout(hs, kwargs)
        t0 = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        if self.family.true_cfg and t0 == self._last_t:  # Flux's true CFG: a second call at the same step (negative prompt)
            self.rows = None
            return
        self._last_t = t0
        self.text_len, self.call_kwargs = ehs.shape[1], kwargs
        if self.cfg is None and cfg is not None:
            self.cfg = cfg
        if self._fresh and self.prompts is not None:
            self.observer.text_layout(self.prompts, text_segments(self.pipe, self.text_len))
        self.begin_call(hs.shape[0], latent, t)


@contextmanager
def install_joint(pipe, observer: Observer, layers: list[str] | None = None, *, branch: str = "cond",
                  cfg: bool | None = None):
    """``install`` for an MM-DiT pipeline: capture processors on its joint-attention modules, the
    step hook on the transformer, the prompt and token hooks; all removed on exit."""
    if branch != "cond":
        raise ValueError("an MM-DiT trace records the prompt's branch only (branch='cond')")
    model = pipe.transformer
    cross = _select_layers(model, joint_attention_layers(model), layers, "joint-attention")
    tracker = JointTracker(pipe, observer, branch, cfg)
    primary = getattr(pipe, tracker.family.word_encoder)
    hooks = [(model, tracker.on_transformer, True), (primary, tracker.on_text_encoder, True)]
    with _installed(pipe, model, tracker, cross, JointCaptureProcessor, hooks, tracker.on_encode) as c:
        yield c


@contextmanager
def trace(pipe, *, branch: str = "cond", cfg: bool | None = None, per_step: bool = False,
          layers: list[str] | None = None, store_device: str | torch.device | None = None,
          words: list[str] | None = None, dtype: torch.dtype = torch.float32) -> Iterator[Trace]:
    """Record per-head cross-attention maps of every image the pipeline generates inside.

    Args:
        pipe: a diffusers pipeline: SD 1.x/2.x, SDXL, img2img, ShapesWorld (UNets), SD3/3.5, FLUX.1,
            FLUX.2 [dev]/[klein], Qwen-Image (MM-DiTs), PixArt-Sigma (a cross-attention DiT).
        branch: ``"cond"`` (the prompt's branch, default) or ``"uncond"`` (the negative prompt's)
            under classifier-free guidance.
        cfg: whether the UNet batch is [uncond; cond]. None reads the pipeline's own
            ``do_classifier_free_guidance`` at each step (right for diffusers' SD pipelines).
        per_step: also keep every step's maps (memory grows with steps).
        layers: layer names to record (default: every cross-attention layer).
        store_device: where the running sums live (default: the UNet's device; results are
            moved to the CPU when each pipeline call ends).
        words: keep only these words' tokens (every occurrence; each image those of its own
            prompt), so a trace of ten words costs about a seventh of one of all 77 tokens;
            ``aggregate.word_map`` works for them.
        dtype: the dtype results are stored in (``torch.float16`` halves the memory; the sums
            over steps are formed in float32 either way).
    Raises:
        TypeError: not a UNet pipeline. ValueError: no cross-attention, unknown layer or branch.
        CaptureError: a trace is already active on this pipeline.
    """
    if words is not None and (isinstance(words, str) or not all(isinstance(w, str) and w.strip() for w in words)):
        raise ValueError(f"words must be a list of non-empty words, got {words!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    rec = MapRecorder(pipe, per_step, store_device, words, dtype)
    if is_dit(pipe) and words is not None:
        raise ValueError("trace(words=...) is for UNet pipelines; an MM-DiT trace keeps every text token")
    with (install_joint if is_dit(pipe) else install)(pipe, rec, layers, branch=branch, cfg=cfg):
        yield Trace(rec)


@contextmanager
def install(pipe, observer: Observer, layers: list[str] | None = None, *, branch: str = "cond",
            cfg: bool | None = None):
    """Show ``observer`` every cross-attention call of ``layers`` (default all) of ``pipe``.

    Installs the capture processors and the step, prompt and projection hooks; removes all of
    them on exit, also after an exception, and finishes the observer: after an exception, every
    pipeline call that ran all its steps is kept, an interrupted one is dropped. Yields the traced
    layers ({name: module}).
    """
    if is_dit(pipe):
        with install_joint(pipe, observer, layers, branch=branch, cfg=cfg) as c:
            yield c
        return
    if branch not in ("cond", "uncond"):
        raise ValueError(f"branch must be 'cond' or 'uncond', got {branch!r}")
    unet = check_pipeline(pipe)
    tracker = Tracker(pipe, observer, branch, cfg)
    cross = _select_layers(unet, tracker.family.layers(unet), layers, "cross-attention")
    hooks = [(unet, tracker.on_unet, True)]
    for name, mod in cross.items():
        hooks += [(mod.to_q, tracker.projection_hook(name, "q"), False), (mod.to_k, tracker.projection_hook(name, "k"), False)]
    if getattr(pipe, "text_encoder", None) is not None:
        hooks.append((pipe.text_encoder, tracker.on_text_encoder, True))
    with _installed(pipe, unet, tracker, cross, CaptureProcessor, hooks, tracker.on_encode) as c:
        yield c
