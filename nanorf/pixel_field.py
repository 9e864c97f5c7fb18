"""A per-pixel refinement of the x-prediction head: each pixel reads its own noisy value.

Not in the paper (JiT's head, and the paper's, is one linear layer from each pixel token); our
choice for narrow models, off unless `ModelConfig.pix_field` > 0 (README, "Results on the toy").

Why. A pixel token is one 16 x 16 patch squeezed into the trunk's D numbers (128 in the toy).
From those alone the head cannot place an object's edge to the pixel: on real held-out scenes
noised only to t = 0.99 and given their real plans, the toy's MLP head redraws them with soft
rims, whose half-bright pixels read as other colours (strict 0.49, where the clean renders
score 1.0). Yet at such t the noisy patch itself says where every edge is. So, as pixel-space
diffusion decoders do (a neural field per patch, PixNerd; a light pixel decoder beside the
transformer, DeCo), a small MLP runs at every pixel of the patch and sees what the token does
not: that pixel's own noisy value z, its place in the patch, and the head's logit for it.

    a_j   = W_in [z_j, l_j] + e_j + W_c h          (W, ) for pixel j of a patch, h its token
    l'_j  = l_j + W_out GELU(W_mid GELU(a_j))      (3, ) refined logits

h (.., D) is the pixel token's final hidden state, l (.., p*p*3) the head's logits (before its
tanh, if any), z (.., p*p*3) the noisy patch, all in patchify's (row, column, channel) order;
e_j is a learned embedding of the pixel's place in the patch. W_out starts at zero, so a fresh
refinement returns the head's own logits. The token's hidden state (which sees the prompt and
the plan through attention) enters as W_c h only, pixel by pixel: the field adds no path from the
plan to the pixels that bypasses the shared attention.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PixelField(nn.Module):
    """(h (.., D), logits (.., p*p*3), z (.., p*p*3)) -> refined logits (.., p*p*3)."""

    chunk = 128   # tokens per pass: one pass over the toy's 64 x 9 tokens, (576, 256, 64) floats per
    # activation, falls out of the CPU's cache and took twice as long (2 cores); any chunk gives the
    # same numbers (tests/test_pixel_field.py)

    def __init__(self, dim: int, patch_size: int, width: int):
        super().__init__()
        self.p = patch_size
        self.cond = nn.Linear(dim, width)                           # per token, shared by its pixels
        self.place = nn.Parameter(torch.randn(patch_size ** 2, width) * 0.02)
        self.inp = nn.Linear(6, width)                              # the pixel's z and logit, 3 channels each
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, 3)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        lead, P = logits.shape[:-1], logits.shape[-1]
        h, logits, z = h.reshape(-1, h.shape[-1]), logits.reshape(-1, P), z.reshape(-1, P)   # n tokens
        parts = zip(h.split(self.chunk), logits.split(self.chunk), z.split(self.chunk))
        return torch.cat([self.refine(*part) for part in parts]).view(*lead, P)

    def refine(self, h: torch.Tensor, logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The module docstring's equations for n tokens: h (n, D), logits and z (n, p*p*3)."""
        n, P = logits.shape
        pix = torch.cat([z.view(n, -1, 3), logits.view(n, -1, 3)], -1)                # (n, p*p, 6)
        a = self.inp(pix) + self.place + self.cond(h).unsqueeze(1)                     # (n, p*p, W)
        delta = self.out(F.gelu(self.mid(F.gelu(a))))                                  # (n, p*p, 3)
        return logits + delta.view(n, P)
