"""Train the ShapesWorld VAE and UNet, time-budgeted, with checkpoints and resume.

    python -m saam.shapes.train vae  --run data/runs/model --minutes 3
    python -m saam.shapes.train unet --run data/runs/model --minutes 8 --steps 20000
    python -m saam.shapes.train assemble --run data/runs/model --out data/shapesworld-model

A variant of the model (``saam.shapes.model.VARIANTS``, the issue-10 ablation) is fine-tuned
from a trained folder, reusing its VAE:

    python -m saam.shapes.train unet --run data/runs/C --variant C --init data/shapesworld-model --minutes 7
    python -m saam.shapes.train assemble --run data/runs/C --variant C --init data/shapesworld-model --out data/variants/C

Each stage picks up from ``<run>/<stage>.pt`` if it exists, so a run cut short by a session's
end (or a 10-minute GPU call) continues where it stopped. Scenes are drawn fresh every step from
a seeded stream (step -> seeds), so a resumed run sees exactly the data an uninterrupted one would.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import model as M
from .world import render_batch, render_from_params, render_params, sample_scene


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def batch_scenes(step: int, batch: int, seed: int):
    return [sample_scene(seed * 10_000_019 + step * batch + i) for i in range(batch)]


class _SceneStream(torch.utils.data.IterableDataset):
    """CPU side of a training step, run in DataLoader workers: scenes, captions, token ids.

    Step ``k`` always gets the same scenes (seeded by step), whichever worker makes it, so
    resuming at step k reproduces the uninterrupted run's data.
    """

    def __init__(self, start: int, steps: int, batch: int, seed: int, tokenizer, p_uncond: float):
        self.start, self.steps, self.batch, self.seed = start, steps, batch, seed
        self.tok, self.p_uncond = tokenizer, p_uncond

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + wid, self.steps, nw):
            scenes = batch_scenes(step, self.batch, self.seed)
            rng = random.Random(self.seed + step)
            caps = ["" if rng.random() < self.p_uncond else sc.caption for sc in scenes]
            ids = self.tok(caps, padding="max_length", max_length=M.MAX_LENGTH, truncation=True,
                           return_tensors="pt").input_ids
            yield step, ids, render_params([sc.objects for sc in scenes])


def warmup_cosine(step: int, lr: float, warmup: int, steps: int) -> float:
    """The learning rate at ``step``: linear warm-up over ``warmup`` steps, then a cosine from ``lr``
    down to a tenth of it at ``steps`` (the UNet organisms' and the MM-DiT's schedule)."""
    return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def _log(run: Path, stage: str, row: dict) -> None:
    with open(run / f"{stage}-log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.clamp(0, 1), b).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def train_vae(run: Path, minutes: float, steps: int, batch: int, lr: float, seed: int) -> None:
    dev = _device()
    vae = M.build_vae().to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    ck = run / "vae.pt"
    step = 0
    if ck.exists():
        st = torch.load(ck, map_location=dev, weights_only=True)
        vae.load_state_dict(st["model"]); opt.load_state_dict(st["opt"]); step = st["step"]
    t0 = time.time(); last_save = t0
    while step < steps and time.time() - t0 < minutes * 60:
        x, _ = render_batch([s.objects for s in batch_scenes(step, batch, seed)], device=dev)
        for g in opt.param_groups:  # cosine decay to 5 %
            g["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        post = vae.encode(x * 2 - 1).latent_dist
        rec = (vae.decode(post.sample()).sample + 1) / 2
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == steps:
            _log(run, "vae", dict(step=step, loss=loss.item(), psnr=psnr(rec.detach(), x),
                                  time=time.time() - t0))
        if time.time() - last_save > 60:
            _save_atomic(dict(model=vae.state_dict(), opt=opt.state_dict(), step=step), ck)
            last_save = time.time()
    _save_atomic(dict(model=vae.state_dict(), opt=opt.state_dict(), step=step), ck)
    print(f"vae: step {step}/{steps} in {time.time() - t0:.0f}s", flush=True)


@torch.no_grad()
def latent_stats(vae, seed: int, n: int = 2048, dev=None):
    """Per-channel mean and overall std of posterior means on fresh scenes; reconstruction PSNR."""
    zs, ps = [], []
    for i in range(0, n, 256):
        x, _ = render_batch([sample_scene(seed + 99_000_000 + i + j).objects for j in range(256)], device=dev)
        z = vae.encode(x * 2 - 1).latent_dist.mean
        zs.append(z)
        ps.append(psnr((vae.decode(z).sample + 1) / 2, x))
    z = torch.cat(zs)
    mean = z.mean(dim=(0, 2, 3))
    std = (z - mean.view(1, -1, 1, 1)).std().item()
    return mean.cpu(), std, sum(ps) / len(ps)


def load_trained_vae(run: Path, dev, seed: int):
    vae = M.build_vae().to(dev)
    vae.load_state_dict(torch.load(run / "vae.pt", map_location=dev, weights_only=True)["model"])
    vae.eval().requires_grad_(False)
    stats = run / "vae-stats.json"
    if not stats.exists():
        mean, std, p = latent_stats(vae, seed, dev=dev)
        stats.write_text(json.dumps(dict(mean=mean.tolist(), std=std, psnr=p)))
    st = json.loads(stats.read_text())
    M.center_latents(vae, torch.tensor(st["mean"]), st["std"])
    return vae, st


def load_init(init: Path, dev, heads: int):
    """VAE (centred, scaled) and UNet weights of a trained model folder, to fine-tune from.

    The UNet's parameter shapes do not depend on the head count, so a variant with other heads
    starts from the same weights, read with its own head split.
    """
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    vae = AutoencoderKL.from_pretrained(init / "vae", dtype=torch.float32).to(dev)
    vae.eval().requires_grad_(False)
    unet = M.build_unet(heads)
    unet.load_state_dict({k: v.float() for k, v in load_file(init / "unet" / "diffusion_pytorch_model.safetensors").items()})
    return vae, unet


def train_unet(run: Path, minutes: float, steps: int, batch: int, lr: float, seed: int,
               warmup: int = 500, p_uncond: float = 0.1, variant: str = "A", init: Path | None = None,
               workers: int | None = None) -> None:
    dev = _device()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    v = M.VARIANTS[variant]
    if init is not None:
        vae, unet = load_init(init, dev, v["heads"])
    else:
        vae, _ = load_trained_vae(run, dev, seed)
        unet = M.build_unet(v["heads"])
    unet = unet.to(dev)
    sf = vae.config.scaling_factor
    enc, tok = M.load_text_encoder(v["causal_text"])
    enc = enc.half().float().to(dev)  # the committed encoder is fp16: train on exactly its values
    sched = M.build_scheduler("ddpm")
    acp = sched.alphas_cumprod.to(dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    ck = run / "unet.pt"
    step = 0
    if ck.exists():
        s = torch.load(ck, map_location=dev, weights_only=True)
        unet.load_state_dict(s["model"]); opt.load_state_dict(s["opt"]); step = s["step"]
    gen = torch.Generator(device=dev)
    t0 = time.time(); last_save = t0
    amp = dict(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda" else dict(device_type="cpu", enabled=False)
    stream = _SceneStream(step, steps, batch, seed + 1, tok, p_uncond)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers or min(6, os.cpu_count() or 1),
                                         prefetch_factor=4, persistent_workers=False)
    for k, ids, params in loader:
        if time.time() - t0 >= minutes * 60:
            break
        assert k == step, (k, step)  # workers interleave steps in order
        gen.manual_seed(seed * 1_000_003 + step)
        x, _ = render_from_params(*(p.to(dev) for p in params))
        with torch.no_grad():
            # posterior *means*: with KL weight 1e-6 the VAE leaves unused channels at unit
            # posterior noise, so sampling would bury the signal (measured: std 0.94 vs 0.2)
            lat = vae.encode(x * 2 - 1).latent_dist.mean * sf
            ids = ids.to(dev)
            ctx = enc(ids)[0]
            mask = M.padding_mask(ids, tok.pad_token_id) if v["mask_padding"] else None
        noise = torch.randn(lat.shape, generator=gen, device=dev)
        t = torch.randint(0, 1000, (batch,), generator=gen, device=dev)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, lr, warmup, steps)
        with torch.autocast(**amp):
            pred = unet(noisy, t, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == steps:
            _log(run, "unet", dict(step=step, loss=loss.item(), grad_norm=gn.item(),
                                   lr=opt.param_groups[0]["lr"], time=time.time() - t0))
        if time.time() - last_save > 90:
            _save_atomic(dict(model=unet.state_dict(), opt=opt.state_dict(), step=step), ck)
            last_save = time.time()
    _save_atomic(dict(model=unet.state_dict(), opt=opt.state_dict(), step=step), ck)
    print(f"unet: step {step}/{steps} in {time.time() - t0:.0f}s", flush=True)


def assemble(run: Path, out: Path, seed: int, variant: str = "A", init: Path | None = None) -> None:
    dev = torch.device("cpu")
    heads = M.VARIANTS[variant]["heads"]
    s = torch.load(run / "unet.pt", map_location=dev, weights_only=True)
    logs = {k: [json.loads(l) for l in open(run / f"{k}-log.jsonl")] for k in ("vae", "unet")
            if (run / f"{k}-log.jsonl").exists()}
    if init is not None:  # a fine-tuned variant: the init's VAE, its card as the history
        vae, _ = load_init(init, dev, heads)
        card = dict(M.model_card(init), variant=variant, init=str(init), finetune_steps=s["step"],
                    finetune_curves=logs)
    else:
        vae, st = load_trained_vae(run, dev, seed)
        card = dict(vae_steps=torch.load(run / "vae.pt", map_location="cpu", weights_only=True)["step"], unet_steps=s["step"],
                    latent_mean=st["mean"], latent_std=st["std"], vae_psnr_db=st["psnr"], seed=seed,
                    curves=logs, variant=variant)
    unet = M.build_unet(heads)
    unet.load_state_dict({k: t.float() for k, t in s["model"].items()})
    M.assemble_pipeline(vae.float(), unet.eval(), out, variant=variant, share_with=init)
    (out / "training.json").write_text(json.dumps(card))
    print(f"assembled {out}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["vae", "unet", "assemble"])
    ap.add_argument("--run", type=Path, default=Path("data/runs/model"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", choices=sorted(M.VARIANTS), default="A")
    ap.add_argument("--init", type=Path, default=None, help="fine-tune from this model folder")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args(argv)
    a.run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    if a.stage == "vae":
        train_vae(a.run, a.minutes, a.steps or 6000, a.batch or 64, a.lr or 1e-3, a.seed)
    elif a.stage == "unet":
        train_unet(a.run, a.minutes, a.steps or 20000, a.batch or 128, a.lr or 1e-3, a.seed,
                   warmup=a.warmup, variant=a.variant, init=a.init, workers=a.workers)
    else:
        from .. import paths
        assemble(a.run, a.out or paths.MODEL_DIR, a.seed, a.variant, a.init)


if __name__ == "__main__":
    main()
