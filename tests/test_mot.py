"""Tests for nanorf/mot.py: the attention mask against hand-written matrices, no information
leakage end to end, expert routing against a slow per-token reference, RoPE against a hand
computation, and the shared RoPE position of image blocks."""

import math

import pytest
import torch
import torch.nn as nn

from nanorf.mot import (KVCache, PAD, PIX, REP, UND, MoT, MoTBlock, Routing, apply_rope, attention_mask,
                        rope_cos_sin)
from nanorf.config import MoTConfig
from nanorf.model import GenBatch
from nanorf.layout import NO_BLOCK, Token, build_layout

pytestmark = pytest.mark.usefixtures("single_thread")

CHANGED = 1e-5   # a real dependence moves outputs by >= 1e-4 at this init (measured); masked ones by 0
SAME = 1e-6


def _mat(rows: str) -> torch.Tensor:
    """'0110 / 1011' style hand-written boolean matrix."""
    return torch.tensor([[c == "1" for c in r] for r in rows.split()], dtype=torch.bool)


def _changed(a, b):
    return (a - b).abs().max().item() > CHANGED


def _same(a, b):
    return torch.allclose(a, b, atol=SAME, rtol=0)


# ---- attention mask ------------------------------------------------------------------------

# Generation example 0 (left-padded by one): pad BOS p1 p2 BOR r1 r2 BOP x1 x2 x3
GEN0 = _mat("""
10000000000
01000000000
01100000000
01110000000
01111000000
01111100000
01111110000
01111111000
01111111111
01111111111
01111111111
""")
# Same with drop_rep: PIX-type queries (BOP, x_i) lose the REP-type keys (BOR, r1, r2)
GEN0_DROP = _mat("""
10000000000
01000000000
01100000000
01110000000
01111000000
01111100000
01111110000
01110001000
01110001111
01110001111
01110001111
""")
# Example 1 (no padding): BOS p1 p2 p3 BOR r1 r2 BOP x1 x2 x3
GEN1 = _mat("""
10000000000
11000000000
11100000000
11110000000
11111000000
11111100000
11111110000
11111111000
11111111111
11111111111
11111111111
""")


def test_gen_mask_hand_written(tiny_model):
    m = tiny_model()
    lay = m.gen_layout([[65, 66], [65, 66, 67]], n_rep=2, n_pix=3)
    assert lay.modality[0].tolist() == [PAD, UND, UND, UND, REP, REP, REP, PIX, PIX, PIX, PIX]
    mask = lay.mask()
    assert mask.shape == (2, 1, 11, 11) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], GEN0)
    assert torch.equal(mask[1, 0], GEN1)


def test_gen_mask_drop_rep(tiny_model):
    m = tiny_model()
    lay = m.gen_layout([[65, 66], [65, 66, 67]], n_rep=2, n_pix=3)
    mask = lay.mask(torch.tensor([True, False]))
    assert torch.equal(mask[0, 0], GEN0_DROP)
    assert torch.equal(mask[1, 0], GEN1)  # drop is per example


# Understanding, V = 4 ViT tokens: BOS BOI v1 v2 v3 v4 EOI q1 q2 a1 EOS
UND0 = _mat("""
10000000000
11000000000
11111100000
11111100000
11111100000
11111100000
11111110000
11111111000
11111111100
11111111110
11111111111
""")


def test_und_mask_hand_written(tiny_model):
    m = tiny_model("model.image_size=8")  # 8 px / ViT patch 4 -> V = 4
    tok = m.tok
    lay = m.und_layout([[10, 11], [10]], [[12], []])
    mask = lay.mask()[:, 0]
    assert lay.tokens[0].tolist() == [tok.bos, tok.boi, 0, 0, 0, 0, tok.eoi, 10, 11, 12, tok.eos]
    assert torch.equal(mask[0], UND0)
    # example 1 is 9 tokens long, right-padded by two: its real rows are UND0's first 9 rows
    assert torch.equal(mask[1, :9, :9], UND0[:9, :9])
    assert not mask[1, :9, 9:].any()          # no real token sees padding
    assert mask[1, 9, 9] and mask[1, 10, 10]  # padding rows are never empty: they see themselves
    assert not mask[1, 9, 10]                 # ... and no later padding


