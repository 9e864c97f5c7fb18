"""The ablation variants (Table 3b REPA, 3c continuous targets) against hand values and
the same guarantees the main method has: causal masks, cached == reference sampling."""

import math

import pytest
import torch

from nanorf.flow import add_noise
from nanorf.model import GenBatch
from nanorf.patches import patchify
from nanorf.targets import RepresentationTargets
from nanorf.sampler import text_to_image
from nanorf.variants import DIFF_MUL, DiffusionHead, repa_loss

pytestmark = pytest.mark.usefixtures("single_thread")

CONT = "model.rep_target=continuous"
REPA = ("model.rf=false", "model.repa_weight=0.5")


def test_repa_loss_hand_values():
    a = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]])                      # (1, 3, 2)
    b = torch.tensor([[[5.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]])
    # cos = 1, 0, -1 -> 1 - cos = 0, 1, 2 -> mean 1; the scale of either side does not matter
    assert repa_loss(a, b).item() == pytest.approx(1.0)
    b2 = torch.tensor([[[1.0, 1.0]]])
    assert repa_loss(torch.tensor([[[1.0, 0.0]]]), b2).item() == pytest.approx(1 - 1 / math.sqrt(2))


def test_diffusion_head_loss_hand_value():
    """At init the head predicts x = 0, so v_theta = -z / (1 - t) and the loss is
    mean((-z/(1-t) - (x - eps))^2) with z = t x + (1 - t) eps, whatever the condition."""
    torch.manual_seed(0)
    head = DiffusionHead(feat_dim=3, cond_dim=4, width=8)
    B, N = 2, 5
    c, x = torch.randn(B, N, 4), torch.randn(B, N, 3)
    t, eps = torch.rand(B, DIFF_MUL, N) * 0.9, torch.randn(B, DIFF_MUL, N, 3)
    xx = x[:, None].expand_as(eps)
    z = add_noise(xx.reshape(-1, 3), t.reshape(-1), eps.reshape(-1, 3)).view_as(eps)
    want = ((-z / (1 - t[..., None]) - (xx - eps)) ** 2).mean()
    assert head.loss(c, x, t, eps, t_eps=0.05).item() == pytest.approx(want.item(), rel=1e-5)
    # once trained a little (the adaLN gates and the output layer start at zero), the condition matters
    torch.nn.init.normal_(head.out.weight, std=0.5)
    for blk in head.blocks:
        torch.nn.init.normal_(blk.ada[1].weight, std=0.5)
    assert head.loss(c, x, t, eps, 0.05) != head.loss(c + 1, x, t, eps, 0.05)


def test_diffusion_head_sample_guidance_and_sphere():
    torch.manual_seed(0)
    head = DiffusionHead(feat_dim=6, cond_dim=4, width=8)
    for blk in head.blocks:
        torch.nn.init.normal_(blk.ada[1].weight, std=0.3)
    torch.nn.init.normal_(head.out.weight, std=0.3)
    c, u = torch.randn(2, 4), torch.randn(2, 4)
    s = lambda cond, w: head.sample(cond, 2, w, steps=4, generator=torch.Generator().manual_seed(1))
    x = s(torch.cat([c, u]), 3.0)
    assert x.shape == (2, 6) and torch.allclose(x.norm(dim=-1), torch.full((2,), 6 ** 0.5))
    # guidance with identical branches, or with w = 1, is the unguided sample
    assert torch.allclose(s(torch.cat([c, c]), 3.0), s(c, 1.0), atol=1e-5)
    assert torch.allclose(s(torch.cat([c, u]), 1.0), s(c, 1.0), atol=1e-5)
    assert not torch.allclose(x, s(c, 1.0), atol=1e-3)


def test_continuous_rep_tokens_are_causal(tiny_model):
    """Changing feature r_j changes the head's condition only at r_j and after it."""
    m = tiny_model(CONT)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, m.n_rep, m.cfg.vit.dim, generator=g)
    z = torch.randn(1, m.n_pix, 48, generator=g)
    t = torch.tensor([0.4])
    o = m.gen_forward([[65, 66]], feats, z, t)
    out, x = o.rep, o.x_pred
    assert out.shape == (1, m.n_rep + 1, m.cfg.mot.dim)
    for j in range(m.n_rep):
        f2 = feats.clone()
        f2[:, j] += 1.0
        o2 = m.gen_forward([[65, 66]], f2, z, t)
        out2, x2 = o2.rep, o2.x_pred
        assert torch.allclose(out[:, :j + 1], out2[:, :j + 1], atol=1e-6)       # [BOR], r_1..r_j
        assert not torch.allclose(out[:, j + 1:], out2[:, j + 1:], atol=1e-4)   # r_{j+1}.. see it
        assert not torch.allclose(x, x2, atol=1e-4)                             # and so do the pixels


