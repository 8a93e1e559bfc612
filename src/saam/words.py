"""Which token positions of a prompt belong to a word, for any Hugging Face tokenizer.

The prompt is split into words and punctuation (``\\w+`` or one non-space symbol), each piece is
tokenized alone, and the pieces' tokens are laid end to end after the tokenizer's start token(s).
That alignment is checked against the tokenization of the whole prompt, so a tokenizer for
which it does not hold fails loudly instead of pointing at the wrong tokens. CLIP's BPE
(SD 1.x/2.x/XL) and BERT's WordPiece (the ShapesWorld model) both satisfy it.
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
    """Each word of the prompt with its token positions in the padded text-encoder input."""
    words = split_words(prompt)
    pieces = [tokenizer(w, add_special_tokens=False).input_ids for w in words]
    full = tokenizer(prompt, add_special_tokens=True).input_ids
    flat = [t for p in pieces for t in p]
    for start in range(0, 4):
        if full[start:start + len(flat)] == flat:
            break
    else:
        raise ValueError(f"cannot align the words of {prompt!r} with {type(tokenizer).__name__}'s "
                         "tokens; word maps need a tokenizer that tokenizes words independently")
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
    limit = max_length or getattr(tokenizer, "model_max_length", None)
    if limit and limit < 10_000 and max(pos) >= limit - 1:
        raise WordNotFound(f"{word!r} lies beyond the text encoder's {limit}-token window "
                           f"(token {max(pos)}) and was truncated away")
    return pos
