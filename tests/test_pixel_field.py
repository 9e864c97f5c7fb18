"""The per-pixel refinement of the pixel head (nanorf/pixel_field.py)."""

import pytest
import torch

from nanorf.pixel_field import PixelField
from tests.conftest import _tiny_model
from tests.test_model import _gen_batch


def _field(width=8, seed=0):
    torch.manual_seed(seed)
    f = PixelField(dim=32, patch_size=4, width=width)
    torch.nn.init.normal_(f.out.weight, std=0.5)   # zero-initialised: make it act
    return f


def test_each_pixel_reads_only_its_own_noisy_value_and_its_own_token():
    """Changing one pixel's z changes that pixel's three outputs and nothing else; changing one
    token's hidden state changes only its own patch: no path between pixels or patches."""
    f = _field()
    g = torch.Generator().manual_seed(1)
    h, logits, z = torch.randn(2, 9, 32, generator=g), torch.randn(2, 9, 48, generator=g), torch.randn(2, 9, 48, generator=g)
    with torch.no_grad():
        base = f(h, logits, z)
        z2 = z.clone()
        z2[1, 4, 15:18] += 1.0                                   # patch 4, pixel 5 (row 1, col 1), RGB
        moved = (f(h, logits, z2) - base).abs() > 1e-6
        assert moved[1, 4, 15:18].any() and moved.sum() == moved[1, 4, 15:18].sum()
        h2 = h.clone()
        h2[0, 2] += 1.0
        moved = (f(h2, logits, z) - base).abs() > 1e-6
        assert moved[0, 2].all() and moved.sum() == 48


def test_hand_computed_pixel():
    """One pixel through the equations of the module docstring."""
    f = _field(width=4)
    g = torch.Generator().manual_seed(2)
    h, logits, z = torch.randn(1, 1, 32, generator=g), torch.randn(1, 1, 48, generator=g), torch.randn(1, 1, 48, generator=g)
    j = 7
    a = f.inp.weight @ torch.cat([z[0, 0, 3 * j:3 * j + 3], logits[0, 0, 3 * j:3 * j + 3]]) + f.inp.bias \
        + f.place[j] + f.cond.weight @ h[0, 0] + f.cond.bias
    gelu = torch.nn.functional.gelu
    want = logits[0, 0, 3 * j:3 * j + 3] + f.out.weight @ gelu(f.mid.weight @ gelu(a) + f.mid.bias) + f.out.bias
    with torch.no_grad():
        assert torch.allclose(f(h, logits, z)[0, 0, 3 * j:3 * j + 3], want, atol=1e-5)


@pytest.mark.parametrize("tanh", [False, True])
def test_fresh_field_is_the_plain_head(tanh):
    """W_out starts at zero: a model with a fresh field predicts what the same weights without
    it predict, so switching it on changes nothing at step 0."""
    kw = ("model.pix_head_hidden=16", f"model.pix_head_tanh={tanh}")
    plain, field = _tiny_model(*kw), _tiny_model(*kw, "model.pix_field=8")
    missing, _ = field.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith("pix_field.") for k in missing)
    b = _gen_batch()
    z = torch.randn(2, plain.n_pix, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = plain.gen_forward(b.prompts, b.targets, z, b.t).x_pred
        c = field.gen_forward(b.prompts, b.targets, z, b.t).x_pred
    assert torch.allclose(a, c, atol=1e-6)
    torch.nn.init.normal_(field.pix_field.out.weight, std=0.5)
    with torch.no_grad():
        assert not torch.allclose(a, field.gen_forward(b.prompts, b.targets, z, b.t).x_pred, atol=1e-3)


def test_chunks_give_the_same_numbers():
    """The chunked pass (the fast one on a CPU) equals one pass over every token, gradients too."""
    f = _field()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 9, 32, generator=g, requires_grad=True)
    logits, z = torch.randn(5, 9, 48, generator=g), torch.randn(5, 9, 48, generator=g)
    outs, grads = [], []
    for chunk in (10 ** 9, 7, 1):
        f.chunk = chunk
        out = f(h, logits, z)
        (gh,) = torch.autograd.grad(out.square().sum(), h)
        outs.append(out.detach()), grads.append(gh)
    for o, gh in zip(outs[1:], grads[1:]):
        assert torch.allclose(o, outs[0], atol=1e-6) and torch.allclose(gh, grads[0], atol=1e-5)