@pytest.mark.parametrize("guidance", [dict(), dict(cfg_rep=1.0), dict(cfg_pix=1.0, cfg_rep=1.0)])
def test_continuous_cached_sampling_equals_reference(tiny_model, guidance):
    m = tiny_model(CONT)
    torch.nn.init.normal_(m.rep.head.out.weight, std=0.3)  # zero-init would make every feature random noise
    prompts = ["a red circle at the top left", "a green triangle"]
    kw = dict(steps=3, **guidance)
    a, ca = text_to_image(m, prompts, torch.Generator().manual_seed(3), kv_cache=True, **kw)
    b, cb = text_to_image(m, prompts, torch.Generator().manual_seed(3), kv_cache=False, **kw)
    assert ca.shape == (2, m.n_rep, m.cfg.vit.dim) and ca.dtype == torch.float32
    assert torch.allclose(ca, cb, atol=1e-4) and torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(ca.norm(dim=-1), torch.full((2, m.n_rep), m.cfg.vit.dim ** 0.5), atol=1e-4)


def test_repa_gen_loss_is_the_weighted_alignment_of_the_tapped_block(tiny_model):
    """L_REPA = w mean(1 - cos(proj(h_k), f)) with h_k the pixel tokens after k = depth // 2
    blocks; its gradient reaches the first k blocks and none after them."""
    m = tiny_model(*REPA).train()
    cfg = m.cfg
    assert m.n_rep == 0 and cfg.mot.depth == 2
    g = torch.Generator().manual_seed(0)
    B = 2
    images = torch.rand(B, 3, 16, 16, generator=g) * 2 - 1
    align = torch.nn.functional.normalize(torch.randn(B, m.n_pix, cfg.vit.dim, generator=g), dim=-1)
    t, eps = torch.tensor([0.3, 0.7]), torch.randn(B, m.n_pix, 48, generator=g)
    no = torch.zeros(B, dtype=torch.bool)
    l_rep, l_fm = m.gen_loss(GenBatch([[65], [66, 67]], images, None, t, eps, no, no, align=align))
    # by hand: run the first block only, take the pixel columns, project
    x = patchify(images, 4)
    z = add_noise(x, t, eps)
    lay = m.gen_layout([[65], [66, 67]], 0, m.n_pix)
    tapped = m.gen_forward([[65], [66, 67]], None, z, t, tap=1).tapped
    want = 0.5 * repa_loss(m.repa_proj(tapped), align)
    assert l_rep.item() == pytest.approx(want.item(), rel=1e-5) and l_rep.item() > 0.1
    # tap 1 is the residual stream after exactly one block
    h0 = m.embed(lay, z=z, t=t)
    from nanorf.mot import Routing, rope_cos_sin
    cos, sin = rope_cos_sin(lay.pos, cfg.mot.dim // cfg.mot.heads, cfg.mot.rope_base)
    h1, _ = m.mot.blocks[0](h0, Routing(lay.modality), cos, sin, lay.mask())
    assert torch.allclose(h1[:, lay.pix_cols], tapped, atol=1e-5)
    m.zero_grad()
    l_rep.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.repa_proj.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.mot.blocks[0].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.mot.blocks[1].parameters())


def test_targets_for_each_variant(tiny_config):
    """Discrete: code ids; continuous: sqrt(D)-scaled unit features on the rep grid, no VQ;
    REPA: unit features on the pixel-patch grid."""
    from nanorf.vit import ViT
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = tiny_config(CONT).model
    rt = RepresentationTargets(cfg, ViT(cfg.vit))
    f = rt(imgs)
    assert rt.vq is None and f.shape == (2, 4, 32)
    assert torch.allclose(f.norm(dim=-1), torch.full((2, 4), 32 ** 0.5), atol=1e-4)
    cfg = tiny_config(*REPA).model
    rt = RepresentationTargets(cfg, ViT(cfg.vit))
    a = rt.align(imgs)
    # pixel patch 4 = ViT patch 4: one feature per pixel patch, no pooling
    out = rt.encoder.encoder(imgs)["x_prenorm"]
    assert a.shape == (2, 16, 32) and torch.allclose(a, torch.nn.functional.normalize(out, dim=-1), atol=1e-5)
    # pixel patch 2, half the ViT's 4 (the toy's 8 against 16): each pixel patch gets the
    # feature of the ViT patch that contains it
    cfg = tiny_config(*REPA, "model.patch_size=2").model
    rt = RepresentationTargets(cfg, ViT(cfg.vit))
    a = rt.align(imgs).view(2, 8, 8, 32)
    f = torch.nn.functional.normalize(rt.encoder.encoder(imgs)["x_prenorm"], dim=-1).view(2, 4, 4, 32)
    for i in range(8):
        for j in range(8):
            assert torch.allclose(a[:, i, j], f[:, i // 2, j // 2], atol=1e-6)
