"""HRV's vote, counted once: the UNet pass (``saam.relevance``) and the concept stream on MM-DiTs
(``saam.stream``) both hand each step's per-head concept scores to a :class:`VoteCounter`."""
from __future__ import annotations

import numpy as np
import torch

from .heads import forward_order, head_ids


class VoteCounter:
    """HRV's vote, counted once for both passes (this module's on UNets and cross-attention DiTs,
    ``saam.stream``'s concept stream on MM-DiTs): at each step, every (image, head) gives one vote to
    the concept it scores highest. Heads are numbered in HRV's order (``heads.head_ids``), each
    layer's from its offset in the forward order."""

    def __init__(self, layers: dict[str, object]):
        lh = {l: m.heads for l, m in layers.items()}
        self.heads = head_ids(lh)
        self.offset, o = {}, 0
        for l in forward_order(lh):
            self.offset[l], o = o, o + lh[l]
        self.votes: dict[int, torch.Tensor] = {}  # step -> [images of the current call, heads, concepts]
        self.timesteps: dict[int, int] = {}
        self._n, self._step = 0, 0

    def start(self, n: int) -> None:
        """A pipeline call of ``n`` images: its votes start afresh."""
        self.votes, self.timesteps, self._n = {}, {}, n

    def step(self, index: int, timestep) -> None:
        self._step, self.timesteps[index] = index, timestep

    def vote(self, layer: str, scores: torch.Tensor, images=slice(None)) -> None:
        """``scores`` [images, heads of ``layer``, concepts]: each head's vote goes to its argmax."""
        won = torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).cpu().to(torch.int16)
        v = self.votes.setdefault(self._step, torch.zeros(self._n, len(self.heads), scores.shape[-1], dtype=torch.int16))
        lo = self.offset[layer]
        v[images, lo:lo + won.shape[-2]] += won

    def take(self) -> dict:
        """The votes of the pipeline call just made: ``votes`` [images, steps, heads, concepts] (int16)
        and the ``timesteps`` of the steps; then starts afresh."""
        order = sorted(self.votes)
        out = dict(votes=torch.stack([self.votes[s] for s in order], 1).numpy(),
                   timesteps=[self.timesteps[s] for s in order])
        self.votes, self.timesteps = {}, {}
        return out


def normalize_votes(votes: np.ndarray) -> np.ndarray:
    """[..., heads, concepts] vote counts -> [concepts, heads] relevance, rows summing to H."""
    v = np.asarray(votes, dtype=np.float64)
    if v.ndim > 2:
        v = v.reshape(-1, *v.shape[-2:]).sum(0)
    h = v.shape[0]
    frac = v / np.maximum(v.sum(1, keepdims=True), 1e-12)  # per head: share of pairs won
    col = frac.sum(0, keepdims=True)                        # per concept
    rel = np.where(col > 0, frac / np.maximum(col, 1e-12) * h, 0.0)
    return rel.T.astype(np.float32)
