import pytest

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
        tc[0].word_map("dog")
    with trace(sd1) as tc:
        run(sd1, "a dog", steps=1)
    assert not tc[0].truncated
