"""Tests for nanorf/vit.py: shapes at several resolutions, RoPE against hand-computed angles,
DINOv3 parameter names, that position actually matters, the connector, and gradient flow."""

import math

import pytest
import torch

from nanorf.config import ViTConfig
from nanorf.vit import Connector, RopePositionEmbedding, ViT, rope_apply

PI = math.pi


def tiny_cfg(**kw):
    base = dict(patch_size=4, dim=32, depth=2, heads=2, n_storage_tokens=2, layerscale_init=0.1)
    base.update(kw)
    return ViTConfig(**base)


@pytest.mark.parametrize("H,W", [(16, 24), (32, 32), (8, 4)])
def test_forward_shapes_any_resolution(H, W):
    torch.manual_seed(0)
    vit = ViT(tiny_cfg())
    out = vit(torch.rand(2, 3, H, W) * 2 - 1)
    h, w = H // 4, W // 4
    assert out["grid"] == (h, w)
    assert out["x_prenorm"].shape == (2, h * w, 32)
    assert out["x_norm_patchtokens"].shape == (2, h * w, 32)
    assert out["x_norm_clstoken"].shape == (2, 32)
    assert out["x_storage_tokens"].shape == (2, 2, 32)
    # the final norm is a fresh LayerNorm: normed patch tokens have ~zero mean, unit variance
    xn = out["x_norm_patchtokens"]
    assert torch.allclose(xn.mean(-1), torch.zeros(2, h * w), atol=1e-5)
    assert not torch.allclose(out["x_prenorm"], xn, atol=1e-3)


def test_non_multiple_of_patch_raises():
    vit = ViT(tiny_cfg())
    with pytest.raises(ValueError, match="multiple of the ViT patch size 4"):
        vit(torch.zeros(1, 3, 18, 24))
    with pytest.raises(ValueError, match="multiple"):
        vit(torch.zeros(1, 3, 16, 22))
    with pytest.raises(ValueError):
        vit(torch.zeros(1, 1, 16, 16))  # not RGB


def test_rope_dim_check():
    ViT(tiny_cfg(dim=24, heads=2))  # D_head 12: fine
    with pytest.raises(ValueError, match="4 \\* heads"):
        ViT(tiny_cfg(dim=20, heads=2))  # D_head 10: not divisible by 4


def test_rope_angles_by_hand():
    # head dim 8, base 100 -> periods = 100 ** (2 * [0, 1] / 4) = [1, 10]
    rope = RopePositionEmbedding(dim=16, heads=2, base=100.0)
    assert torch.allclose(rope.periods, torch.tensor([1.0, 10.0]))
    # 2 x 3 grid: y centres (0.5/2, 1.5/2)*2-1 = -1/2, 1/2; x centres (0.5/3, 1.5/3, 2.5/3)*2-1 = -2/3, 0, 2/3
    # per token, in units of pi: [2y/1, 2y/10, 2x/1, 2x/10], then tiled twice
    half = [
        [-1.0, -0.1, -4 / 3, -2 / 15],  # (row 0, col 0)
        [-1.0, -0.1, 0.0, 0.0],  # (0, 1)
        [-1.0, -0.1, 4 / 3, 2 / 15],  # (0, 2)
        [1.0, 0.1, -4 / 3, -2 / 15],  # (1, 0)
        [1.0, 0.1, 0.0, 0.0],  # (1, 1)
        [1.0, 0.1, 4 / 3, 2 / 15],  # (1, 2)
    ]
    expected = torch.tensor([r + r for r in half]) * PI  # (6, 8)
    got = rope.angles(2, 3)
    assert got.shape == (6, 8)
    assert torch.allclose(got, expected, atol=1e-5)
    sin, cos = rope(2, 3)
    assert torch.allclose(sin, torch.sin(expected), atol=1e-5)
    assert torch.allclose(cos, torch.cos(expected), atol=1e-5)


def test_rope_rotates_pairs_i_and_i_plus_half():
    # rotate-half convention: coordinates (i, i + D/2) form one rotating pair
    a = torch.tensor([0.3, 0.7, 1.1, -0.4])
    ang = torch.cat([a, a])[None]  # (1, 8)
    sin, cos = torch.sin(ang), torch.cos(ang)
    e0 = torch.zeros(1, 8)
    e0[0, 0] = 1.0
    out = rope_apply(e0, sin, cos)[0]
    exp = torch.zeros(8)
    exp[0], exp[4] = math.cos(0.3), math.sin(0.3)
    assert torch.allclose(out, exp, atol=1e-6)
    e6 = torch.zeros(1, 8)
    e6[0, 6] = 1.0
    out = rope_apply(e6, sin, cos)[0]
    exp = torch.zeros(8)
    exp[6], exp[2] = math.cos(1.1), -math.sin(1.1)
    assert torch.allclose(out, exp, atol=1e-6)


