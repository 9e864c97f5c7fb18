"""Any image size: positions as functions of normalised coordinates, non-square sampling and data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sample
from nanorf.checkpoint import load_model
from nanorf.data import ImageCaptionFolder, fit_to_budget
from nanorf.patches import resize_grid_table, sincos_2d
from nanorf.sampler import sample_cached, sample_pixels, sample_rep_tokens, settings_for
from nanorf.shapes import ShapesWorld


def test_grids_of_non_square_sizes_and_bad_sizes(tiny_model):
    cfg = tiny_model("model.image_size=32", "model.patch_size=8").cfg  # encoder patch 4, pool 2
    g = cfg.grids((64, 48))
    assert (g.pix, g.vit, g.rep) == ((8, 6), (16, 12), (8, 6))
    assert (g.n_pix, g.n_rep, g.n_vit) == (48, 48, 192)
    assert cfg.grids() == cfg.grids((32, 32)) and cfg.grids().n_pix == 16
    for bad in ((30, 32), (32, 0), (36, 32)):
        with pytest.raises(ValueError, match="multiples of 8"):
            cfg.grids(bad)


def test_resize_grid_table_is_bilinear_in_normalised_coordinates():
    # a table linear in the cell centres' x coordinate stays linear: 2x2 -> 4x4 and 2x2 -> 3x4
    xs2 = torch.tensor([0.25, 0.75])
    table = torch.stack([xs2.repeat(2), torch.ones(4)], 1)                         # (4, 2): x, 1
    big = resize_grid_table(table, (4, 4))
    want_x = torch.tensor([0.25, 0.375, 0.625, 0.75]).repeat(4)                    # bilinear clamps at the edges
    assert big.shape == (16, 2) and torch.allclose(big[:, 0], want_x) and torch.allclose(big[:, 1], torch.ones(16))
    assert torch.equal(resize_grid_table(table, (2, 2)), table)
    wide = resize_grid_table(table, (3, 4))
    assert wide.shape == (12, 2) and torch.allclose(wide[:, 0], want_x[:12])


def test_positions_at_a_shared_coordinate_agree(tiny_model):
    """A grid three times as dense has a cell centred on every centre of the original grid
    ((3i + 1.5) / 3n = (i + 0.5) / n): there, every position must equal the original one."""
    m = tiny_model()
    with torch.no_grad():
        m.rep_pos.add_(torch.randn_like(m.rep_pos))   # a learned table that is no sin-cos function
    side = m.cfg.image_size
    g0, g3 = m.cfg.grids(), m.cfg.grids((3 * side, 3 * side))
    for fn, (h, w), (h3, w3) in ((m.pix_positions, g0.pix, g3.pix), (m.vit_positions, g0.vit, g3.vit),
                                 (m.rep_positions, g0.rep, g3.rep)):
        small = fn((h, w)).view(h, w, -1)
        dense = fn((h3, w3)).view(h3, w3, -1)[1::3, 1::3]                          # the coinciding centres
        assert torch.allclose(dense, small, atol=1e-5), fn.__name__
    # and the interpolated rep table is the learned one read at each cell centre (grid_sample,
    # an independent bilinear read in [-1, 1] coordinates), here at the non-square 64x48
    gw = m.cfg.grids((64, 48)).rep                                                 # (8, 6)
    ys, xs = ((torch.arange(n) + 0.5) / n * 2 - 1 for n in gw)
    coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None]          # (1, 8, 6, 2) as (x, y)
    rg = m.cfg.rep_grid
    table = m.rep_pos.detach().T.reshape(1, -1, rg, rg)
    want = F.grid_sample(table, coords, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(m.rep_positions(gw), want[0].flatten(1).T, atol=1e-5)
    assert torch.equal(m.pix_positions((8, 6)), sincos_2d(8, 6, m.cfg.mot.dim))


def test_a_32px_checkpoint_samples_at_64x48(ckpt):
    model, cfg, _ = load_model(ckpt)
    s = settings_for(model, steps=2)
    ids = [model.tok.encode("a red circle", cfg.model.max_text_len)] * 2
    images, codes = sample_cached(model, ids, s, torch.Generator().manual_seed(0), size=(64, 48))
    assert images.shape == (2, 3, 64, 48) and codes.shape == (2, 48) and torch.isfinite(images).all()
    # the uncached reference path draws the same numbers at this size too
    gen = torch.Generator().manual_seed(0)
    ref_codes = sample_rep_tokens(model, ids, s, gen, size=(64, 48))
    ref = sample_pixels(model, ids, ref_codes, s, gen, size=(64, 48))
    assert torch.equal(codes, ref_codes) and torch.allclose(images, ref, atol=1e-4)


def test_sample_cli_size_and_any_size_question(ckpt, tmp_path, capsys):
    out = tmp_path / "wide.png"
    sample.main(["--ckpt", str(ckpt), "--prompt", "a red circle", "--out", str(out), "--size", "32x48",
                 "--steps", "2", "--rep-map"])
    with Image.open(out) as im:
        assert im.size == (48, 32)                                                 # (W, H)
    with Image.open(tmp_path / "wide.rep.png") as im:
        assert im.size == (48, 32)                                                 # the plan on its 4x6 grid
    img = tmp_path / "odd.png"
    Image.fromarray(ShapesWorld((32, 64), seed=0)[0]["image"][:, :50]).save(img)   # 50 px wide: resized
    capsys.readouterr()
    sample.main(["--ckpt", str(ckpt), "--image", str(img), "--question", "how many red circles are there?"])
    assert len(capsys.readouterr().out.splitlines()) == 1          # an answer (any text), no error


def test_fit_to_budget_keeps_aspect_within_the_budget():
    assert fit_to_budget(32, 32, 32 * 32, 16) == (32, 32)
    assert fit_to_budget(100, 200, 32 * 32, 8) == (16, 40)       # 22.6 x 45.3 rounded down to multiples of 8
    assert fit_to_budget(10, 1000, 32 * 32, 8) == (8, 128)       # one side held at one multiple
    assert fit_to_budget(16, 24, 32 * 32, 8) == (16, 24)         # smaller images are not enlarged
    assert fit_to_budget(20, 30, 32 * 32, 8) == (16, 24)         # only rounded down to multiples
    for h, w in ((300, 200), (17, 90), (64, 64), (480, 640)):
        H, W = fit_to_budget(h, w, 48 * 48, 16)
        assert H % 16 == 0 and W % 16 == 0 and H * W <= 48 * 48
        assert abs(H / W - h / w) / (h / w) < 0.75                # roughly the same shape


def test_folder_keeps_aspect_ratio(tmp_path):
    import json
    for name, (h, w) in (("a.png", (40, 80)), ("b.png", (64, 64)), ("c.png", (90, 30))):
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(tmp_path / name)
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"file": f, "text": "x"}) + "\n"
                                                     for f in ("a.png", "b.png", "c.png")))
    crop = ImageCaptionFolder(tmp_path, 32)
    keep = ImageCaptionFolder(tmp_path, 32, keep_aspect=True, multiple=8)
    assert {crop[i]["image"].shape for i in range(3)} == {(32, 32, 3)}
    assert [keep[i]["image"].shape[:2] for i in range(3)] == [(16, 40), (32, 32), (48, 16)]
