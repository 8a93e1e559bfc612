"""Batched pipeline runs: every item its own seeded random stream, each batch cached, batches
shared between processes.

Every experiment that generates (fidelity, relevance votes, traced records, attention budgets)
runs its items through :func:`run_batches`. Item ``i`` of a run seeded with ``seed`` draws its
initial noise from its own CPU generator seeded with ``item_seed(seed, i)`` (diffusers takes one
generator per image), and whatever else it draws (HRV's word draws) from a ``random.Random`` seeded
the same way. So an item's result does not depend on the batch it is in or on which process
made it: a GPU user at batch 16 and a CPU user at batch 4 get the same images, up to the kernels'
own floating-point differences between batch sizes. With ``cache`` given, each batch is its own
cache entry, keyed by the step's key, the batch size, the batch's items, the seed and its start.
Hence:

- a run that asks for a prefix of an earlier run's items (the organism ablation's 64 captions of
  the paper's 160, with the same seed and batch size) reuses those batches instead of generating;
- an interrupted run resumes at its first unfinished batch, losing nothing;
- under ``accelerate launch`` (several GPUs or processes) process ``r`` of ``n`` makes the batches
  ``r, r + n, ...``, writes each atomically, waits for the others and reads them all: every
  process returns the same list as one process would.
"""
from __future__ import annotations

import hashlib
import os
import random
from typing import Callable, Sequence

from .cache import cached, digest


def item_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` in a run seeded with ``seed`` (63 bits of a hash of both)."""
    return int.from_bytes(hashlib.sha256(f"saam:{seed}:{index}".encode()).digest()[:8], "little") >> 1


def generators(seed: int, start: int, n: int) -> list:
    """One seeded CPU ``torch.Generator`` per item ``start .. start + n - 1`` (the same images on any
    device)."""
    import torch  # here, so that the notebook runner (which asks only for ``processes``) starts fast
    return [torch.Generator("cpu").manual_seed(item_seed(seed, start + i)) for i in range(n)]


def item_rngs(seed: int, start: int, n: int) -> list[random.Random]:
    """One seeded ``random.Random`` per item, for draws other than the initial noise."""
    return [random.Random(item_seed(seed, start + i)) for i in range(n)]


def processes() -> tuple[int, int]:
    """(this process's rank, number of processes) under ``accelerate launch`` / torchrun; (0, 1) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def _group():
    from accelerate import PartialState  # NCCL between GPUs, gloo between CPU processes
    import torch
    return PartialState(cpu=not torch.cuda.is_available())


def check_group(state, rank: int, world: int) -> None:
    """The process group ``state`` (accelerate's) is the one ``RANK`` / ``WORLD_SIZE`` describe: a
    process that joined no group would take rank 0's batches and write rank 0's outputs beside the
    real rank 0 (seen where a launcher set the variables but the group fell back to one process)."""
    got = (int(state.process_index), int(state.num_processes))
    if got != (rank, world):
        raise RuntimeError(f"this process is rank {rank} of {world} by RANK / WORLD_SIZE, but its process group "
                           f"says rank {got[0]} of {got[1]}: it would duplicate another rank's work and outputs. "
                           "Start it with `accelerate launch --num_processes N` or torchrun, or unset WORLD_SIZE")


def _barrier() -> None:
    _group().wait_for_everyone()


# batches this process generated (cache misses) per cache name: what the several-process test counts
GENERATED: dict[str, int] = {}


def run_batches(items: Sequence, batch_size: int, seed: int, fn: Callable, *, cache: tuple[str, dict] | None = None,
                desc: str | None = None) -> list:
    """``fn(batch, generators, start)`` for consecutive batches of ``items``; the list of its results.

    Args:
        batch_size: items per pipeline call (a positive int).
        seed: the run's seed; ``generators`` holds one CPU generator per item of the batch, seeded
            with ``item_seed(seed, start + j)``; ``start`` is the batch's first item index.
        cache: (name, key) to cache each batch under; None runs without a cache (and in one process).
        desc: a progress bar's label (None: no bar).
    """
    from .progress import bar
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    starts = list(range(0, len(items), batch_size))
    rank, world = processes() if cache is not None else (0, 1)
    if world > 1:
        check_group(_group(), rank, world)

    def one(start):
        batch = items[start:start + batch_size]
        if cache is None:
            return fn(batch, generators(seed, start, len(batch)), start)
        name, key = cache

        def make():
            GENERATED[name] = GENERATED.get(name, 0) + 1
            return fn(batch, generators(seed, start, len(batch)), start)
        return cached(name, dict(key, batch_size=batch_size, start=start, items=digest(list(batch)), seed=seed), make)

    mine = starts[rank::world]
    out = {s: one(s) for s in bar(mine, desc=desc, disable=desc is None)}
    if world > 1:
        _barrier()  # the other processes' batches are in the cache now
        out = {s: out[s] if s in out else one(s) for s in starts}
    return [out[s] for s in starts]
