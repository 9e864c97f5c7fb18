"""Byte-level text tokenizer and the special tokens that delimit the sequence blocks.

The paper inherits Qwen3's BPE vocabulary with its decoder; nanorf's toy ships no vocabulary
files, so text is UTF-8 bytes (ids 0-255), which handles any language and needs no
download. A byte tokenizer can also carry a fixed word list (`ModelConfig.tokenizer =
"bytes+shapes"`: the shapes world's 42 words): each word, with or without its leading space, is
one token, and everything else stays bytes. That is what a BPE vocabulary does to such captions
(Qwen3 writes " red" as one token), and it makes the toy's texts 3-4x shorter. The special
tokens mark the blocks of the two sequences (docs/method.md,
"Sequences and the attention mask"):

    generation:     [BOS] prompt [BOR] r_1 ... r_N [BOP] p_1 ... p_M
    understanding:  [BOS] [BOI] v_1 ... v_V [EOI] question answer [EOS]

Representation tokens and image patches are not text and never pass through this
tokenizer: they have their own embeddings in model.py.

With a Qwen3 decoder (nanorf/pretrained.py, `load_qwen3`) the text goes through Qwen's own BPE
vocabulary instead: `QwenTokenizer` reads the checkpoint folder's `tokenizer.json` (with the
optional `tokenizers` package) and gives the same interface. `make_tokenizer` picks one from
`ModelConfig.tokenizer`.

The interface both have: `encode(text, max_len)`, `decode(ids)`, `is_special(id)` (a token that
is no text: generation stops on it, decoding skips it), the special ids `.bos .eos .boi .eoi
.bor .bop .pad`, and `vocab_size` (the rows of the embedding and LM head).
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[BOI]", "[EOI]", "[BOR]", "[BOP]")
INSTALL_HINT = 'pip install -e ".[pretrained]"'


class TokenizerError(ValueError):
    """A text that the configured context cannot hold, or ids that are not text."""


class ByteTokenizer:
    """UTF-8 bytes (ids 0-255), the special tokens, then optional whole words; `vocab_size`
    rounded up to a multiple of 8.

    words: each word w adds two tokens, "w" and " w". Encoding takes the longest word token
    that matches at each byte (greedy, like a BPE with fixed merges) and falls back to one byte,
    so any text still encodes, and decoding concatenates the tokens' bytes: an exact round trip.
    """

    def __init__(self, words=()):
        self.n_bytes = 256
        for i, name in enumerate(SPECIALS):
            setattr(self, name.strip("[]").lower(), self.n_bytes + i)  # self.pad, self.bos, ...
        first = self.n_bytes + len(SPECIALS)
        pieces = [p.encode("utf-8") for w in dict.fromkeys(words) for p in (w, " " + w) if len(p.encode("utf-8")) > 1]
        self._piece = dict(zip(range(first, first + len(pieces)), pieces))      # id -> bytes
        self._id = {b: i for i, b in self._piece.items()}                       # bytes -> id
        self._longest = max(map(len, pieces), default=1)
        self.vocab_size = (first + len(pieces) + 7) // 8 * 8  # a matmul-friendly head size

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        b, ids, i = text.encode("utf-8"), [], 0
        while i < len(b):
            for n in range(min(self._longest, len(b) - i), 1, -1):
                if b[i:i + n] in self._id:
                    ids.append(self._id[b[i:i + n]])
                    i += n
                    break
            else:
                ids.append(b[i])
                i += 1
        if max_len is not None and len(ids) > max_len:
            raise TokenizerError(
                f"text is {len(ids)} {'tokens' if self._piece else 'bytes'} but this model holds at most "
                f"{max_len}: {text[:40]!r}...")
        return ids

    def is_special(self, i: int) -> bool:
        """No text: a special token, or one of the unused rows up to vocab_size."""
        i = int(i)
        return not (0 <= i < self.n_bytes or i in self._piece)

    def decode(self, ids) -> str:
        """Tokens back to text; special tokens are skipped, broken UTF-8 is replaced."""
        out = b"".join(self._piece.get(int(i), bytes([int(i)]) if 0 <= int(i) < self.n_bytes else b"") for i in ids)
        return out.decode("utf-8", errors="replace")


def _name(entry) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or {"content": string, ...}."""
    return entry.get("content") if isinstance(entry, dict) else entry


