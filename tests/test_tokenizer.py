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
