"""experiments.grad_share: which parameter groups each loss reaches, and the summary's arithmetic."""

import math

import pytest
import torch

from experiments.grad_share import group_of, loss_gradients, summarize
from nanorf.stream import Stream
from nanorf.targets import RepresentationTargets

pytestmark = pytest.mark.usefixtures("single_thread")


def test_summary_hand_values():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([4.0, -3.0])
    grads = {"lm": {"g": [a, a]}, "fm": {"g": [b, -a]}}
    row = summarize(grads)["g"]
    assert row["lm"] == pytest.approx(5.0) and row["fm"] == pytest.approx(5.0)
    assert row["cos_lm_fm"] == pytest.approx((0.0 - 1.0) / 2)   # orthogonal, then opposite
    assert "rep" not in row and "cos_lm_rep" not in row


def test_group_names():
    assert group_of("mot.blocks.3.attn_in.1.weight", shared_attention=False) == "rep-attn"
    assert group_of("mot.blocks.3.attn_in.0.weight", shared_attention=True) == "shared-attn"
    assert group_of("mot.blocks.0.ffn.2.w1.weight", shared_attention=True) == "pix-ffn"
    assert group_of("connector.fc1.weight", False) == "und-io" and group_of("vit.norm.weight", False) == "vit"


@pytest.mark.parametrize("shared", ["true", "false"])
def test_each_loss_reaches_only_what_its_tokens_see(tiny_config, tiny_model, shared):
    """L_Rep must not reach the pixel side (rep tokens come before the pixels and may not see
    them) and no generation loss reaches the ViT; L_LM reaches only the understanding side.
    Every loss reaches the understanding expert, which carries the prompt."""
    over = f"model.mot.shared_attention={shared}"
    cfg, model = tiny_config(over), tiny_model(over).train()
    targets = RepresentationTargets(cfg.model, model.vit)
    g = summarize(loss_gradients(model, targets, Stream(cfg, model), steps=[0]))
    und_attn = "shared-attn" if shared == "true" else "und-attn"
    for loss in ("lm", "rep", "fm"):
        assert g[und_attn][loss] > 0 and g["und-ffn"][loss] > 0, loss
    assert all(g[k]["lm"] == 0 for k in g if k.startswith(("rep-", "pix-")))
    assert all(g[k]["rep"] == 0 for k in g if k.startswith("pix-")) and g["vit"]["rep"] == 0
    assert g["vit"]["fm"] == 0 and g["vit"]["lm"] > 0
    assert g["rep-ffn"]["fm"] > 0   # the pixels read the plan through attention to the rep tokens
    assert not math.isnan(g[und_attn]["cos_lm_rep"])
