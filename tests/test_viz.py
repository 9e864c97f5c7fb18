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
