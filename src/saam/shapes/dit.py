"""An MM-DiT ShapesWorld organism: SD3's joint-attention transformer, trained with flow matching.

The recipe (``make model VARIANT=mmdit``; resumable, time-budgeted like the UNet organisms):

    python -m saam.shapes.dit train --run data/runs/mmdit --init data/shapesworld-model --steps 20000
    python -m saam.shapes.dit assemble --run data/runs/mmdit --init data/shapesworld-model --out data/variants/mmdit

- ``SD3Transformer2DModel`` (diffusers) on the organisms' 16x16x4 latents, patch 2 (64 image
  tokens), 6 joint blocks of 4 heads x 32, QK-normalisation as SD3.5; the text stream is the
  organisms' frozen causal text encoder (all-MiniLM-L6-v2 with a causal mask, 77 tokens, 384-d, as
  variants B-D), its mean over the prompt's tokens the pooled vector; the VAE is the trained
  organisms' (``--init``), frozen.
- Flow matching as SD3 trains: ``x_t = (1 - t) x_0 + t noise`` with ``t`` drawn logit-normally,
  the transformer predicts ``noise - x_0`` at timestep ``1000 t``; 10 % of captions dropped for
  classifier-free guidance. Sampling: ``FlowMatchEulerDiscreteScheduler``.
- :class:`ShapesDiTPipeline` is a small diffusers pipeline (``encode_prompt``,
  ``do_classifier_free_guidance``, ``transformer``), so ``trace``, the concept stream and every
  chapter treat it as they treat SD3.

No GPU was at hand when this was written: the recipe is tested for a few steps on the CPU
(``tests/test_organisms.py``); no trained MM-DiT organism is committed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import model as M

ABOUT = M.MMDIT_ABOUT


def build_transformer():
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=6,
                                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=384,
                                 caption_projection_dim=128, pooled_projection_dim=384, pos_embed_max_size=16,
                                 qk_norm="rms_norm")


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def _pooled(states: torch.Tensor, ids: torch.Tensor, pad: int) -> torch.Tensor:
    """The pooled text vector: the mean of the prompt's token states (padding left out)."""
    keep = (ids != pad).to(states.dtype)[..., None]
    return (states * keep).sum(1) / keep.sum(1).clamp_min(1)


