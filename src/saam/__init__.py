"""saam: selectively aggregated attention maps for diffusion models.

Capture per-head cross-attention maps from any UNet-based diffusers pipeline, score heads by
concept relevance (HRV-style), and aggregate a word's map over a chosen set of heads. DAAM's
average over all heads is one preset of the same aggregation.
"""
__version__ = "0.1.0"
