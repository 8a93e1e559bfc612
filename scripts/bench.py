"""Capture and relevance overhead on the ShapesWorld pipeline (CPU), measured side by side,
and the per-notebook times of the last `make all` (build/<profile>/timings.json).

Writes figures/bench-capture.json (overhead_ratio = traced / plain wall time, median of
interleaved repeats; peak RSS overhead at two step counts, to show memory is flat in steps) and
figures/bench-relevance.json (relevance pass / plain generation of the same prompts).
"""
import json
from pathlib import Path
import os
import statistics
import subprocess
import sys
import time

import torch

torch.set_num_threads(2)


def child(mode: str, steps: int) -> None:
    """One warmed-up generation in a fresh process: the RSS it adds above its starting point (MB),
    sampled every 2 ms, and the bytes the trace itself holds."""
    import threading
    import psutil
    from saam.capture import trace
    from saam.shapes.model import load_pipeline
    pipe = load_pipeline()
    prompts = ["a red circle and a small blue square"] * 8
    pipe(prompts, num_inference_steps=2, output_type="np")  # warm-up: allocator and caches
    proc = psutil.Process()
    base = proc.memory_info().rss
    top, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            top[0] = max(top[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=sample)
    th.start()
    stored = 0
    gen = torch.Generator().manual_seed(0)
    if mode == "plain":
        pipe(prompts, num_inference_steps=steps, generator=gen, output_type="np")
    else:
        with trace(pipe) as tc:
            pipe(prompts, num_inference_steps=steps, generator=gen, output_type="np")
        stored = sum(m.numel() * m.element_size() for hm in tc for m in hm.maps.values())
    done.set(); th.join()
    print(json.dumps(dict(added_mb=(top[0] - base) / 2**20, stored_mb=stored / 2**20)))


def peak(mode: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(steps)], check=True,
                         capture_output=True, text=True, env=dict(os.environ)).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    from saam import paths
    from saam.capture import trace
    from saam.relevance import load_concepts, relevance_pass
    from saam.shapes.model import load_pipeline
    from saam.shapes.world import sample_scene
    pipe = load_pipeline()
    steps, repeats = 20, 7
    prompts = [sample_scene(i, split="test").caption for i in range(8)]

    def plain():
        pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")

    def traced():
        with trace(pipe):
            plain()

    def relevance():
        relevance_pass(pipe, load_concepts(), prompts, steps=steps, guidance=7.5, batch_size=8, progress=False)

    def gen_same():  # what the relevance pass generates, without the probe
        pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
             output_type="latent")

    plain(); traced()  # warm-up
    times = {"plain": [], "traced": [], "relevance": [], "gen_same": []}
    for _ in range(repeats):  # interleaved, so drift hits both sides alike
        for name, fn in (("plain", plain), ("traced", traced), ("gen_same", gen_same), ("relevance", relevance)):
            t = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    # each repeat runs both sides back to back: the median of per-repeat ratios cancels drift
    pair = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))
    mem = {s: {m: peak(m, s) for m in ("plain", "traced")} for s in (10, 40)}
    cap = dict(overhead_ratio=pair("traced", "plain"), ratio_of_medians=med["traced"] / med["plain"], plain_s=med["plain"], traced_s=med["traced"],
               steps=steps, images=len(prompts), repeats=repeats, target_ratio=1.05,
               peak_rss_overhead_mb=mem[10]["traced"]["added_mb"] - mem[10]["plain"]["added_mb"],
               peak_rss_overhead_mb_by_steps={str(s): v["traced"]["added_mb"] - v["plain"]["added_mb"]
                                              for s, v in mem.items()},
               trace_stored_mb_by_steps={str(s): v["traced"]["stored_mb"] for s, v in mem.items()},
               device="cpu", threads=torch.get_num_threads())
    rel = dict(overhead_ratio=pair("relevance", "gen_same"), ratio_of_medians=med["relevance"] / med["gen_same"], relevance_s=med["relevance"],
               generation_s=med["gen_same"], steps=steps, images=len(prompts), repeats=repeats, target_ratio=1.5)
    figures = paths.figures_dir("paper")
    figures.mkdir(exist_ok=True)
    (figures / "bench-capture.json").write_text(json.dumps(cap, indent=1))
    (figures / "bench-relevance.json").write_text(json.dumps(rel, indent=1))
    print(f"capture:   traced/plain = {cap['overhead_ratio']:.3f} (target <= 1.05); "
          f"peak RSS overhead {cap['peak_rss_overhead_mb_by_steps']} MB by steps")
    print(f"relevance: pass/generation = {rel['overhead_ratio']:.3f} (target <= 1.5)")
    dit = dit_capture()
    (figures / "bench-dit.json").write_text(json.dumps(dit, indent=1))
    for k, v in dit["models"].items():
        print(f"MM-DiT capture ({k}): traced/plain = {v['overhead_ratio']:.3f} (target <= 1.05); "
              f"concept stream / plain = {v['stream_ratio']:.2f}")
    sys.path.insert(0, str(Path(__file__).parent))
    from run_notebook import timings_report
    for profile in ("paper", "smoke"):
        if (paths.BUILD / profile / "timings.json").exists():
            print("last make all, " + timings_report(paths.BUILD / profile))


# MM-DiTs whose blocks have the released models' widths (SD3 Medium: 24 heads of 64; Flux: heads of 128,
# 12 of its 24), fewer of them, at 1,024 image tokens, random weights (none can be downloaded here)
DIT_BENCH = {"sd3": dict(sample_size=64, num_layers=4, attention_head_dim=64, num_attention_heads=24,
                         caption_projection_dim=1536, pos_embed_max_size=64),
             "flux": dict(num_layers=2, num_single_layers=2, attention_head_dim=128, num_attention_heads=12,
                          axes_dims_rope=(16, 56, 56))}


def dit_capture(steps: int = 4, repeats: int = 5) -> dict:
    """The trace's cost on MM-DiTs (traced / plain wall time of the same generation, median of
    interleaved per-repeat ratios) and the concept stream's (relevance pass / plain)."""
    from saam.capture import trace
    from saam.relevance import relevance_pass
    from saam.testing import tiny_dit_pipeline
    out = {}
    for kind, cfg in DIT_BENCH.items():
        pipe = tiny_dit_pipeline(kind, **cfg)
        pipe.set_progress_bar_config(disable=True)
        run = dict(num_inference_steps=steps, guidance_scale=5.0, height=128, width=128, max_sequence_length=64,
                   output_type="latent")
        prompt = "a red circle next to a small blue square"

        def plain():
            pipe(prompt, generator=torch.Generator().manual_seed(0), **run)

        def traced():
            with trace(pipe):
                plain()

        def stream():
            relevance_pass(pipe, {"color": ["red", "blue"], "shape": ["circle", "square"]}, [prompt], steps=steps,
                           guidance=5.0, batch_size=1, height=128, width=128, max_sequence_length=64, progress=False)
        plain(); traced()  # warm-up
        times = {"plain": [], "traced": [], "stream": []}
        for _ in range(repeats):
            for name, fn in (("plain", plain), ("traced", traced), ("stream", stream)):
                t = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t)
        pair = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
        out[kind] = dict(overhead_ratio=pair("traced", "plain"), stream_ratio=pair("stream", "plain"),
                         plain_s=statistics.median(times["plain"]), transformer=cfg, image_tokens=1024)
    return dict(models=out, steps=steps, repeats=repeats, target_ratio=1.05, device="cpu", threads=torch.get_num_threads())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
