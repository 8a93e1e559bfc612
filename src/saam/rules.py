"""Mask-free head selection, pre-registered: three rules written down before any was scored
(``docs/preregistration.md``; issue 36), each computed from HRV's relevance pass alone (its prompts,
its concept words, its traced generations; no masks, no evaluation images, no evaluation words).

Each rule gives one score per (concept, head); top-k takes the k best, as for relevance.

- ``concentration``: relevance x (1 - H / log P). At every vote a head casts, H is the spatial
  entropy of its map of the word of the concept it voted for (its attention to that word's tokens,
  normalised over the P pixels of its layer); the factor is its mean over the votes a head gave the
  concept. A head that attends to a colour word over the whole image scores low.
- ``peak_votes``: HRV's vote, counted at image tokens: at each token the head's vote goes to the
  concept whose word it attends to most there, and counts only if that token is in the top quarter
  (:data:`PEAK_Q`) of the head's map of that word at that step; the counts are normalised as HRV
  normalises its votes (``votes.normalize_votes``).
- ``consensus``: relevance x max(0, r), r the Pearson correlation over pixels of the head's map of the
  concept's words (summed over the steps of one generation) with the mean map of DAAM's heads (every
  head outside the mid block and the layers at 1/8 of the latent), averaged over the prompts.

:class:`RuleStats` collects, per relevance prompt, what the rules need while the pass runs
(``relevance.VoteRecorder`` hands it every probe call); :func:`rule_matrix` turns the stats of any
multiset of prompts (all of them, a bootstrap draw, a subset) into the [concepts, heads] scores.
"""
from __future__ import annotations

import numpy as np
import torch

from .heads import block_of
from .select import DAAM_SKIPS_FACTOR
from .votes import normalize_votes

# rule key -> label (tables and figures), defined once; the order is the registration's
RULES = {"concentration": "rule: concentration x relevance", "peak_votes": "rule: peak votes",
         "consensus": "rule: consensus x relevance"}
PEAK_Q = 0.25  # peak_votes' one setting, fixed at registration
STATS = ("conc", "peak", "consensus")  # the per-prompt arrays (Relevance.prompt_stats), [prompts, heads, concepts]


