"""Which token positions of a prompt belong to a word, for any Hugging Face tokenizer.

A prompt's words are ``\\w+`` runs and single non-space symbols ("McDonald's" is "McDonald",
"'", "s"). A word's tokens are the tokens whose characters overlap the word's characters in the
tokenizer's own tokenization of the whole prompt (its offset mapping), so the alignment agrees
with the pipeline's tokenizer however it cuts: CLIP's BPE makes ``'s``, ``'t`` and ``!!!`` one
token each, BERT's WordPiece splits "hexagon" into sub-words; a token shared by two words
(CLIP's ``'s``) belongs to both. Tokenizers without offsets (slow Python tokenizers) fall back to
tokenizing each word alone, checked against the whole prompt's tokens, and fail loudly where that
does not hold instead of pointing at the wrong tokens.
"""
from __future__ import annotations

import re

_SPLIT = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> list[str]:
    return _SPLIT.findall(text)


class WordNotFound(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def word_spans(prompt: str, tokenizer) -> list[tuple[str, list[int]]]:
    """Each word of the prompt with its token positions in the text-encoder input (start token
    included, untruncated: positions past the encoder's window are checked by ``token_positions``)."""
    if getattr(tokenizer, "is_fast", False):
        return _spans_by_offsets(prompt, tokenizer)
    return _spans_by_pieces(prompt, tokenizer)


def _spans_by_offsets(prompt: str, tokenizer) -> list[tuple[str, list[int]]]:
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True, truncation=False)
    special = set(tokenizer.all_special_ids)
    tokens = [(i, a, b) for i, (t, (a, b)) in enumerate(zip(enc.input_ids, enc["offset_mapping"]))
              if b > a and t not in special]
    return [(m.group(), [i for i, a, b in tokens if a < m.end() and b > m.start()])
            for m in _SPLIT.finditer(prompt)]


def _spans_by_pieces(prompt: str, tokenizer) -> list[tuple[str, list[int]]]:
    words = split_words(prompt)
    pieces = [tokenizer(w, add_special_tokens=False).input_ids for w in words]
    full = tokenizer(prompt, add_special_tokens=True).input_ids
    flat = [t for p in pieces for t in p]
    for start in range(0, 4):
        if full[start:start + len(flat)] == flat:
            break
    else:
        raise ValueError(f"cannot align the words of {prompt!r} with {type(tokenizer).__name__}'s "
                         "tokens: it has no offset mapping (use its fast version, e.g. "
                         "AutoTokenizer.from_pretrained(..., use_fast=True)) and does not tokenize "
                         "words independently")
    out, pos = [], start
    for w, p in zip(words, pieces):
        out.append((w, list(range(pos, pos + len(p)))))
        pos += len(p)
    return out


def token_positions(prompt: str, word: str, tokenizer, occurrence: int | str = 0,
                    max_length: int | None = None) -> list[int]:
    """Token positions of ``word`` (one or more words, e.g. "rose-colored") in ``prompt``.

    Matching is case-insensitive on whole words. ``occurrence`` picks among repeats: an index
    (default 0, the first), or ``"all"`` for every occurrence together, as DAAM merges them.

    Raises:
        WordNotFound: the word is not in the prompt (the message lists the prompt's words), or
            the occurrence does not exist, or it lies beyond the text encoder's window.
    """
    spans = word_spans(prompt, tokenizer)
    query = [w.lower() for w in split_words(word)]
    if not query:
        raise WordNotFound(f"empty word {word!r}")
    lowered = [w.lower() for w, _ in spans]
    hits = [i for i in range(len(spans) - len(query) + 1) if lowered[i:i + len(query)] == query]
    if not hits:
        raise WordNotFound(f"{word!r} is not a word of the prompt {prompt!r}; its words are "
                           f"{[w for w, _ in spans]}")
    if occurrence == "all":
        pos = [p for i in hits for _, ps in spans[i:i + len(query)] for p in ps]
    elif not isinstance(occurrence, int) or isinstance(occurrence, bool):
        raise TypeError(f"occurrence must be an int or 'all', got {occurrence!r}")
    elif occurrence >= len(hits) or occurrence < 0:
        raise WordNotFound(f"{word!r} occurs {len(hits)} time(s) in {prompt!r}; "
                           f"occurrence {occurrence} does not exist")
    else:
        i = hits[occurrence]
        pos = [p for _, ps in spans[i:i + len(query)] for p in ps]
    pos = list(dict.fromkeys(pos))  # a token shared by two words (CLIP's 's) counts once
    if not pos:
        raise WordNotFound(f"{word!r} has no tokens of its own in {prompt!r} "
                           f"({type(tokenizer).__name__} drops it)")
    limit = max_length or getattr(tokenizer, "model_max_length", None)
    if limit and limit < 10_000 and max(pos) >= limit - 1:
        raise WordNotFound(f"{word!r} lies beyond the text encoder's {limit}-token window "
                           f"(token {max(pos)}) and was truncated away")
    return pos


CLASSES = ("start", "words", "end", "padding")  # what each position of a text-encoder input holds


