"""What a trace tells its observer, and the one observer that records maps.

- :class:`Observer`: the contract. A trace (``saam.capture``) shows an observer every traced
  attention call of the recorded rows: a UNet's queries and keys (``observe``), an MM-DiT's text
  probabilities (``add``) and output products (``add_output``), plus the call's begin and end.
- :class:`Tracker`: the state one trace shares between its hooks: which batch rows to record
  (classifier-free guidance), the step, the prompts' token ids; ``saam.joint.JointTracker`` is the
  MM-DiT's.
- :class:`MapRecorder`: sums the probabilities into :class:`~saam.headmaps.HeadMaps`.
"""
from __future__ import annotations

import torch

from . import family
from .crossattn import probs
from .headmaps import CaptureError, HeadMaps


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

    def add_output(self, layer: str, products: torch.Tensor) -> None:
        """MM-DiTs, when ``outputs``: [n, heads, image tokens, text tokens] dot products of each
        head's attention outputs (before the output projection) of every image token with every text
        token, recorded rows only. Their sum over heads is ConceptAttention's output-space logits."""

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
                         keep=self.kept_tokens(token_ids), outs={}, head_outs={}, words=None)
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

    def add_output(self, layer: str, products: torch.Tensor) -> None:
        """The softmax over each image's word tokens (other positions get 0) of the products summed
        over heads (ConceptAttention's) and of each head's own (the head-wise maps), summed over steps."""
        g = self._gen
        words = g["words"]
        if words is None or words.shape[1] != products.shape[-1]:
            return
        w = words.to(products.device)[:, None, None, :]

        def share(logits):  # a prompt without words: 0
            return torch.softmax(logits.masked_fill(~w, float("-inf")), -1).nan_to_num(0.0).to(
                self.store_device or logits.device, torch.float32)
        for key, s in (("outs", share(products.sum(1, keepdim=True))[:, 0]), ("head_outs", share(products))):
            if layer in g[key]:
                g[key][layer] += s
            else:
                g[key][layer] = s.clone()

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
                outputs={l: spatial(s[i]).to("cpu", self.dtype) for l, s in g["outs"].items()} or None,
                head_outputs={l: spatial(s[i]).to("cpu", self.dtype) for l, s in g["head_outs"].items()} or None))


def _grid(n: int, latent: tuple[int, int]) -> tuple[int, int]:
    """Height and width of a layer whose sequence has n pixels, given the latent size."""
    for d in (1, 2, 4, 8, 16, 32, 64):
        h, w = -(-latent[0] // d), -(-latent[1] // d)
        if h * w == n:
            return h, w
    raise CaptureError(f"cannot place {n} pixels on a grid for latent size {latent}")

