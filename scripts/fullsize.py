"""Full-size checks: the released SD v1.4, v2.1 and SDXL architectures (random weights, built offline
by ``saam.testing.full_size_pipeline``) at their native resolution, in fp32 and bf16 on the CPU.

For every model and dtype, a few denoising steps of one prompt with classifier-free guidance:

- ``identical``: the traced latents equal the untraced ones bit for bit (default processors);
- ``max_abs_diff``: per-head maps (mean over steps) against the probabilities diffusers' own
  ``Attention.get_attention_scores`` forms for each cross-attention module in the same run, checked
  with ``torch.testing.assert_close``'s default tolerances for the dtype;
- ``trace_mb_all_tokens_fp32`` / ``trace_mb_words_fp16``: the trace's memory per image, all 77
  tokens in fp32 against ten words in fp16 (``trace(words=..., dtype=torch.float16)``);
- ``bf16_vs_fp32``: the Pearson r and largest difference of DAAM word maps (min-max normalised)
  between the bf16 and fp32 runs of the same weights and noise.

And for SD v1.4 in fp32, traced / plain time (median of paired, interleaved runs). fp16 is run
only where the CPU has native half-precision arithmetic (AVX512-FP16 / AMX-FP16). Writes
figures/bench-fullsize.json. ``--tiny`` runs the same code on the tiny pipelines (seconds; tested).

    python scripts/fullsize.py                       # all three models (about 30 min on 2 cores)
    python scripts/fullsize.py --models sd14 --steps 2
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

PROMPT = "a photo of a cat and a dog on a red sofa next to a green lamp in a wooden room"
WORDS = ["photo", "cat", "dog", "red", "sofa", "next", "green", "lamp", "wooden", "room"]
TINY = {"sd14": "sd14-layout", "sd21": "sd2", "sdxl": "sdxl-layout"}


def native_fp16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return " avx512_fp16" in flags or " amx_fp16" in flags


def run(pipe, steps: int, size: int, seed: int = 0) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                generator=torch.Generator().manual_seed(seed), output_type="latent").images


def word_maps(tc) -> dict[str, torch.Tensor]:
    from saam.aggregate import normalize, word_map
    return {w: normalize(word_map(tc[0], w)).flatten() for w in WORDS}


def check(pipe, kind: str, dtype: torch.dtype, steps: int, size: int) -> tuple[dict, dict]:
    from saam.capture import trace
    from saam.testing import as_probs, diffusers_attention_probs
    t = time.perf_counter()
    plain = run(pipe, steps, size)
    step_s = (time.perf_counter() - t) / steps
    with trace(pipe, words=WORDS, dtype=torch.float16) as few:
        traced = run(pipe, steps, size)
    with diffusers_attention_probs(pipe) as ref, trace(pipe) as full:
        run(pipe, steps, size)
    hm = full[0]
    worst, n_values = 0.0, 0
    for layer, r in ref.items():
        ours, theirs = as_probs(hm.maps[layer]) / hm.steps, r[1] / hm.steps  # the conditional row
        torch.testing.assert_close(ours.to(dtype), theirs.to(dtype), msg=lambda m: f"{kind} {dtype} {layer}: {m}")
        worst, n_values = max(worst, float((ours - theirs).abs().max())), n_values + ours.numel()
    out = dict(identical=bool(torch.equal(plain, traced)), max_abs_diff=worst, values_compared=n_values,
               tolerance="torch.testing.assert_close defaults for the dtype", seconds_per_step=step_s,
               heads=sum(hm.layer_heads.values()), layers=len(hm.maps),
               trace_mb_all_tokens_fp32=hm.nbytes / 1e6, trace_mb_words_fp16=few[0].nbytes / 1e6,
               words=len(WORDS), word_tokens=len(few[0].tokens))
    return out, word_maps(full)


def overhead(pipe, steps: int, size: int, repeats: int) -> dict:
    from saam.capture import trace
    times: dict[str, list[float]] = {"plain": [], "traced": []}
    run(pipe, 1, size)  # warm-up
    for _ in range(repeats):
        for name in ("plain", "traced"):
            t = time.perf_counter()
            if name == "plain":
                run(pipe, steps, size)
            else:
                with trace(pipe):
                    run(pipe, steps, size)
            times[name].append(time.perf_counter() - t)
    ratios = [a / b for a, b in zip(times["traced"], times["plain"])]
    return dict(overhead_ratio=statistics.median(ratios), ratios=ratios, plain_s=statistics.median(times["plain"]),
                traced_s=statistics.median(times["traced"]), steps=steps, repeats=repeats, target_ratio=1.03)


def main(argv=None) -> None:
    from diffusers.utils import logging as dlog
    from saam import paths
    from saam.testing import FULL_SIZE, full_size_pipeline, tiny_pipeline
    dlog.set_verbosity_error()  # "modules that should be kept in float32: []" at every cast
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["sd14", "sd21", "sdxl"], choices=sorted(FULL_SIZE))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="paired runs for SD v1.4's traced/plain time")
    ap.add_argument("--tiny", action="store_true", help="the tiny pipelines instead (a quick check of this script)")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                    help="only these (default: fp32, bf16, and fp16 where the CPU has it)")
    ap.add_argument("--merge", action="store_true", help="update these models' entries in an existing --out file")
    ap.add_argument("--out", default=str(paths.figures_dir("paper") / "bench-fullsize.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if native_fp16() else [])
    if a.dtypes:
        dtypes = [getattr(torch, d) for d in a.dtypes]
    report = dict(prompt=PROMPT, steps=a.steps, threads=torch.get_num_threads(), device="cpu", tiny=a.tiny,
                  fp16="run" if native_fp16() else "skipped: no native fp16 arithmetic on this CPU", models={})
    if a.merge and Path(a.out).exists():
        old = json.loads(Path(a.out).read_text())
        report["models"] = old["models"]
    for kind in a.models:
        t = time.perf_counter()
        pipe = tiny_pipeline(TINY[kind]) if a.tiny else full_size_pipeline(kind)
        pipe.set_progress_bar_config(disable=True)
        size = 64 if a.tiny else FULL_SIZE[kind]["size"]
        entry = dict(size=size, build_s=time.perf_counter() - t,
                     unet_params=sum(p.numel() for p in pipe.unet.parameters()))
        ref_maps = None
        for dtype in dtypes:
            pipe.to(dtype=dtype)
            res, maps = check(pipe, kind, dtype, a.steps, size)
            name = str(dtype).replace("torch.", "")
            if ref_maps is None:
                ref_maps = maps
            else:
                r = [float(torch.corrcoef(torch.stack([ref_maps[w], maps[w]]))[0, 1]) for w in WORDS]
                res["vs_float32"] = dict(min_pearson_r=min(r), median_pearson_r=statistics.median(r),
                                         max_abs_diff=max(float((ref_maps[w] - maps[w]).abs().max()) for w in WORDS))
            entry[name] = res
            print(f"{kind} {name} {size}px: identical={res['identical']} max|diff|={res['max_abs_diff']:.2e} "
                  f"trace {res['trace_mb_all_tokens_fp32']:.1f} MB (77 tokens fp32) -> "
                  f"{res['trace_mb_words_fp16']:.1f} MB ({len(WORDS)} words fp16), {res['seconds_per_step']:.1f} s/step"
                  + (f", {name} vs float32 word maps r >= {res['vs_float32']['min_pearson_r']:.3f}" if "vs_float32" in res else ""),
                  flush=True)
        if kind == "sd14":
            pipe.to(dtype=torch.float32)
            entry["overhead_float32"] = overhead(pipe, a.steps, size, a.repeats)
            print(f"sd14 float32 traced/plain = {entry['overhead_float32']['overhead_ratio']:.3f} (target <= 1.03)")
        report["models"][kind] = {**report["models"].get(kind, {}), **entry}
        del pipe
        gc.collect()
    if not all(m[d]["identical"] for m in report["models"].values() for d in m if isinstance(m[d], dict) and "identical" in m[d]):
        raise SystemExit("a traced run differs from the untraced one")
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