def test_noisy_block_invisible_to_later_tokens_but_vit_block_visible():
    # BOS, a 2-token bidirectional ViT block (clean), t1, BOP, a 2-token noisy pixel block, t2
    vit, pix = Token(pos=1, block=0), Token(modality=PIX, pos=4, block=1, noisy=True)
    rows = [[Token(1), vit, vit, Token(2, pos=2), Token(3, PIX, pos=3), pix, pix, Token(4, pos=5)]]
    lay = build_layout(rows, left=False)
    expected = _mat("""
    10000000
    11100000
    11100000
    11110000
    11111000
    11111110
    11111110
    11111001
    """)
    assert torch.equal(lay.mask()[0, 0], expected)


# ---- no leakage, end to end ----------------------------------------------------------------

def _gen(m, prompt, codes, z, t=0.3, drop_rep=None):
    """(rep logits, x_pred) of one teacher-forced example."""
    out = m.gen_forward([prompt], codes, z, torch.tensor([t]), drop_rep)
    return out.rep, out.x_pred


@pytest.fixture
def gen_inputs():
    g = torch.Generator().manual_seed(1)
    return [65, 66, 67], torch.randint(0, 16, (1, 4), generator=g), torch.randn(1, 16, 48, generator=g)


def test_changing_a_rep_code_only_affects_later_positions(tiny_model, gen_inputs):
    m = tiny_model()
    prompt, codes, z = gen_inputs
    r, x = _gen(m, prompt, codes, z)
    c2 = codes.clone()
    c2[0, 2] = (c2[0, 2] + 1) % 16  # r_3
    r2, x2 = _gen(m, prompt, c2, z)
    assert r.shape == (1, 5, 16)  # logits at [BOR], r_1..r_4
    assert _same(r[:, :3], r2[:, :3])   # [BOR], r_1, r_2 predict without seeing r_3
    assert _changed(r[:, 3], r2[:, 3])  # r_3's own output predicts r_4 from it
    assert _changed(x, x2)              # the pixel block sees the rep tokens


def test_pixels_invisible_to_rep_tokens(tiny_model, gen_inputs):
    m = tiny_model()
    prompt, codes, z = gen_inputs
    r, x = _gen(m, prompt, codes, z)
    for j in (0, 7, 15):
        z2 = z.clone()
        z2[0, j] += 1.0
        r2, x2 = _gen(m, prompt, codes, z2)
        assert _same(r, r2)
        # the pixel block is bidirectional: every other patch's prediction moves
        others = [i for i in range(16) if i != j]
        assert all(_changed(x[0, i], x2[0, i]) for i in others)
    # the time step is part of the pixel block only
    r3, _ = _gen(m, prompt, codes, z, t=0.9)
    assert _same(r, r3)


def test_pixels_see_prompt_and_rep(tiny_model, gen_inputs):
    m = tiny_model()
    prompt, codes, z = gen_inputs
    r, x = _gen(m, prompt, codes, z)
    r2, x2 = _gen(m, [65, 66, 68], codes, z)       # last prompt byte changed
    assert _changed(x, x2) and _changed(r, r2)
    c2 = codes.clone()
    c2[0, 0] = (c2[0, 0] + 3) % 16                  # r_1 changed
    r3, x3 = _gen(m, prompt, c2, z)
    assert _changed(x, x3)
    assert _same(r[:, :1], r3[:, :1]) and _changed(r[:, 1:], r3[:, 1:])


def test_drop_rep_makes_pixels_invariant_to_rep_codes(tiny_model, gen_inputs):
    m = tiny_model()
    prompt, codes, z = gen_inputs
    drop = torch.tensor([True])
    _, x = _gen(m, prompt, codes, z, drop_rep=drop)
    _, x2 = _gen(m, prompt, torch.randint(0, 16, (1, 4), generator=torch.Generator().manual_seed(7)), z,
                 drop_rep=drop)
    assert _same(x, x2)
    _, x3 = _gen(m, prompt, codes, z, drop_rep=torch.tensor([False]))
    assert _changed(x, x3)  # the drop really changes what the pixels see
    _, x4 = _gen(m, [70], codes, z, drop_rep=drop)
    assert _changed(x, x4)  # but they still see the prompt


