"""Tests for nanorf/vq.py: pooling, Algorithm 1 assignment and update against hand computations,
empty codes, no gradients, the EMA encoder, and the DDP guarantee (2 gloo ranks holding halves of
a batch produce the codes and codebook of one process holding all of it)."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nanorf.config import VQConfig, ViTConfig
from nanorf.vit import ViT
from nanorf.vq import EMAEncoder, OnlineVQ, codebook_stats, pool_features


def make_vq(protos, tau=0.5, momentum=0.5):
    """An initialised OnlineVQ holding the given prototypes."""
    K, D = protos.shape
    vq = OnlineVQ(D, VQConfig(codebook_size=K, tau=tau, momentum=momentum))
    vq.prototypes.copy_(protos)
    vq.initialized.fill_(True)
    return vq


# ---------------------------------------------------------------- pooling

def test_pool_features_hand_4x4():
    # channel 0 holds the raster index 0..15 of a 4x4 grid, channel 1 holds 100 - index
    idx = torch.arange(16.0)
    feats = torch.stack([idx, 100 - idx], dim=-1)[None]  # (1, 16, 2)
    out = pool_features(feats, (4, 4), 2)
    # blocks: {0,1,4,5} -> 2.5, {2,3,6,7} -> 4.5, {8,9,12,13} -> 10.5, {10,11,14,15} -> 12.5
    exp = torch.tensor([[2.5, 97.5], [4.5, 95.5], [10.5, 89.5], [12.5, 87.5]])[None]
    assert torch.equal(out, exp)
    # non-square 2 x 4 grid -> 1 x 2: {0,1,4,5} -> 2.5, {2,3,6,7} -> 4.5
    out = pool_features(idx[:8].reshape(1, 8, 1), (2, 4), 2)
    assert torch.equal(out, torch.tensor([[[2.5], [4.5]]]))
    with pytest.raises(ValueError, match="pooling"):
        pool_features(torch.zeros(1, 12, 1), (3, 4), 2)


# ---------------------------------------------------------------- assignment

def test_assign_hand_example_batch_softmax_changes_argmax():
    # K=3 prototypes at 0, 90 and 180 degrees; three features at 0 degrees and one at 40 degrees.
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    c, s = math.cos(math.radians(40)), math.sin(math.radians(40))  # 0.766044, 0.642788
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [c, s]])
    vq = make_vq(protos, tau=0.5)
    # by hand: scores / 0.5 -> rows [2, 0, -2] (x3) and [1.532089, 1.285575, -1.532089]
    # softmax over codes: [e^2, 1, e^-2] / (e^2 + 1 + e^-2) = [0.866813, 0.117310, 0.015876]
    #                     row 4: [0.546982, 0.427478, 0.025540]
    # column sums of exp(q): [3 e^0.866813 + e^0.546982, 3 e^0.117310 + e^0.427478, 3 e^0.015876 + e^0.025540]
    #                      = [8.865980, 4.906791, 4.073878]
    # softmax over the batch: row 1-3 [0.268365, 0.229166, 0.249395] -> code 0
    #                         row 4   [0.194906, 0.312503, 0.251816] -> code 1
    # Plain nearest-prototype would give row 4 code 0 (40 < 50 degrees); the crowded code 0
    # column pushes it to code 1: this is the anti-collapse effect of the Sinkhorn step.
    assert (z @ protos.T).argmax(1).tolist() == [0, 0, 0, 0]
    codes = vq.assign(z)
    assert codes.dtype == torch.long
    assert codes.tolist() == [0, 0, 0, 1]
    # and the probabilities themselves, via the same steps written out
    q = (z @ protos.T / 0.5).softmax(1)
    assert torch.allclose(q[3], torch.tensor([0.546982, 0.427478, 0.025540]), atol=1e-6)
    p = q.exp() / q.exp().sum(0)
    assert torch.allclose(p[3], torch.tensor([0.194906, 0.312503, 0.251816]), atol=1e-6)
    assert torch.allclose(p[0], torch.tensor([0.268365, 0.229166, 0.249395]), atol=1e-6)
    # the same batch without the crowd: the 40-degree feature alone goes to its nearest code
    assert vq.assign(z[3:]).tolist() == [0]


def test_assign_matches_two_softmaxes_on_random_data():
    torch.manual_seed(0)
    protos = F.normalize(torch.randn(32, 8), dim=1)
    z = F.normalize(torch.randn(100, 8), dim=1)
    vq = make_vq(protos, tau=0.5)
    ref = torch.softmax(torch.softmax(z @ protos.T / 0.5, dim=1), dim=0).argmax(1)
    assert torch.equal(vq.assign(z), ref)


# ---------------------------------------------------------------- update

def test_update_hand_example():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    vq = make_vq(protos, momentum=0.5)
    z = torch.tensor([[0.6, 0.8], [0.8, 0.6], [0.6, 0.8]])
    vq.update(z, torch.tensor([0, 0, 1]))
    # code 0: mean (0.7, 0.7) -> C_new (1/sqrt2, 1/sqrt2); 0.5 (1,0) + 0.5 C_new = (0.853553, 0.353553)
    #         -> normalised (cos 22.5 deg, sin 22.5 deg) = (0.923880, 0.382683)
    # code 1: C_new (0.6, 0.8); 0.5 (0,1) + 0.5 (0.6, 0.8) = (0.3, 0.9) -> / sqrt(0.9) = (0.316228, 0.948683)
    # code 2: empty -> unchanged
    exp = torch.tensor([[0.923880, 0.382683], [0.316228, 0.948683], [-1.0, 0.0]])
    assert torch.allclose(vq.prototypes, exp, atol=1e-6)
    assert torch.equal(vq.prototypes[2], torch.tensor([-1.0, 0.0]))
    # histogram (2/3, 1/3, 0): 2 codes used, perplexity exp(-(2/3 ln 2/3 + 1/3 ln 1/3)) = 1.889882
    assert float(vq.last_usage) == 2.0
    assert float(vq.last_perplexity) == pytest.approx(1.889882, abs=1e-5)


def test_empty_codes_unchanged_bit_exactly():
    torch.manual_seed(1)
    protos = F.normalize(torch.randn(10, 6), dim=1)
    vq = make_vq(protos.clone(), momentum=0.9)
    z = F.normalize(torch.randn(20, 6), dim=1)
    codes = torch.tensor([1, 3, 3, 7] * 5)
    vq.update(z, codes)
    for k in range(10):
        if k in (1, 3, 7):
            assert not torch.equal(vq.prototypes[k], protos[k])
        else:
            assert torch.equal(vq.prototypes[k], protos[k]), k


def test_prototypes_stay_unit_norm_and_train_eval_modes():
    torch.manual_seed(2)
    vq = OnlineVQ(16, VQConfig(codebook_size=32, momentum=0.9))
    for _ in range(100):
        vq(F.normalize(torch.randn(64, 16) + 0.5, dim=1))
    assert torch.allclose(vq.prototypes.norm(dim=1), torch.ones(32), atol=1e-5)
    assert 1 <= float(vq.last_usage) <= 32 and float(vq.last_perplexity) >= 1
    before = vq.prototypes.clone()
    vq(F.normalize(torch.randn(64, 16), dim=1), update=False)
    assert torch.equal(vq.prototypes, before)
    vq.eval()
    vq(F.normalize(torch.randn(64, 16), dim=1))  # eval: assign only
    assert torch.equal(vq.prototypes, before)


# ---------------------------------------------------------------- initialisation

def test_first_forward_initialises_from_features():
    torch.manual_seed(3)
    for M, K in [(50, 16), (5, 16)]:  # without and with replacement
        vq = OnlineVQ(8, VQConfig(codebook_size=K, momentum=0.99)).eval()
        assert not bool(vq.initialized)
        z = F.normalize(torch.randn(M, 8), dim=1)
        vq(z)
        assert bool(vq.initialized)
        assert torch.allclose(vq.prototypes.norm(dim=1), torch.ones(K), atol=1e-5)
        # every prototype is one of the batch features up to the small init noise
        assert (vq.prototypes @ z.T).max(dim=1).values.min() > 0.99
        if M < K:  # duplicates were separated by the noise
            assert torch.cdist(vq.prototypes, vq.prototypes).add(torch.eye(K)).min() > 0
        # later forwards do not re-initialise
        p = vq.prototypes.clone()
        vq(F.normalize(torch.randn(M, 8), dim=1))
        assert torch.equal(vq.prototypes, p)
    # a loaded state dict is honoured: initialized=True -> no re-init on the next forward
    vq2 = OnlineVQ(8, VQConfig(codebook_size=K)).eval()
    vq2.load_state_dict(vq.state_dict())
    vq2(F.normalize(torch.randn(M, 8), dim=1))
    assert torch.equal(vq2.prototypes, vq.prototypes)


def test_farthest_point_init_covers_rare_clusters():
    """The default init: k-centre greedy. A batch that is 97% one feature (the empty cells of
    the shapes world) and 3% three rare, distinct ones: farthest points give every rare one a
    prototype, and each chosen point is the one farthest from those chosen before it."""
    from nanorf.vq import farthest_points
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 8), dim=1)
    labels = torch.tensor([0] * 97 + [1, 2, 3])
    z = F.normalize(centres[labels] + 0.01 * torch.randn(100, 8), dim=1)
    for seed in range(5):
        idx = farthest_points(z, 4, torch.Generator().manual_seed(seed))
        assert sorted(labels[idx].tolist()) == [0, 1, 2, 3]
        for i in range(2, 4):   # greedy: the i-th pick maximises the distance to the nearest earlier pick
            gap = (1 - z @ z[idx[:i]].T).min(dim=1).values
            assert gap[idx[i]] == pytest.approx(gap.max().item(), abs=1e-6)
    # fewer distinct rows than k: each distinct row once, then draws with replacement
    few = F.normalize(torch.randn(3, 8), dim=1).repeat(5, 1)                     # 15 rows, 3 distinct
    idx = farthest_points(few, 6, torch.Generator().manual_seed(0))
    assert len(idx) == 6 and len({tuple(few[i].tolist()) for i in idx[:3]}) == 3
    # through OnlineVQ: init="farthest" uses it, "random" (the default) is the plain draw, anything else one error
    vq = OnlineVQ(8, VQConfig(codebook_size=4, init="farthest")).eval()
    vq(z)
    assert sorted((vq.prototypes @ centres.T).argmax(1).tolist()) == [0, 1, 2, 3]
    assert OnlineVQ(8, VQConfig(codebook_size=4)).init == "random"
    with pytest.raises(ValueError, match="vq.init"):
        OnlineVQ(8, VQConfig(init="kmeans"))


# ---------------------------------------------------------------- no gradients

def test_no_gradient_through_vq():
    torch.manual_seed(4)
    lin = torch.nn.Linear(4, 8)
    w0 = lin.weight.detach().clone()
    vq = OnlineVQ(8, VQConfig(codebook_size=16, momentum=0.5))
    z = F.normalize(lin(torch.randn(30, 4)), dim=1)
    assert z.requires_grad
    codes = vq(z)
    assert not codes.requires_grad and codes.grad_fn is None
    assert vq.prototypes.grad_fn is None and not vq.prototypes.requires_grad
    assert list(vq.parameters()) == []
    assert lin.weight.grad is None and torch.equal(lin.weight, w0)


# ---------------------------------------------------------------- EMA encoder

def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return ViT(ViTConfig(patch_size=4, dim=16, depth=1, heads=1, n_storage_tokens=1, layerscale_init=0.1))


def test_ema_update_formula():
    online = tiny_vit()
    ema = EMAEncoder(online, pool=2)
    with torch.no_grad():
        for p in ema.encoder.parameters():
            p.fill_(1.0)
        for p in online.parameters():
            p.fill_(3.0)
        online.rope_embed.periods.fill_(7.0)
    ema.update(online, decay=0.9)
    for name, p in ema.encoder.named_parameters():  # 0.9 * 1 + 0.1 * 3 = 1.2
        assert torch.allclose(p, torch.full_like(p, 1.2), atol=1e-6), name
        assert not p.requires_grad
    assert torch.equal(ema.encoder.rope_embed.periods, torch.full((4,), 7.0))  # buffers copied
    for p in online.parameters():  # online untouched
        assert torch.equal(p, torch.full_like(p, 3.0))
    ema.update(online, decay=0.5)  # 0.5 * 1.2 + 0.5 * 3 = 2.1
    assert torch.allclose(ema.encoder.cls_token, torch.full((1, 1, 16), 2.1), atol=1e-6)


def test_ema_features_are_pooled_prenorm_and_frozen():
    online = tiny_vit()
    ema = EMAEncoder(online, pool=2)
    ema.train()
    assert not ema.encoder.training  # stays in eval mode
    img = (torch.rand(2, 3, 16, 24) * 2 - 1).requires_grad_(True)
    z = ema.features(img)
    assert z.shape == (2, 6, 16)  # grid 4 x 6 -> pooled 2 x 3
    assert z.grad_fn is None and not z.requires_grad
    assert torch.allclose(z.norm(dim=-1), torch.ones(2, 6), atol=1e-5)
    with torch.no_grad():
        out = online(img)
    exp = F.normalize(pool_features(out["x_prenorm"], (4, 6), 2), dim=-1)
    assert torch.allclose(z, exp, atol=1e-5)
    wrong = F.normalize(pool_features(out["x_norm_patchtokens"], (4, 6), 2), dim=-1)
    assert not torch.allclose(z, wrong, atol=1e-3)  # uses features BEFORE the final norm


# ---------------------------------------------------------------- codebook stats

def test_codebook_stats_known_histogram():
    codes = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    st = codebook_stats(codes, K=5)
    # p = (1/4, 1/4, 1/2): H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2 -> perplexity 2^1.5 = 2.828427
    assert st["used"] == 3
    assert st["perplexity"] == pytest.approx(2 ** 1.5, abs=1e-5)
    assert codebook_stats(torch.tensor([4, 4, 4]), K=5) == {"used": 1, "perplexity": pytest.approx(1.0)}


# ---------------------------------------------------------------- DDP

K_DDP, D_DDP, STEPS, SPLIT = 16, 8, 3, 40  # rank 0 holds 40 of each 64-feature batch, rank 1 holds 24


def _ddp_data():
    g = torch.Generator().manual_seed(5)
    protos = F.normalize(torch.randn(K_DDP, D_DDP, generator=g), dim=1)
    batches = [F.normalize(torch.randn(64, D_DDP, generator=g) + 0.3, dim=1) for _ in range(STEPS)]
    return protos, batches


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        protos, batches = _ddp_data()
        vq = make_vq(protos.clone(), tau=0.5, momentum=0.5)
        codes = []
        for zb in batches:
            local = zb[:SPLIT] if rank == 0 else zb[SPLIT:]
            codes.append(vq(local))
        # the init path: each rank sees different features; all must end with rank 0's choice
        torch.manual_seed(100 + rank)
        vq_init = OnlineVQ(D_DDP, VQConfig(codebook_size=K_DDP)).eval()
        z_init = F.normalize(torch.randn(20, D_DDP), dim=1)
        vq_init(z_init)
        torch.save({"codes": codes, "protos": vq.prototypes, "usage": vq.last_usage,
                    "ppl": vq.last_perplexity, "init_protos": vq_init.prototypes, "z_init": z_init},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_match_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    protos, batches = _ddp_data()
    single = make_vq(protos.clone(), tau=0.5, momentum=0.5)
    for step, zb in enumerate(batches):
        codes = single(zb)
        assert torch.equal(torch.cat([r0["codes"][step], r1["codes"][step]]), codes), step
    # both ranks hold the single-process codebook (up to summation order) and the same stats
    assert torch.allclose(r0["protos"], single.prototypes, atol=1e-6)
    assert torch.equal(r0["protos"], r1["protos"])
    assert float(r0["usage"]) == float(single.last_usage) == float(r1["usage"])
    assert float(r0["ppl"]) == pytest.approx(float(single.last_perplexity), abs=1e-5)
    # the codebook did move, and differently from what one rank's half alone would give
    assert not torch.allclose(single.prototypes, protos, atol=1e-2)
    half = make_vq(protos.clone(), tau=0.5, momentum=0.5)
    for zb in batches:
        half(zb[:SPLIT])
    assert not torch.allclose(half.prototypes, single.prototypes, atol=1e-3)

    # init: both ranks agree, and equal one process initialised on the global batch
    # (rank 0's rows, then rank 1's): the draw is over the gathered features
    assert torch.equal(r0["init_protos"], r1["init_protos"])
    one = OnlineVQ(D_DDP, VQConfig(codebook_size=K_DDP)).eval()
    one(torch.cat([r0["z_init"], r1["z_init"]]))
    assert torch.allclose(r0["init_protos"], one.prototypes, atol=1e-6)
    # and it drew from both ranks' features, not from one rank's alone
    both = torch.cat([r0["z_init"], r1["z_init"]])
    assert (r0["init_protos"] @ both.T).max(1).values.min() > 0.99
    assert (r0["init_protos"] @ r0["z_init"].T).max(1).values.min() < 0.99
    assert (r0["init_protos"] @ r1["z_init"].T).max(1).values.min() < 0.99
