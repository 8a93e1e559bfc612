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

The parts, one module each: ``saam.observe`` (the observer contract, the tracker, the map
recorder), ``saam.crossattn`` (the UNet's capture processor), ``saam.joint`` (the MM-DiTs'
joint capture), ``saam.spies`` (the dispatcher and SDPA spies); this module installs them. Questions
about a model family (is it an MM-DiT, which layers, where its text lies) go to ``saam.family``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from . import family
from .crossattn import CaptureProcessor
from .headmaps import CaptureError, HeadMaps  # noqa: F401 - what a trace gives and raises
from .joint import JointCaptureProcessor, JointTracker
from .observe import MapRecorder, Observer, Tracker  # noqa: F401 - the contract install() takes

_ACTIVE = "_saam_trace_active"


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


@contextmanager
def install_joint(pipe, observer: Observer, layers: list[str] | None = None, *, branch: str = "cond",
                  cfg: bool | None = None):
    """``install`` for an MM-DiT pipeline: capture processors on its joint-attention modules, the
    step hook on the transformer, the prompt and token hooks; all removed on exit."""
    if branch != "cond":
        raise ValueError("an MM-DiT trace records the prompt's branch only (branch='cond')")
    model = pipe.transformer
    cross = _select_layers(model, family.of_model(model).layers(model), layers, "joint-attention")
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
    if family.is_joint(pipe) and words is not None:
        raise ValueError("trace(words=...) is for UNet pipelines; an MM-DiT trace keeps every text token")
    with (install_joint if family.is_joint(pipe) else install)(pipe, rec, layers, branch=branch, cfg=cfg):
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
    if family.is_joint(pipe):
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
