"""saam: selectively aggregated attention maps for diffusion models.

Capture per-head cross-attention maps from diffusers pipelines (UNets, MM-DiTs, PixArt), score heads by
concept relevance (HRV-style), and aggregate a word's map over a chosen set of heads. DAAM's
average over the heads it hooks is one preset of the same aggregation.

    from saam import trace, word_map, load_published, eligible, head_set

The names below are what the README's snippet uses; each lives in the module named beside it
(imported on first use, so ``import saam`` stays light).
"""
__version__ = "0.1.0"

_EXPORTS = {"trace": "capture", "HeadMaps": "headmaps", "word_map": "aggregate", "word_mask": "aggregate",
            "load_published": "relevance", "relevance_pass": "relevance", "load_concepts": "relevance", "Relevance": "relevance", "head_set": "select", "eligible": "select",
            "METHODS": "select", "normalize": "aggregate", "to_mask": "aggregate",
            "plot_overlay": "plots", "resolve": "models"}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'saam' has no attribute {name!r}")
