"""Packing (nanorf/packing.py): a packed batch is the same computation as the padded one."""

import pytest
import torch

from nanorf.layout import NO_BLOCK
from nanorf.model import GenBatch, UndBatch
from nanorf.mot import attention_mask, attention_mask_mod
from nanorf.packing import first_fit, gen_doc, pack, packed_loss, split_gen, split_und, split_to, stack, und_doc

ATOL = 1e-5


def _gen(model, B, size, seed, drop_text=None, drop_rep=None):
    g = torch.Generator().manual_seed(seed)
    H, W = size
    gr = model.cfg.grids(size)
    P = model.cfg.patch_size ** 2 * 3
    return GenBatch(prompts=[list(range(65, 65 + 3 + 2 * i)) for i in range(B)],
                    images=torch.rand(B, 3, H, W, generator=g) * 2 - 1,
                    targets=torch.randint(0, model.cfg.vq.codebook_size, (B, gr.n_rep), generator=g),
                    t=torch.rand(B, generator=g), eps=torch.randn(B, gr.n_pix, P, generator=g),
                    drop_text=torch.tensor([False, True, False][:B]) if drop_text is None else drop_text,
                    drop_rep=torch.tensor([False, False, True][:B]) if drop_rep is None else drop_rep)


def _und(model, B, size, seed):
    g = torch.Generator().manual_seed(seed)
    H, W = size
    return UndBatch(images=torch.rand(B, 3, H, W, generator=g) * 2 - 1,
                    questions=[model.question_ids("how many?")] * B,
                    answers=[list(range(97, 97 + 1 + i)) for i in range(B)])


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=ATOL, rtol=1e-4), (k, (a[k] - b[k]).abs().max())


def test_first_fit():
    assert first_fit([5, 3, 4, 2, 6], 8) == [[0, 1], [2, 3], [4]]
    assert first_fit([8, 1], 8) == [[0], [1]]
    with pytest.raises(ValueError, match="does not fit --tokens-per-rank 8"):
        first_fit([3, 9], 8)
    # FSDP ranks run the same number of rows: the fullest pack is halved until there are n
    assert split_to([[0, 1, 2], [3]], 4) == [[0], [1], [2], [3]]
    assert split_to([[0, 1, 2], [3]], 3) == [[0], [1, 2], [3]]
    assert split_to([[0, 1, 2], [3]], 2) == [[0, 1, 2], [3]]
    with pytest.raises(ValueError):
        split_to([[0], [1]], 3)


@pytest.mark.parametrize("field", [0, 8])
def test_packed_loss_and_gradients_equal_the_padded_batch(tiny_model, field):
    """Same examples, same sizes: RFModel.forward on the padded batch vs packs of 2 rows
    (with pix_field, the per-pixel refinement reads each pack's noisy patches)."""
    model = tiny_model(f"model.pix_field={field}")
    if field:
        torch.nn.init.normal_(model.pix_field.out.weight, std=0.5)
    model.train()
    gen, und = _gen(model, 3, (16, 16), 0), _und(model, 3, (16, 16), 1)
    model.zero_grad()
    loss, parts = model(gen, und)
    loss.backward()
    want = _grads(model)

    docs = [gen_doc(model, b) for b in split_gen(gen)] + [und_doc(model, b) for b in split_und(und)]
    budget = max(len(d.tokens) for d in docs) * 2 + 3                   # two or three documents per pack
    packs = pack(docs, budget)
    assert 1 < len(packs) < 6
    model.zero_grad()
    total = 0.0
    for p in packs:
        l, _ = packed_loss(model, p, n_gen=3, n_und=3)
        l.backward()
        total += l.item()
    assert abs(total - loss.item()) < ATOL
    _close(_grads(model), want)


