"""Tests for Qwen3's shapes in the MoT without any checkpoint: the routed MoE FFN against a
per-token reference, its load-balancing loss against hand values, grouped-query attention with
the KV cache, and the aux loss wired into RFModel's loss (nanorf/moe.py, nanorf/mot.py)."""

from dataclasses import astuple

import pytest
import torch
import torch.nn.functional as F

from nanorf.config import MoTConfig
from nanorf.layout import NO_BLOCK
from nanorf.moe import MoEFFN, load_balancing_loss
from nanorf.mot import PAD, PIX, REP, UND, KVCache, MoT, RMSNorm, attention_mask

pytestmark = pytest.mark.usefixtures("single_thread")


def _moe(norm_topk_prob=True, E=4, k=2, D=16, h=8, seed=0):
    torch.manual_seed(seed)
    m = MoEFFN(D, h, E, k, norm_topk_prob, RMSNorm(D))
    m.init_weights(0.3, 0.3)
    with torch.no_grad():
        m.router.weight.normal_(std=1.0)  # routing margins far above float rounding
    return m


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_matches_per_token_reference(norm_topk_prob):
    m = _moe(norm_topk_prob)
    x = torch.randn(13, 16)
    out = m(x)
    h = m.norm(x)
    for i in range(13):
        p = (h[i] @ m.router.weight.T).softmax(-1)
        w, idx = p.topk(2)
        if norm_topk_prob:
            w = w / w.sum()
        ref = sum(wj * F.linear(F.silu(F.linear(h[i], m.gate[e])) * F.linear(h[i], m.up[e]), m.down[e])
                  for wj, e in zip(w, idx.tolist()))
        assert torch.allclose(out[i], ref, atol=1e-5), i
    # an empty batch of tokens is fine (an expert group without tokens never calls it, but a pool
    # whose experts all go unpicked must still work)
    assert m(torch.randn(0, 16)).shape == (0, 16)


def test_moe_logs_router_logits_and_gets_router_gradients():
    m = _moe()
    log = []
    x = torch.randn(5, 16)
    m(x, log).sum().backward()
    assert len(log) == 1 and log[0].shape == (5, 4)
    assert m.router.weight.grad.abs().sum() > 0  # through the top-k weights


