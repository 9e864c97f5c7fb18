"""Tests for nanorf/model.py: patchify, 2-D sin-cos positions, sequence layouts, the three
losses (hand checks, per-example normalisation, CFG drops), that training lowers the loss,
and the representation targets."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from nanorf.layout import NO_BLOCK, PIX_BLOCK, VIT_BLOCK
from nanorf.model import GenBatch, UndBatch
from nanorf.patches import images_to_tensor, patchify, sincos_2d, tensor_to_images, unpatchify
from nanorf.mot import PAD, PIX, REP, UND
from nanorf.targets import RepresentationTargets

pytestmark = pytest.mark.usefixtures("single_thread")

# ---- patches and positions -----------------------------------------------------------------


def test_patchify_hand_checked_and_round_trip():
    img = torch.arange(3 * 8 * 8, dtype=torch.float32).view(1, 3, 8, 8)   # value = c*64 + y*8 + x
    x = patchify(img, 4)
    assert x.shape == (1, 4, 48)
    # patch (row 0, col 1) is patch 1 in raster order; its vector is (i, j, c) with c fastest
    want = torch.tensor([[c * 64 + i * 8 + (4 + j) for i in range(4) for j in range(4) for c in range(3)]],
                        dtype=torch.float32)
    assert torch.equal(x[0, 1], want[0])
    assert x[0, 1, :4].tolist() == [4.0, 68.0, 132.0, 5.0]
    assert x[0, 2, 0].item() == 32.0           # patch (1, 0) starts at y = 4, x = 0
    g = torch.Generator().manual_seed(0)
    img2 = torch.randn(2, 3, 12, 8, generator=g)
    assert torch.equal(unpatchify(patchify(img2, 4), 4, 3, 2), img2)


def test_sincos_2d_values_and_shapes():
    e = sincos_2d(2, 2, 8)
    assert e.shape == (4, 8)
    # q = 2 frequencies, geometric from pi/2 to pi/2 * (2 * 64) = 64 pi; cell (0, 1) has
    # centre y = 0.25, x = 0.75
    y, x, f = 0.25, 0.75, [math.pi / 2, 64 * math.pi]
    want = ([math.sin(y * w) for w in f] + [math.cos(y * w) for w in f]
            + [math.sin(x * w) for w in f] + [math.cos(x * w) for w in f])
    assert torch.allclose(e[1], torch.tensor(want), atol=1e-5)
    assert sincos_2d(3, 5, 64).shape == (15, 64)
    assert len({tuple(r) for r in sincos_2d(4, 4, 32).round(decimals=4).tolist()}) == 16  # distinct


def test_sincos_2d_grids_agree_at_coinciding_centres_small():
    # a 1x1 grid's centre (0.5, 0.5) is the centre cell of a 3x3 grid; a 2x2 grid's cells are
    # the centres of the 3x3 blocks of a 6x6 grid
    assert torch.allclose(sincos_2d(1, 1, 64)[0], sincos_2d(3, 3, 64)[4], atol=1e-6)
    six = sincos_2d(6, 6, 32)
    assert torch.allclose(sincos_2d(2, 2, 32), six[[7, 10, 25, 28]], atol=1e-6)


def test_sincos_2d_grids_agree_at_coinciding_centres_large():
    a, b = sincos_2d(8, 8, 64), sincos_2d(24, 24, 64)
    idx = [(3 * i + 1) * 24 + (3 * j + 1) for i in range(8) for j in range(8)]
    assert torch.allclose(a, b[idx], atol=1e-5)


def test_images_tensor_round_trip():
    import numpy as np
    ims = [np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)]
    x = images_to_tensor(ims)
    assert x.shape == (1, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert (tensor_to_images(x)[0] == ims[0]).all()


# ---- layouts -------------------------------------------------------------------------------

def test_gen_layout_hand_built(tiny_model):
    m = tiny_model()
    t = m.tok
    lay = m.gen_layout([[65, 66], [65, 66, 67, 68]], n_rep=4, n_pix=16)
    L = 1 + 4 + 1 + 4 + 1 + 16   # BOS p1..p4 | BOR r1..r4 | BOP x1..x16 (example 0: 2 pads, 2 bytes)
    assert lay.tokens.shape == (2, L)
    assert lay.rep_cols == slice(L - 16 - 1 - 4, L - 16 - 1) and lay.pix_cols == slice(L - 16, L)
    assert lay.tokens[0].tolist() == [0, 0, t.bos, 65, 66, t.bor] + [0] * 4 + [t.bop] + [0] * 16
    assert lay.tokens[1].tolist() == [t.bos, 65, 66, 67, 68, t.bor] + [0] * 4 + [t.bop] + [0] * 16
    assert lay.modality[0].tolist() == [PAD, PAD, UND, UND, UND] + [REP] * 5 + [PIX] * 17
    assert lay.pos[0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8] + [9] * 16
    assert lay.pos[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10] + [11] * 16
    assert lay.valid[0].tolist() == [False, False] + [True] * (L - 2)
    assert lay.noisy[0].tolist() == [False] * (L - 16) + [True] * 16
    assert lay.block[0].tolist() == [NO_BLOCK] * (L - 16) + [PIX_BLOCK] * 16
    assert (lay.targets == -1).all()


def test_gen_layout_without_rf(tiny_model):
    m = tiny_model("model.rf=false")
    t = m.tok
    assert m.n_rep == 0 and m.rep is None
    lay = m.gen_layout([[65]], n_rep=0, n_pix=16)
    assert lay.rep_cols is None and lay.pix_cols == slice(3, 19)
    assert lay.tokens[0, :3].tolist() == [t.bos, 65, t.bop]
    assert lay.modality[0].tolist() == [UND, UND] + [PIX] * 17


def test_und_layout_hand_built(tiny_model):
    m = tiny_model()
    t = m.tok
    lay = m.und_layout([[10, 11], [10, 11, 12]], [[12, 13], [20]])
    V = 16
    assert lay.vit_cols == slice(2, 2 + V)
    # example 0: BOS BOI v*16 EOI 10 11 12 13 EOS
    s = 2 + V + 1
    assert lay.tokens[0].tolist() == [t.bos, t.boi] + [0] * V + [t.eoi, 10, 11, 12, 13, t.eos]
    want = [-1] * (s + 5)
    want[s + 1], want[s + 2], want[s + 3] = 12, 13, t.eos   # "11" predicts 12, 12 -> 13, 13 -> EOS
    assert lay.targets[0].tolist() == want
    # example 1: question 10 11 12, answer 20, EOS: same length, different split
    want1 = [-1] * (s + 5)
    want1[s + 2], want1[s + 3] = 20, t.eos
    assert lay.targets[1].tolist() == want1
    assert lay.pos[0].tolist() == [0, 1] + [2] * V + [3, 4, 5, 6, 7, 8]
    assert lay.block[0].tolist() == [NO_BLOCK] * 2 + [VIT_BLOCK] * V + [NO_BLOCK] * 6
    assert not lay.noisy.any()
    # right padding: a shorter example keeps its ViT block in the same columns
    lay2 = m.und_layout([[10], [10, 11, 12]], [[12], [20, 21, 22]])
    assert lay2.valid[0].tolist() == [True] * (s + 3) + [False] * 4
    assert lay2.modality[0, -4:].tolist() == [PAD] * 4
    assert lay2.targets[0].tolist() == [-1] * s + [12, t.eos] + [-1] * 5


def test_und_layout_follow_up_turns_hand_built(tiny_model):
    """Two turns about one image: each answer and the [EOS] that ends it are targets; the
    second question is not, and positions run on through both turns."""
    m = tiny_model()
    t, V = m.tok, 16
    lay = m.und_layout([[10]], [[12, 13]], follow_ups=[[([14], [15])]])
    s = 2 + V + 1
    assert lay.tokens[0].tolist() == [t.bos, t.boi] + [0] * V + [t.eoi, 10, 12, 13, t.eos, 14, 15, t.eos]
    want = [-1] * (s + 7)
    want[s], want[s + 1], want[s + 2] = 12, 13, t.eos      # 10 -> 12, 12 -> 13, 13 -> EOS
    want[s + 4], want[s + 5] = 15, t.eos                   # EOS -> 14 is a question: no target; 14 -> 15, 15 -> EOS
    assert lay.targets[0].tolist() == want
    assert lay.pos[0].tolist()[s:] == list(range(4, 11))
    # a row without follow-ups beside one with them: the first is the single-turn layout, padded
    lay2 = m.und_layout([[10], [10]], [[12, 13], [12, 13]], follow_ups=[[], [([14], [15])]])
    single = m.und_layout([[10]], [[12, 13]])
    n = single.tokens.shape[1]
    assert lay2.targets[0, :n].tolist() == single.targets[0].tolist() and not lay2.valid[0, n:].any()
    with pytest.raises(ValueError, match="training"):
        m.und_layout([[10]], [[]], eos=False, follow_ups=[[([14], [15])]])


def test_a_follow_up_turn_does_not_reach_back_into_the_first(tiny_model):
    """Causal text: the first turn's logits are the same with and without a later turn, and the
    loss of a two-turn example is the mean CE over both answers' target columns."""
    m = tiny_model()
    b = _und_batch([1])
    one, lay1 = m.und_forward(b.images, b.questions, b.answers)
    more = [[([40, 41], [42, 43, 44])]]
    two, lay2 = m.und_forward(b.images, b.questions, b.answers, follow_ups=more)
    n = one.shape[1]
    assert torch.allclose(one[0], two[0, :n], atol=1e-5)
    cols = (lay2.targets[0] >= 0).nonzero().flatten()
    assert len(cols) == 7 + 4                                   # 6 answer bytes + EOS, then 3 + EOS
    want = F.cross_entropy(two[0, cols], lay2.targets[0, cols])
    loss = m.und_loss(UndBatch(b.images, b.questions, b.answers, more))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_und_layout_without_eos_has_no_targets_on_question(tiny_model):
    m = tiny_model()
    lay = m.und_layout([[10, 11]], [[]], eos=False)
    assert (lay.targets == -1).all()


