"""Mixture-of-Transformers decoder: shared self-attention, FFN experts routed by token type.

docs/method.md, "MoT routing": all tokens share self-attention, and each token's
feed-forward network is one of three modality-specific experts (understanding,
representation prediction, pixel generation). Routing is hard, by token type:

    UND = 0  text, ViT tokens, [BOS] [EOS] [BOI] [EOI]
    REP = 1  representation tokens and [BOR]
    PIX = 2  pixel patches and [BOP]
    PAD = 3  padding: no expert, zero update

Each expert runs only on its own tokens (gather by index, scatter back): compute is
proportional to the tokens, not tokens x experts. With `shared_attention=False` the
attention projections, QK-norms and pre-norms are per expert too (BAGEL's MoT code);
the attention operation itself always spans the whole sequence.

Qwen3's shapes are config fields (MoTConfig): a head size independent of the width,
grouped-query attention (`n_kv_heads` key/value heads, each shared by heads / n_kv_heads query
heads; the KV cache holds only those), an explicit FFN width, and, for Qwen3-MoE, each expert
group as a pool of routed experts (moe.py): two-level routing, by token type, then by router.

Positions: 1-D RoPE over sequence positions (Qwen3), where every token of an image
block (ViT tokens, pixel patches) shares one position (BAGEL); spatial layout inside
a block comes from the 2-D embeddings that model.py adds.

The attention mask (`attention_mask`; docs/method.md, "Sequences and the attention mask"):
causal for text and representation tokens, bidirectional inside a ViT or pixel block,
and nothing outside a noisy pixel block may see it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MoTConfig
from .moe import MoEFFN, load_balancing_loss

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # a torch without flex_attention: packing then uses the dense mask only
    BlockMask, flex_attention = type("NoBlockMask", (), {}), None

_compiled_flex = None


def flex(q, k, v, block_mask):
    """flex_attention, compiled once on CUDA (uncompiled it materialises every score)."""
    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)

UND, REP, PIX, PAD = 0, 1, 2, 3
N_EXPERTS = 3


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def attention_mask(block: torch.Tensor, noisy: torch.Tensor, valid: torch.Tensor,
                   modality: torch.Tensor, drop_rep: torch.Tensor | None = None,
                   doc: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, 1, L, L) mask, True = query i may attend to key j.

    block (B, L): image block id, or -1 outside any block; tokens of one block see each other
    both ways. noisy (B, L): a noisy pixel patch. valid (B, L): not padding. modality (B, L):
    UND/REP/PIX/PAD. drop_rep: CFG drop of the representation sequence as the pixel block sees
    it, (B,) per row or (B, L) per query token: PIX-type queries ([BOP] and patches) may not
    attend to REP-type keys ([BOR] and r_i). doc (B, L): the document of each token in a packed
    row (packing.py); a token sees only its own document, and the rules above hold inside it.
    `attention_mask_mod` is the same rule, one (query, key) pair at a time, for flex_attention.
    """
    B, L = block.shape
    ar = torch.arange(L, device=block.device)
    causal = ar[None, :, None] >= ar[None, None, :]                              # (1, L, L)
    same_doc = (doc[:, :, None] == doc[:, None, :]) if doc is not None else torch.ones_like(causal)
    same_block = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0) & same_doc  # (B, L, L)
    mask = (causal | same_block) & same_doc & valid[:, None, :]
    mask = mask & ~(noisy[:, None, :] & ~same_block)       # a noisy block is invisible from outside
    if drop_rep is not None:
        q_drop = drop_rep[:, None] if drop_rep.dim() == 1 else drop_rep           # (B, 1) or (B, L)
        hide = (modality[:, :, None] == PIX) & (modality[:, None, :] == REP) & q_drop[:, :, None]
        mask = mask & ~hide
    mask = mask | torch.eye(L, dtype=torch.bool, device=block.device)[None]  # padding sees itself: no empty rows
    return mask[:, None]


def attention_mask_mod(block: torch.Tensor, noisy: torch.Tensor, valid: torch.Tensor,
                       modality: torch.Tensor, drop_rep: torch.Tensor, doc: torch.Tensor):
    """attention_mask's rule as a flex_attention mask_mod(b, h, q, k) -> bool, for a packed
    batch (every argument (B, L); drop_rep per query token). On CUDA the block mask built from
    it skips every fully masked tile, so attention across documents costs nothing."""
    def mask_mod(b, h, q, k):
        same_doc = doc[b, q] == doc[b, k]
        same_block = (block[b, q] == block[b, k]) & (block[b, q] >= 0) & same_doc
        ok = ((q >= k) | same_block) & same_doc & valid[b, k]
        ok = ok & ~(noisy[b, k] & ~same_block)
        ok = ok & ~((modality[b, q] == PIX) & (modality[b, k] == REP) & drop_rep[b, q])
        return ok | (q == k)
    return mask_mod


