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


def test_one_traced_generation_feeds_records_and_budget(tmp_path, monkeypatch):
    """The joint run (``steps.generation_run``) gives what separate runs give: images equal to
    untraced ones, word records equal to a plain trace's, and each image's attention budget equal to
    its own trace's; the steps asking for fewer images share its batches."""
    from saam import chapter, models, steps
    from saam.capture import trace
    from saam.evaluate import generated_words, records_of
    from saam.sinks import attention_budget
    monkeypatch.setattr(paths, "CACHE", tmp_path)
    p = chapter.load("smoke", "steps=2 n_eval=4 n_sinks=2 batch_size=2 precision=fp32")
    pipe = models.load_model(p)
    scenes = steps.eval_scenes(p, n=4)
    heads = steps.denoiser_heads(pipe)
    per, summary = steps.sink_budget(pipe, p)  # asks for 2 images: makes the run's first batch
    recs, images, _ = steps.records(pipe, p, "generation", heads)
    # untraced, in the same batches of 2 (a batch of 4 may round a last bit differently: AVX2's fp32 kernels do)
    plain = np.concatenate([pipe([s.caption for s in scenes[i:i + 2]], num_inference_steps=2, guidance_scale=p["guidance"],
                                 generator=steps.generators(p, 2, start=i), output_type="np").images for i in (0, 2)])
    np.testing.assert_array_equal(images, (plain * 255).round().astype(np.uint8))
    with trace(pipe) as tc:
        pipe([s.caption for s in scenes[:2]], num_inference_steps=2, guidance_scale=p["guidance"],
             generator=steps.generators(p, 2), output_type="np")
    for i in range(2):
        words, det = generated_words(scenes[i], images[i])
        want = records_of(tc[i], scenes[i].caption, words, i, heads, len(scenes[i].objects))
        got = [r for r in recs if r.image == i]
        assert [r.word for r in got] == [r.word for r in want]
        assert all(np.array_equal(a.maps, b.maps) for a, b in zip(got, want))
    mask = lambda i: np.any([d.mask for d in generated_words(scenes[i], images[i])[1]], axis=0)  # noqa: E731
    import pandas as pd
    alone_budget = pd.concat([attention_budget(tc[i], mask(i)) for i in range(2)])
    alone_budget = alone_budget.groupby(["head", "layer", "block", "region"], sort=False).mean().reset_index()
    pd.testing.assert_frame_equal(per, alone_budget)
    assert len(list((tmp_path / "generation").glob("*.json"))) == 2  # 4 images, batches of 2, each made once


def test_bf16_weights_compute_what_autocast_computes():
    """``models.autocast_bf16`` stores the UNet's linear and convolution weights in bfloat16 once;
    autocast casts exactly those at every call, so the images are the same, bit for bit, as under
    autocast with float32 weights (and not the float32 images: autocast is on). The text states are
    cast once per call too (shown failing once with a float16 cast there)."""
    from saam.models import _autocast, autocast_bf16
    from saam.testing import tiny_pipeline
    out, kinds = {}, {}
    for how in ("fp32", "autocast", "stored"):
        pipe = tiny_pipeline("sd1")
        pipe.set_progress_bar_config(disable=True)
        if how == "autocast":
            pipe.unet.forward = _autocast(pipe.unet.forward, torch.bfloat16)
        elif how == "stored":
            autocast_bf16(pipe.unet)
            assert pipe.unet.conv_in.weight.dtype == torch.bfloat16
            assert all(m.weight.dtype == torch.float32 for m in pipe.unet.modules() if isinstance(m, torch.nn.GroupNorm))
        seen = []  # what the first cross-attention's key projection is handed
        to_k = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2")).to_k
        to_k.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
        out[how] = pipe(["a red cat", "a dog"], num_inference_steps=3, guidance_scale=5.0,
                        generator=torch.Generator().manual_seed(0), output_type="latent").images
        kinds[how] = set(seen)
    assert torch.equal(out["stored"], out["autocast"]) and not torch.equal(out["stored"], out["fp32"])
    # the text states are cast once per call ("stored"), not by autocast at every projection
    assert kinds == {"fp32": {torch.float32}, "autocast": {torch.float32}, "stored": {torch.bfloat16}}


def test_the_reproduction_check_tells_arithmetic_from_a_departure():
    """issue 37: a value just outside its 95 % CI (organism A's binding on an EPYC: 0.906 [0.758, 0.968]
    -> 0.969, two of 32 prompts) is an edge case, not a failure; one outside the family-wise interval is."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("compare_runs", Path(__file__).parents[1] / "scripts" / "compare_runs.py")
    cr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cr)
    assert abs(cr.family_z(93) - 3.46) < 0.01 and abs(cr.family_z(1) - 1.96) < 0.01
    rows = [("a", 0.5, [0.4, 0.6], 0.5), ("b", 0.5, [0.4, 0.6], 0.55), ("binding", 0.906, [0.758, 0.968], 0.969)]
    rows += [(f"x{i}", 0.5, [0.4, 0.6], 0.5) for i in range(89)] + [("far", 0.5, [0.4, 0.6], 0.75)]
    out = {r["name"]: r for r in cr.classify(rows, {"binding": 32})}
    assert [out[n]["cls"] for n in ("a", "b", "binding", "far")] == ["same", "inside", "edge", "departs"]
    assert out["binding"]["flipped"] == 2 and out["binding"]["family"][1] > 0.969
    text = cr.summary(list(out.values()))
    assert "93 values with a CI: 90 identical, 1 inside" in text and "1 departing" in text and "NOT reproduced" in text
    assert "reproduced" == cr.summary([r for r in out.values() if r["name"] != "far"]).splitlines()[-1]
