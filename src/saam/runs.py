"""Batched pipeline runs: one seeded generator over consecutive batches, each batch cached.

Every experiment that generates (fidelity, relevance votes, traced records, attention budgets)
runs its items through :func:`run_batches`. The CPU generator is seeded once and carried from
batch to batch, so the results equal one long loop. With ``cache`` given, each batch is its own
cache entry, keyed by the step's key, the batch's items and the random state the batch starts
from, and it stores the state it ends in. Hence:

- a run that asks for a prefix of an earlier run's items (the organism ablation's 64 captions of
  the paper's 160, with the same seed and batch size) reuses those batches instead of generating;
- an interrupted run resumes at its first unfinished batch, losing nothing.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import numpy as np
import torch

from .cache import cached, digest


def _get(states) -> list:
    out = []
    for s in states:
        if isinstance(s, torch.Generator):
            out.append(s.get_state().numpy().copy())
        else:
            version, words, gauss = s.getstate()
            out.append(dict(version=version, words=np.array(words, np.int64), gauss=gauss))
    return out


def _set(states, values) -> None:
    for s, v in zip(states, values):
        if isinstance(s, torch.Generator):
            s.set_state(torch.from_numpy(np.asarray(v, np.uint8).copy()))
        else:
            s.setstate((v["version"], tuple(int(w) for w in v["words"]), v["gauss"]))


def run_batches(items: Sequence, batch_size: int, seed: int, fn: Callable, *, cache: tuple[str, dict] | None = None,
                states: Sequence[random.Random] = (), desc: str | None = None) -> list:
    """``fn(batch, generator, start)`` for consecutive batches of ``items``; the list of its results.

    Args:
        seed: seeds the CPU ``torch.Generator`` handed to every batch.
        cache: (name, key) to cache each batch under; None runs without a cache.
        states: further random sources ``fn`` draws from (``random.Random``), carried across
            batches and cached like the generator.
        desc: a progress bar's label (None: no bar).
    """
    from .progress import bar
    gen = torch.Generator("cpu").manual_seed(seed)
    sources = [gen, *states]
    out = []
    starts = range(0, len(items), batch_size)
    for start in bar(starts, desc=desc, disable=desc is None):
        batch = items[start:start + batch_size]
        if cache is None:
            out.append(fn(batch, gen, start))
            continue

        def compute():
            res = fn(batch, gen, start)
            return dict(result=res, end=_get(sources))
        name, key = cache
        entry = cached(name, dict(key, batch_size=batch_size, start=start, items=digest(list(batch)),
                                  state=digest(_get(sources))), compute)
        _set(sources, entry["end"])
        out.append(entry["result"])
    return out