def rope_cos_sin(pos: torch.Tensor, head_dim: int, base: float):
    """pos (B, L) -> cos, sin (B, 1, L, head_dim/2) for rotate-half RoPE."""
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=pos.device) / head_dim)
    ang = pos.float()[..., None] * inv                                           # (B, L, hd/2)
    return ang.cos()[:, None], ang.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd): rotate the two halves of each head by the position angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class DocMasks:
    """A packed batch's attention as one small dense mask per document (packing.py): documents
    never attend to each other, so on CPU attention runs document by document and costs the sum
    of their squared lengths, not the square of the row's. The same rule as the dense
    (B, 1, L, L) mask; `docs` is [(row, start, end, mask (1, 1, n, n))], padding after the last
    document of a row gets zeros (nothing reads it)."""

    def __init__(self, docs: list[tuple[int, int, int, torch.Tensor]], rows: int, length: int):
        self.docs, self.rows, self.length = docs, rows, length

    def attend(self, q, k, v) -> torch.Tensor:
        """q, k, v (B, H, L, hd) -> (B, H, L, hd)."""
        out = []
        for r in range(self.rows):
            parts, end = [], 0
            for row, s, e, m in self.docs:
                if row == r:
                    parts.append(F.scaled_dot_product_attention(q[r:r + 1, :, s:e], k[r:r + 1, :, s:e],
                                                                v[r:r + 1, :, s:e], attn_mask=m.to(q.device)))
                    end = e
            if end < self.length:
                parts.append(q.new_zeros(1, q.shape[1], self.length - end, v.shape[-1]))
            out.append(torch.cat(parts, dim=2))                                       # (1, H, L, hd)
        return torch.cat(out)


class Routing:
    """Groups the tokens of a flattened (B*L) sequence by type, once per forward.

    Tokens are sorted by type with one gather, each expert runs on its contiguous
    slice, and one more gather puts the rows back in sequence order: the cost is
    proportional to the number of tokens, whatever the number of experts."""

    def __init__(self, modality: torch.Tensor):
        flat = modality.reshape(-1)
        self.order = torch.argsort(flat, stable=True)                              # (B*L,) grouped UND, REP, PIX, PAD
        self.inverse = torch.argsort(self.order)
        self.counts = torch.bincount(flat, minlength=PAD + 1).tolist()             # tokens per type

    def apply(self, modules, x: torch.Tensor, out_dim: int) -> torch.Tensor:
        """x (N, D) -> (N, out_dim): modules[e] on the rows of type e; PAD rows get zeros.

        A single module (shared weights) runs on every row as one matmul; its PAD rows
        are not zeroed, which is harmless: the mask hides padding from every real token."""
        if len(modules) == 1:
            return modules[0](x)
        # index_select, not x[idx]: its backward is an index_add, much cheaper than index_put
        groups = x.index_select(0, self.order).split(self.counts)                  # per type, (n_e, D)
        outs = [m(g) if g.shape[0] else g.new_zeros(0, out_dim) for m, g in zip(modules, groups)]
        outs.append(x.new_zeros(self.counts[PAD], out_dim))
        return torch.cat(outs).index_select(0, self.inverse)


