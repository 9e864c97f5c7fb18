"""The fast sampler (KV cache, cached prefix for every ODE step) against the reference path."""

import pytest
import torch
import torch.nn as nn

from nanorf.config import SamplingSettings
from nanorf.mot import PIX, KVCache
from nanorf.sampler import answer, step_tokens, text_to_image

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red circle at the top left and a blue", "a green triangle"]  # tiny model: <= 40 bytes


@pytest.mark.parametrize("rf", [True, False])
@pytest.mark.parametrize("guidance", [dict(), dict(cfg_pix=1.0), dict(cfg_rep=1.0), dict(cfg_pix=1.0, cfg_rep=1.0),
                                      dict(top_k=3, solver="heun", cfg_interval=(0.2, 0.8)),
                                      dict(cfg_mode="split", cfg_pix_rep=2.0), dict(cfg_mode="split", cfg_rep=1.0),
                                      dict(cfg_mode="norep"), dict(renoise_from=0.5)])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])
def test_cached_sampling_equals_reference(tiny_model, rf, guidance, prompts):
    m = tiny_model() if rf else tiny_model("model.rf=false")
    kw = dict(steps=4, temperature=1.0, **guidance)
    a, ca = text_to_image(m, prompts, torch.Generator().manual_seed(3), kv_cache=True, **kw)
    b, cb = text_to_image(m, prompts, torch.Generator().manual_seed(3), kv_cache=False, **kw)
    if rf:
        assert torch.equal(ca, cb)
        assert ca.shape == (len(prompts), m.n_rep)
    else:
        assert ca is None and cb is None
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    # the pictures are not trivially equal (e.g. all clamped): the model's output moves with the seed
    c, _ = text_to_image(m, prompts, torch.Generator().manual_seed(4), kv_cache=True, **kw)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("field", [0, 8])
def test_cached_sampling_equals_reference_with_tanh_head(tiny_model, field):
    """The tanh head, and with pix_field the per-pixel refinement that also reads z."""
    m = tiny_model("model.pix_head_tanh=true", f"model.pix_field={field}")
    if field:
        torch.nn.init.normal_(m.pix_field.out.weight, std=0.5)   # zero-initialised: make it act
    a, ca = text_to_image(m, PROMPTS, torch.Generator().manual_seed(3), kv_cache=True, steps=4)
    b, cb = text_to_image(m, PROMPTS, torch.Generator().manual_seed(3), kv_cache=False, steps=4)
    assert torch.equal(ca, cb) and torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_cached_diffusion_step_equals_full_forward(tiny_model):
    """One ODE evaluation against the cached prefix equals gen_forward over the whole sequence,
    for the cond rows and for the uncond rows with the rep sequence hidden."""
    m = tiny_model()
    tok = m.tok
    prompts = [tok.encode(PROMPTS[0]), []]
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, m.cfg.vq.codebook_size, (2, m.n_rep), generator=g)
    z = torch.randn(2, m.n_pix, m.cfg.patch_size ** 2 * 3, generator=g)
    t = torch.tensor([0.3, 0.3])
    hide = torch.tensor([False, True])
    full = m.gen_forward(prompts, codes, z, t, hide).x_pred
    # build the cache: prefill [BOS] prompt [BOR] r_1..r_N [BOP], then the pixel block alone
    lay = m.gen_layout(prompts, m.n_rep, m.n_pix)
    n_pre = lay.pix_cols.start
    x = m.embed(lay, codes=codes, z=z, t=t)
    cache = KVCache(m.cfg.mot.depth, n_pre)
    mask = lay.mask(hide)[:, :, :n_pre, :n_pre]
    m.mot(x[:, :n_pre], lay.modality[:, :n_pre], lay.pos[:, :n_pre], mask, cache=cache, write=True)
    cache.commit(lay.valid[:, :n_pre], lay.modality[:, :n_pre])
    before = cache.k.clone()
    pos = lay.pos[:, n_pre:n_pre + 1]
    h = step_tokens(m, cache, m.embed_pix(z, t), PIX, pos, cache.mask(m.n_pix, bidir=True, hide_rep=hide), write=False)
    assert torch.allclose(m.predict_x(h, z), full, atol=1e-5)
    assert cache.len == n_pre and torch.equal(cache.k, before)  # the step wrote nothing


class _NoSpecials(nn.Module):
    """The LM head with every special token (EOS included) ruled out, so that every answer
    runs the full max_new_tokens and the comparison covers every cached decode step."""

    def __init__(self, head: nn.Module, n_bytes: int):
        super().__init__()
        self.head, self.n_bytes = head, n_bytes

    def forward(self, h):
        out = self.head(h)
        out[..., self.n_bytes:] = -1e9
        return out


@pytest.mark.parametrize("sampling", [dict(), dict(top_k=5, temperature=1.0)])
def test_cached_text_generation_equals_reference(tiny_model, sampling):
    m = tiny_model()
    m.lm_head = _NoSpecials(m.lm_head, m.tok.n_bytes)
    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    qs = ["what color is the circle?", "describe the image.", "where?"]  # different lengths
    a = answer(m, imgs, qs, max_new_tokens=10, generator=torch.Generator().manual_seed(1), kv_cache=True, **sampling)
    b = answer(m, imgs, qs, max_new_tokens=10, generator=torch.Generator().manual_seed(1), kv_cache=False, **sampling)
    assert a == b
    assert all(len(x) > 0 for x in a)  # with no EOS possible, every answer ran all ten steps


def test_kv_cache_overflow_raises():
    c = KVCache(1, 2)
    k = torch.zeros(1, 1, 3, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        c.append(0, k, k)


def test_split_guidance_formula():
    """split: v(0,0) + w_r (v(0,r) - v(0,0)) + w (v(c,r) - v(0,r)); joint: v(0,0) + w (v(c,r) - v(0,0))."""
    from nanorf.sampler import guide, pixel_branches
    assert pixel_branches(1.0, "split") == [(True, False)]
    assert pixel_branches(3.0, "joint") == [(True, False), (False, True)]
    assert pixel_branches(3.0, "split") == [(True, False), (False, True), (False, False)]
    assert pixel_branches(3.0, "norep") == [(True, True), (False, True)]
    assert pixel_branches(1.0, "norep") == [(True, True)]
    v = torch.tensor([[5.0], [1.0], [2.0]])  # v(c,r), v(0,0), v(0,r) for a batch of 1
    opt = SamplingSettings(cfg_pix=3.0, cfg_pix_rep=2.0, cfg_interval=(0.0, 1.0))
    assert guide(v, 1, 0.5, opt).item() == 1 + 2 * (2 - 1) + 3 * (5 - 2)
    assert guide(v[:2], 1, 0.5, opt).item() == 1 + 3 * (5 - 1)
    # outside the interval both weights are 1: the conditional velocity
    assert guide(v, 1, 0.5, SamplingSettings(cfg_pix=3.0, cfg_pix_rep=2.0, cfg_interval=(0.6, 1.0))).item() == 5.0
    with pytest.raises(ValueError):
        pixel_branches(3.0, "nested")