def test_state_dict_uses_dinov3_names():
    cfg = tiny_cfg(depth=2)
    vit = ViT(cfg)
    sd = vit.state_dict()
    expected = {"cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "rope_embed.periods", "norm.weight", "norm.bias"}
    for i in range(2):
        for n in ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                  "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                  "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"]:
            expected.add(f"blocks.{i}.{n}")
    assert set(sd) == expected
    assert sd["cls_token"].shape == (1, 1, 32)
    assert sd["storage_tokens"].shape == (1, 2, 32)
    assert sd["mask_token"].shape == (1, 32)
    assert sd["patch_embed.proj.weight"].shape == (32, 3, 4, 4)
    assert sd["blocks.1.attn.qkv.weight"].shape == (96, 32)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (128, 32)
    assert sd["rope_embed.periods"].shape == (4,)  # D_head // 4 = 16 // 4
    # init as DINOv3: LayerScale constant, zero linear biases, zero mask token, LN eps 1e-5
    assert torch.all(sd["blocks.0.ls1.gamma"] == 0.1)
    assert torch.all(sd["blocks.0.attn.qkv.bias"] == 0)
    assert torch.all(sd["mask_token"] == 0)
    assert 0.01 < sd["blocks.0.mlp.fc1.weight"].std() < 0.03
    assert vit.blocks[0].norm1.eps == 1e-5 and vit.norm.eps == 1e-5
    # no storage tokens -> no storage_tokens key (as DINOv3)
    assert "storage_tokens" not in ViT(tiny_cfg(n_storage_tokens=0)).state_dict()


def _permute_patches(img, perm, p):
    """Move patch perm[j] of the raster grid to position j, in image space."""
    B, C, H, W = img.shape
    h, w = H // p, W // p
    x = img.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C, p, p)  # (B, hw, C, p, p)
    x = x[:, perm]
    return x.reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def test_rope_breaks_permutation_equivariance():
    torch.manual_seed(0)
    vit = ViT(tiny_cfg(layerscale_init=1.0)).eval()
    with torch.no_grad():  # std-0.02 init gives near-uniform attention; sharpen it so position shows
        for blk in vit.blocks:
            blk.attn.qkv.weight.mul_(20)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    perm = torch.randperm(16)
    with torch.no_grad():
        out = vit(img)["x_norm_patchtokens"]  # (B, 16, D)
        out_p = vit(_permute_patches(img, perm, 4))["x_norm_patchtokens"]
        diff_rope = (out_p - out[:, perm]).abs().max()
        # control: with RoPE switched off (infinite periods -> zero angles) the same model IS
        # permutation-equivariant, so the difference above is due to position alone
        vit.rope_embed.periods.fill_(float("inf"))
        out0 = vit(img)["x_norm_patchtokens"]
        out0_p = vit(_permute_patches(img, perm, 4))["x_norm_patchtokens"]
    assert torch.allclose(out0_p, out0[:, perm], atol=1e-5)
    assert diff_rope > 0.1


