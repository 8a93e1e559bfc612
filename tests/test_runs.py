"""Batched runs: one generator across batches, per-batch cache entries shared by prefixes."""
import random

import numpy as np
import torch

from saam import paths
from saam.runs import run_batches


def _fn(calls, rng=None):
    def fn(batch, gen, start):
        calls.append(start)
        noise = torch.rand(len(batch), generator=gen).numpy()
        extra = np.array([rng.random() for _ in batch]) if rng else 0
        return np.array(batch) + noise + extra
    return fn


def test_batches_equal_one_loop_and_prefixes_reuse_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE", tmp_path)
    items = list(range(10))
    calls: list = []
    plain = np.concatenate(run_batches(items, 4, 0, _fn(calls)))
    one_loop = np.array(items) + torch.cat([torch.rand(n, generator=g) for g in [torch.Generator().manual_seed(0)]
                                            for n in (4, 4, 2)]).numpy()
    np.testing.assert_array_equal(plain, one_loop)

    calls.clear()
    short = run_batches(items[:8], 4, 0, _fn(calls), cache=("t", dict(a=1)))
    assert calls == [0, 4]
    calls.clear()
    full = run_batches(items, 4, 0, _fn(calls), cache=("t", dict(a=1)))
    assert calls == [8]  # the first two batches came from the shorter run's entries
    np.testing.assert_array_equal(np.concatenate(full), plain)
    np.testing.assert_array_equal(np.concatenate(short), plain[:8])
    calls.clear()
    run_batches(items, 4, 1, _fn(calls), cache=("t", dict(a=1)))  # another seed: nothing shared
    run_batches(items[1:], 4, 0, _fn(calls), cache=("t", dict(a=1)))  # other items: nothing shared
    assert calls == [0, 4, 8, 0, 4, 8]


def test_an_interrupted_run_resumes_with_every_random_source_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE", tmp_path)
    items = list(range(9))
    want = np.concatenate(run_batches(items, 3, 0, _fn([], rng := random.Random(5)), states=[rng]))

    def dies_at_6(batch, gen, start):
        if start == 6:
            raise KeyboardInterrupt
        return inner(batch, gen, start)
    rng, calls = random.Random(5), []
    inner = _fn(calls, rng)
    try:
        run_batches(items, 3, 0, dies_at_6, cache=("t", {}), states=[rng])
    except KeyboardInterrupt:
        pass
    rng, calls = random.Random(5), []
    got = np.concatenate(run_batches(items, 3, 0, _fn(calls, rng), cache=("t", {}), states=[rng]))
    assert calls == [6]
    np.testing.assert_array_equal(got, want)