def test_padding_does_not_change_outputs(tiny_model, gen_inputs):
    m = tiny_model()
    prompt, codes, z = gen_inputs
    t = torch.tensor([0.3, 0.6])
    out = m.gen_forward([prompt[:1], prompt + [70, 71]], codes.repeat(2, 1), z.repeat(2, 1, 1), t)
    r, x = out.rep, out.x_pred
    r0, x0 = _gen(m, prompt[:1], codes, z, 0.3)
    r1, x1 = _gen(m, prompt + [70, 71], codes, z, 0.6)
    assert torch.allclose(r[:1], r0, atol=1e-5) and torch.allclose(x[:1], x0, atol=1e-5)
    assert torch.allclose(r[1:], r1, atol=1e-5) and torch.allclose(x[1:], x1, atol=1e-5)


def test_und_vit_block_bidirectional_and_hidden_from_bos(tiny_model):
    m = tiny_model()
    g = torch.Generator().manual_seed(2)
    lay = m.und_layout([[10, 11]], [[12, 13]])
    V = lay.vit_cols.stop - lay.vit_cols.start
    vt = torch.randn(1, V, 32, generator=g)
    h = m.trunk(lay, m.embed(lay, vit_tokens=vt))
    vt2 = vt.clone()
    vt2[0, -1] += 1.0   # the last ViT token: causal attention would hide it from every other one
    h2 = m.trunk(lay, m.embed(lay, vit_tokens=vt2))
    assert _same(h[:, :2], h2[:, :2])                 # [BOS] [BOI] come before the image
    for c in range(lay.vit_cols.start, lay.vit_cols.stop):
        assert _changed(h[0, c], h2[0, c])            # every ViT position sees every other
    assert _changed(h[:, lay.vit_cols.stop:], h2[:, lay.vit_cols.stop:])  # text after sees it
    # and through the public entry point: changing the image leaves [BOS] [BOI] alone
    img = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    l1, _ = m.und_forward(img, [[10, 11]], [[12, 13]])
    img2 = img.clone()
    img2[..., :4, :4] = -img2[..., :4, :4]
    l2, _ = m.und_forward(img2, [[10, 11]], [[12, 13]])
    assert _same(l1[:, :2], l2[:, :2]) and _changed(l1[:, 2:], l2[:, 2:])


def test_und_text_causal(tiny_model):
    m = tiny_model()
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    l1, lay = m.und_forward(img, [[10, 11, 12]], [[20, 21]])
    l2, _ = m.und_forward(img, [[10, 11, 12]], [[20, 99]])
    last = lay.valid.sum().item()
    # columns up to and including a1 (= last - 3: ..., a1, a2, EOS) do not see a2
    assert _same(l1[:, : last - 2], l2[:, : last - 2])
    assert _changed(l1[:, last - 2:last], l2[:, last - 2:last])


# ---- routing -------------------------------------------------------------------------------

class _Counting(nn.Module):
    def __init__(self, mod):
        super().__init__()
        self.mod, self.rows = mod, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.mod(x)


def _modality():
    return torch.tensor([[UND, UND, REP, REP, PIX, PIX, PAD],
                         [PAD, PAD, UND, PIX, REP, UND, PIX],
                         [PIX, PIX, PIX, PIX, PIX, PIX, PIX]])