class RuleStats:
    """Per image of a pipeline call, per head and concept: the summed concentration of the voted
    word's map (``conc``, one term per vote), the peak-token votes (``peak``) and the correlation of
    the head's summed map with DAAM's heads' mean (``consensus``)."""

    def __init__(self, offsets: dict[str, int], n_heads: int):
        self.offsets, self.n_heads = offsets, n_heads

    def start(self, n: int, latent: tuple[int, int]) -> None:
        self.n, self.latent, self.maps, self.acc = n, latent, {}, None

    def add(self, layer: str, maps: torch.Tensor, won: torch.Tensor) -> None:
        """``maps`` [n, heads, pixels, concepts]: the head's attention to each concept's word at each
        pixel (mean over the word's tokens); ``won`` [n, heads]: the concept each head voted for."""
        from .observe import _grid
        n, h, p, c = maps.shape
        if self.acc is None:
            self.acc = {s: torch.zeros(n, self.n_heads, c, dtype=torch.float64) for s in ("conc", "peak")}
        lo = self.offsets[layer]
        m = maps.float()
        # concentration of the voted word's map
        voted = m.gather(3, won[:, :, None, None].expand(n, h, p, 1))[..., 0]  # [n, h, p]
        q = voted / voted.sum(-1, keepdim=True).clamp_min(1e-30)
        ent = -(q * q.clamp_min(1e-30).log()).sum(-1)
        conc = 1 - ent / np.log(p) if p > 1 else torch.zeros_like(ent)
        self.acc["conc"][:, lo:lo + h].scatter_add_(2, won[:, :, None], conc[:, :, None].double())
        # peak votes: each token's winner, kept where the token is in the top quarter of that word's map
        kth = max(1, int(np.ceil(PEAK_Q * p)))
        thr = m.topk(kth, dim=2).values[:, :, -1, :]  # [n, h, c]: the value at the top-quarter boundary
        best, arg = m.max(-1)  # [n, h, p]
        keep = best >= thr.gather(2, arg)
        self.acc["peak"][:, lo:lo + h].scatter_add_(2, arg, keep.double())
        # the head's map of each concept, summed over steps, on its own grid
        gh, gw = _grid(p, self.latent)
        s = m.permute(0, 1, 3, 2).reshape(n, h, c, gh, gw)
        self.maps[layer] = self.maps[layer] + s if layer in self.maps else s.clone()

    def take(self) -> dict[str, np.ndarray]:
        """This call's stats: each [images, heads, concepts] float64; then starts afresh."""
        import torch.nn.functional as F
        lat = self.latent
        up, daam = {}, []
        for layer, s in self.maps.items():  # every map on the latent grid, as DAAM upsamples them
            n, h, c, gh, gw = s.shape
            up[layer] = F.interpolate(s.reshape(n, h * c, gh, gw), size=lat, mode="bilinear",
                                      align_corners=False).reshape(n, h, c, -1)
            if block_of(layer) != "mid" and lat[0] // gh != DAAM_SKIPS_FACTOR:
                daam.append(up[layer])
        if not daam:
            raise ValueError("the consensus rule needs DAAM's heads (outside the mid block, above 1/8 of the latent)")
        ref = torch.cat(daam, 1).mean(1, keepdim=True)  # [n, 1, c, pixels]: DAAM's map of each concept
        ref = ref - ref.mean(-1, keepdim=True)
        r = torch.zeros(self.n, self.n_heads, ref.shape[2], dtype=torch.float64)
        for layer, u in up.items():
            u = u.double()
            x = u - u.mean(-1, keepdim=True)
            sx, sr = x.square().sum(-1), ref.double().square().sum(-1)
            flat = (sx <= 1e-12 * u.square().sum(-1)) | (sr <= 0)  # a constant map (to rounding) has no r: 0
            lo = self.offsets[layer]
            r[:, lo:lo + u.shape[1]] = torch.where(flat, 0.0, (x * ref.double()).sum(-1) / (sx * sr).sqrt().clamp_min(1e-300))
        out = dict(conc=self.acc["conc"].numpy(), peak=self.acc["peak"].numpy(), consensus=r.numpy())
        self.maps, self.acc = {}, None
        return out


def rule_matrix(rel, rule: str, counts: np.ndarray | None = None) -> np.ndarray:
    """A rule's [concepts, heads] scores from the relevance pass's per-prompt votes and stats,
    over the prompts weighted by ``counts`` (default: each once; a bootstrap draw's multiplicities)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; the pre-registered rules are {', '.join(RULES)}")
    if rel.prompt_votes is None or not rel.prompt_stats:
        raise ValueError("the pre-registered rules need the per-prompt statistics of HRV's pass on a UNet or a "
                         "cross-attention DiT (relevance.relevance_pass); published vectors and an MM-DiT's concept "
                         "stream carry none")
    pv = np.asarray(rel.prompt_votes, np.float64)
    w = np.ones(len(pv)) if counts is None else np.asarray(counts, np.float64)
    st = {k: np.tensordot(w, np.asarray(v, np.float64), axes=1) for k, v in rel.prompt_stats.items()}
    if rule == "peak_votes":
        return normalize_votes(st["peak"])
    votes = np.tensordot(w, pv, axes=1)  # [heads, concepts]
    base = normalize_votes(votes).astype(np.float64)
    if rule == "concentration":
        factor = np.where(votes > 0, st["conc"] / np.maximum(votes, 1), 0.0)
    else:
        factor = np.maximum(st["consensus"] / w.sum(), 0.0)
    return (base * factor.T).astype(np.float32)