# ---- losses --------------------------------------------------------------------------------

def _gen_batch(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GenBatch(prompts=[[65, 66, 67], [68]][:B] + [[70 + i] for i in range(B - 2)],
                    images=torch.rand(B, 3, 16, 16, generator=g) * 2 - 1,
                    targets=torch.randint(0, 16, (B, 4), generator=g),
                    t=torch.rand(B, generator=g) * 0.8 + 0.1,
                    eps=torch.randn(B, 16, 48, generator=g),
                    drop_text=torch.zeros(B, dtype=torch.bool), drop_rep=torch.zeros(B, dtype=torch.bool))


def test_gen_loss_finite_rf_on_and_off(tiny_model):
    for rf in ("true", "false"):
        m = tiny_model(f"model.rf={rf}")
        b = _gen_batch()
        if rf == "false":
            b.targets = None
        l_rep, l_fm = m.gen_loss(b)
        assert l_rep.shape == () and l_fm.shape == ()
        assert torch.isfinite(l_rep) and torch.isfinite(l_fm) and l_fm > 0
        if rf == "true":
            assert l_rep.item() == pytest.approx(math.log(16), abs=0.15)   # small-init head: ~uniform
        else:
            assert l_rep.item() == 0.0


def test_mlp_pixel_head_escapes_the_linear_heads_rank():
    """pix_head_hidden > 0: a GELU MLP whose outputs span more than the trunk's D directions (a
    linear head's centred outputs have rank <= D: the toy's reason for the MLP)."""
    from tests.conftest import _tiny_model
    plain = "model.pix_head_tanh=false"                         # a tanh would lift the rank too
    lin, mlp = _tiny_model("model.pix_head_hidden=0", plain), _tiny_model("model.pix_head_hidden=64", plain)
    assert isinstance(mlp.pix_head, torch.nn.Sequential) and mlp.pix_head[0].out_features == 64
    h = torch.randn(500, 32)                                   # D = 32, a patch is 4*4*3 = 48 values
    rank = lambda out: torch.linalg.matrix_rank(out - out.mean(0)).item()
    with torch.no_grad():
        assert rank(lin.pix_head(h)) <= 32 < rank(mlp.pix_head(h)) == 48


@pytest.mark.parametrize("hidden", [0, 64])
def test_tanh_pixel_head_is_tanh_of_the_plain_head(hidden):
    """pix_head_tanh adds only the tanh: the same weights (same state-dict keys) give
    x_pred = tanh(plain x_pred), inside [-1, 1] where the plain head's outputs are not."""
    from tests.conftest import _tiny_model
    plain = _tiny_model(f"model.pix_head_hidden={hidden}", "model.pix_head_tanh=false")
    bounded = _tiny_model(f"model.pix_head_hidden={hidden}", "model.pix_head_tanh=true")
    torch.nn.init.normal_(plain.pix_out.weight, std=2.0)   # outputs well beyond [-1, 1]
    bounded.load_state_dict(plain.state_dict())
    b = _gen_batch()
    z = torch.randn(2, plain.n_pix, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = plain.gen_forward(b.prompts, b.targets, z, b.t).x_pred
        c = bounded.gen_forward(b.prompts, b.targets, z, b.t).x_pred
    assert a.abs().max() > 1.5
    assert torch.allclose(c, torch.tanh(a), atol=1e-6)


@pytest.mark.parametrize("hidden", [0, 64])
def test_gen_loss_hand_check_with_zero_pixel_head(tiny_model, hidden):
    """At init the pixel head's last layer is zero (JiT), so x_pred = 0 and L_FM has a closed form."""
    m = tiny_model(f"model.pix_head_hidden={hidden}", randomize_pix_head=False)
    b = _gen_batch()
    _, l_fm = m.gen_loss(b)
    x = patchify(b.images, 4)
    t = b.t[:, None, None]
    z = t * x + (1 - t) * b.eps
    want = ((-z / (1 - t).clamp_min(0.05) - (x - b.eps)) ** 2).mean()
    assert l_fm.item() == pytest.approx(want.item(), rel=1e-5)
    rep_logits = m.gen_forward(b.prompts, b.targets, patchify(b.images, 4), b.t).rep
    # the rep loss is next-token CE: logits at [BOR], r_1..r_3 predict r_1..r_4
    l_rep, _ = m.gen_loss(b)
    ce = F.cross_entropy(rep_logits[:, :4].reshape(-1, 16), b.targets.reshape(-1))
    assert rep_logits.shape == (2, 5, 16)
    assert l_rep.item() == pytest.approx(ce.item(), rel=1e-5)


def test_drop_text_equals_empty_prompt(tiny_model):
    m = tiny_model()
    b = _gen_batch()
    dropped = m.gen_loss(replace(b, drop_text=torch.tensor([True, False])))
    empty = m.gen_loss(replace(b, prompts=[[], b.prompts[1]]))
    kept = m.gen_loss(b)
    for d, e in zip(dropped, empty):
        assert d.item() == pytest.approx(e.item(), abs=1e-6)
    assert abs(dropped[1].item() - kept[1].item()) > 1e-6   # the drop matters


def test_drop_rep_changes_only_fm(tiny_model):
    m = tiny_model()
    b = _gen_batch()
    l_rep0, l_fm0 = m.gen_loss(b)
    l_rep1, l_fm1 = m.gen_loss(replace(b, drop_rep=torch.tensor([True, True])))
    assert l_rep0.item() == pytest.approx(l_rep1.item(), abs=1e-7)   # rep tokens never see pixels
    assert abs(l_fm0.item() - l_fm1.item()) > 1e-6


def _und_batch(idx, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    qs = [[10, 11, 12], [40], [50, 51]]
    ans = [[20], [21, 22, 23, 24, 25, 26], [30, 31]]
    return UndBatch(images=images[idx], questions=[qs[i] for i in idx], answers=[ans[i] for i in idx])


def test_und_loss_hand_check(tiny_model):
    m = tiny_model()
    b = _und_batch([1])
    logits, lay = m.und_forward(b.images, b.questions, b.answers)
    s = 2 + 16 + 1           # first text column; question is 1 byte, answer 6 bytes, then EOS
    cols = list(range(s, s + 7))
    tgt = torch.tensor([21, 22, 23, 24, 25, 26, m.tok.eos])
    want = F.cross_entropy(logits[0, cols], tgt)
    assert m.und_loss(b).item() == pytest.approx(want.item(), rel=1e-5)


def test_und_loss_is_mean_of_per_example_means(tiny_model):
    """Each example weighs the same whatever its answer length: the property that makes a DDP
    step equal a single-process step."""
    m = tiny_model()
    both = m.und_loss(_und_batch([0, 1])).item()
    l0, l1 = m.und_loss(_und_batch([0])).item(), m.und_loss(_und_batch([1])).item()
    assert both == pytest.approx((l0 + l1) / 2, abs=1e-5)
    # and it is not the token-weighted mean (2 vs 7 target tokens)
    assert abs(both - (2 * l0 + 7 * l1) / 9) > 1e-3
    three = m.und_loss(_und_batch([0, 1, 2])).item()
    l2 = m.und_loss(_und_batch([2])).item()
    assert three == pytest.approx((l0 + l1 + l2) / 3, abs=1e-5)


def test_forward_sums_the_three_losses(tiny_model):
    m = tiny_model()
    gen, und = _gen_batch(), _und_batch([0, 2])
    total, parts = m(gen, und)
    l_rep, l_fm = m.gen_loss(gen)
    assert (parts.lm.item(), parts.rep.item(), parts.fm.item()) == pytest.approx(
        (m.und_loss(und).item(), l_rep.item(), l_fm.item()), rel=1e-6)
    three = (parts.lm, parts.rep, parts.fm)
    assert parts.aux is None                                    # a dense decoder has no balancing loss
    assert total.item() == pytest.approx(sum(v.item() for v in three), rel=1e-6)
    assert all(v.item() > 0 for v in three)
    total2, parts2 = m(_gen_batch())
    assert parts2.lm.item() == 0.0


def test_short_training_run_lowers_the_loss(tiny_model):
    m = tiny_model(randomize_pix_head=False).train()
    gen, und = _gen_batch(B=4, seed=3), _und_batch([0, 1, 2])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss, parts = m(gen, und)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append({"lm": parts.lm.item(), "rep": parts.rep.item(), "fm": parts.fm.item()})
    first, last = losses[0], losses[-1]
    assert sum(last.values()) < 0.7 * sum(first.values())
    for k in ("lm", "rep", "fm"):
        assert last[k] < first[k], (k, first[k], last[k])


def test_every_parameter_gets_a_gradient(tiny_model):
    """DDP without find_unused_parameters needs every trainable parameter in the graph."""
    m = tiny_model()
    loss, _ = m(_gen_batch(), _und_batch([0, 1]))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_new_parameters_are_the_generation_side_modules(tiny_model):
    """The x4-LR set: every parameter only rep/pix tokens pass through, by module, including
    the rep and pixel experts' final norms; nothing the understanding path uses."""
    m = tiny_model()
    new = {id(p) for p in m.new_parameters()}
    names = {n for n, p in m.named_parameters() if id(p) in new}
    for want in ("mot.norm.1.weight", "mot.norm.2.weight", "rep_pos", "rep.emb.weight", "rep.head.weight",
                 "pix_emb.weight", "pix_head.bias", "t_emb.0.weight", "mot.blocks.0.ffn.1.up.weight",
                 "mot.blocks.1.ffn.2.down.weight"):
        assert want in names, want
    for n in names:
        assert not n.startswith(("vit.", "connector.", "tok_emb", "lm_head", "mot.norm.0")), n
        assert ".ffn.0." not in n and ".attn_in." not in n and ".attn_out." not in n, n
    # with per-modality attention the rep/pix attention is new too
    m2 = tiny_model("model.mot.shared_attention=false")
    names2 = {n for n, p in m2.named_parameters() if id(p) in {id(q) for q in m2.new_parameters()}}
    assert "mot.blocks.0.attn_in.1.qkv.weight" in names2 and "mot.blocks.0.attn_out.2.weight" in names2
    assert "mot.blocks.0.attn_in.0.qkv.weight" not in names2
    # and the optimiser gives exactly them the multiplier
    opt = m.configure_optimizer(replace(tiny_config_train(), new_param_lr_mult=4.0))
    mult = {id(p): g["lr_mult"] for g in opt.param_groups for p in g["params"]}
    assert all(mult[id(p)] == (4.0 if id(p) in new else 1.0) for p in m.parameters())


def tiny_config_train():
    from nanorf.config import TrainConfig
    return TrainConfig()


# ---- representation targets ----------------------------------------------------------------

def test_representation_targets(tiny_model, tiny_config):
    m = tiny_model()
    cfg = tiny_config().model
    rt = RepresentationTargets(cfg, m.vit)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    codes = rt(images, update=False)
    assert codes.shape == (3, cfg.rep_grid ** 2) == (3, 4)
    assert codes.dtype == torch.long
    assert (codes >= 0).all() and (codes < cfg.vq.codebook_size).all()
    assert torch.equal(rt(images, update=False), codes)   # deterministic without an update
    assert not any(p.requires_grad for p in rt.parameters())


def test_code_patches_are_running_means_of_the_patches_under_each_code(tiny_model, tiny_config):
    m = tiny_model()
    rt = RepresentationTargets(tiny_config().model, m.vit).train()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(3, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    codes = rt(a)                                                                  # first sight: the batch mean
    tiles = patchify(a, 8).flatten(0, 1)                                           # (3*4, 8*8*3): 2x2 rep grid
    for k in codes.unique().tolist():
        assert torch.allclose(rt.code_patches[k], tiles[codes.flatten() == k].mean(0), atol=1e-6)
    assert rt.code_seen.sum() == len(codes.unique()) and (rt.code_patches[~rt.code_seen] == 0).all()
    before = rt.code_patches.clone()
    codes_b = rt(b)                                                                # then momentum 0.99
    tiles_b = patchify(b, 8).flatten(0, 1)
    for k in codes_b.unique().tolist():
        mean = tiles_b[codes_b.flatten() == k].mean(0)
        want = mean if k not in codes.unique().tolist() else 0.99 * before[k] + 0.01 * mean
        assert torch.allclose(rt.code_patches[k], want, atol=1e-6)
    frozen = rt.code_patches.clone()
    rt.eval()
    rt(a)                                                                          # eval mode: no update
    assert torch.equal(rt.code_patches, frozen)
    rt.train()
    rt(a, update=False)                                                            # nor without update
    assert torch.equal(rt.code_patches, frozen)



def _label_only(images):
    """A GenBatch holding only what RepresentationTargets.label reads: the clean images."""
    B, no = len(images), torch.zeros(len(images), dtype=torch.bool)
    return GenBatch(prompts=[[65]] * B, images=images, targets=None, t=torch.zeros(B),
                    eps=torch.zeros(B, 16, 48), drop_text=no, drop_rep=no)


def test_a_steps_targets_do_not_depend_on_its_micro_batches(tiny_model, tiny_config):
    """label(*micro_batches) makes one assignment, one codebook update (the first time: the
    initialisation) and one mean-patch update over the step's micro-batches together: 2
    micro-batches of 2 get the codes, codebook and mean patches of one micro-batch of the same 4
    examples, step after step. Labelled one micro-batch at a time (the per-micro-step VQ nanorf had
    before), the codebook would differ: the init draws from 8 features instead of 16 and each
    micro-step's batch softmax and update see half the batch."""
    m = tiny_model()
    cfg = tiny_config().model
    whole, split, apart = (RepresentationTargets(cfg, m.vit).train() for _ in range(3))
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1               # 4 images x N = 4 cells: 16 = K features
        one, halves = _label_only(images), [_label_only(images[:2]), _label_only(images[2:])]
        whole.label(one)
        split.label(*halves)
        assert one.targets.shape == (4, 4) and [b.targets.shape for b in halves] == [(2, 4), (2, 4)]
        assert torch.equal(torch.cat([b.targets for b in halves]), one.targets), step
        for b in (_label_only(images[:2]), _label_only(images[2:])):
            apart.label(b)
    assert bool(split.vq.initialized)
    torch.testing.assert_close(split.vq.prototypes, whole.vq.prototypes, rtol=0, atol=1e-6)
    torch.testing.assert_close(split.code_patches, whole.code_patches, rtol=0, atol=1e-6)
    assert torch.equal(split.code_seen, whole.code_seen)
    assert not torch.allclose(apart.vq.prototypes, whole.vq.prototypes, atol=1e-2)
