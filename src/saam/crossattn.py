"""The UNet capture (and PixArt's cross-attention DiT): a processor that runs a cross-attention
module's own processor and shows the trace's observer the queries and keys it projected.

- :func:`project`, :func:`keys`, :func:`probs`: a diffusers ``Attention`` module's projections and
  softmax, as its processor forms them (HRV's relevance pass reuses them on its pseudo-context).
- :class:`CaptureProcessor`: the wrapper ``saam.capture.install`` puts on every traced module.
"""
from __future__ import annotations

import inspect

import torch


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

    def __init__(self, base, layer: str, tracker):  # tracker: a saam.observe.Tracker
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