class AttnIn(nn.Module):
    """Pre-norm and q/k/v projection with per-head QK-norm (Qwen3):
    (n, D) -> (n, (H + 2 Hkv) * hd), the H query heads, then Hkv key heads, then Hkv value heads."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.hd = head_dim
        self.sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        self.norm = RMSNorm(dim, eps)
        self.qkv = nn.Linear(dim, sum(self.sizes), bias=False)  # Qwen3's q_proj, k_proj, v_proj stacked
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).split(self.sizes, dim=1)                   # (n, H*hd), (n, Hkv*hd) x2
        q = self.q_norm(q.unflatten(1, (-1, self.hd))).flatten(1)                    # per-head norm over hd
        k = self.k_norm(k.unflatten(1, (-1, self.hd))).flatten(1)
        return torch.cat([q, k, v], 1)


class FFN(nn.Module):
    """Pre-norm SwiGLU feed-forward expert (Qwen3's FFN form)."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        x = self.norm(x)
        return self.down(F.silu(self.gate(x)) * self.up(x))


def make_ffn(cfg: MoTConfig) -> nn.Module:
    """One expert group's FFN: a dense SwiGLU, or a pool of routed SwiGLU experts (moe.py)."""
    if cfg.n_routed_experts:
        return MoEFFN(cfg.dim, cfg.moe_size, cfg.n_routed_experts, cfg.top_k, cfg.norm_topk_prob,
                      RMSNorm(cfg.dim, cfg.rms_eps))
    return FFN(cfg.dim, cfg.ffn_size, cfg.rms_eps)


class MoTBlock(nn.Module):
    def __init__(self, cfg: MoTConfig):
        super().__init__()
        n_attn = 1 if cfg.shared_attention else N_EXPERTS
        self.dim, self.heads, self.kv_heads, self.hd = cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_size
        self.attn_in = nn.ModuleList(AttnIn(cfg.dim, cfg.heads, cfg.kv_heads, cfg.head_size, cfg.rms_eps)
                                     for _ in range(n_attn))
        self.attn_out = nn.ModuleList(nn.Linear(cfg.heads * cfg.head_size, cfg.dim, bias=False) for _ in range(n_attn))
        self.ffn = nn.ModuleList(make_ffn(cfg) for _ in range(N_EXPERTS))

    def forward(self, x, routing: Routing, cos, sin, mask, kv=None, router_log: list | None = None):
        """x (B, L, D). kv: optional (k, v) prefix of shape (B, Hkv, P, hd) that the
        queries also attend to (the cache); mask is then (B, 1, L, P + L). router_log: with
        routed FFNs, one list per expert group that receives the router logits.
        Returns the new x and this call's own (k, v), (B, Hkv, L, hd) each."""
        B, L, D = x.shape
        H, Hkv, hd = self.heads, self.kv_heads, self.hd
        qkv = routing.apply(self.attn_in, x.reshape(B * L, D), (H + 2 * Hkv) * hd)  # (B*L, (H + 2Hkv) hd)
        q, k, v = qkv.view(B, L, H + 2 * Hkv, hd).transpose(1, 2).split([H, Hkv, Hkv], dim=1)  # (B, H|Hkv, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = (k, v)
        if kv is not None:
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
        if Hkv != H:  # GQA: query head h reads key/value head h // (H / Hkv), as Qwen3's repeat_kv
            k, v = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
        if isinstance(mask, BlockMask):  # packed rows on CUDA (packing.py): flex_attention, tiles skipped
            a = flex(q, k, v, block_mask=mask)                                    # (B, H, L, hd)
        elif isinstance(mask, DocMasks):  # packed rows on CPU: attention per document
            a = mask.attend(q, k, v)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)         # (B, H, L, hd)
        a = a.transpose(1, 2).reshape(B * L, H * hd)
        x = x + routing.apply(self.attn_out, a, D).view(B, L, D)
        ffn = self.ffn
        if router_log is not None and isinstance(ffn[0], MoEFFN):
            ffn = [lambda g, m=m, log=log: m(g, log) for m, log in zip(ffn, router_log)]
        x = x + routing.apply(ffn, x.reshape(B * L, D), D).view(B, L, D)
        return x, new_kv


