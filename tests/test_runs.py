"""Batched runs: every item its own random stream, per-batch cache entries shared by prefixes."""
import numpy as np
import pytest
import torch

from saam import paths
from saam.runs import item_seed, run_batches


def _fn(calls):
    def fn(batch, gens, start):
        calls.append(start)
        assert len(gens) == len(batch)
        return np.array(batch) + np.array([torch.rand(1, generator=g).item() for g in gens])
    return fn


def test_results_do_not_depend_on_the_batch_size():
    items = list(range(10))
    by = {b: np.concatenate(run_batches(items, b, 0, _fn([]))) for b in (1, 3, 4, 10)}
    want = np.array(items) + np.array([torch.rand(1, generator=torch.Generator().manual_seed(item_seed(0, i))).item()
                                       for i in items])
    for b, got in by.items():
        np.testing.assert_array_equal(got, want, err_msg=f"batch size {b}")
    assert len({item_seed(0, i) for i in range(1000)} | {item_seed(1, i) for i in range(1000)}) == 2000
    with pytest.raises(ValueError, match="positive integer"):
        run_batches(items, 0, 0, _fn([]))


def test_prefixes_reuse_the_cache_and_an_interrupted_run_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE", tmp_path)
    items = list(range(10))
    plain = np.concatenate(run_batches(items, 4, 0, _fn([])))
    calls: list = []
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

    inner_calls: list = []
    inner = _fn(inner_calls)

    def dies_at_6(batch, gens, start):
        if start == 6:
            raise KeyboardInterrupt
        return inner(batch, gens, start)
    with pytest.raises(KeyboardInterrupt):
        run_batches(items[:9], 3, 0, dies_at_6, cache=("u", {}))
    calls.clear()
    got = np.concatenate(run_batches(items[:9], 3, 0, _fn(calls), cache=("u", {})))
    assert calls == [6]
    np.testing.assert_array_equal(got, np.concatenate(run_batches(items[:9], 3, 0, _fn([]))))


def test_relevance_votes_do_not_depend_on_the_batch_size(sd1):
    """HRV draws words per image (its batch is 1): a batch of 6 gives the votes of 6 batches of 1."""
    from saam.relevance import relevance_pass
    concepts = {"Color": ["red", "blue", "green"], "Animals": ["cat", "dog", "bird"], "Brands": ["McDonald's", "Coca-Cola"]}
    prompts = ["a red cat", "a dog", "a tree", "the man's car", "a blue bird!!!", "it isn't green"]
    one = relevance_pass(sd1, concepts, prompts, steps=2, batch_size=1, progress=False)
    six = relevance_pass(sd1, concepts, prompts, steps=2, batch_size=6, progress=False)
    np.testing.assert_array_equal(one.prompt_votes, six.prompt_votes)
    np.testing.assert_array_equal(one.votes, six.votes)
    other = relevance_pass(sd1, concepts, prompts, steps=2, batch_size=6, seed=1, progress=False)
    assert not np.array_equal(other.prompt_votes, six.prompt_votes)  # the seed matters
