"""One adapter per model family: every model-specific question, answered once.

``of(pipe)`` (or ``of_model(denoiser)``) gives the :class:`Family` of a diffusers pipeline, told
apart by structure (a UNet; an MM-DiT with single-stream blocks, Flux's; an MM-DiT without, SD3's),
and ``capture``, ``stream``, ``models`` ask it instead of naming classes:

- which module denoises, and which of its modules are the attention layers a trace records;
- where the text tokens sit in a joint sequence (Flux: ``[text; image]``, SD3: ``[image; text]``);
- which text encoder's token ids carry the prompt's words, and where each encoder's tokens lie;
- the latent grid and guidance layout a denoiser call implies;
- how the pipeline's ``encode_prompt`` is called for words alone (the concept stream).

:data:`SUPPORT` declares, per family, what is supported and how it is tested: the README's table
of families is generated from it (``scripts/readme_results.py``). :data:`FAMILIES`,
:data:`COMPONENTS`, :func:`folder_family` and :func:`width_rules` are the same questions asked of a
model folder on disk (``models.check_model_folder``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    name: str
    dit: bool                 # an MM-DiT (joint attention over image and text) rather than a UNet
    text_first: bool = False  # MM-DiTs: text tokens come before the image tokens in the joint sequence
    word_encoder: str = "text_encoder"  # the encoder whose token ids align with the prompt's words
    packed: bool = False      # MM-DiTs: latents come packed in 2 x 2 patches, placed by img_ids (Flux)
    true_cfg: bool = False    # a negative prompt runs as a second denoiser call at the same step (Flux)
    denoiser_attr: str = "unet"  # the pipeline's attribute holding the denoiser
    start_token: bool = True  # the text encoder puts a start token first (CLIP, BERT; not T5): HRV's pseudo-context keeps it
    projects_context: bool = False  # the denoiser projects the encoder's states before its blocks (PixArt's caption_projection)
    cfg_from_encode: bool = False  # the pipeline keeps no do_classifier_free_guidance; encode_prompt is told it (PixArt)
    fp32_output: bool = False  # under bf16 autocast the prediction goes back to float32 (its scheduler step expects it)
    # loggers set to errors only when a pipeline of the family is loaded: PixArt's warns at every call that
    # the optional caption cleaners (bs4, ftfy) are missing, and falls back to lower-casing the prompt
    quiet_loggers: tuple[str, ...] = ()
    # "auto": diffusers' AutoPipelineForImage2Image; "latents": noised latents (evaluate.LatentImg2Img); "flow": flow
    # matching's interpolation at the first kept step (evaluate.FlowImg2Img)
    img2img: str = "auto"
    # MM-DiTs whose encoder reads the prompt inside a template: "chat" (the tokenizer's chat template, one user
    # turn: FLUX.2 [klein]), "pipeline" (the pipeline's prompt_template_encode, its first
    # prompt_template_encode_start_idx tokens dropped: Qwen-Image); "" none
    template: str = ""
    rotary: str = "joint"  # MM-DiTs: one rotary table over [text; image] ("joint", Flux) or (image, text) ("split", Qwen-Image)
    context_in: str = "context_embedder"  # how encoder states enter the blocks: "context_embedder", or "txt_norm+txt_in"

    def denoiser(self, pipe):
        return getattr(pipe, self.denoiser_attr)

    @property
    def daam_heads(self) -> str:
        """DAAM's head set on this family, in words (what ``saam map`` records in maps.json)."""
        if not self.dit:
            return ("every cross-attention head of the down and up blocks" if self.denoiser_attr == "unet"
                    else "every cross-attention head of every transformer block")
        return "every joint-attention head of every transformer block, its image-to-word attention"

    def context(self, model, states: torch.Tensor) -> torch.Tensor:
        """Encoder states as the attention layers' key and value projections receive them."""
        if not self.projects_context:
            return states
        # in the projection's own weights' dtype (bf16 where models.autocast_bf16 stored them so: what the
        # generation computes under autocast), back in the states' dtype
        dt = next(model.caption_projection.parameters()).dtype
        return model.caption_projection(states.to(dt)).to(states.dtype)

    def encode_cfg(self, args, kwargs) -> bool | None:
        """Whether the pipeline's ``encode_prompt`` call (``args``, ``kwargs``) asks for guidance, where
        the family's pipelines tell it there rather than in an attribute; None: not told."""
        if not self.cfg_from_encode:
            return None
        v = kwargs.get("do_classifier_free_guidance", args[1] if len(args) > 1 else None)
        return None if v is None else bool(v)

    def layers(self, model) -> dict[str, object]:
        """The attention modules a trace records, by name (module path)."""
        if not self.dit:
            mods = dict(model.named_modules())
            out = {}
            for key in model.attn_processors:
                name = key[: -len(".processor")]
                if getattr(mods.get(name), "is_cross_attention", False):
                    out[name] = mods[name]
            return out
        return {name: m for name, m in model.named_modules()
                if name.endswith(".attn") and name.startswith(("transformer_blocks.", "single_transformer_blocks."))}

    def text_slice(self, total: int, text_len: int) -> slice:
        """Where the ``text_len`` text keys lie among ``total`` keys of a joint call."""
        return slice(0, text_len) if self.text_first else slice(total - text_len, total)

    def templated(self, pipe):
        """The word encoder's tokenizer as the pipeline applies it, inside its template (``words.Templated``):
        Qwen-Image's prompt_template_encode; FLUX.2 [klein]'s chat template, one user turn, no thinking;
        FLUX.2 [dev]'s, its system prompt (``pipe.system_message``) first (its tokenizer may be a
        processor around the tokenizer)."""
        from .words import Templated
        if self.template == "pipeline":
            prefix, _, suffix = pipe.prompt_template_encode.partition("{}")
            return Templated(pipe.tokenizer, prefix, suffix, drop=pipe.prompt_template_encode_start_idx)
        chat, mark = pipe.tokenizer, "\x00"
        system = getattr(pipe, "system_message", None)
        if system is None:
            text = chat.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                            add_generation_prompt=True, enable_thinking=False)
        else:
            text = chat.apply_chat_template([{"role": "system", "content": [{"type": "text", "text": system}]},
                                             {"role": "user", "content": [{"type": "text", "text": mark}]}],
                                            tokenize=False, add_generation_prompt=False)
        prefix, _, suffix = text.partition(mark)
        return Templated(getattr(chat, "tokenizer", chat), prefix, suffix)

    def text_segments(self, pipe, text_len: int) -> list[tuple[int, object, int]]:
        """(offset, tokenizer, length) of each text encoder's tokens in a text sequence of
        ``text_len``: UNets one tokenizer; Flux T5's alone (CLIP gives only the pooled vector);
        SD3 CLIP-L/G's 77 (feature-concatenated), then T5's; FLUX.2 and Qwen-Image one templated
        tokenizer (``templated``)."""
        if not self.dit:
            return [(0, pipe.tokenizer, text_len)]
        if self.template:
            return [(0, self.templated(pipe), text_len)]
        if self.word_encoder == "text_encoder_2":
            return [(0, pipe.tokenizer_2, text_len)]
        clip = pipe.tokenizer.model_max_length
        return [(0, pipe.tokenizer, clip)] + ([(clip, pipe.tokenizer_3, text_len - clip)]
                                              if getattr(pipe, "tokenizer_3", None) is not None and text_len > clip else [])

    def call_layout(self, hidden_states: torch.Tensor, kwargs: dict) -> tuple[tuple[int, int], bool | None]:
        """(latent grid, classifier-free guidance in the batch or None = ask the pipeline) of a
        denoiser call on ``hidden_states``."""
        if not self.packed:
            return tuple(hidden_states.shape[-2:]), None
        if kwargs.get("img_shapes") is not None:  # Qwen-Image: (frames, rows, columns) of packed patches per image
            _, h, w = kwargs["img_shapes"][0][0]
            return (2 * int(h), 2 * int(w)), False
        ids = kwargs["img_ids"]  # packed 2 x 2 latent patches: (row, column) of each (FLUX.2: (t, row, column, l))
        ids = ids[0] if ids.ndim == 3 else ids
        return (2 * (int(ids[:, 1].max()) + 1), 2 * (int(ids[:, 2].max()) + 1)), False

    def encode_words_kwargs(self) -> dict:
        """What ``encode_prompt`` needs besides the words to encode them alone, unguided."""
        if self.name == "sd3":
            return dict(prompt_2=None, prompt_3=None, do_classifier_free_guidance=False)
        return dict(prompt_2=None) if self.name == "flux" else {}

    def embed_context(self, model, states: torch.Tensor) -> torch.Tensor:
        """Encoder states as the first block receives them (the MM-DiT's context embedding)."""
        def into(m, x):  # in the module's own weights' dtype (bf16 where models.autocast_bf16 stored them so)
            return m(x.to(m.weight.dtype))
        if self.context_in == "txt_norm+txt_in":
            return into(model.txt_in, into(model.txt_norm, states))
        return into(model.context_embedder, states)

    def side_rotary(self, rot, text_len: int, n: int, model=None, denoiser_call: dict | None = None):
        """The rotary table of a concept-stream side call whose ``n`` text tokens replace the prompt's
        ``text_len``: the concept tokens where the prompt's first ``n`` tokens are (FLUX.1 puts every
        text token at position 0, FLUX.2 and Qwen-Image count them along their own axis; Qwen-Image's
        table is made again for ``n`` text tokens by the denoiser's own ``pos_embed`` where the prompt
        has fewer: ``model`` and its call's arguments ``denoiser_call``)."""
        if self.rotary == "split":  # Qwen-Image: (image, text) tables
            img, txt = rot
            if n <= txt.shape[0]:
                return img, txt[:n]
            return model.pos_embed(denoiser_call["img_shapes"], max_txt_seq_len=n, device=txt.device)
        out = []
        for r in rot:
            text = r[:text_len]
            if torch.equal(text, text[:1].expand_as(text)):
                text = text[:1].expand(n, *text.shape[1:])
            elif n <= text_len:
                text = text[:n]
            else:
                raise ValueError(f"the concept stream has {n} tokens, more than the prompt's {text_len} text positions")
            out.append(torch.cat([text, r[text_len:]]))
        return tuple(out)

    def side_call(self, block, kwargs: dict, row: int, stream: torch.Tensor, text_len: int, model=None,
                  denoiser_call: dict | None = None) -> torch.Tensor:
        """One concept-stream side call: ``block`` run as the generation ran it (``kwargs``) for batch
        row ``row``, its text replaced by ``stream`` [n, inner]; returns the stream's states after it.
        ``model``, ``denoiser_call``: the denoiser and its call's arguments (``side_rotary``)."""
        hs = kwargs["hidden_states"]
        batch, n = hs.shape[0], len(stream)

        def row_of(v):
            if torch.is_tensor(v):
                return v[row:row + 1] if v.ndim and v.shape[0] == batch and batch > 1 else v
            if isinstance(v, (tuple, list)):
                return type(v)(row_of(x) for x in v)
            return v
        call = {k: row_of(v) for k, v in kwargs.items() if k not in ("hidden_states", "image_rotary_emb")}
        single = kwargs.get("encoder_hidden_states") is None  # a single-stream block: [text; image] in one
        if single:
            call["hidden_states"] = torch.cat([stream[None].to(hs.dtype), hs[row:row + 1, text_len:]], 1)
        else:
            call["hidden_states"], call["encoder_hidden_states"] = hs[row:row + 1], stream[None].to(hs.dtype)
        if call.get("encoder_hidden_states_mask") is not None:
            call["encoder_hidden_states_mask"] = call["encoder_hidden_states_mask"].new_ones(1, n)
        if kwargs.get("image_rotary_emb") is not None:
            call["image_rotary_emb"] = self.side_rotary(kwargs["image_rotary_emb"], text_len, n, model, denoiser_call)
        out = block(**call)
        if torch.is_tensor(out):  # FLUX.2's single-stream block: the joint sequence
            return out[0, :n]
        return None if out[0] is None else out[0][0]  # (text, image): SD3's last block returns no text


