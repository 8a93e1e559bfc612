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
        ids = tok(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        opens = ids[0] in {getattr(tok, a, None) for a in ("bos_token_id", "cls_token_id")} - {None}
        for c, pos in classes_of(ids, tok, length, start=opens).items():
            out[c] += [offset + p for p in pos]
    return out
