"""Capture and relevance overhead on the ShapesWorld pipeline (CPU), measured side by side,
the measured cold `make all` times with their machines (``saam.profiles.MEASURED_RUNS``), and the
per-notebook times of the last `make all` here, with the machine and arithmetic each chapter ran on
(build/<profile>/timings.json).

Writes figures/bench-capture.json (overhead_ratio = traced / plain wall time, median of
interleaved repeats; peak RSS overhead at two step counts, to show memory is flat in steps),
figures/bench-relevance.json (relevance pass / plain generation of the same prompts),
figures/bench-dit.json (the same on MM-DiTs) and figures/bench-allocator.json (the paper profile's
batch under glibc's malloc and under tcmalloc, which `make all` preloads where the system has it).
`python scripts/bench.py allocator` runs the last one alone.
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


def batch_child() -> None:
    """One paper-profile batch (32 images, 10 steps; warm-up, then 3 timed) in a fresh process: its
    times, the page faults it took, and a hash of its latents (equal under either allocator)."""
    import hashlib
    import resource
    from saam import chapter, steps
    from saam.models import load_model
    p = chapter.load("paper")
    pipe = load_model(p)
    caps = [s.caption for s in steps.eval_scenes(p, "test", 32)]

    def run():
        return pipe(caps, num_inference_steps=10, guidance_scale=p["guidance"], generator=steps.generators(p, 32),
                    output_type="latent").images
    run()
    faults, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(3):
        t = time.perf_counter(); lat = run(); times.append(time.perf_counter() - t)
    print(json.dumps(dict(s=statistics.median(times), faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                          latents=hashlib.sha256(lat.float().numpy().tobytes()).hexdigest()[:16])))


def allocator(repeats: int = 4) -> dict | None:
    """glibc's malloc against tcmalloc (the Makefile's TCMALLOC) on the same batch, one fresh process
    each, alternating; the median of per-repeat time ratios. None where the system has no tcmalloc."""
    lib = subprocess.run(["make", "-s", "--no-print-directory", "-f", "Makefile", "print-tcmalloc"], capture_output=True,
                         text=True, cwd=Path(__file__).parents[1]).stdout.strip()
    if not lib:
        print("allocator: no tcmalloc on this system (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")
        return None
    runs = {"glibc": [], "tcmalloc": []}
    for _ in range(repeats):
        for name, pre in (("glibc", ""), ("tcmalloc", lib)):
            env = dict(os.environ, LD_PRELOAD=pre)
            out = subprocess.run([sys.executable, __file__, "--batch"], check=True, capture_output=True, text=True,
                                 env=env).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    ratio = statistics.median(a["s"] / b["s"] for a, b in zip(runs["glibc"], runs["tcmalloc"]))
    same = len({r["latents"] for v in runs.values() for r in v}) == 1
    res = dict(glibc_over_tcmalloc=ratio, same_latents=same, library=lib, repeats=repeats,
               batch="paper profile, 32 images, 10 steps, median of 3 per process",
               glibc_s=[r["s"] for r in runs["glibc"]], tcmalloc_s=[r["s"] for r in runs["tcmalloc"]],
               glibc_faults=statistics.median(r["faults"] for r in runs["glibc"]),
               tcmalloc_faults=statistics.median(r["faults"] for r in runs["tcmalloc"]))
    print(f"allocator: glibc / tcmalloc time = {ratio:.3f}; page faults per 3 batches {res['glibc_faults']:,.0f} "
          f"against {res['tcmalloc_faults']:,.0f}; latents identical: {same}")
    return res


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
    alloc = allocator()
    if alloc:
        (figures / "bench-allocator.json").write_text(json.dumps(alloc, indent=1))
    sys.path.insert(0, str(Path(__file__).parent))
    from run_notebook import timings_report
    from saam.profiles import measured_runs
    print("cold make all of the paper profile, as measured (saam.profiles.MEASURED_RUNS; docs/performance.md):")
    for line in measured_runs():
        print("  " + line)
    for profile in ("paper", "smoke"):
        if (paths.BUILD / profile / "timings.json").exists():
            print("last make all here, " + timings_report(paths.BUILD / profile))


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
    elif len(sys.argv) > 1 and sys.argv[1] == "--batch":
        batch_child()
    elif len(sys.argv) > 1 and sys.argv[1] == "allocator":
        from saam import paths
        res = allocator()
        if res:
            (paths.figures_dir("paper") / "bench-allocator.json").write_text(json.dumps(res, indent=1))
    else:
        main()