class QwenTokenizer:
    """Qwen3's byte-level BPE (`tokenizer.json` of a checkpoint folder) plus nanorf's specials.

    The text ids are the checkpoint's own (0 .. n_text - 1). [BOS], [EOS] and [PAD] are Qwen's
    tokens where the folder names them: the ids in config.json (bos/eos/pad_token_id; Qwen3:
    <|endoftext|> for BOS, <|endoftext|> or <|im_end|> for EOS), else the strings in
    tokenizer_config.json (Qwen3: pad <|endoftext|>). The rest ([BOI] [EOI] [BOR] [BOP], and any
    of the three the folder lacks) are new ids appended after the checkpoint's embedding rows
    (`text_vocab`: config.json's vocab_size, 151,936 for Qwen3, above the tokenizer's 151,669
    tokens); `vocab_size` is that, rounded up to a multiple of 8 as the byte tokenizer's is.
    """

    def __init__(self, path, text_vocab: int = 0):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError(f"the Qwen tokenizer needs the tokenizers package: {INSTALL_HINT}") from None
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        file = folder / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"no tokenizer.json at {file}")
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:  # truncated or not a tokenizers file
            raise TokenizerError(f"cannot read {file}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
                from None
        self.path = str(path)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.n_text = max(vocab.values()) + 1 if vocab else 0                       # ids the BPE can produce
        cfg, tcfg = self._json(folder / "config.json"), self._json(folder / "tokenizer_config.json")
        self.text_vocab = text_vocab or cfg.get("vocab_size") or self.n_text
        if self.text_vocab < self.n_text:
            raise TokenizerError(f"{file} has {self.n_text} tokens but the embedding has only {self.text_vocab} rows")
        nxt = self.text_vocab
        for name in SPECIALS:
            attr = name.strip("[]").lower()
            tid = None
            if attr in ("bos", "eos", "pad"):
                tid = cfg.get(f"{attr}_token_id")
                tid = tid[0] if isinstance(tid, list) and tid else tid
                if not (isinstance(tid, int) and 0 <= tid < self.n_text):
                    tid = vocab.get(_name(tcfg.get(f"{attr}_token")) or "")
            if tid is None:
                tid, nxt = nxt, nxt + 1
            setattr(self, attr, tid)                                                 # self.bos, self.boi, ...
        self.n_new = nxt - self.text_vocab
        self.vocab_size = (nxt + 7) // 8 * 8
        added = self._tok.get_added_tokens_decoder()
        self._special = {i for i, t in added.items() if t.special} | {getattr(self, n.strip("[]").lower())
                                                                    for n in SPECIALS}

    @staticmethod
    def _json(file: Path) -> dict:
        try:
            d = json.loads(file.read_text()) if file.is_file() else {}
        except (OSError, ValueError) as e:
            raise TokenizerError(f"cannot read {file}: {type(e).__name__}") from None
        return d if isinstance(d, dict) else {}

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if max_len is not None and len(ids) > max_len:
            raise TokenizerError(
                f"text is {len(ids)} tokens but this model holds at most {max_len}: {text[:40]!r}...")
        return ids

    def is_special(self, i: int) -> bool:
        """nanorf's specials, the tokenizer's own special tokens (<|im_end|>, ...), and ids past its vocabulary."""
        i = int(i)
        return not 0 <= i < self.n_text or i in self._special

    def decode(self, ids) -> str:
        """Ids back to text; special tokens are skipped."""
        return self._tok.decode([int(i) for i in ids if not self.is_special(i)], skip_special_tokens=True)


def make_tokenizer(spec: str = ""):
    """The tokenizer a ModelConfig names: "" = bytes, "bytes+shapes" = bytes and the shapes
    world's words, else a Qwen3 folder or its tokenizer.json."""
    if spec == "bytes+shapes":
        from .shapes import vocabulary
        return ByteTokenizer(vocabulary())
    return QwenTokenizer(spec) if spec else ByteTokenizer()
