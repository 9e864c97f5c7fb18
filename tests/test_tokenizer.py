"""Tests for nanorf/tokenizer.py: UTF-8 byte round trips, special tokens, vocab size, errors."""

import pytest

from nanorf.tokenizer import SPECIALS, ByteTokenizer, TokenizerError


@pytest.mark.parametrize("text", ["a red circle at the top left", "", "café ☕ 日本", "tab\tnew\nline\x00"])
def test_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_non_ascii_is_bytes_not_characters():
    tok = ByteTokenizer()
    ids = tok.encode("café ☕ 日本")
    # c a f é(2) space ☕(3) space 日(3) 本(3) = 3 + 2 + 1 + 3 + 1 + 3 + 3
    assert len(ids) == 16
    assert ids[3:5] == [0xC3, 0xA9]     # é
    assert ids[6:9] == [0xE2, 0x98, 0x95]  # ☕


def test_specials_distinct_and_above_bytes():
    tok = ByteTokenizer()
    ids = [tok.pad, tok.bos, tok.eos, tok.boi, tok.eoi, tok.bor, tok.bop]
    assert len(set(ids)) == len(ids) == len(SPECIALS)
    assert all(256 <= i < tok.vocab_size for i in ids)
    assert tok.n_bytes == 256


def test_vocab_size_multiple_of_8():
    tok = ByteTokenizer()
    assert tok.vocab_size % 8 == 0
    assert 256 + len(SPECIALS) <= tok.vocab_size < 256 + len(SPECIALS) + 8


def test_decode_skips_specials_and_replaces_broken_utf8():
    tok = ByteTokenizer()
    assert tok.decode([tok.bos, 104, tok.eos, 105, tok.bor, tok.pad]) == "hi"
    assert tok.decode([]) == ""
    assert tok.decode([0xFF, 104]) == "\ufffdh"
    assert tok.decode([0xE6, 0x97]) == "\ufffd"    # a truncated 3-byte character
    import torch
    assert tok.decode(torch.tensor([104, tok.eos, 105])) == "hi"   # tensors of ids work too


def test_too_long_raises_clear_error():
    tok = ByteTokenizer()
    assert tok.encode("abcde", max_len=5) == [97, 98, 99, 100, 101]  # exactly at the limit is fine
    with pytest.raises(TokenizerError) as e:
        tok.encode("abcdef", max_len=5)
    msg = str(e.value)
    assert "6" in msg and "5" in msg and "abcdef" in msg
    # the limit counts bytes: two characters, six bytes
    with pytest.raises(TokenizerError, match="6 bytes"):
        tok.encode("日本", max_len=5)
    assert issubclass(TokenizerError, ValueError)


def test_word_tokens_round_trip_and_fall_back_to_bytes():
    tok = ByteTokenizer(["red", "circle", "circles"])
    ids = tok.encode("a red circles redder")
    # "a" is no word: a byte; " red", " circles" (longest match, not " circle" + "s") are one token each;
    # " redder" is " red" + "d" "e" "r"
    assert ids[0] == ord("a") and tok.decode(ids[1:2]) == " red" and tok.decode(ids[2:3]) == " circles"
    assert ids[3:] == [tok.encode(" red")[0], ord("d"), ord("e"), ord("r")]
    assert len(ids) == 7
    assert tok.decode(ids) == "a red circles redder"
    assert tok.encode("red") != tok.encode(" red")[0:1] and len(tok.encode("red")) == 1   # with and without the space
    for text in ["", "café ☕ 日本", "circlecircle", "  red  "]:
        assert tok.decode(tok.encode(text)) == text
    words = [i for i in ids if i >= 256]
    assert all(not tok.is_special(i) for i in words) and all(i > tok.bop for i in words)
    assert tok.is_special(tok.bos) and tok.is_special(tok.vocab_size - 1)
    assert tok.vocab_size % 8 == 0 and tok.vocab_size >= 256 + len(SPECIALS) + 6
    with pytest.raises(TokenizerError, match="3 tokens"):
        tok.encode("red red red", max_len=2)


def test_shapes_words_cover_every_text_of_the_world():
    """With the toy's word list every word of every caption, question and answer is one token:
    the tokens are the words plus the "?" or "." that ends a question."""
    from nanorf.shapes import ShapesWorld
    from nanorf.tokenizer import make_tokenizer
    tok = make_tokenizer("bytes+shapes")
    world = ShapesWorld(48, seed=3)
    for i in range(300):
        it = world[i]
        for text in [it["caption"], *(t for qa in it["qa"] for t in qa)]:
            ids = tok.encode(text)
            assert tok.decode(ids) == text
            assert len(ids) == len(text.split()) + text.endswith(("?", ".")), text