def _pipeline_class():
    from diffusers import DiffusionPipeline

    class ShapesDiTPipeline(DiffusionPipeline):
        """Text-to-image with the MM-DiT organism: the organisms' VAE and text encoder, SD3's
        transformer, flow-matching Euler sampling with classifier-free guidance."""
        model_cpu_offload_seq = "text_encoder->transformer->vae"

        def __init__(self, vae, text_encoder, tokenizer, transformer, scheduler):
            super().__init__()
            self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                  scheduler=scheduler)
            self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
            self._guidance_scale = 1.0

        @property
        def do_classifier_free_guidance(self) -> bool:
            return self._guidance_scale > 1

        @torch.no_grad()
        def encode_prompt(self, prompt, device=None, num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                          negative_prompt=None, **unused):
            """(prompt states [n, 77, 384], negative states or None, pooled [n, 384], negative pooled or None)."""
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            device = device or self.transformer.device

            def enc(texts):
                ids = self.tokenizer(texts, padding="max_length", max_length=M.MAX_LENGTH, truncation=True,
                                     return_tensors="pt").input_ids.to(device)
                states = self.text_encoder(ids)[0]
                pooled = _pooled(states, ids, self.tokenizer.pad_token_id)
                return (states.repeat_interleave(num_images_per_prompt, 0),
                        pooled.repeat_interleave(num_images_per_prompt, 0))
            pe, pp = enc(prompt)
            ne = npool = None
            if do_classifier_free_guidance:
                neg = [""] * len(prompt) if negative_prompt is None else (
                    [negative_prompt] * len(prompt) if isinstance(negative_prompt, str) else list(negative_prompt))
                ne, npool = enc(neg)
            return pe, ne, pp, npool

        @torch.no_grad()
        def __call__(self, prompt, num_inference_steps: int = 28, guidance_scale: float = 5.0, generator=None,
                     height: int | None = None, width: int | None = None, output_type: str = "pil",
                     num_images_per_prompt: int = 1, negative_prompt=None, **unused):
            from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
            self._guidance_scale = guidance_scale
            dev = self.transformer.device
            pe, ne, pp, npool = self.encode_prompt(prompt, dev, num_images_per_prompt, self.do_classifier_free_guidance,
                                                   negative_prompt)
            n = pe.shape[0]
            s = self.transformer.config.sample_size
            h, w = (height or s * self.vae_scale_factor) // self.vae_scale_factor, (width or s * self.vae_scale_factor) // self.vae_scale_factor
            gens = generator if isinstance(generator, list) else [generator] * n
            x = torch.cat([torch.randn((1, 4, h, w), generator=g, dtype=torch.float32) for g in gens]).to(dev)
            self.scheduler.set_timesteps(num_inference_steps, device=dev)
            self._num_timesteps = len(self.scheduler.timesteps)
            ctx, pooled = (torch.cat([ne, pe]), torch.cat([npool, pp])) if self.do_classifier_free_guidance else (pe, pp)
            for t in self.scheduler.timesteps:
                inp = torch.cat([x, x]) if self.do_classifier_free_guidance else x
                v = self.transformer(hidden_states=inp, timestep=t.expand(inp.shape[0]), encoder_hidden_states=ctx,
                                     pooled_projections=pooled, return_dict=False)[0]
                if self.do_classifier_free_guidance:
                    u, c = v.chunk(2)
                    v = u + guidance_scale * (c - u)
                x = self.scheduler.step(v, t, x, return_dict=False)[0]
            if output_type == "latent":
                return ImagePipelineOutput(images=x)
            img = ((self.vae.decode(x / self.vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
            img = img.permute(0, 2, 3, 1).float().cpu().numpy()
            if output_type == "pil":
                from PIL import Image
                img = [Image.fromarray((i * 255).round().astype(np.uint8)) for i in img]
            return ImagePipelineOutput(images=img)

    return ShapesDiTPipeline


def load(path: Path, device: str = "cpu"):
    """The MM-DiT organism from its folder (``assemble``): a ``ShapesDiTPipeline``."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from ..progress import quiet
    path = Path(path)
    with quiet():
        tr = SD3Transformer2DModel.from_pretrained(path / "transformer", local_files_only=True).float()
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True).float()
    enc, tok = M.load_text_encoder(causal=True)
    pipe = _pipeline_class()(vae=vae.eval(), text_encoder=enc, tokenizer=tok, transformer=tr.eval(), scheduler=build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def train(run: Path, init: Path, minutes: float, steps: int, batch: int, lr: float, seed: int, warmup: int = 500,
          p_uncond: float = 0.1, workers: int | None = None) -> int:
    """Flow-matching training of the transformer (resumes from ``<run>/mmdit.pt``); returns the step reached."""
    from diffusers import AutoencoderKL
    from .train import _SceneStream, _log, _save_atomic, warmup_cosine
    from .world import render_from_params
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKL.from_pretrained(Path(init) / "vae", local_files_only=True).float().to(dev).eval().requires_grad_(False)
    enc, tok = M.load_text_encoder(causal=True)
    enc = enc.half().float().to(dev)  # the committed encoder is fp16: train on exactly its values
    torch.manual_seed(seed)  # the same initial weights however it is called (a resumed run loads its own)
    tr = build_transformer().to(dev)
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, weight_decay=1e-2)
    ck, step = run / "mmdit.pt", 0
    if ck.exists():
        s = torch.load(ck, map_location=dev, weights_only=True)
        tr.load_state_dict(s["model"]); opt.load_state_dict(s["opt"]); step = s["step"]
    gen = torch.Generator(device=dev)
    amp = dict(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda" else dict(device_type="cpu", enabled=False)
    t0 = last = time.time()
    loader = torch.utils.data.DataLoader(_SceneStream(step, steps, batch, seed + 1, tok, p_uncond), batch_size=None,
                                         num_workers=workers if workers is not None else min(6, os.cpu_count() or 1))
    for k, ids, params in loader:
        if time.time() - t0 >= minutes * 60:
            break
        assert k == step, (k, step)
        gen.manual_seed(seed * 1_000_003 + step)
        x, _ = render_from_params(*(p.to(dev) for p in params))
        with torch.no_grad():
            x0 = vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor
            ids = ids.to(dev)
            ctx = enc(ids)[0]
            pooled = _pooled(ctx, ids, tok.pad_token_id)
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        t = torch.sigmoid(torch.randn(len(x0), generator=gen, device=dev))  # logit-normal, as SD3
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, lr, warmup, steps)
        with torch.autocast(**amp):
            pred = tr(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=ctx, pooled_projections=pooled,
                      return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == steps:
            _log(run, "mmdit", dict(step=step, loss=loss.item(), grad_norm=gn.item(), lr=opt.param_groups[0]["lr"],
                                    time=time.time() - t0))
        if time.time() - last > 90:
            _save_atomic(dict(model=tr.state_dict(), opt=opt.state_dict(), step=step), ck)
            last = time.time()
    _save_atomic(dict(model=tr.state_dict(), opt=opt.state_dict(), step=step), ck)
    print(f"mmdit: step {step}/{steps} in {time.time() - t0:.0f}s", flush=True)
    return step


def assemble(run: Path, init: Path, out: Path) -> Path:
    """A model folder: the trained transformer, the init's VAE, the scheduler, ``saam.json``
    (variant ``mmdit``) and ``training.json``; the text encoder is the package's causal one."""
    s = torch.load(run / "mmdit.pt", map_location="cpu", weights_only=True)
    tr = build_transformer()
    tr.load_state_dict(s["model"])
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tr.save_pretrained(tmp / "transformer", safe_serialization=True)
    shutil.copytree(Path(init) / "vae", tmp / "vae")  # the text encoder is the package's (M.load_text_encoder)
    build_scheduler().save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps(dict(
        _class_name="ShapesDiTPipeline", transformer=["diffusers", "SD3Transformer2DModel"],
        vae=["diffusers", "AutoencoderKL"], scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"]), indent=1))
    (tmp / "saam.json").write_text(json.dumps(dict(variant="mmdit", about=ABOUT), indent=1))
    log = run / "mmdit-log.jsonl"
    curves = [json.loads(l) for l in open(log)] if log.exists() else []
    (tmp / "training.json").write_text(json.dumps(dict(variant="mmdit", init=str(init), steps=s["step"], curves=curves)))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["train", "assemble"])
    ap.add_argument("--run", type=Path, default=Path("data/runs/mmdit"))
    ap.add_argument("--init", type=Path, default=Path("data/shapesworld-model"), help="the trained organism whose VAE is used")
    ap.add_argument("--out", type=Path, default=Path("data/variants/mmdit"))
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args(argv)
    a.run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    if a.stage == "train":
        train(a.run, a.init, a.minutes, a.steps, a.batch, a.lr, a.seed, a.warmup, workers=a.workers)
    else:
        print(assemble(a.run, a.init, a.out))


if __name__ == "__main__":
    main()
