"""The joint capture of MM-DiTs (SD3, SD3.5, FLUX.1, FLUX.2, Qwen-Image): a processor that runs a
joint-attention module's own processor and shows the trace's observer each image query's
probability on each text key (the softmax over all keys, as the joint attention takes it) and,
for ConceptAttention, the products of the attention outputs; and the tracker that counts an
MM-DiT's steps and finds its prompt's rows.

The queries and keys are those the processor hands its attention kernel (``saam.spies``).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .headmaps import CaptureError
from .observe import Tracker
from .spies import _run_spied


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
                if tr.observer.outputs:  # ConceptAttention's output space: image outputs . text outputs, per head
                    o = o[r].float()
                    outputs = torch.einsum("nhid,nhtd->nhit", o[:, :, image], o[:, :, text])
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
            self.observer.text_layout(self.prompts, self.family.text_segments(self.pipe, self.text_len))
        self.begin_call(hs.shape[0], latent, t)