def test_connector_shapes():
    con = Connector(32, 48)
    y = con(torch.randn(2, 5, 32))
    assert y.shape == (2, 5, 48)
    assert set(con.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert con.fc1.weight.shape == (48, 32) and con.fc2.weight.shape == (48, 48)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    vit = ViT(tiny_cfg())
    con = Connector(32, 16)
    out = vit(torch.rand(2, 3, 8, 12) * 2 - 1)
    # random projections: a plain sum of LayerNorm outputs has a ~zero gradient
    loss = (con(out["x_norm_patchtokens"]) * torch.randn(2, 6, 16)).sum() \
        + (out["x_norm_clstoken"] * torch.randn(2, 32)).sum()
    loss.backward()
    for name, p in list(vit.named_parameters()) + list(con.named_parameters()):
        assert p.grad is not None, name
        if name == "mask_token":
            assert torch.all(p.grad == 0)  # in the graph (0 * mask_token) only so DDP sees it
        else:
            assert p.grad.abs().sum() > 0, name


def test_attention_matches_naive_reference():
    # Per-token, per-head loop: qkv rows are [q; k; v], heads contiguous inside each (DINOv3's
    # reshape (B, N, 3, H, Dh)); RoPE rotates patch tokens only, never CLS/storage.
    torch.manual_seed(0)
    vit = ViT(tiny_cfg(dim=16, heads=2, n_storage_tokens=1))
    attn = vit.blocks[0].attn
    with torch.no_grad():
        attn.qkv.weight.normal_(0, 0.5)
        attn.qkv.bias.normal_(0, 0.5)
    n_prefix, h, w = 2, 2, 3
    x = torch.randn(1, n_prefix + h * w, 16)
    sin, cos = vit.rope_embed(h, w)  # (6, 8)
    with torch.no_grad():
        got = attn(x, (sin, cos))[0]
        W, b = attn.qkv.weight, attn.qkv.bias
        heads_out = []
        for hd in range(2):
            sl = lambda part: slice(part * 16 + hd * 8, part * 16 + hd * 8 + 8)  # noqa: E731
            q = [W[sl(0)] @ t + b[sl(0)] for t in x[0]]
            k = [W[sl(1)] @ t + b[sl(1)] for t in x[0]]
            v = torch.stack([W[sl(2)] @ t + b[sl(2)] for t in x[0]])
            for i in range(n_prefix, len(q)):  # rotate pairs (j, j+4) of patch tokens by their angles
                for vec in (q, k):
                    a = torch.atan2(sin[i - n_prefix], cos[i - n_prefix])
                    u = vec[i].clone()
                    vec[i] = torch.cat([u[:4] * torch.cos(a[:4]) - u[4:] * torch.sin(a[:4]),
                                        u[4:] * torch.cos(a[:4]) + u[:4] * torch.sin(a[:4])])
            scores = torch.stack([torch.stack([qi @ kj for kj in k]) for qi in q]) / math.sqrt(8)
            heads_out.append(scores.softmax(-1) @ v)  # (N, 8)
        ref = attn.proj(torch.cat(heads_out, dim=-1))
    assert torch.allclose(got, ref, atol=1e-5)


def test_dinov3_release_options_names_and_masked_key_bias():
    # the options the released DINOv3 checkpoints need: SwiGLU (mlp.w1/w2/w3), the masked key bias
    # (a bias_mask buffer, as DINOv3's LinearKMaskedBias); and ones only the loader may meet:
    # no LayerScale, an untied CLS norm, no qkv bias
    cfg = tiny_cfg(ffn_layer="swiglu", mlp_ratio=3.3, mask_k_bias=True, layerscale_init=0.0,
                   untie_cls_and_patch_norms=True)
    vit = ViT(cfg)
    sd = vit.state_dict()
    assert sd["blocks.0.mlp.w1.weight"].shape == (72, 32)  # int(int(32 * 3.3) * 2/3) = 70 -> multiple of 8
    assert sd["blocks.0.mlp.w2.bias"].shape == (72,) and sd["blocks.0.mlp.w3.weight"].shape == (32, 72)
    assert not any(k.endswith("gamma") or ".fc1." in k for k in sd)
    assert {"cls_norm.weight", "cls_norm.bias"} <= set(sd)
    assert torch.equal(sd["blocks.1.attn.qkv.bias_mask"], torch.tensor([1.0] * 32 + [0.0] * 32 + [1.0] * 32))
    # the key bias is masked in forward and gets no gradient
    with torch.no_grad():
        vit.blocks[0].attn.qkv.bias.normal_()
    out = vit(torch.rand(1, 3, 8, 12) * 2 - 1)
    (out["x_norm_patchtokens"] * torch.randn_like(out["x_norm_patchtokens"])).sum().backward()
    g = vit.blocks[0].attn.qkv.bias.grad
    assert torch.all(g[32:64] == 0) and g[:32].abs().sum() > 0
    assert "blocks.0.attn.qkv.bias" not in ViT(tiny_cfg(qkv_bias=False)).state_dict()


def test_rope_min_max_periods_and_max_coords():
    # DINOv3's second parametrisation: periods geometric from min_period to max_period
    rope = RopePositionEmbedding(dim=32, heads=2, base=100.0, min_period=0.5, max_period=20.0, normalize_coords="max")
    assert torch.allclose(rope.periods, torch.tensor([0.5, 0.5 * 40 ** (1 / 3), 0.5 * 40 ** (2 / 3), 20.0]))
    # "max": both axes divided by max(h, w) = 3; y centres (0.5, 1.5)/3*2-1 = -2/3, 0
    ang = rope.angles(2, 3)  # (6, 16)
    y = torch.tensor([-2 / 3, -2 / 3, -2 / 3, 0.0, 0.0, 0.0])
    x = torch.tensor([-2 / 3, 0.0, 2 / 3] * 2)
    assert torch.allclose(ang[:, 0], 2 * PI * y / 0.5, atol=1e-5)
    assert torch.allclose(ang[:, 4], 2 * PI * x / 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="normalize_coords"):
        RopePositionEmbedding(dim=32, heads=2, base=100.0, normalize_coords="diag")