def test_load_balancing_loss_hand_values():
    # two experts, top-1; probabilities (0.75, 0.25) for every token: f = (1, 0), P = (.75, .25)
    logits = torch.log(torch.tensor([[0.75, 0.25]] * 4))
    assert load_balancing_loss(logits, 1).item() == pytest.approx(2 * 0.75)
    # perfectly balanced: half the tokens each way, mirrored probabilities -> E * (.5 * .5 * 2) = 1
    logits = torch.log(torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    assert load_balancing_loss(logits, 1).item() == pytest.approx(1.0)
    assert load_balancing_loss(torch.zeros(0, 3), 2).item() == 0.0


def _text_inputs(L, B=1):
    mod = torch.full((B, L), UND)
    valid = torch.ones(B, L, dtype=torch.bool)
    mask = attention_mask(torch.full((B, L), NO_BLOCK), torch.zeros_like(valid), valid, mod)
    return mod, torch.arange(L).expand(B, L), valid, mask


@pytest.mark.parametrize("moe", [False, True])
def test_gqa_kv_cache_holds_kv_heads_and_matches_full_pass(moe):
    """4 query heads of 12 over 2 key/value heads, head size independent of the width; decoding
    one token at a time against the cache equals the full causal pass."""
    torch.manual_seed(0)
    cfg = MoTConfig(dim=32, depth=2, heads=4, n_kv_heads=2, head_dim=12, ffn_hidden=40,
                    n_routed_experts=4 if moe else 0, top_k=2, moe_hidden=16)
    mot = MoT(cfg)
    assert mot.blocks[0].attn_in[0].qkv.weight.shape == ((4 + 2 * 2) * 12, 32)
    assert mot.blocks[0].attn_out[0].weight.shape == (32, 4 * 12)
    L = 7
    mod, pos, valid, mask = _text_inputs(L, B=2)
    x = torch.randn(2, L, 32)
    full = mot(x, mod, pos, mask)
    cache = KVCache(cfg.depth, L)
    for j in range(L):
        m = cache.mask(1, False) if j else mask[..., :1, :1]
        out = mot(x[:, j:j + 1], mod[:, j:j + 1], pos[:, j:j + 1], m, cache=cache, write=True)
        cache.commit(valid[:, j:j + 1], mod[:, j:j + 1])
        assert torch.allclose(out, full[:, j:j + 1], atol=1e-5), j
    assert cache.k.shape == (cfg.depth, 2, 2, L, 12)  # (blocks, B, Hkv, len, hd): kv heads, not repeated


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA is MHA whose key/value heads are repeated (query head h reads kv head h // 2)."""
    torch.manual_seed(0)
    g = MoT(MoTConfig(dim=32, depth=1, heads=4, n_kv_heads=2, head_dim=8))
    mha = MoT(MoTConfig(dim=32, depth=1, heads=4, head_dim=8))
    sd = g.state_dict()
    w = sd["blocks.0.attn_in.0.qkv.weight"]
    q, k, v = w.split([32, 16, 16])
    rep = lambda t: t.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)  # noqa: E731
    sd["blocks.0.attn_in.0.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    mod, pos, _, mask = _text_inputs(6)
    x = torch.randn(1, 6, 32)
    assert torch.allclose(g(x, mod, pos, mask), mha(x, mod, pos, mask), atol=1e-5)


def test_two_level_routing_keeps_groups_apart():
    """Each expert group is its own pool: a REP token's output depends on the REP pool only, and the
    record holds each group's tokens."""
    torch.manual_seed(0)
    mot = MoT(MoTConfig(dim=16, depth=1, heads=2, n_routed_experts=4, top_k=2, moe_hidden=8))
    mod = torch.tensor([[UND, UND, REP, REP, PIX, PAD]])
    valid = mod != PAD
    mask = attention_mask(torch.full((1, 6), NO_BLOCK), torch.zeros_like(valid), valid, mod)
    pos = torch.arange(6)[None]
    x = torch.randn(1, 6, 16)
    log = mot.router_log()
    out = mot(x, mod, pos, mask, router_log=log)
    assert [sum(t.shape[0] for t in g) for g in log] == [2, 2, 1]  # PAD routes to no pool
    with torch.no_grad():
        mot.blocks[0].ffn[PIX].down.add_(1.0)
    out2 = mot(x, mod, pos, mask)
    assert torch.allclose(out[:, :4], out2[:, :4], atol=1e-6)   # UND and REP rows: not through PIX's pool
    assert not torch.allclose(out[:, 4], out2[:, 4], atol=1e-4)
    aux = mot.aux_loss(log)
    want = torch.stack([load_balancing_loss(torch.cat(g), 2) for g in log]).mean()
    assert torch.allclose(aux, want)
    assert mot.aux_loss(None) is None and MoT(MoTConfig(dim=16, depth=1, heads=2)).router_log() is None


def test_moe_model_adds_the_weighted_aux_loss(tiny_model):
    from test_model import _gen_batch, _und_batch
    m = tiny_model("model.mot.n_routed_experts=4", "model.mot.top_k=2", "model.mot.moe_hidden=16",
                   "model.mot.aux_loss_coef=0.5")
    gen, und = _gen_batch(), _und_batch([0, 2])
    total, parts = m(gen, und)
    assert parts.aux is not None
    assert total.item() == pytest.approx(sum(v.item() for v in astuple(parts)), rel=1e-6)
    assert parts.aux.item() > 0.5 * 0.9  # L_aux >= ~1 (k = 2 balanced gives 2; never far below)
    total.backward()
    assert m.mot.blocks[0].ffn[0].router.weight.grad.abs().sum() > 0
    assert m.mot.blocks[1].ffn[2].router.weight.grad.abs().sum() > 0
    # a dense model has no balancing term
    d = tiny_model()
    _, parts = d(gen, und)
    assert parts.aux is None