def test_routing_matches_per_token_reference():
    torch.manual_seed(0)
    mod = _modality()
    mods = nn.ModuleList(_Counting(nn.Linear(8, 5)) for _ in range(3))
    x = torch.randn(mod.numel(), 8)
    out = Routing(mod).apply(mods, x, 5)
    ref = torch.zeros(mod.numel(), 5)
    for i, e in enumerate(mod.flatten().tolist()):
        if e != PAD:
            ref[i] = mods[e].mod(x[i:i + 1])[0]
    assert torch.allclose(out, ref, atol=1e-6)
    pads = mod.flatten() == PAD
    assert (out[pads] == 0).all()
    # each expert ran on its own tokens only (no compute-all-then-mask)
    counts = [(mod == e).sum().item() for e in (UND, REP, PIX)]
    assert [m.rows for m in mods] == counts  # (the reference loop above bypasses the counters)


def test_routing_shared_module_applies_to_all_non_pad_rows():
    torch.manual_seed(0)
    mod = _modality()
    lin = nn.Linear(8, 5)
    x = torch.randn(mod.numel(), 8)
    out = Routing(mod).apply(nn.ModuleList([lin]), x, 5)
    pads = mod.flatten() == PAD
    assert out.shape == (mod.numel(), 5)
    # what PAD rows hold is unspecified for a shared module (the mask hides them from every
    # real token; test_padding_does_not_change_outputs checks that end to end)
    assert torch.allclose(out[~pads], lin(x[~pads]), atol=1e-6)


def _block_inputs(L=9, D=32, H=2):
    torch.manual_seed(0)
    mod = torch.tensor([[UND, UND, UND, REP, REP, REP, PIX, PIX, PIX]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 7]])
    block = torch.tensor([[NO_BLOCK] * 7 + [1, 1]])
    mask = attention_mask(block, block >= 0, torch.ones(1, L, dtype=torch.bool), mod)
    cos, sin = rope_cos_sin(pos, D // H, 10000.0)
    return torch.randn(1, L, D), Routing(mod), cos, sin, mask


def test_separate_attention_has_per_modality_params_and_reduces_to_shared():
    shared = MoTBlock(MoTConfig(dim=32, depth=1, heads=2, shared_attention=True))
    sep = MoTBlock(MoTConfig(dim=32, depth=1, heads=2, shared_attention=False))
    ks, kp = set(shared.state_dict()), set(sep.state_dict())
    for e in range(3):
        assert f"attn_in.{e}.qkv.weight" in kp and f"attn_in.{e}.q_norm.weight" in kp
        assert f"attn_out.{e}.weight" in kp
    assert "attn_in.1.qkv.weight" not in ks and "attn_out.1.weight" not in ks
    assert not torch.equal(sep.attn_in[0].qkv.weight, sep.attn_in[1].qkv.weight)
    # every expert gets its own FFN in both variants
    assert all(f"ffn.{e}.up.weight" in ks for e in range(3))

    x, routing, cos, sin, mask = _block_inputs()
    y_shared, _ = shared(x, routing, cos, sin, mask)
    # copy the shared weights into all three per-modality slots: the two must agree exactly
    with torch.no_grad():
        for e in range(3):
            sep.attn_in[e].load_state_dict(shared.attn_in[0].state_dict())
            sep.attn_out[e].load_state_dict(shared.attn_out[0].state_dict())
        sep.ffn.load_state_dict(shared.ffn.state_dict())
    y_sep, _ = sep(x, routing, cos, sin, mask)
    assert torch.allclose(y_shared, y_sep, atol=1e-6)
    # now perturb only the REP expert's attention output projection: only REP rows move directly
    with torch.no_grad():
        sep.attn_out[1].weight.add_(0.5)
    y_sep2, _ = sep(x, routing, cos, sin, mask)
    assert torch.allclose(y_sep2[:, :3], y_sep[:, :3], atol=1e-6)   # UND rows: causal, before REP
    assert _changed(y_sep2[:, 3:6], y_sep[:, 3:6])


def test_separate_attention_model_trains_every_expert(tiny_model):
    m = tiny_model("model.mot.shared_attention=false")
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    l_rep, l_fm = m.gen_loss(GenBatch([[65], [66, 67]], img, torch.randint(0, 16, (2, 4), generator=g),
                                      torch.tensor([0.2, 0.7]), torch.randn(2, 16, 48, generator=g),
                                      torch.tensor([False, False]), torch.tensor([False, False])))
    (l_rep + l_fm).backward()
    for e in range(3):
        gq = m.mot.blocks[0].attn_in[e].qkv.weight.grad
        assert gq is not None and gq.abs().sum() > 0


# ---- RoPE ----------------------------------------------------------------------------------

def test_rope_hand_computation_head_dim_4():
    base = 100.0
    pos = torch.tensor([[0, 1, 3]])
    cos, sin = rope_cos_sin(pos, 4, base)
    assert cos.shape == (1, 1, 3, 2)
    # inverse frequencies: base^(-0/4) = 1, base^(-2/4) = 0.1
    for i, p in enumerate([0, 1, 3]):
        assert torch.allclose(cos[0, 0, i], torch.tensor([math.cos(p), math.cos(0.1 * p)]))
        assert torch.allclose(sin[0, 0, i], torch.tensor([math.sin(p), math.sin(0.1 * p)]))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 3, 4)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y[0, 0, 0], x[0, 0, 0])  # position 0 is the identity
    # pairs (0, 2) and (1, 3) rotate by angles p and 0.1 p
    for i, p in enumerate([1, 3]):
        a, b = p, 0.1 * p
        want = torch.tensor([1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
                             1 * math.sin(a) + 3 * math.cos(a), 2 * math.sin(b) + 4 * math.cos(b)])
        assert torch.allclose(y[0, 0, i + 1], want, atol=1e-6)