def classes_of(ids: list[int], tok, n: int, start: bool) -> dict[str, list[int]]:
    """One tokenizer's ids over ``n`` positions by class; ``start``: whether they open with a start
    token (CLIP, BERT; T5 has none). The end token is the first end-of-text / [SEP]."""
    s = int(start)
    ends = {t for t in (tok.eos_token_id, tok.sep_token_id) if t is not None}
    end = next((i for i in range(s, len(ids)) if ids[i] in ends), len(ids))
    return dict(start=list(range(s)), words=list(range(s, end)), end=[end] if end < n else [],
                padding=list(range(end + 1, n)))


def segment_classes(prompt: str, segments: list[tuple[int, object, int]]) -> dict[str, list[int]]:
    """An MM-DiT's text sequence by class: each encoder's segment (offset, tokenizer, length)
    tokenized as the pipeline pads it, its classes placed at the segment's offset."""
    out: dict[str, list[int]] = {c: [] for c in CLASSES}
    for offset, tok, length in segments:
        if hasattr(tok, "classes"):  # a templated prompt (words.Templated)
            for c, pos in tok.classes(prompt, length).items():
                out[c] += [offset + p for p in pos]
            continue
        ids = tok(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        opens = ids[0] in {getattr(tok, a, None) for a in ("bos_token_id", "cls_token_id")} - {None}
        for c, pos in classes_of(ids, tok, length, start=opens).items():
            out[c] += [offset + p for p in pos]
    return out


class Templated:
    """A tokenizer as a pipeline applies it inside a prompt template (a chat template: Qwen-Image, FLUX.2):
    the prompt's tokens where the model sees them, the template's never counted as the prompt's.

    ``prefix`` + prompt + ``suffix`` is what the pipeline tokenizes; its first ``drop`` tokens are
    dropped before the denoiser sees the sequence (Qwen-Image drops its system prompt). Called like
    the tokenizer on a prompt, it returns the ids of that sequence with each token's characters in
    the *prompt's* coordinates (a template token: (0, 0)), so ``token_positions`` and
    ``segment_classes`` work on it unchanged; every other attribute is the tokenizer's. Checked when
    made: the dropped tokens must all lie before the prompt (else its first words would be cut).
    """

    is_fast = True
    model_max_length = 10**9  # no window of its own: the pipeline's max_sequence_length cuts the sequence

    def __init__(self, tokenizer, prefix: str, suffix: str = "", drop: int = 0):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(f"a templated prompt needs a fast tokenizer (offsets); got {type(tokenizer).__name__}")
        self.tokenizer, self.prefix, self.suffix, self.drop = tokenizer, prefix, suffix, drop
        # a rendered chat that opens with the start token gets no second one (transformers' rule for chat templates)
        bos = getattr(tokenizer, "bos_token", None)
        self.special = not (bos and prefix.startswith(bos))
        own = len(tokenizer(prefix, add_special_tokens=self.special).input_ids)
        if drop > own:
            raise ValueError(f"the pipeline drops the first {drop} tokens of its template, but this tokenizer "
                             f"({type(tokenizer).__name__}) cuts the template's text before the prompt into {own}: "
                             "the prompt's first words would be dropped; this tokenizer does not belong to the pipeline")

    def __getattr__(self, name):
        tok = self.__dict__.get("tokenizer")
        if tok is None or name.startswith("__"):  # (unpickling asks before the state is set)
            raise AttributeError(name)
        return getattr(tok, name)

    def encode(self, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids the denoiser sees for ``prompt`` (template included, ``drop`` removed) and each one's
        characters in ``prompt`` ((0, 0) for the template's)."""
        at = len(self.prefix)
        enc = self.tokenizer(self.prefix + prompt + self.suffix, add_special_tokens=self.special, return_offsets_mapping=True)
        offsets = [(max(a, at) - at, min(b, at + len(prompt)) - at) if b > at and a < at + len(prompt) else (0, 0)
                   for a, b in enc["offset_mapping"]]
        return list(enc.input_ids[self.drop:]), offsets[self.drop:]

    def __call__(self, prompt: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False,
                 truncation: bool = False, padding=False, max_length: int | None = None, **_):
        from transformers import BatchEncoding
        ids, offsets = self.encode(prompt)
        if truncation and max_length:
            ids, offsets = ids[:max_length], offsets[:max_length]
        if padding == "max_length" and max_length and len(ids) < max_length:
            pad = self.tokenizer.pad_token_id
            offsets += [(0, 0)] * (max_length - len(ids))
            ids = ids + [pad] * (max_length - len(ids))
        out = {"input_ids": ids}
        if return_offsets_mapping:
            out["offset_mapping"] = offsets
        return BatchEncoding(out)

    def classes(self, prompt: str, length: int) -> dict[str, list[int]]:
        """Positions of a ``length``-token sequence by class: the template before the prompt as "start",
        the prompt's tokens as "words", the template after it as "end", then "padding"."""
        ids, offsets = self.encode(prompt)
        ids, offsets = ids[:length], offsets[:length]
        words = [i for i, (a, b) in enumerate(offsets) if b > a]
        first = words[0] if words else len(ids)
        last = words[-1] if words else len(ids) - 1
        return dict(start=list(range(first)), words=list(range(first, last + 1)),
                    end=list(range(last + 1, len(ids))), padding=list(range(len(ids), length)))
