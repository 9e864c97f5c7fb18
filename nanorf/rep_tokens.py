"""RF's representation tokens as the decoder sees them: discrete VQ code ids with their own
identity embedding, a K-way readout, the next-token cross-entropy L_Rep, and the sampler's
guided draw (docs/method.md, "Representation targets and online VQ" and "Sampling"; the
paper's rep-logit CFG l = l_u + w_rep (l_c - l_u), then top-k).

The ids come from the online VQ (vq.py, targets.py); the 2-D spatial embedding that is added
to each token lives in RFModel (`rep_pos`). Table 3c's continuous targets have the same
interface (variants.ContinuousRep).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def sample_logits(logits: torch.Tensor, top_k: int = 0, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) -> (B,) ids. temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)


class DiscreteRep(nn.Module):
    """RF's representation tokens: VQ code ids, an identity embedding, a K-way head.

    The interface every rep-target kind has (variants.ContinuousRep is the other):
      embed(codes)                  (B, n) ids -> (B, n, D) identity embeddings
      readout(h)                    (B, n, D) hidden states -> what the next token is drawn from
      loss(out, targets, draws)     L_Rep on the readout at [BOR], r_1..r_{N-1}
      draw(out, n, w, s, gen)       the next token of n sequences, guided with weight w
      buffer(rows, n, device)       zeros that hold n tokens per row
      target_draws(B, generator)    random draws the loss needs for a batch (train.Stream), or None
    """

    def __init__(self, dim: int, K: int):
        super().__init__()
        self.K = K
        self.emb = nn.Embedding(K, dim)
        self.head = nn.Linear(dim, K, bias=False)

    def init_weights(self):
        nn.init.normal_(self.head.weight, std=0.02)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.emb(codes)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)                                                        # (.., K) logits

    def loss(self, out: torch.Tensor, targets: torch.Tensor, draws=None) -> torch.Tensor:
        """Next-token CE: out (B, N, K) logits, targets (B, N) code ids."""
        return F.cross_entropy(out.reshape(-1, self.K).float(), targets.reshape(-1))

    def draw(self, out: torch.Tensor, n: int, w: float, settings, generator=None) -> torch.Tensor:
        """out (n, K) logits, or (2n, K) with the prompt-dropped rows second when guided:
        l = l_u + w (l_c - l_u), then top-k / temperature sampling -> (n,) ids."""
        logits = out.float()
        if out.shape[0] > n:
            logits = logits[n:] + w * (logits[:n] - logits[n:])
        return sample_logits(logits[:n], settings.top_k, settings.temperature, generator)

    def buffer(self, rows: int, n: int, device) -> torch.Tensor:
        return torch.zeros(rows, n, dtype=torch.long, device=device)

    def target_draws(self, B: int, generator: torch.Generator):
        return None  # codes need no noise; the step's generator is left untouched
