"""Presets build at the paper's shapes; config round-trips and overrides."""

import pytest
import torch

from nanorf.config import Config, PRESETS, apply_overrides, get_config
from nanorf.model import RFModel


@pytest.mark.parametrize("name, n_rep, n_pix", [("paper256", 64, 256), ("paper1024", 1024, 4096)])
def test_paper_presets_have_the_paper_token_counts(name, n_rep, n_pix):
    cfg = get_config(name)
    assert cfg.model.patch_size == 16 and cfg.model.vit.patch_size == 16 and cfg.model.vq.pool == 2
    assert cfg.model.vq.codebook_size == 16384 and cfg.model.vq.tau == 0.5 and cfg.model.vq.momentum == 0.9999
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = RFModel(cfg.model)
    assert (m.n_rep, m.n_pix) == (n_rep, n_pix)
    assert m.rep_head.weight.shape == (16384, cfg.model.mot.dim)
    assert m.pix_head.weight.shape == (16 * 16 * 3, cfg.model.mot.dim)
    assert m.rep_pos.shape == (n_rep, cfg.model.mot.dim)


def test_every_preset_builds_and_round_trips():
    for name in PRESETS:
        cfg = get_config(name)
        assert Config.from_dict(cfg.to_dict()) == cfg
        with torch.device("meta"):
            RFModel(cfg.model)


def test_overrides_parse_types_and_reject_bad_keys():
    cfg = apply_overrides(get_config("toy"), ["model.mot.dim=256", "train.lr=3e-4", "model.rf=false",
                                              "model.flow.cfg_interval=0.1,0.9"])
    assert cfg.model.mot.dim == 256 and cfg.train.lr == 3e-4 and cfg.model.rf is False
    assert cfg.model.flow.cfg_interval == (0.1, 0.9)
    for bad in ["model.nope=1", "model.mot=3", "train.lr", "model.mot.dim=abc"]:
        with pytest.raises(ValueError):
            apply_overrides(get_config("toy"), [bad])
    with pytest.raises(ValueError, match="unknown config"):
        get_config("huge")
