"""The GPU run a researcher will make, measured on the released architectures (random weights, built
offline: nothing is downloaded) in fp16: ``make gpu-bench`` on a machine with a CUDA GPU.

For SD v1.4 (512 px) and SDXL (1024 px): traced / plain time (median of paired, interleaved runs),
images per second untraced and traced, and peak GPU memory of each; then the measured time of a
Table 1 run on SD v1.4 (``--table1`` images of a COCO-format export of ShapesWorld at 512 px, the
real-image protocol at strength 0.5 with the sd14 profile's steps and batch, scored at every k and
tau of the profile's sweeps). Writes figures/bench-gpu.json.

    python scripts/gpu_bench.py                       # CUDA, fp16: both models, a 500-image Table 1
    python scripts/gpu_bench.py --tiny --device cpu   # the same code on tiny pipelines (seconds)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a photo of a cat and a dog on a red sofa next to a green lamp"
TINY = {"sd14": "sd14-layout", "sdxl": "sdxl-layout"}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def throughput(pipe, device: str, size: int, batch: int, steps: int, repeats: int) -> dict:
    from saam.capture import trace

    def gen():
        pipe([PROMPT] * batch, num_inference_steps=steps, height=size, width=size, output_type="latent",
             generator=[torch.Generator().manual_seed(i) for i in range(batch)])
    gen()  # warm-up (kernels, allocator)
    times: dict[str, list[float]] = {"plain": [], "traced": []}
    peaks: dict[str, float | None] = {}
    for _ in range(repeats):
        for name in ("plain", "traced"):
            reset_peak(device)
            sync(device)
            t = time.perf_counter()
            if name == "plain":
                gen()
            else:
                with trace(pipe):
                    gen()
            sync(device)
            times[name].append(time.perf_counter() - t)
            peaks[name] = peak_mb(device)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(overhead_ratio=statistics.median(a / b for a, b in zip(times["traced"], times["plain"])),
                images_per_s_plain=batch / med["plain"], images_per_s_traced=batch / med["traced"],
                peak_mb_plain=peaks["plain"], peak_mb_traced=peaks["traced"], batch=batch, steps=steps,
                size=size, repeats=repeats)


def table1(pipe, device: str, n: int, tiny: bool, overrides: str) -> dict:
    """A Table 1 run on SD v1.4: the sd14 profile's real-image protocol over ``n`` exported images."""
    from saam import paths, steps, tables
    from saam.evaluate import miou_table
    from saam.family import UNET
    from saam.heads import head_ids
    from saam.relevance import load_published
    with tempfile.TemporaryDirectory() as tmp:
        data, model = Path(tmp) / "coco", Path(tmp) / "model"
        subprocess.run([sys.executable, "-m", "saam.shapes.world", "--export-coco", str(data), "--n", str(n)], check=True)
        pipe.save_pretrained(model)  # the profile reads the UNet's config from its folder
        paths.CACHE = Path(tmp) / "cache"  # measured cold, and nothing left behind
        from saam.profiles import load
        p = dict(load("sd14", overrides), model_path=str(model), data_dir=str(data), n_eval=n)
        lh = {l: m.heads for l, m in UNET.layers(pipe.unet).items()}
        rel = load_published("sd14", lh)
        heads = head_ids(lh)
        sync(device)
        t = time.perf_counter()
        recs, _, _ = steps.records(pipe, p, "dataset", heads, p["strengths"][0])
        sync(device)
        gen_s = time.perf_counter() - t
        df = tables.score(recs, rel, p, ks=p["k_sweep"], taus=p["tau_sweep"])
        miou_table(df)
        total = time.perf_counter() - t
    return dict(images=n, words=len(recs), generate_and_trace_s=gen_s, total_s=total,
                steps=p["steps"], strength=p["strengths"][0], batch_size=p["batch_size"], tiny=tiny)


def main(argv=None) -> None:
    from diffusers.utils import logging as dlog
    from saam import paths
    from saam.testing import FULL_SIZE, full_size_pipeline, tiny_pipeline
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", nargs="+", default=["sd14", "sdxl"], choices=sorted(TINY))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--table1", type=int, default=500, help="images of the Table 1 run (0: skip)")
    ap.add_argument("--tiny", action="store_true", help="tiny pipelines (a quick check of this script)")
    ap.add_argument("--out", default=str(paths.figures_dir("paper") / "bench-gpu.json"))
    a = ap.parse_args(argv)
    dlog.set_verbosity_error()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine (--device cpu --tiny checks the script)")
    dtype = torch.float16 if a.device.startswith("cuda") else torch.float32
    report = dict(device=torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
                  dtype=str(dtype), torch=torch.__version__, models={})
    for kind in a.models:
        t = time.perf_counter()
        pipe = (tiny_pipeline(TINY[kind]) if a.tiny else full_size_pipeline(kind)).to(a.device, dtype)
        pipe.set_progress_bar_config(disable=True)
        size = 64 if a.tiny else FULL_SIZE[kind]["size"]
        res = dict(build_s=time.perf_counter() - t, **throughput(pipe, a.device, size, a.batch, a.steps, a.repeats))
        if kind == "sd14" and a.table1:
            res["table1"] = table1(pipe, a.device, a.table1, a.tiny,
                                   "steps=2 batch_size=2 k_sweep=[0.25] tau_sweep=[0.4]" if a.tiny else "")
        report["models"][kind] = res
        print(kind, json.dumps(res), flush=True)
        del pipe
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
