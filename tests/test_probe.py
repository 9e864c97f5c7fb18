"""experiments.probe: code usage, the mean-patch mosaic of a code plan, and the no-rep pixel mode."""

import math
import random

import pytest
import torch

from experiments.probe import KEYS, plan_following, probe, usage
from nanorf.data import Obj, Scene, held_out_prompts, render
from nanorf.eval import score_images
from nanorf.patches import tensor_to_images
from nanorf.sampler import draw_plan, text_to_image
from nanorf.config import SamplingSettings
from nanorf.sampler import sample_pixels

pytestmark = pytest.mark.usefixtures("single_thread")


def test_usage_hand_values():
    u = usage(torch.tensor([[0, 0, 1, 1]]), K=8)
    assert u["codes_used"] == 2 and u["perplexity"] == pytest.approx(2.0)
    u = usage(torch.tensor([[3, 3, 3, 5]]), K=8)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert u["codes_used"] == 2 and u["perplexity"] == pytest.approx(math.exp(h))


def test_draw_plan_places_each_codes_patch_in_raster_order():
    tiles = torch.arange(3 * 3 * 2 * 2, dtype=torch.float).view(3, 3, 2, 2)      # K=3 codes, (3, 2, 2) px
    patches = tiles.permute(0, 2, 3, 1).reshape(3, 12)                            # patchify's (y, x, c) order
    codes = torch.tensor([[2, 0, 1, 2]])                                           # 2x2 grid
    img = draw_plan(codes, patches)
    assert img.shape == (1, 3, 4, 4)
    assert torch.equal(img[0, :, :2, :2], tiles[2]) and torch.equal(img[0, :, :2, 2:], tiles[0])
    assert torch.equal(img[0, :, 2:, :2], tiles[1]) and torch.equal(img[0, :, 2:, 2:], tiles[2])


def test_norep_pixels_ignore_the_rep_tokens(tiny_model):
    """cfg_mode "norep" hides the rep sequence from the pixel block in every branch: any codes,
    same picture; the paper's joint mode does see them."""
    m = tiny_model()
    g = torch.Generator().manual_seed(0)
    c1, c2 = (torch.randint(0, 16, (1, m.n_rep), generator=g) for _ in range(2))
    run = lambda codes, mode: sample_pixels(m, [[65, 66]], codes, SamplingSettings(steps=3, cfg_pix=3.0, cfg_mode=mode),
                                            generator=torch.Generator().manual_seed(1))
    assert torch.allclose(run(c1, "norep"), run(c2, "norep"), atol=1e-6)
    assert not torch.allclose(run(c1, "joint"), run(c2, "joint"), atol=1e-4)


def test_plan_following_by_hand():
    rng = random.Random(0)
    scene = Scene((Obj("red", "circle", "top left"), Obj("blue", "square", "bottom right")))
    img = render(scene, 48, rng)
    assert plan_following([img], [scene]) == 1.0
    moved = Scene((Obj("red", "circle", "top"), Obj("blue", "square", "bottom right")))
    assert plan_following([img], [moved]) == 0.5                     # the circle is not where that plan put it
    recoloured = Scene((Obj("green", "circle", "top left"), Obj("blue", "triangle", "bottom right")))
    assert plan_following([img], [recoloured]) == 0.0
    # over several images it is the fraction of all their objects
    other = Scene((Obj("cyan", "triangle", "center"),))
    assert plan_following([img, render(other, 48, rng)], [moved, other]) == pytest.approx(2 / 3)


def test_probe_runs_on_a_tiny_model(tiny_model, tiny_config):
    from nanorf.targets import RepresentationTargets
    m = tiny_model("model.image_size=32", "model.patch_size=8", "model.vit.patch_size=8", "model.max_text_len=80")
    targets = RepresentationTargets(m.cfg, m.vit).eval()
    targets(torch.rand(8, 3, 32, 32) * 2 - 1)                                      # initialise the codebook
    r = probe(m, targets, n=5)
    assert r["n"] == 5 and r["real_images"]["overall"] == 1.0                     # the scorer reads renders
    for k in ("pixels_given_sampled_reps", "pixels_given_no_reps", "pixels_given_real_reps",
              "plan_alone_sampled", "plan_alone_real"):
        assert set(r[k]) == set(KEYS) and all(0 <= r[k][x] <= 1 for x in KEYS if x != "extras")
    # the probe's "no reps" row is exactly the norep sampler's pictures, scored
    held = held_out_prompts(1)
    x, _ = text_to_image(m, [p.text for p in held], torch.Generator().manual_seed(0), cfg_mode="norep")
    want = score_images(tensor_to_images(x), held)
    assert r["pixels_given_no_reps"]["overall"] == pytest.approx(want["overall"], abs=1e-4)
    assert 1 <= r["codebook_real"]["codes_used"] <= 16
    ps = r["plan_swap"]
    assert ps["n"] == 5 and 0 <= ps["plan_following_with_real_plan"] <= 1 and 0 <= ps["plan_following_no_plan"] <= 1


def test_probe_cli_samples_every_row_with_the_sampler_flags(ckpt, tmp_path, monkeypatch):
    """--steps / --cfg-interval (sample.py's flags) become the settings every row samples with
    (passed to probe, which hands them to every sampling call) and are recorded in the JSON; the sampled-reps
    row equals nanorf.eval's scorer on text_to_image with the same overrides."""
    import json
    import experiments.probe as probe_mod
    from nanorf.checkpoint import load_model
    seen = {}

    def spy(model, targets, n, seed, settings):
        seen["sample"] = settings
        return probe(model, targets, n, seed, settings)

    monkeypatch.setattr(probe_mod, "probe", spy)
    probe_mod.main(["--ckpt", str(ckpt), "--n", "5", "--steps", "3", "--cfg-interval", "0.2", "0.8",
                    "--json", str(tmp_path / "p.json")])
    m = load_model(ckpt)[0]
    assert (m.cfg.sample.steps, m.cfg.sample.cfg_interval) != (3, (0.2, 0.8))      # the checkpoint's own
    assert (seen["sample"].steps, seen["sample"].cfg_interval) == (3, (0.2, 0.8))
    r = json.loads((tmp_path / "p.json").read_text())
    assert r["sampling"] == {"steps": 3, "cfg_interval": [0.2, 0.8]}
    held = held_out_prompts(1)
    x, _ = text_to_image(m, [p.text for p in held], torch.Generator().manual_seed(0), steps=3, cfg_interval=(0.2, 0.8))
    want = score_images(tensor_to_images(x), held)
    for k in ("overall", "extras"):
        assert r["pixels_given_sampled_reps"][k] == pytest.approx(want[k], abs=1e-4)