UNET = Family("unet", dit=False)
SD3 = Family("sd3", dit=True, denoiser_attr="transformer", fp32_output=True)
FLUX = Family("flux", dit=True, text_first=True, word_encoder="text_encoder_2", packed=True, true_cfg=True,
              denoiser_attr="transformer", fp32_output=True)
FLUX2 = Family("flux2", dit=True, text_first=True, packed=True, true_cfg=True, denoiser_attr="transformer",
               start_token=False, fp32_output=True, template="chat", img2img="flow")
QWEN = Family("qwenimage", dit=True, text_first=True, packed=True, true_cfg=True, denoiser_attr="transformer",
              start_token=False, fp32_output=True, template="pipeline", rotary="split", context_in="txt_norm+txt_in")
# a cross-attention DiT (PixArt-Sigma): image patches attend to T5's states in each block's attn2, as a UNet's
# layers attend to CLIP's; HRV's construction applies directly, without a start token
PIXART = Family("pixart", dit=False, denoiser_attr="transformer", start_token=False, projects_context=True,
                cfg_from_encode=True, fp32_output=True,
                quiet_loggers=("diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma",), img2img="latents")


def of_model(model) -> Family:
    """The family of a denoiser module, by its structure."""
    if hasattr(model, "up_blocks"):
        return UNET
    if hasattr(model, "double_stream_modulation_img"):
        return FLUX2
    if hasattr(model, "single_transformer_blocks"):
        return FLUX
    if hasattr(model, "txt_in") and hasattr(model, "img_in") and hasattr(model, "transformer_blocks"):
        return QWEN
    if hasattr(model, "transformer_blocks") and hasattr(model, "context_embedder"):
        return SD3
    if hasattr(model, "transformer_blocks") and hasattr(model, "caption_projection"):
        return PIXART
    raise TypeError(f"{type(model).__name__} is neither a UNet nor a DiT this package knows "
                    "(SD 1.x/2.x/XL, SD3/3.5, FLUX.1, FLUX.2, Qwen-Image, PixArt-Sigma)")