def test_rope_relative_position():
    torch.manual_seed(0)
    hd = 16
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), hd, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), hd, 10000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    for d in (0, 1, 5):
        s = [score(p + d, p) for p in (0, 3, 17, 40)]
        assert max(s) - min(s) < 1e-4
    assert abs(score(5, 0) - score(6, 0)) > 1e-3  # and it does depend on the difference
    assert abs(score(0, 0) - (q * k).sum().item()) < 1e-5


def test_image_blocks_share_one_position(tiny_model):
    m = tiny_model()
    lay = m.gen_layout([[65, 66]], n_rep=4, n_pix=16)
    # BOS p1 p2 | BOR r1..r4 | BOP x1..x16
    assert lay.pos[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8] + [9] * 16
    assert lay.rep_cols == slice(4, 8) and lay.pix_cols == slice(9, 25)
    lay = m.und_layout([[10]], [[11]])
    assert lay.pos[0].tolist() == [0, 1] + [2] * 16 + [3, 4, 5, 6]


def test_mot_forward_kv_cache_matches_full_pass():
    """MoT's cache argument: a prefix's (k, v) plus the suffix equals the full pass."""
    torch.manual_seed(0)
    cfg = MoTConfig(dim=32, depth=2, heads=2)
    mot = MoT(cfg)
    L, P = 9, 5
    mod = torch.tensor([[UND, UND, UND, REP, REP, REP, REP, REP, REP]])
    pos = torch.arange(L)[None]
    valid = torch.ones(1, L, dtype=torch.bool)
    full_mask = attention_mask(torch.full((1, L), NO_BLOCK), torch.zeros_like(valid), valid, mod)
    x = torch.randn(1, L, 32)
    full = mot(x, mod, pos, full_mask)
    cache = KVCache(cfg.depth, L)
    mot(x[:, :P], mod[:, :P], pos[:, :P], full_mask[..., :P, :P], cache=cache, write=True)
    cache.commit(valid[:, :P], mod[:, :P])
    tail = mot(x[:, P:], mod[:, P:], pos[:, P:], full_mask[..., P:, :], cache=cache)
    assert torch.allclose(tail, full[:, P:], atol=1e-5)
    # and one token at a time, each appended, equals the full pass too
    cache = KVCache(cfg.depth, L)
    for j in range(L):
        out = mot(x[:, j:j + 1], mod[:, j:j + 1], pos[:, j:j + 1], cache.mask(1, False) if j else
                  full_mask[..., :1, :1], cache=cache, write=True)
        cache.commit(valid[:, j:j + 1], mod[:, j:j + 1])
        assert torch.allclose(out, full[:, j:j + 1], atol=1e-5), j
