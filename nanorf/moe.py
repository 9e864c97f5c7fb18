"""Routed mixture-of-experts FFN (Qwen3-MoE) and its load-balancing loss.

docs/method.md, "MoT routing": the paper's decoder is Qwen3-30B-A3B, whose every FFN is a pool
of routed SwiGLU experts (128 per layer, top-8). In the MoT each of the three expert groups
(und / rep / pix) is then one such pool, so routing has two levels: a token's type picks the
pool (hard, `mot.Routing`), then the pool's learned router picks k experts in it.

Inside a pool, as Qwen3-MoE computes it:

    p = softmax(router(x))                    (n, E), in float32
    w, e = top_k(p)                           k weights and expert ids per token
    w = w / sum(w)       if norm_topk_prob    (Qwen3-30B-A3B: yes)
    y = sum_j w_j * SwiGLU_{e_j}(x)

Each expert runs only on the tokens routed to it: the n*k (token, expert) pairs are sorted by
expert with one gather, each expert takes its contiguous slice, and the weighted outputs are
added back with one index_add. Compute scales with n*k, not n*E.

The auxiliary load-balancing loss (Switch Transformer eq. 4-6, as Qwen3-MoE's
`load_balancing_loss_func`): with f_i the fraction of the n*k assignments that went to expert i
and P_i the mean router probability of expert i over the same tokens,

    L_aux = E * sum_i f_i * P_i        (1 when perfectly balanced with k = 1; k when balanced with top-k)

computed over the tokens of every layer of one pool together. The caller adds
`MoTConfig.aux_loss_coef * L_aux` to its loss (Qwen3-MoE's router_aux_loss_coef, 0.001).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoEFFN(nn.Module):
    """Pre-norm pool of routed SwiGLU experts: (n, D) -> (n, D).

    Expert weights are stacked, one (E, ...) tensor per projection, named as the dense FFN
    names them (gate, up, down); the router is a bias-free (D -> E) linear map. `norm` is the
    pre-norm (mot.RMSNorm; passed in so this file needs nothing from mot.py)."""

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int, norm_topk_prob: bool, norm: nn.Module):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk_prob = n_experts, top_k, norm_topk_prob
        self.norm = norm
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.gate = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.up = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.down = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.init_weights(0.02, 0.02)  # RFModel re-draws them with its residual scaling

    def init_weights(self, std: float, down_std: float):
        for w in (self.router.weight, self.gate, self.up):
            nn.init.normal_(w, std=std)
        nn.init.normal_(self.down, std=down_std)  # residual-branch output, like the dense FFN's down

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits (n, E) -> top-k weights (n, k) in float32 and expert ids (n, k)."""
        probs = logits.float().softmax(-1)
        w, idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return w, idx

    def forward(self, x: torch.Tensor, log: list | None = None) -> torch.Tensor:
        """x (n, D). `log`: a list that receives this call's router logits (n, E), for the loss."""
        h = self.norm(x)
        logits = self.router(h)                                                    # (n, E)
        if log is not None:
            log.append(logits)
        w, idx = self.route(logits)                                                # (n, k) each
        n, k = idx.shape
        flat = idx.reshape(-1)                                                     # (n*k,) expert of each pair
        order = torch.argsort(flat, stable=True)                                   # pairs grouped by expert
        token = order // k                                                         # token of each sorted pair
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        xs = h.index_select(0, token).split(counts)                                # per expert, (n_e, D)
        ys = [h.new_zeros(0, h.shape[1])]  # n = 0: nothing to route
        for e, xe in enumerate(xs):
            if xe.shape[0]:
                ys.append(F.linear(F.silu(F.linear(xe, self.gate[e])) * F.linear(xe, self.up[e]), self.down[e]))
        y = torch.cat(ys) * w.reshape(-1)[order, None].to(h.dtype)                 # (n*k, D) weighted
        return h.new_zeros(n, h.shape[1]).index_add(0, token, y)


def load_balancing_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """L_aux = E * sum_i f_i P_i over router logits (N, E) of one pool (every layer's tokens
    concatenated); see the module docstring. 0 without tokens."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    E = logits.shape[-1]
    probs = logits.float().softmax(-1)                                             # (N, E)
    idx = probs.topk(top_k, dim=-1).indices                                        # (N, k)
    f = torch.bincount(idx.reshape(-1), minlength=E).float() / logits.shape[0]     # assignments per token
    return E * (f * probs.mean(0)).sum()
