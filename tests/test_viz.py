"""experiments.viz: the mask picture and the two plan figures, drawn from a tiny checkpoint."""

import numpy as np
import pytest
from PIL import Image

from experiments import viz

pytestmark = pytest.mark.usefixtures("single_thread_module")


def test_mask_picture(tmp_path):
    viz.main(["--mask", str(tmp_path / "m.png")])
    assert Image.open(tmp_path / "m.png").size[0] > 100


def test_plans_and_plan_swap_figures(ckpt, tmp_path, capsys):
    viz.main(["--plans", str(tmp_path / "p.png"), "--ckpt", str(ckpt), "--prompt", "two red circles"])
    g = np.asarray(Image.open(tmp_path / "p.png"))
    assert g.shape == ((2 * 34 + 2) * 4, (4 * 34 + 2) * 4, 3)      # 2 rows x 4 seeds of 32 px, x4
    viz.main(["--plan-swap", str(tmp_path / "s.png"), "--ckpt", str(ckpt)])
    g = np.asarray(Image.open(tmp_path / "s.png"))
    assert g.shape == ((4 * 34 + 2) * 4, (4 * 34 + 2) * 4, 3)      # 4 prompts x 4 columns
    assert "columns: real image, its plan" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        viz.main(["--plans", str(tmp_path / "x.png")])              # no --ckpt


def test_plan_figures_sample_with_the_sampler_flags(ckpt, tmp_path, monkeypatch):
    """--steps / --cfg-interval (sample.py's flags) reach every sampling call of both figures;
    without them the figures sample with the checkpoint's own settings."""
    import nanorf.sampler as sampler
    from nanorf.checkpoint import load_model
    seen = []
    real_t2i, real_pix = sampler.text_to_image, sampler.sample_pixels

    def t2i(model, prompts, generator=None, settings=None, **k):
        seen.append(settings)
        return real_t2i(model, prompts, generator, settings=settings, **k)

    def pix(model, ids, codes, s, generator=None, **k):
        seen.append(s)
        return real_pix(model, ids, codes, s, generator, **k)

    monkeypatch.setattr(sampler, "text_to_image", t2i)
    monkeypatch.setattr(sampler, "sample_pixels", pix)
    own = load_model(ckpt)[0].cfg.sample
    assert (own.steps, own.cfg_interval) != (3, (0.2, 0.8))
    flags = ["--ckpt", str(ckpt), "--steps", "3", "--cfg-interval", "0.2", "0.8"]
    viz.main(["--plans", str(tmp_path / "p.png")] + flags)
    viz.main(["--plan-swap", str(tmp_path / "s.png")] + flags)
    assert len(seen) == 4 + 2                                          # four seeds, then painted and blind
    assert all((s.steps, s.cfg_interval) == (3, (0.2, 0.8)) for s in seen)
    assert [s.cfg_mode for s in seen[4:]] == [own.cfg_mode, "norep"]
    seen.clear()
    viz.main(["--plans", str(tmp_path / "q.png"), "--ckpt", str(ckpt)])
    assert all(s == own for s in seen)
