"""Catching the queries and keys a joint-attention processor hands to its attention kernel.

A processor's ``__call__`` is run as a copy of itself whose globals map ``dispatch_attention_fn``
(diffusers' attention dispatcher: FLUX.1, FLUX.2, Qwen-Image) and ``F`` (torch.nn.functional: SD3's
processor calls scaled_dot_product_attention itself) to the spies below (:func:`_run_spied`).
Nothing outside that one call changes: no torch or diffusers function is replaced, other threads
and models are untouched, and the attention backend a user selected (``model.set_attention_backend``,
``attention_backend``) still runs; only the default ("native") on the CPU runs the same kernel
through a door that also returns the log-sum-exp.
"""
from __future__ import annotations

import contextvars
import types

import torch
import torch.nn.functional as F

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

