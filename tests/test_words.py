import pytest

from saam.aggregate import word_map
from saam.testing import clip_tokenizer
from saam.words import WordNotFound, token_positions


@pytest.fixture(scope="module")
def bert():
    from saam.shapes.model import load_text_encoder
    return load_text_encoder()[1]


def test_clip_positions_multi_token_and_repeats():
    tok = clip_tokenizer()
    prompt = "a rose-colored vase next to a Vase of roses"
    ids = tok(prompt).input_ids
    assert token_positions(prompt, "vase", tok) == [5]
    assert token_positions(prompt, "vase", tok, occurrence=1) == [9]
    pos = token_positions(prompt, "rose-colored", tok)
    assert pos == [2, 3, 4] and ids[2] == tok("rose", add_special_tokens=False).input_ids[0]
    with pytest.raises(WordNotFound, match="occurs 2 time"):
        token_positions(prompt, "vase", tok, occurrence=2)


def test_bert_wordpiece_subwords(bert):
    prompt = "a magenta hexagon and a red hexagon"
    pieces = bert.tokenize("hexagon")
    assert len(pieces) > 1
    pos = token_positions(prompt, "hexagon", bert, occurrence=1)
    assert [bert.convert_ids_to_tokens(bert(prompt).input_ids[i]) for i in pos] == pieces
    with pytest.raises(WordNotFound, match="words are"):
        token_positions(prompt, "circle", bert)


def test_truncated_word_is_an_error():
    tok = clip_tokenizer()
    prompt = " ".join(["cat"] * 80) + " dog"
    with pytest.raises(WordNotFound, match="77-token window"):
        token_positions(prompt, "dog", tok)


def test_all_occurrences_merge_as_daam_does():
    tok = clip_tokenizer()
    prompt = "a rose-colored vase next to a Vase of roses"
    assert token_positions(prompt, "vase", tok, occurrence="all") == [5, 9]
    with pytest.raises(TypeError, match="int or 'all'"):
        token_positions(prompt, "vase", tok, occurrence="2")


def test_a_traced_prompt_cut_by_the_window_says_so(sd1):
    from conftest import run
    from saam.capture import trace
    with trace(sd1) as tc:
        run(sd1, " ".join(["cat"] * 80) + " dog", steps=1)
    assert tc[0].truncated
    with pytest.raises(WordNotFound, match="77-token window and was cut there"):
        word_map(tc[0], "dog")
    with trace(sd1) as tc:
        run(sd1, "a dog", steps=1)
    assert not tc[0].truncated


def _own_tokens(tok, text):
    return tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("which", ["clip", "bert"])
def test_every_hrv_word_aligns_with_the_tokenizer(which, bert):
    """HRV's 340 concept words (McDonald's, T-shirt, Yo-yo, Rio de Janeiro ...), alone as the relevance
    pass encodes them and inside a caption with a possessive, a contraction and repeated punctuation."""
    from saam.relevance import load_concepts
    tok = clip_tokenizer() if which == "clip" else bert
    words = [w for ws in load_concepts("hrv").values() for w in ws]
    assert len(words) == 340
    for w in words:
        own = _own_tokens(tok, w)
        assert token_positions(w, w, tok) == list(range(1, 1 + len(own))), w
        prompt = f"the kid's photo of {w}, isn't it great!!!"
        ids = tok(prompt).input_ids
        assert [ids[i] for i in token_positions(prompt, w, tok)] == own, (w, prompt)


def test_clip_possessives_contractions_and_punctuation():
    """CLIP makes 's, 't and !!! one token each; the word before keeps only its own tokens, and the
    whole word ("McDonald's", "don't") gets both."""
    tok = clip_tokenizer()
    prompt = "a McDonald's sign that doesn't glow!!! next to the man's dog"
    ids = tok(prompt).input_ids
    name = lambda pos: tok.convert_ids_to_tokens([ids[i] for i in pos])  # noqa: E731
    assert name(token_positions(prompt, "McDonald's", tok)) == ["mcdonald</w>", "'s</w>"]
    assert name(token_positions(prompt, "McDonald", tok)) == ["mcdonald</w>"]
    assert name(token_positions(prompt, "doesn't", tok)) == ["doesn</w>", "'t</w>"]
    assert name(token_positions(prompt, "glow", tok)) == ["glow</w>"]
    assert name(token_positions(prompt, "dog", tok)) == ["dog</w>"]
    assert name(token_positions(prompt, "man", tok)) == ["man</w>"]


COCO_STYLE = [
    "A man's bicycle leaning against a store's window.",
    "Two dogs that don't seem to like each other's toys!!!",
    "The cat isn't on the couch; it's under the table...",
    "A woman holding a McDonald's cup and a hot-dog (with mustard).",
    "Kids' toys scattered on the floor -- what a mess?!",
    "A 1950's style diner with red booths & chrome stools",
]


@pytest.mark.parametrize("which", ["clip", "bert"])
def test_every_word_of_coco_style_captions_has_its_tokens(which, bert):
    """Every word of captions with possessives, contractions and repeated punctuation finds tokens, and
    together the words cover every token of the caption (nothing is left unaccounted for)."""
    from saam.words import split_words, word_spans
    tok = clip_tokenizer() if which == "clip" else bert
    for caption in COCO_STYLE:
        spans = word_spans(caption, tok)
        assert [w for w, _ in spans] == split_words(caption)
        assert all(pos for _, pos in spans), caption
        n = len(tok(caption).input_ids)
        assert sorted({p for _, pos in spans for p in pos}) == list(range(1, n - 1)), caption
        for w in split_words(caption):
            if w.isalpha():
                token_positions(caption, w, tok, occurrence="all")


def test_a_templated_prompt_counts_only_the_prompts_tokens_and_refuses_a_foreign_tokenizer():
    """words.Templated: a word's positions inside a chat template are its own tokens (a template token
    that spells the same word is not), and a pipeline that drops more tokens than the tokenizer makes of
    the template before the prompt is refused (the prompt's first words would be dropped)."""
    from saam.testing import qwen_tokenizer
    from saam.words import Templated, segment_classes, token_positions
    tok = qwen_tokenizer()
    t = Templated(tok, "<|im_start|>user\nDescribe the color:", "<|im_end|>\n<|im_start|>assistant\n")
    ids, _ = t.encode("a red cat")
    assert tok.convert_ids_to_tokens([ids[p] for p in token_positions("a red cat", "cat", t)]) == ["Ġcat"]
    both = t.encode("the color red")[0]
    colour = tok.convert_tokens_to_ids("Ġcolor")
    [pos] = token_positions("the color red", "color", t)  # the prompt's "color", not the template's
    assert both[pos] == colour and both.index(colour) < pos
    cls = segment_classes("a red cat", [(0, t, 20)])
    assert tok.decode([ids[p] for p in cls["words"]]) == "a red cat"
    assert tok.decode([ids[p] for p in cls["start"]]) == t.prefix
    assert cls["padding"] == list(range(len(ids), 20))
    with pytest.raises(ValueError, match="prompt's first words would be dropped"):
        Templated(tok, "<|im_start|>user\n", "", drop=10)
