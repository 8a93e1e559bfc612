"""Head ids, layer names and the orderings used by HRV and DAAM.

A layer is a cross-attention module, named by its diffusers module path
(``up_blocks.1.attentions.0.transformer_blocks.0.attn2``; in an MM-DiT a joint-attention module,
``transformer_blocks.3.attn`` or Flux's single-stream ``single_transformer_blocks.5.attn``); a head
is ``(layer, index)``.
Those names are stable across diffusers releases and pipelines, unlike positional indices.
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple

BLOCKS = ("down", "mid", "up", "transformer", "single")  # UNet blocks, then MM-DiT joint and single-stream blocks


class HeadId(NamedTuple):
    layer: str
    head: int

    def __str__(self) -> str:
        return f"{self.layer}[{self.head}]"


def block_of(layer: str) -> str:
    """'down', 'mid' or 'up' for a UNet module path; 'transformer' (SD3's joint blocks, Flux's
    double-stream ones) or 'single' (Flux's single-stream blocks) for an MM-DiT's."""
    for b in BLOCKS:
        if layer.startswith(b):
            return b
    raise ValueError(f"{layer!r} is not in a UNet down/mid/up block nor an MM-DiT transformer block")


def layer_factors(unet_config, layers: Iterable[str]) -> dict[str, int]:
    """How far each layer's maps are downsampled from the latent (1, 2, 4, ...), from the UNet's
    config alone (``unet.config`` or its ``config.json`` as a dict).

    A diffusers ``UNet2DConditionModel`` halves the resolution after every down block but the last
    and doubles it after every up block but the last, so ``down_blocks.i`` runs at ``2**i``, the mid
    block at ``2**(n-1)`` and ``up_blocks.j`` at ``2**(n-1-j)`` for ``n`` blocks. DAAM's layer
    rule (``saam.select.eligible``) reads this.
    """
    n = len(unet_config["down_block_types"])
    if len(unet_config["up_block_types"]) != n:
        raise ValueError("a UNet with different numbers of down and up blocks is not a diffusers UNet2DConditionModel")
    out = {}
    for layer in layers:
        b, i = block_of(layer), _numbers(layer)
        out[layer] = 2 ** (i[0] if b == "down" else n - 1 if b == "mid" else n - 1 - i[0])
    return out


def _numbers(layer: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", layer))


def forward_order(layers: Iterable[str]) -> list[str]:
    """Layers in forward order: down blocks, mid block, up blocks (HRV's order); an MM-DiT's blocks
    in order, Flux's double-stream before its single-stream ones."""
    return sorted(layers, key=lambda n: (BLOCKS.index(block_of(n)), _numbers(n)))


def order(layers: Iterable[str], convention: str = "hrv") -> list[str]:
    """Layer ordering by convention.

    ``hrv``: down, mid, up in forward order (HRV's published head index).
    ``daam``: up blocks first, then down, then mid (the order DAAM collects heat maps in).
    """
    fwd = forward_order(layers)
    if convention == "hrv":
        return fwd
    if convention == "daam":
        rank = {"up": 0, "down": 1, "mid": 2}
        return sorted(fwd, key=lambda n: rank.get(block_of(n), 3))  # stable: keeps forward order within
    raise ValueError(f"unknown convention {convention!r}; use 'hrv' or 'daam'")


def head_ids(layer_heads: dict[str, int], convention: str = "hrv") -> list[HeadId]:
    """All heads, flattened in a convention's layer order (the flat index is a head's position)."""
    return [HeadId(l, h) for l in order(layer_heads, convention) for h in range(layer_heads[l])]


def parse_hrv_name(name: str) -> tuple[str, int, int]:
    m = re.fullmatch(r"\s*(down|mid|up),\s*layer:\s*(\d+),\s*head:\s*(\d+)\s*", str(name))
    if not m:
        raise ValueError(f"not an HRV head name: {name!r} (expected e.g. 'up, layer: 8, head: 3')")
    return m.group(1), int(m.group(2)), int(m.group(3))


def from_hrv_names(names: Iterable[str], layer_heads: dict[str, int]) -> list[HeadId]:
    """Map HRV head names onto this UNet's heads; an unknown name is an error, not a skip."""
    by_block: dict[str, list[str]] = {b: [] for b in BLOCKS}
    for l in forward_order(layer_heads):
        by_block[block_of(l)].append(l)
    out = []
    for n in names:
        b, li, h = parse_hrv_name(n)
        if li >= len(by_block[b]) or h >= layer_heads[by_block[b][li]]:
            raise ValueError(f"HRV head {n!r} does not exist in this UNet "
                             f"({len(by_block[b])} {b} layers)")
        out.append(HeadId(by_block[b][li], h))
    return out
