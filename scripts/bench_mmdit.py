"""The MM-DiT organism's training step, its parts and levers measured side by side in one run.

    python scripts/bench_mmdit.py [--batch 64]

Seconds per batch: rendering, the VAE's encoder, the text encoder at 77 tokens and at the organism's
window, the transformer's step (forward, backward, AdamW) at both lengths, in fp32, under bf16 autocast
where this CPU computes bf16 natively, on one thread; a fresh step against one drawn from the pool
(``saam.shapes.dit.Pool``). docs/performance.md quotes a run with its CPU.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from saam import models
from saam.shapes import dit
from saam.shapes.train import batch_scenes
from saam.shapes.world import render_from_params, render_params


def bench(init: Path, batch: int = 64, repeats: int = 3) -> dict:
    """The parts and levers (module doc), seconds per batch, printed and returned."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(Path(init) / "vae", local_files_only=True).float().eval().requires_grad_(False)
    enc, tok = dit.text_encoder()
    tr = dit.build_transformer()
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-5)
    scenes = batch_scenes(0, batch, 1)
    params = render_params([sc.objects for sc in scenes])

    def timed(f):
        f()
        t = time.perf_counter()
        for _ in range(repeats):
            f()
        return (time.perf_counter() - t) / repeats

    def ids(n):
        return tok([sc.caption for sc in scenes], padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids

    x, _ = render_from_params(*params)
    with torch.no_grad():
        x0 = vae.encode(x * 2 - 1).latent_dist.mean
        ctx = {n: enc(ids(n))[0] for n in (77, dit.TEXT_LENGTH)}

    def step(n, bf16=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = tr(hidden_states=x0, timestep=torch.rand(batch) * 1000, encoder_hidden_states=ctx[n],
                      pooled_projections=ctx[n][:, 0], return_dict=False)[0]
        loss = F.mse_loss(pred.float(), x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = dict(machine=models.machine(), batch=batch, threads=torch.get_num_threads())
    with torch.no_grad():
        out["render"] = timed(lambda: render_from_params(*params))
        out["vae_encode"] = timed(lambda: vae.encode(x * 2 - 1))
        for n in (77, dit.TEXT_LENGTH):
            i = ids(n)
            out[f"text_{n}"] = timed(lambda: enc(i))
    for n in (77, dit.TEXT_LENGTH):
        out[f"transformer_{n}"] = timed(lambda: step(n))
    if models.cpu_has_bf16():
        out[f"transformer_{dit.TEXT_LENGTH}_bf16"] = timed(lambda: step(dit.TEXT_LENGTH, True))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out[f"transformer_{dit.TEXT_LENGTH}_1thread"] = timed(lambda: step(dit.TEXT_LENGTH))
    torch.set_num_threads(threads)
    out["fresh_step_77"] = out["render"] + out["vae_encode"] + out["text_77"] + out["transformer_77"]
    out["pool_step"] = out[f"transformer_{dit.TEXT_LENGTH}"]
    out["speedup_pool_over_fresh_77"] = out["fresh_step_77"] / out["pool_step"]
    for k, v in out.items():
        print(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", type=Path, default=Path("data/shapesworld-model"))
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    bench(a.init, a.batch)