def of(pipe) -> Family:
    """The family of a diffusers pipeline (its ``unet``, else its ``transformer``)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return UNET
    model = getattr(pipe, "transformer", None)
    if model is None:
        raise TypeError(f"{type(pipe).__name__} has neither a UNet nor a transformer to trace")
    return of_model(model)


def is_joint(pipe) -> bool:
    """Whether ``pipe`` denoises with an MM-DiT (joint attention over image and text); False for a
    UNet, a cross-attention DiT or anything else."""
    try:
        return of(pipe).dit
    except TypeError:
        return False


# ------------------------------------------------------------------ folders on disk (model_index.json)

# profile key -> the family a folder must hold (``models.check_model_folder``)
FAMILIES = {"sd14": "SD v1.x", "sd15": "SD v1.x", "sd21": "SD v2.x", "sdxl": "SDXL", "sd3": "SD3", "sd35": "SD3.5",
            "flux": "Flux", "flux2": "FLUX.2 [dev]", "flux2-klein": "FLUX.2 [klein]", "qwenimage": "Qwen-Image",
            "pixart": "PixArt-Sigma"}
# what each pipeline class needs besides its denoiser, VAE, first text encoder and scheduler
COMPONENTS = {"StableDiffusionXLPipeline": ["text_encoder_2", "tokenizer_2"],
              "StableDiffusion3Pipeline": ["text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"],
              "FluxPipeline": ["text_encoder_2", "tokenizer_2"]}


def folder_family(index: dict, config: dict) -> str:
    """"SD v1.x", "SD v2.x", "SDXL", "SD3", "SD3.5", "Flux" or the pipeline class name, from a
    folder's model_index.json and its denoiser's config.json."""
    cls = index.get("_class_name")
    if cls == "StableDiffusionXLPipeline":
        return "SDXL"
    if cls == "StableDiffusionPipeline":
        return "SD v2.x" if config.get("use_linear_projection") else "SD v1.x"
    if cls == "StableDiffusion3Pipeline":
        return "SD3.5" if config.get("qk_norm") else "SD3"
    if cls == "FluxPipeline":
        return "Flux"
    if cls == "PixArtSigmaPipeline":
        return "PixArt-Sigma"
    return {"Flux2Pipeline": "FLUX.2 [dev]", "Flux2KleinPipeline": "FLUX.2 [klein]",
            "QwenImagePipeline": "Qwen-Image"}.get(cls, str(cls))


def width_rules(cls: str | None, denoiser: str, encoders: list[dict]) -> list[tuple[str, int | None, str]]:
    """(denoiser config key, the width the text encoders imply, what implies it) for a folder of
    pipeline class ``cls``: a UNet's ``cross_attention_dim`` is its encoders' hidden sizes summed
    (SDXL concatenates both); an MM-DiT's ``joint_attention_dim`` is T5's ``d_model`` (SD3's third
    encoder, Flux's second) and its ``pooled_projection_dim`` the CLIP pooled width(s)."""
    if denoiser == "unet" and encoders:
        n = 2 if cls == "StableDiffusionXLPipeline" else 1
        return [("cross_attention_dim", sum(e.get("hidden_size", 0) for e in encoders[:n]),
                 "the text encoders' hidden size" + (" (summed)" if n > 1 else ""))]
    if cls == "StableDiffusion3Pipeline" and len(encoders) == 3:
        return [("joint_attention_dim", encoders[2].get("d_model"), "text_encoder_3's d_model"),
                ("pooled_projection_dim", sum(e.get("projection_dim", 0) for e in encoders[:2]),
                 "the CLIP encoders' projection_dim summed")]
    if cls == "FluxPipeline" and len(encoders) == 2:
        return [("joint_attention_dim", encoders[1].get("d_model"), "text_encoder_2's d_model"),
                ("pooled_projection_dim", encoders[0].get("hidden_size"), "text_encoder's hidden_size")]
    if cls == "PixArtSigmaPipeline" and len(encoders) == 1:
        return [("caption_channels", encoders[0].get("d_model"), "text_encoder's d_model")]
    if cls in ("Flux2Pipeline", "Flux2KleinPipeline") and len(encoders) == 1:  # three layers' states, concatenated
        width = (encoders[0].get("text_config") or encoders[0]).get("hidden_size")
        return [("joint_attention_dim", None if width is None else 3 * width,
                 "three times text_encoder's hidden_size (the pipeline stacks three of its layers)")]
    if cls == "QwenImagePipeline" and len(encoders) == 1:
        return [("joint_attention_dim", (encoders[0].get("text_config") or encoders[0]).get("hidden_size"),
                 "text_encoder's hidden_size")]
    return []


# what each family supports and how it is tested: the README's table (scripts/readme_results.py)
SUPPORT = (
    ("SD 1.x / 2.x (UNet)", "sd14, sd15, sd21", "yes", "HRV's pass; published (v1.4)", "top/bottom/random/soft",
     "-", "yes", "tiny + full-size random; numerics vs diffusers"),
    ("SDXL (UNet)", "sdxl", "yes", "HRV's pass; published", "top/bottom/random/soft", "-", "yes",
     "tiny + full-size random; numerics vs diffusers"),
    ("SD3 / SD3.5 (MM-DiT)", "sd3, sd35", "yes", "concept stream / direct", "top/bottom/random/soft",
     "ConceptAttention", "yes", "tiny random; float64 softmax; images bit-identical"),
    ("FLUX.1 (MM-DiT)", "flux", "yes", "concept stream / direct", "top/bottom/random/soft", "ConceptAttention",
     "yes", "tiny random; float64 softmax; images bit-identical"),
    ("ShapesWorld organisms", "paper, smoke, organism-a", "yes", "HRV's pass", "top/bottom/random/soft",
     "-", "yes", "trained, exact masks"),
    ("PixArt-Sigma (cross-attention DiT)", "pixart", "yes", "HRV's pass (no start token: T5)", "top/bottom/random/soft",
     "-", "yes", "tiny random; float64 softmax; images bit-identical"),
    ("FLUX.2 [dev] / [klein] (MM-DiT)", "flux2, flux2-klein", "yes", "concept stream / direct", "top/bottom/random/soft",
     "ConceptAttention", "yes", "tiny random (Mistral-3 / Qwen3 text, chat templates); float64 softmax; images "
     "bit-identical; CPU attention backends"),
    ("Qwen-Image (MM-DiT)", "qwenimage", "yes", "concept stream / direct", "top/bottom/random/soft", "ConceptAttention",
     "yes", "tiny random (Qwen2.5-VL text, dropped system prompt); float64 softmax; images bit-identical; CPU attention backends"),
    ("Sana", "-", "no", "-", "-", "-", "-", "not yet"),
)
SUPPORT_COLUMNS = ("family", "profiles", "trace", "relevance", "selection (+ oracle-k bound where masks exist)", "output maps", "every chapter", "tested how")