class KVCache:
    """Keys and values of an already processed prefix, for every block, preallocated
    (the key/value heads only: under grouped-query attention, Hkv < H of them).

    Besides k/v, the cache keeps what the mask needs to know about each cached key:
    whether it is a real token (`valid`) and its expert type (`modality`, so a CFG branch
    can hide the representation tokens from the pixel block). Tokens are appended in
    columns; RoPE positions travel with the tokens, so a padded column costs only a
    masked key. Noisy pixel blocks are never written: nothing after them may see them.
    """

    def __init__(self, depth: int, max_len: int):
        self.depth, self.max_len, self.len = depth, max_len, 0
        self.k = self.v = self.valid = self.modality = None

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor):
        """Write block i's (B, Hkv, n, hd) keys/values at the current end."""
        if self.k is None:
            B, H, _, hd = k.shape
            self.k = k.new_zeros(self.depth, B, H, self.max_len, hd)
            self.v = torch.zeros_like(self.k)
        n = k.shape[2]
        if self.len + n > self.max_len:
            raise ValueError(f"KV cache full: {self.len} + {n} > {self.max_len} tokens")
        self.k[i, :, :, self.len:self.len + n] = k
        self.v[i, :, :, self.len:self.len + n] = v

    def commit(self, valid: torch.Tensor, modality: torch.Tensor):
        """Advance the end past the (B, n) tokens just written to every block."""
        self.valid = valid if self.valid is None else torch.cat([self.valid, valid], 1)
        self.modality = modality if self.modality is None else torch.cat([self.modality, modality], 1)
        self.len += valid.shape[1]

    def select(self, rows: torch.Tensor):
        """Keep only these batch rows (e.g. drop the CFG rows once they are no longer needed)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.valid, self.modality = self.valid[rows], self.modality[rows]

    def prefix(self, i: int):
        return self.k[i, :, :, :self.len], self.v[i, :, :, :self.len]

    def mask(self, n: int, bidir: bool, hide_rep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, n, len + n) for n new tokens: every valid cached key, then the new tokens
        causally (bidir=False) or all of them (a bidirectional block). hide_rep (B,) drops
        REP-type cached keys for those rows (the CFG drop of the rep sequence)."""
        B = self.valid.shape[0]
        old = self.valid
        if hide_rep is not None:
            old = old & ~((self.modality == REP) & hide_rep[:, None].to(old.device))
        old = old[:, None, :].expand(B, n, self.len)
        new = torch.ones(n, n, dtype=torch.bool, device=old.device)
        new = new if bidir else new.tril()
        return torch.cat([old, new.expand(B, n, n)], dim=2)[:, None]


class MoT(nn.Module):
    """The decoder trunk: embeddings in, hidden states out (heads live in model.py)."""

    def __init__(self, cfg: MoTConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(MoTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.ModuleList(RMSNorm(cfg.dim, cfg.rms_eps) for _ in range(N_EXPERTS))  # final norm per modality

    def expert_modules(self, expert: int) -> list[nn.Module]:
        """Every module that only tokens of this expert pass through: its FFNs, its final norm
        and, with per-modality attention, its attention projections."""
        mods = [self.norm[expert]]
        for blk in self.blocks:
            mods.append(blk.ffn[expert])
            if len(blk.attn_in) > 1:
                mods += [blk.attn_in[expert], blk.attn_out[expert]]
        return mods

    def router_log(self) -> list[list[torch.Tensor]] | None:
        """An empty record for forward's `router_log` (one list per expert group), or None
        for a dense decoder: pass it to one or more forwards, then to `aux_loss`."""
        return [[] for _ in range(N_EXPERTS)] if self.cfg.n_routed_experts else None

    def aux_loss(self, router_log: list[list[torch.Tensor]] | None) -> torch.Tensor | None:
        """The load-balancing loss (moe.py) of each expert group's pool over every token and
        layer the record holds, averaged over the groups that saw tokens (each pool is balanced
        on its own; the mean keeps aux_loss_coef on Qwen3-MoE's scale). Unweighted; None when dense."""
        if router_log is None:
            return None
        losses = [load_balancing_loss(torch.cat(logs), self.cfg.top_k) for logs in router_log if logs]
        return torch.stack(losses).mean() if losses else None

    def forward(self, x, modality, pos, mask, cache: KVCache | None = None, write: bool = False,
                tap: int | None = None, router_log: list | None = None):
        """x (B, L, D) embedded tokens; modality, pos (B, L); mask (B, 1, L, P + L)
        where P is the cached prefix length (0 without a cache), or a flex_attention BlockMask
        (packed rows on CUDA, packing.py).
        With `write`, these L tokens' keys/values are appended to `cache` (the caller
        then calls cache.commit). Returns hidden (B, L, D) after the per-modality final norm;
        with `tap`, also the residual stream (B, L, D) after `tap` blocks (REPA's target layer).
        router_log (from `router_log()`): collects routed FFNs' router logits for `aux_loss`."""
        routing = Routing(modality)
        cos, sin = rope_cos_sin(pos, self.cfg.head_size, self.cfg.rope_base)
        if isinstance(mask, torch.Tensor) and mask.all():  # e.g. a pixel block against its whole prefix: SDPA's unmasked kernel is faster
            mask = None
        tapped = x if tap == 0 else None
        for i, blk in enumerate(self.blocks):
            prefix = cache.prefix(i) if cache is not None and cache.len else None
            x, (k, v) = blk(x, routing, cos, sin, mask, prefix, router_log)
            if write:
                cache.append(i, k, v)
            if tap == i + 1:
                tapped = x
        B, L, D = x.shape
        out = routing.apply(self.norm, x.reshape(B * L, D), D).view(B, L, D)
        return out if tap is None else (out, tapped)
