"""Byte-level text tokenizer and the special tokens that delimit the sequence blocks.

The paper inherits Qwen3's BPE vocabulary with its decoder; nanorf's toy ships no vocabulary
files, so text is UTF-8 bytes (ids 0-255), which handles any language and needs no
download. The special tokens mark the blocks of the two sequences (docs/method.md,
"Sequences and the attention mask"):

    generation:     [BOS] prompt [BOR] r_1 ... r_N [BOP] p_1 ... p_M
    understanding:  [BOS] [BOI] v_1 ... v_V [EOI] question answer [EOS]

Representation tokens and image patches are not text and never pass through this
tokenizer: they have their own embeddings in model.py.
"""

from __future__ import annotations

SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[BOI]", "[EOI]", "[BOR]", "[BOP]")


class TokenizerError(ValueError):
    """A text that the configured context cannot hold, or ids that are not text."""


class ByteTokenizer:
    """UTF-8 bytes plus the special tokens; `vocab_size` rounded up to a multiple of 8."""

    def __init__(self):
        self.n_bytes = 256
        for i, name in enumerate(SPECIALS):
            setattr(self, name.strip("[]").lower(), self.n_bytes + i)  # self.pad, self.bos, ...
        n = self.n_bytes + len(SPECIALS)
        self.vocab_size = (n + 7) // 8 * 8  # a matmul-friendly head size

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        ids = list(text.encode("utf-8"))
        if max_len is not None and len(ids) > max_len:
            raise TokenizerError(
                f"text is {len(ids)} bytes but this model holds at most {max_len}: {text[:40]!r}...")
        return ids

    def decode(self, ids) -> str:
        """Bytes back to text; special tokens are skipped, broken UTF-8 is replaced."""
        return bytes(int(i) for i in ids if 0 <= int(i) < self.n_bytes).decode("utf-8", errors="replace")
