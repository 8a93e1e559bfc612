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

No GPU was at hand: the committed organism (``data/variants/mmdit``) was trained on the CPU and
met the targets at step 11,000 (``training.json``: the loss and the fidelity curve); the recipe is
tested for a few steps (``tests/test_organisms.py``).
"""
from __future__ import annotations

import argparse
import json
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
            from diffusers.image_processor import VaeImageProcessor
            self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

        def _encode_vae_image(self, image: torch.Tensor, generator=None) -> torch.Tensor:
            """Images in [-1, 1] as the transformer's latents: the VAE's mean, scaled, as training
            encodes them (the real-image protocol's ``evaluate.FlowImg2Img`` starts from these)."""
            return self.vae.encode(image.to(self.vae.dtype)).latent_dist.mean * self.vae.config.scaling_factor

        @property
        def do_classifier_free_guidance(self) -> bool:
            return self._guidance_scale > 1

        @torch.no_grad()
        def encode_prompt(self, prompt, device=None, num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                          negative_prompt=None, **unused):
            """(prompt states [n, TEXT_LENGTH, 384], negative states or None, pooled [n, 384], negative pooled or None)."""
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            device = device or self.transformer.device

            def enc(texts):
                ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
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
                     num_images_per_prompt: int = 1, negative_prompt=None, latents: torch.Tensor | None = None, **unused):
            from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
            self._guidance_scale = guidance_scale
            dev = self.transformer.device
            pe, ne, pp, npool = self.encode_prompt(prompt, dev, num_images_per_prompt, self.do_classifier_free_guidance,
                                                   negative_prompt)
            n = pe.shape[0]
            s = self.transformer.config.sample_size
            h, w = (height or s * self.vae_scale_factor) // self.vae_scale_factor, (width or s * self.vae_scale_factor) // self.vae_scale_factor
            gens = generator if isinstance(generator, list) else [generator] * n
            x = (torch.cat([torch.randn((1, 4, h, w), generator=g, dtype=torch.float32) for g in gens]).to(dev)
                 if latents is None else latents.to(dev, torch.float32))
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
    enc, tok = text_encoder()
    pipe = _pipeline_class()(vae=vae.eval(), text_encoder=enc, tokenizer=tok, transformer=tr.eval(), scheduler=build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


TEXT_LENGTH = 32  # the organism's text window: every ShapesWorld caption fits (at most 21 tokens with [CLS]/[SEP])
POOL_BATCHES = 2048  # batches of encoded scenes kept for reuse (131,072 scenes at batch 64; about 7 GB on disk)
FIDELITY_EVERY = 1000  # steps between fidelity scores on the fixed prompt set (the curve in training.json)
FIDELITY_N = 64  # prompts per fidelity group of the curve
TARGETS = dict(single_color_accuracy=0.90, single_shape_accuracy=0.80, two_object_binding=0.50)  # the UNet organisms'


def text_encoder():
    """The organism's frozen causal text encoder (fp16 weights computed in fp32, as committed) and
    its tokenizer, windowed to :data:`TEXT_LENGTH` tokens."""
    enc, tok = M.load_text_encoder(causal=True)
    tok.model_max_length = TEXT_LENGTH
    return enc.half().float(), tok


class Pool:
    """Encoded training scenes, kept on disk (``<run>/pool``) and reused: each of the first
    :data:`POOL_BATCHES` steps renders, encodes (VAE latent, text states) and trains on a fresh
    batch of the seeded scene stream and appends it; later steps draw batches from the pool, a
    seeded permutation per epoch. The VAE and the text encoder (together more than the transformer's
    training step on a CPU: ``scripts/bench_mmdit.py``) then run once per scene, not once
    per visit. Captions are stored whole; the 10 % dropped for guidance are drawn per visit.

    A pool lost with an ignored folder is rebuilt from the same seeds (bit-identical on one machine).
    """

    def __init__(self, folder: Path, batch: int, seed: int, n_batches: int = POOL_BATCHES):
        self.dir, self.batch, self.seed, self.nb = Path(folder), batch, seed, n_batches
        self.dir.mkdir(parents=True, exist_ok=True)
        n = n_batches * batch
        mode = lambda f: "r+" if (self.dir / f).exists() else "w+"
        self.lat = np.lib.format.open_memmap(self.dir / "latents.npy", mode("latents.npy"), np.float32, (n, 4, 16, 16))
        self.txt = np.lib.format.open_memmap(self.dir / "text.npy", mode("text.npy"), np.float32, (n, TEXT_LENGTH, 384))
        self.ids = np.lib.format.open_memmap(self.dir / "ids.npy", mode("ids.npy"), np.int32, (n, TEXT_LENGTH))
        meta = self.dir / "built.json"
        self.built = json.loads(meta.read_text())["batches"] if meta.exists() else 0
        if self.lat.shape[0] != n or (meta.exists() and json.loads(meta.read_text()).get("seed") != seed):
            raise ValueError(f"{self.dir}: a pool of another size or seed; remove it to rebuild")

    def add(self, b: int, lat: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor) -> None:
        assert b <= self.built, (b, self.built)  # a batch again (after a crash between saves): the same data
        sl = slice(b * self.batch, (b + 1) * self.batch)
        self.lat[sl], self.txt[sl], self.ids[sl] = lat.numpy(), txt.numpy(), ids.numpy()
        self.built = max(self.built, b + 1)
        if self.built % 64 == 0 or self.built == self.nb:
            for a in (self.lat, self.txt, self.ids):
                a.flush()
            (self.dir / "built.json").write_text(json.dumps(dict(batches=self.built, seed=self.seed)))

    def draw(self, step: int) -> np.ndarray:
        """The pool rows a step after the first ``n_batches`` trains on."""
        n = self.nb * self.batch
        k = (step - self.nb) * self.batch
        epoch, off = divmod(k, n)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        return np.sort(perm[off:off + self.batch])


def _stream_batch(step: int, batch: int, seed: int, tok):
    """Scene batch ``step`` of the seeded stream: captions' token ids and render parameters."""
    from .train import batch_scenes
    from .world import render_params
    scenes = batch_scenes(step, batch, seed)
    ids = tok([sc.caption for sc in scenes], padding="max_length", max_length=TEXT_LENGTH, truncation=True,
              return_tensors="pt").input_ids
    return ids, render_params([sc.objects for sc in scenes])


@torch.no_grad()
def _encode(vae, enc, tok, ids, params):
    from .world import render_from_params
    x, _ = render_from_params(*params)
    return vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor, enc(ids)[0]


def fidelity_now(tr, vae, enc, tok, seed: int, n: int = FIDELITY_N) -> dict:
    """The analyzer-scored fidelity of the transformer as it stands: ``n`` held-out prompts per
    group (single, two-object, unseen combos; the chapters' seed stream, 25 steps, guidance 5)."""
    from .analyzer import fidelity
    from .world import sample_scene
    groups = {name: [sample_scene(seed + 5_000_000 + i, k, split=split, p_color=1.0) for i in range(n)]
              for name, k, split in (("single", 1, "test"), ("two", 2, "test"), ("unseen", 1, "unseen"))}
    was = tr.training
    pipe = _pipeline_class()(vae=vae, text_encoder=enc, tokenizer=tok, transformer=tr.eval(), scheduler=build_scheduler())
    pipe.set_progress_bar_config(disable=True)
    try:
        return fidelity(pipe, groups, 25, 5.0, seed)
    finally:
        tr.train(was)


def met(fid: dict) -> bool:
    return all(fid[k] >= v for k, v in TARGETS.items())


def pack(run: Path, out: Path) -> Path:
    """A compact resumable checkpoint to commit when a session ends: fp32 weights, the optimizer's
    moments in bf16 (their range, not their last bits, matters), the step and the logs."""
    s = torch.load(run / "mmdit.pt", map_location="cpu", weights_only=True)
    opt = s["opt"]
    opt["state"] = {k: {n: (v.to(torch.bfloat16) if v.is_floating_point() and v.dim() else v) for n, v in st.items()}
                    for k, st in opt["state"].items()}
    logs = {f.name: f.read_text() for f in sorted(run.glob("mmdit-*.jsonl"))}
    out.parent.mkdir(parents=True, exist_ok=True)
    from .train import _save_atomic
    _save_atomic(dict(model=s["model"], opt=opt, step=s["step"], logs=logs), out)
    return out


def train(run: Path, init: Path, minutes: float, steps: int, batch: int, lr: float, seed: int, warmup: int = 500,
          p_uncond: float = 0.1, resume: Path | None = None,
          pool_batches: int = POOL_BATCHES, fidelity_every: int = FIDELITY_EVERY, fidelity_n: int = FIDELITY_N,
          stop_at_targets: bool = True) -> int:
    """Flow-matching training of the transformer; returns the step reached.

    Resumes from ``<run>/mmdit.pt``, else from ``resume`` (a :func:`pack`-ed checkpoint). Every
    ``fidelity_every`` steps the fidelity is scored and logged; with ``stop_at_targets`` training
    stops at the first score that meets :data:`TARGETS`."""
    from diffusers import AutoencoderKL
    from .train import _log, _save_atomic, warmup_cosine
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKL.from_pretrained(Path(init) / "vae", local_files_only=True).float().to(dev).eval().requires_grad_(False)
    enc, tok = text_encoder()
    enc = enc.to(dev)
    torch.manual_seed(seed)  # the same initial weights however it is called (a resumed run loads its own)
    tr = build_transformer().to(dev)
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, weight_decay=1e-2)
    ck, step = run / "mmdit.pt", 0
    src = ck if ck.exists() else (resume if resume is not None and Path(resume).exists() else None)
    if src is not None:
        s = torch.load(src, map_location=dev, weights_only=True)
        tr.load_state_dict(s["model"])
        for st in s["opt"]["state"].values():
            for n, v in st.items():
                if v.is_floating_point() and v.dim():
                    st[n] = v.float()
        opt.load_state_dict(s["opt"]); step = s["step"]
        for name, text in s.get("logs", {}).items():  # a packed checkpoint carries the curves so far
            if not (run / name).exists():
                (run / name).write_text(text)
    pool = Pool(run / "pool", batch, seed, pool_batches)
    empty = enc(tok([""], padding="max_length", max_length=TEXT_LENGTH, return_tensors="pt").input_ids.to(dev))[0]
    gen = torch.Generator(device=dev)
    t0 = last = time.time()

    def fresh(b):
        ids, params = _stream_batch(b, batch, seed + 1, tok)
        lat, txt = _encode(vae, enc, tok, ids.to(dev), [p.to(dev) for p in params])
        pool.add(b, lat.cpu(), txt.cpu(), ids.to(torch.int32))
        return lat, txt, ids

    while pool.built < min(step, pool.nb):  # a lost pool: rebuild the batches already trained on
        fresh(pool.built)
        if pool.built % 64 == 0:
            print(f"mmdit: pool rebuilt to batch {pool.built}/{min(step, pool.nb)}", flush=True)
    while step < steps and time.time() - t0 < minutes * 60:
        gen.manual_seed(seed * 1_000_003 + step)
        if step < pool.nb:
            x0, ctx, ids = fresh(step)
        else:
            rows = pool.draw(step)
            x0, ctx = torch.from_numpy(pool.lat[rows]).to(dev), torch.from_numpy(pool.txt[rows]).to(dev)
            ids = torch.from_numpy(pool.ids[rows].astype(np.int64))
        ids = ids.to(dev)
        drop = torch.rand(len(x0), generator=gen, device=dev) < p_uncond
        ctx = torch.where(drop.view(-1, 1, 1), empty, ctx)
        ids = torch.where(drop.view(-1, 1), tok.pad_token_id, ids)
        ids[drop, 0], ids[drop, 1] = tok.cls_token_id, tok.sep_token_id
        pooled = _pooled(ctx, ids, tok.pad_token_id)
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        t = torch.sigmoid(torch.randn(len(x0), generator=gen, device=dev))  # logit-normal, as SD3
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        for g in opt.param_groups:
            g["lr"] = warmup_cosine(step, lr, warmup, steps)
        pred = tr(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=ctx, pooled_projections=pooled,
                  return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0 or step == steps:
            _log(run, "mmdit", dict(step=step, loss=loss.item(), grad_norm=gn.item(), lr=opt.param_groups[0]["lr"],
                                    time=time.time() - t0))
        if time.time() - last > 300:
            _save_atomic(dict(model=tr.state_dict(), opt=opt.state_dict(), step=step), ck)
            last = time.time()
        if fidelity_every and step % fidelity_every == 0:
            f0 = time.time()
            fid = fidelity_now(tr, vae, enc, tok, seed, fidelity_n)
            _log(run, "mmdit-fidelity", dict(step=step, **fid, met=met(fid), seconds=time.time() - f0))
            print(f"mmdit: step {step} fidelity " + ", ".join(f"{k} {fid[k]:.3f}" for k in TARGETS), flush=True)
            if stop_at_targets and met(fid):
                break
    _save_atomic(dict(model=tr.state_dict(), opt=opt.state_dict(), step=step), ck)
    print(f"mmdit: step {step}/{steps} in {time.time() - t0:.0f}s", flush=True)
    return step


def assemble(run: Path, init: Path, out: Path) -> Path:
    """A model folder: the trained transformer (fp16 weights), the init's VAE, the scheduler, ``saam.json``
    (variant ``mmdit``) and ``training.json``; the text encoder is the package's causal one."""
    s = torch.load(run / "mmdit.pt", map_location="cpu", weights_only=True)
    tr = build_transformer()
    tr.load_state_dict(s["model"])
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tr.half().save_pretrained(tmp / "transformer", safe_serialization=True)  # fp16 (7 MB); ``load`` computes in fp32
    shutil.copytree(Path(init) / "vae", tmp / "vae")  # the text encoder is the package's (M.load_text_encoder)
    build_scheduler().save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps(dict(
        _class_name="ShapesDiTPipeline", transformer=["diffusers", "SD3Transformer2DModel"],
        vae=["diffusers", "AutoencoderKL"], scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"]), indent=1))
    (tmp / "saam.json").write_text(json.dumps(dict(variant="mmdit", about=ABOUT), indent=1))
    read = lambda f: [json.loads(l) for l in open(f)] if f.exists() else []
    fid, curves = read(run / "mmdit-fidelity-log.jsonl"), read(run / "mmdit-log.jsonl")
    # each resumed chunk's clock starts at 0: its last reading is how long it ran (pool building and fidelity included)
    chunks = [a["time"] for a, b in zip(curves, curves[1:] + [None]) if b is None or b["time"] < a["time"]]
    (tmp / "training.json").write_text(json.dumps(dict(
        variant="mmdit", init=str(init), steps=s["step"], text_length=TEXT_LENGTH, targets=TARGETS,
        targets_met_at=next((r["step"] for r in fid if r["met"]), None), wall_seconds=round(sum(chunks)), chunks=len(chunks),
        fidelity=fid, curves=curves), indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["train", "assemble", "pack"])
    ap.add_argument("--run", type=Path, default=Path("data/runs/mmdit"))
    ap.add_argument("--init", type=Path, default=Path("data/shapesworld-model"), help="the trained organism whose VAE is used")
    ap.add_argument("--out", type=Path, default=Path("data/variants/mmdit"))
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--resume", type=Path, default=Path("data/mmdit-resume.pt"),
                    help="a packed checkpoint to start from when --run has none (committed between sessions)")
    a = ap.parse_args(argv)
    a.run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    if a.stage == "train":
        train(a.run, a.init, a.minutes, a.steps, a.batch, a.lr, a.seed, a.warmup, resume=a.resume)
    elif a.stage == "pack":
        print(pack(a.run, a.resume))
    else:
        print(assemble(a.run, a.init, a.out))


if __name__ == "__main__":
    main()
