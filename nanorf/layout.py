"""The two sequences the model reads, token by token (docs/method.md, "Sequences and the attention mask").

    generation      [PAD..] [BOS] prompt [BOR] r_1 .. r_N [BOP] p_1 .. p_M      (left-padded)
    understanding   [BOS] [BOI] v_1 .. v_V [EOI] question answer [EOS] [PAD..]  (right-padded)
                    (in training, optionally more turns: .. [EOS] question answer [EOS] ..)

Each token is one `Token` row: its id, the expert that processes it, its RoPE position, the
image block it belongs to (if any), whether it is a noisy pixel patch, and the next-token
target it carries. `build_layout` stacks a batch of rows into (B, L) tensors, a `Layout`.

Left-padding generation and right-padding understanding puts every image block (r, p, v) in
the same columns for the whole batch, so blocks are spliced in with a plain concatenation
instead of scatters, and the sampler appends tokens at a common column (nanorf's choice).

Positions: text and representation tokens count up one by one; every token of an image block
(ViT tokens, pixel patches) shares one position (BAGEL), and spatial layout inside the block
comes from the 2-D embeddings that model.py adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .mot import PAD, PIX, REP, UND, attention_mask
from .tokenizer import ByteTokenizer

NO_BLOCK = -1    # a token outside any bidirectional image block
VIT_BLOCK = 0    # the ViT tokens v_1..v_V of an understanding sequence
PIX_BLOCK = 1    # the noisy pixel patches p_1..p_M of a generation sequence
NO_TARGET = -1   # no next-token loss at this column


class Token(NamedTuple):
    """One column of a sequence. `id` is 0 where model.embed splices in a block embedding
    (ViT features, a rep token, a pixel patch)."""
    id: int = 0
    modality: int = UND         # the FFN expert: UND / REP / PIX / PAD
    pos: int = 0                # RoPE position
    block: int = NO_BLOCK       # tokens of one image block see each other both ways
    noisy: bool = False         # a noisy pixel patch: nothing outside its block may see it
    target: int = NO_TARGET     # the id this column predicts (understanding answers)


PAD_TOKEN = Token(modality=PAD)


@dataclass
class Layout:
    """A padded batch of sequences, one (B, L) tensor per Token field, and where the blocks are."""
    tokens: torch.Tensor
    modality: torch.Tensor
    pos: torch.Tensor
    block: torch.Tensor
    noisy: torch.Tensor     # bool
    valid: torch.Tensor     # bool: not padding
    targets: torch.Tensor
    vit_cols: slice | None = None   # columns of v_1..v_V
    rep_cols: slice | None = None   # columns of r_1..r_n
    pix_cols: slice | None = None   # columns of p_1..p_M

    def mask(self, drop_rep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, L, L) boolean attention mask; drop_rep (B,) hides the rep sequence from the pixels."""
        return attention_mask(self.block, self.noisy, self.valid, self.modality, drop_rep)


def build_layout(rows: list[list[Token]], left: bool) -> Layout:
    """Stack rows of Tokens, padded on the left (generation) or the right (understanding)."""
    L = max(len(r) for r in rows)
    pad = [[PAD_TOKEN] * (L - len(r)) for r in rows]
    table = np.array([p + r if left else r + p for p, r in zip(pad, rows)], dtype=np.int64)   # (B, L, 6)
    tokens, modality, pos, block, noisy, targets = torch.from_numpy(table).unbind(-1)          # each (B, L)
    return Layout(tokens, modality, pos, block, noisy.bool(), modality != PAD, targets)


def gen_row(tok: ByteTokenizer, prompt: list[int], n_rep: int, n_pix: int, rf: bool = True) -> list[Token]:
    """One generation sequence: [BOS] prompt ([BOR] r_1..r_{n_rep}) ([BOP] p_1..p_{n_pix})."""
    row = [Token(tok.bos)] + [Token(c, pos=1 + i) for i, c in enumerate(prompt)]
    if rf:
        row.append(Token(tok.bor, REP, pos=len(row)))
        row += [Token(modality=REP, pos=len(row) + i) for i in range(n_rep)]
    if n_pix:
        row.append(Token(tok.bop, PIX, pos=len(row)))
        row += [Token(modality=PIX, pos=len(row), block=PIX_BLOCK, noisy=True)] * n_pix
    return row


def und_row(tok: ByteTokenizer, n_vit: int, question: list[int], answer: list[int], eos: bool = True,
            follow_ups=()) -> list[Token]:
    """One understanding sequence: [BOS][BOI] v_1..v_V [EOI] question answer ([EOS]); targets on
    the answer (and [EOS]). follow_ups: more (question, answer) turns about the same image, each
    after the previous answer's [EOS] and ending in its own, with targets on its answer and [EOS]
    (training only: eos must be True)."""
    head = [Token(tok.bos), Token(tok.boi, pos=1)] + [Token(pos=2, block=VIT_BLOCK)] * n_vit
    head.append(Token(tok.eoi, pos=3))
    if follow_ups and not eos:
        raise ValueError("follow-up turns end in [EOS]: they are for training sequences")
    text, answered = [], []  # the ids after [EOI]; whether each is an answer token or its [EOS]
    end = [tok.eos] if eos else []
    for q, a in [(question, answer), *follow_ups]:
        text += q + a + end
        answered += [False] * len(q) + [True] * (len(a) + len(end))
    # the column of text[i] predicts text[i + 1]: an answer's predecessors carry targets
    return head + [Token(c, pos=4 + i, target=text[i + 1] if i + 1 < len(text) and answered[i + 1] else NO_TARGET)
                   for i, c in enumerate(text)]


def generation_layout(tok: ByteTokenizer, prompts: list[list[int]], n_rep: int, n_pix: int,
                      rf: bool = True) -> Layout:
    """[BOS] prompt [BOR] r_1..r_{n_rep} ([BOP] p_1..p_M if n_pix). n_rep may be less than N
    while sampling; without rep tokens (rf=False, the pixel-only baseline) there is no [BOR]."""
    lay = build_layout([gen_row(tok, prompt, n_rep, n_pix, rf) for prompt in prompts], left=True)
    end = lay.tokens.shape[1]
    if n_pix:
        lay.pix_cols = slice(end - n_pix, end)
        end -= n_pix + 1                                                            # before [BOP]
    if rf:
        lay.rep_cols = slice(end - n_rep, end)
    return lay


def understanding_layout(tok: ByteTokenizer, n_vit: int, questions: list[list[int]], answers: list[list[int]],
                         eos: bool = True, follow_ups=None) -> Layout:
    """[BOS][BOI] v_1..v_V [EOI] question answer [EOS]; targets on the answer (and [EOS]).
    follow_ups: per row, its further (question, answer) turns (und_row), or None."""
    more = follow_ups or [()] * len(questions)
    lay = build_layout([und_row(tok, n_vit, q, a, eos, f) for q, a, f in zip(questions, answers, more)], left=False)
    lay.vit_cols = slice(2, 2 + n_vit)
    return lay
