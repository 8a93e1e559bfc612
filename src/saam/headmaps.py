"""What a trace records for one image: :class:`HeadMaps`, the per-head cross-attention maps.

The lowest layer of the package's map path: ``capture`` fills HeadMaps, ``aggregate`` turns them
into word maps and masks (``aggregate.word_map``), ``sinks`` and ``evaluate`` read them. This
module imports neither of those.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .heads import HeadId, head_ids


class CaptureError(RuntimeError):
    pass


@dataclass
class HeadMaps:
    """Cross-attention maps of one generated image.

    Attributes:
        maps: layer name -> float32 tensor [heads, tokens, h, w], summed over recorded steps.
        steps: number of denoising steps summed.
        timesteps: the scheduler timesteps seen, in order.
        token_ids: the prompt's text-encoder input ids (None if the prompt was given as embeddings).
            Where the family reads the prompt inside a template whose first tokens the pipeline drops
            (Qwen-Image), these are the encoder's whole input while the maps' token axis and
            :meth:`token_positions` index the text sequence the denoiser sees (what is left after the
            drop); :meth:`token_positions` is the one to index maps with.
        prompt: the prompt, decoded from ``token_ids``.
        latent_size, image_size: (height, width).
        per_step: layer -> [steps, heads, tokens, h, w] when ``trace(per_step=True)``.
        tokens: the prompt positions the maps' token axis holds, when ``trace(words=...)`` kept
            only some (None: every position of the text-encoder input).
        segments: an MM-DiT's text sequence, when it joins several encoders' tokens: (offset,
            tokenizer, length) of each (SD3: CLIP at 0, T5 after CLIP's 77; Flux: T5 alone). A word's
            positions are its tokens in every segment. None: one tokenizer from position 0.
        outputs: an MM-DiT's ConceptAttention output-space shares, layer -> [tokens, h, w] summed over
            steps: each pixel's softmax over the prompt's word tokens of the products of its
            attention output with theirs (0 at other positions). None for UNets.
        head_outputs: the same per head, layer -> [heads, tokens, h, w]: each head's own softmax over
            the word tokens of the products of its outputs alone (the head-wise ConceptAttention maps
            that head sets aggregate: ``aggregate.output_head_maps``). None for UNets.
    """
    maps: dict[str, torch.Tensor]
    steps: int
    timesteps: list[int]
    token_ids: list[int] | None
    prompt: str | None
    latent_size: tuple[int, int]
    image_size: tuple[int, int]
    tokenizer: object = field(repr=False, default=None)
    per_step: dict[str, torch.Tensor] | None = field(repr=False, default=None)
    tokens: list[int] | None = None
    segments: list[tuple[int, object, int]] | None = None
    outputs: dict[str, torch.Tensor] | None = field(repr=False, default=None)
    head_outputs: dict[str, torch.Tensor] | None = field(repr=False, default=None)

    def columns(self, positions) -> list[int]:
        """Where prompt token ``positions`` lie on the maps' token axis (the same unless the trace
        kept only some words' tokens)."""
        positions = [int(p) for p in positions]
        if self.tokens is None:
            return positions
        lost = [p for p in positions if p not in self.tokens]
        if lost:
            raise CaptureError(f"token positions {lost} were not kept: this trace kept the tokens of the words "
                               f"asked for only (positions {self.tokens}); trace with words=None for all")
        return [self.tokens.index(p) for p in positions]

    @property
    def nbytes(self) -> int:
        """Memory of the maps (and per-step maps) in bytes."""
        return sum(m.numel() * m.element_size() for d in (self.maps, self.per_step or {}, self.outputs or {}) for m in d.values())

    @property
    def layer_heads(self) -> dict[str, int]:
        return {l: m.shape[0] for l, m in self.maps.items()}

    def heads(self, convention: str = "hrv") -> list[HeadId]:
        return head_ids(self.layer_heads, convention)

    def token_positions(self, word: str, occurrence: int | str = 0) -> list[int]:
        """Positions of ``word`` in this image's prompt (``occurrence``: index, or "all")."""
        from .words import WordNotFound, token_positions
        if self.prompt is None or self.tokenizer is None:
            raise CaptureError("this trace has no prompt text (was the prompt given as embeddings?)")
        if self.segments:
            out = []
            for offset, tok, length in self.segments:
                try:
                    out += [offset + p for p in token_positions(self.prompt, word, tok, occurrence, max_length=length)]
                except WordNotFound:  # e.g. cut off by one encoder's window but not the other's
                    pass
            if not out:
                from .words import split_words
                raise WordNotFound(f"{word!r} is in none of the text encoders' tokens of {self.prompt!r}; the prompt's "
                                   f"words: {', '.join(split_words(self.prompt))}")
            return out
        try:
            return token_positions(self.prompt, word, self.tokenizer, occurrence)
        except WordNotFound as e:
            if self.truncated:
                raise WordNotFound(f"{e} The prompt filled the text encoder's {len(self.token_ids)}-token window "
                                   f"and was cut there: {word!r} may have been truncated away.") from None
            raise

    @property
    def truncated(self) -> bool:
        """Whether the prompt filled the text encoder's window (so later words were cut off)."""
        ids, tok = self.token_ids, self.tokenizer
        if not ids or tok is None:
            return False
        pads = {t for t in (tok.pad_token_id, tok.eos_token_id, tok.sep_token_id) if t is not None}
        return len(ids) >= getattr(tok, "model_max_length", len(ids) + 1) and ids[-2] not in pads

    @property
    def layer_factors(self) -> dict[str, int]:
        """Layer -> how far its maps are downsampled from the latent (1, 2, 4, ...)."""
        out = {}
        for l, m in self.maps.items():
            h, w = m.shape[-2:]
            out[l] = next((d for d in (1, 2, 4, 8, 16, 32, 64) if -(-self.latent_size[0] // d) == h
                           and -(-self.latent_size[1] // d) == w), self.latent_size[0] // h)
        return out