def test_follow_up_turns_pack_as_they_pad(tiny_model):
    """Understanding examples with several turns (train.und_turns): packed rows give the padded
    batch's loss and gradients, and the packing check counts every turn."""
    from nanorf.packing import check_packing
    model = tiny_model()
    model.train()
    und = _und(model, 3, (16, 16), 1)
    und.follow_ups = [[], [([40, 41], [42])], [([40], [43, 44]), ([45], [46])]]
    model.zero_grad()
    loss, _ = model(None, und)
    loss.backward()
    want = _grads(model)
    docs = [und_doc(model, b) for b in split_und(und)]
    base = [len(und_doc(model, b).tokens) for b in split_und(_und(model, 3, (16, 16), 1))]
    assert [len(d.tokens) - n for d, n in zip(docs, base)] == [0, 2 + 1 + 1, (1 + 2 + 1) + (1 + 1 + 1)]
    model.zero_grad()
    total = 0.0
    for p in pack(docs, max(len(d.tokens) for d in docs) + 2):
        l, _ = packed_loss(model, p, n_gen=0, n_und=3)
        l.backward()
        total += l.item()
    assert abs(total - loss.item()) < ATOL
    _close(_grads(model), want)
    cfg = model.cfg
    one = 3 + cfg.grids().n_vit + 2 * cfg.max_text_len + 1           # the longest one-turn example
    budget = max(one, 1 + cfg.max_text_len + 1 + cfg.grids().n_rep + 1 + cfg.grids().n_pix)
    check_packing(cfg, budget, und_turns=1)
    with pytest.raises(ValueError, match="cannot hold"):
        check_packing(cfg, budget, und_turns=3)


def test_mixed_sizes_packed_equal_examples_one_by_one(tiny_model):
    """Examples of three sizes (one non-square) in one pack: the pack's loss and gradients equal
    the mean over the examples run alone through RFModel.forward."""
    model = tiny_model()
    model.train()
    sizes = [(16, 16), (8, 24), (24, 16)]
    gens = [_gen(model, 1, s, 10 + i, torch.tensor([False]), torch.tensor([i == 1])) for i, s in enumerate(sizes)]
    unds = [_und(model, 1, s, 20 + i) for i, s in enumerate(sizes)]
    model.zero_grad()
    want_loss = 0.0
    for g, u in zip(gens, unds):
        loss, _ = model(g, u)
        (loss / 3).backward()
        want_loss += loss.item() / 3
    want = _grads(model)
    docs = [gen_doc(model, g) for g in gens] + [und_doc(model, u) for u in unds]
    p = stack(docs)                                                     # one row, six documents
    model.zero_grad()
    loss, parts = packed_loss(model, p, n_gen=3, n_und=3)
    loss.backward()
    assert abs(loss.item() - want_loss) < ATOL
    _close(_grads(model), want)


def test_no_attention_across_documents(tiny_model):
    model = tiny_model()
    docs = [gen_doc(model, b) for b in split_gen(_gen(model, 2, (16, 16), 0))] + \
           [und_doc(model, b) for b in split_und(_und(model, 1, (16, 8), 1))]
    p = stack(docs)
    m = p.mask()[0, 0]                                                  # (L, L)
    doc = p.doc[0]
    cross = (doc[:, None] != doc[None, :]) & ~torch.eye(len(doc), dtype=torch.bool)
    assert not (m & cross).any()
    # inside each document the mask is exactly that document's own padded-path mask
    for k, d in enumerate(docs):
        cols = (doc == k).nonzero().squeeze(1)
        lay = p.layout
        alone = attention_mask(lay.block[:, cols], lay.noisy[:, cols], lay.valid[:, cols], lay.modality[:, cols],
                               p.drop_q[:, cols][:, :1].squeeze(1))[0, 0]
        assert torch.equal(m[cols][:, cols], alone)
    # and perturbing one document's embeddings changes no other document's output
    x = torch.randn(1, len(doc), model.cfg.mot.dim)
    h = model.mot(x, p.layout.modality, p.layout.pos, p.mask())
    x2 = x.clone()
    x2[0, doc == 0] += 1.0
    h2 = model.mot(x2, p.layout.modality, p.layout.pos, p.mask())
    assert torch.equal(h[0, doc != 0], h2[0, doc != 0])
    assert not torch.allclose(h[0, doc == 0], h2[0, doc == 0])


