"""Stage 0 (experiments.pretrain_vit): patch labels by hand, and train.py --vit-init."""

import random

import pytest
import torch

import train
from experiments.pretrain_vit import patch_labels, pretrain
from nanorf.checkpoint import load_checkpoint, load_vit_weights, save_vit_weights
from nanorf.data import Obj, Scene, render

from conftest import expect_cli_error
from test_train import TINY

pytestmark = pytest.mark.usefixtures("single_thread")


def test_patch_labels_by_hand():
    scene = Scene((Obj("green", "square", "top left"), Obj("blue", "triangle", "bottom right")))
    img = render(scene, 48, random.Random(0))
    lab = patch_labels(img, scene, 4).view(12, 12)
    green_square, blue_triangle = 1 + 3 * 1 + 1, 1 + 3 * 2 + 2                  # COLORS / SHAPES order
    # the centre patch of each cell is inside its object; the centre cell is empty
    assert lab[1, 1] == green_square and lab[10, 10] == blue_triangle and lab[6, 6] == 0
    assert set(lab.unique().tolist()) == {0, green_square, blue_triangle}
    # a patch is labelled only where its object covers >= 1/4 of it
    px = torch.from_numpy((img != 0).any(-1)).view(12, 4, 12, 4).float().mean((1, 3))
    assert torch.equal(lab > 0, px >= 0.25)


def test_vit_init_loads_the_pretrained_weights(tmp_path, tiny_config, capsys):
    vcfg = tiny_config().model.vit
    vit, acc = pretrain(vcfg, size=16, steps=2, batch_size=4, log=lambda *_: None)
    assert set(acc) == {"patch", "object_patch", "shape_of_object_patch"}
    path = tmp_path / "vit.pt"
    save_vit_weights(path, vit, {"held_out": acc})
    assert all(torch.equal(a, b) for a, b in zip(load_vit_weights(str(path), vcfg).values(), vit.state_dict().values()))
    # with lr 0 the run's ViT (and the target encoder's EMA copy) is exactly the loaded one
    train.main([*TINY, "--out-dir", str(tmp_path / "run"), "--max-steps", "1", "--lr", "0", "--vit-init", str(path)])
    ck = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert ck["config"]["train"]["vit_init"] == str(path)
    for k, v in vit.state_dict().items():
        assert torch.equal(ck["model"]["vit." + k], v), k
        assert torch.allclose(ck["targets"]["encoder.encoder." + k], v, atol=1e-6), k  # one EMA step of p to p
    # a missing file and a ViT of another shape fail with one line
    expect_cli_error(capsys, lambda: train.main([*TINY, "--out-dir", str(tmp_path / "x"), "--vit-init",
                                                 str(tmp_path / "nope.pt")]), "train.py: error: --vit-init: no file")
    expect_cli_error(capsys, lambda: train.main([*TINY, "--out-dir", str(tmp_path / "x"), "--vit-init", str(path),
                                                 "--set", "model.vit.depth=2"]), "train.py: error: --vit-init:")
    assert not (tmp_path / "x").exists()


def test_files_from_before_the_dinov3_vit_fields_still_load(tmp_path, tiny_config):
    # ViTConfig gained fields for the official DINOv3 checkpoints (ffn_layer, mask_k_bias, ...);
    # ViT files and run checkpoints written before them hold configs without those keys
    from nanorf.checkpoint import FORMAT
    from nanorf.vit import ViT
    cfg = tiny_config()
    new_fields = ("ffn_layer", "ffn_hidden", "qkv_bias", "mask_k_bias", "norm_eps", "rope_min_period",
                  "rope_max_period", "rope_normalize_coords", "untie_cls_and_patch_norms")
    old_vit = {k: v for k, v in vars(cfg.model.vit).items() if k not in new_fields}
    vit = ViT(cfg.model.vit)
    torch.save({"vit_config": old_vit, "vit": vit.state_dict(), "held_out": {}}, tmp_path / "vit.pt")
    assert load_vit_weights(str(tmp_path / "vit.pt"), cfg.model.vit).keys() == vit.state_dict().keys()
    old_cfg = cfg.to_dict()
    old_cfg["model"]["vit"] = old_vit
    torch.save({"format": FORMAT, "config": old_cfg, "step": 0}, tmp_path / "ckpt.pt")
    load_checkpoint(tmp_path / "ckpt.pt", expect=cfg)  # a resume: no "trained with another model config"