def test_flex_mask_mod_equals_the_dense_mask(tiny_model):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    model = tiny_model()
    docs = [gen_doc(model, b) for b in split_gen(_gen(model, 3, (16, 16), 0))] + \
           [und_doc(model, b) for b in split_und(_und(model, 2, (8, 16), 1))]
    p = stack([docs[:3], docs[3:]])                                     # two rows, padded
    lay = p.layout
    mod = attention_mask_mod(lay.block, lay.noisy, lay.valid, lay.modality, p.drop_q, p.doc)
    R, L = p.doc.shape
    assert torch.equal(flex.create_mask(mod, R, None, L, L, device="cpu"), p.mask())
    assert (lay.block[lay.valid] != NO_BLOCK).any() and p.drop_q.any()   # the rules were exercised
    # the CPU fast path, attention document by document, gives the dense mask's output
    x = torch.randn(R, L, model.cfg.mot.dim, requires_grad=True)
    a = model.mot(x, lay.modality, lay.pos, p.mask())
    b = model.mot(x, lay.modality, lay.pos, p.doc_masks())
    assert torch.allclose(a[lay.valid], b[lay.valid], atol=1e-5)
    ga, = torch.autograd.grad(a[lay.valid].sum(), x)
    gb, = torch.autograd.grad(b[lay.valid].sum(), x)
    assert torch.allclose(ga, gb, atol=1e-5)
    # and the trunk under flex_attention (unfused on CPU) gives the SDPA output
    x = torch.randn(R, L, model.cfg.mot.dim)
    bm = flex.create_block_mask(mod, R, None, L, L, device="cpu")
    with torch.no_grad():
        a = model.mot(x, lay.modality, lay.pos, p.mask())
        b = model.mot(x, lay.modality, lay.pos, bm)
    assert torch.allclose(a[lay.valid], b[lay.valid], atol=1e-5)


def _mixed_folder(root, sizes):
    import json

    import numpy as np
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "text": f"noise {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_train_packed_equals_padded_and_runs_mixed_sizes(tmp_path, single_thread):
    """One process: --tokens-per-rank logs the padded run's losses on square data; on a folder of
    mixed aspect ratios it trains with every image at its own size, and the checkpoint then
    samples at a non-square size."""
    import train
    from conftest import TINY_ARGS, read_log
    from nanorf.checkpoint import load_model
    from nanorf.sampler import text_to_image
    common = [*TINY_ARGS, "--set", "train.log_every=1", "--set", "train.warmup_steps=0", "--max-steps", "2"]
    train.main([*common, "--out-dir", str(tmp_path / "pad")])
    train.main([*common, "--out-dir", str(tmp_path / "pack"), "--tokens-per-rank", "400"])
    for a, b in zip(read_log(tmp_path / "pad"), read_log(tmp_path / "pack")):
        for k in ("lm", "rep", "fm"):
            assert a[k] == pytest.approx(b[k], abs=1e-4), (k, a, b)
    folder = _mixed_folder(tmp_path / "mixed", [(32, 64), (64, 32), (40, 40), (32, 32), (20, 90), (90, 20)])
    train.main([*common, "--data", str(folder), "--out-dir", str(tmp_path / "mixed_run"), "--tokens-per-rank", "400"])
    log = read_log(tmp_path / "mixed_run")
    assert len(log) == 2 and all(r["fm"] > 0 for r in log)
    model, _, _ = load_model(tmp_path / "mixed_run" / "ckpt.pt")
    images, _ = text_to_image(model, ["noise 1"], steps=2, size=(24, 40))
    assert images.shape == (1, 3, 24, 40)


def test_tokens_per_rank_errors_are_one_line(tmp_path, capsys):
    import train
    from conftest import TINY_ARGS
    for extra, msg in ((["--tokens-per-rank", "50"], "cannot hold the longest example"),
                       (["--tokens-per-rank", "400", "--repa"], "train padded")):
        with pytest.raises(SystemExit) as e:
            train.main([*TINY_ARGS, "--out-dir", str(tmp_path / "x"), *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]
    assert not (tmp_path / "x").exists()
