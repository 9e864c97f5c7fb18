"""Presets build at the paper's shapes; config round-trips and overrides."""

import json

import pytest
import torch

from nanorf.config import Config, apply_overrides
from nanorf.presets import PRESETS, get_config
from nanorf.model import RFModel


@pytest.mark.parametrize("name, n_rep, n_pix", [("paper256", 64, 256), ("paper1024", 1024, 4096)])
def test_paper_presets_have_the_paper_token_counts(name, n_rep, n_pix):
    cfg = get_config(name)
    assert cfg.model.patch_size == 16 and cfg.model.vit.patch_size == 16 and cfg.model.vq.pool == 2
    assert cfg.model.vq.codebook_size == 16384 and cfg.model.vq.tau == 0.5 and cfg.model.vq.momentum == 0.9999
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = RFModel(cfg.model)
    assert (m.n_rep, m.n_pix) == (n_rep, n_pix)
    assert m.rep.head.weight.shape == (16384, cfg.model.mot.dim)
    assert m.pix_head.weight.shape == (16 * 16 * 3, cfg.model.mot.dim)
    assert m.rep_pos.shape == (n_rep, cfg.model.mot.dim)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_at_its_token_counts_and_round_trips(name):
    cfg = get_config(name)
    # through JSON, as a checkpoint's config may travel: tuples come back as lists
    assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    m = cfg.model
    with torch.device("meta"):
        model = RFModel(m)
    assert model.n_pix == (m.image_size // m.patch_size) ** 2
    assert model.n_rep == (m.image_size // m.vit.patch_size // m.vq.pool) ** 2
    assert model.rep_pos.shape == (model.n_rep, m.mot.dim)
    # every preset can train on the shapes world: its longest answer (a 4-object description) fits
    from nanorf.shapes import MAX_ANSWER_BYTES
    assert m.max_text_len >= MAX_ANSWER_BYTES
    # the tokens a layout holds for one generation example: [BOS] [BOR] r [BOP] p
    lay = model.gen_layout([[]], model.n_rep, model.n_pix)
    assert lay.tokens.shape == (1, 3 + model.n_rep + model.n_pix)


def test_overrides_parse_types_and_reject_bad_keys():
    cfg = apply_overrides(get_config("toy"), ["model.mot.dim=256", "train.lr=3e-4", "model.rf=false",
                                              "model.sample.cfg_interval=0.1,0.9"])
    assert cfg.model.mot.dim == 256 and cfg.train.lr == 3e-4 and cfg.model.rf is False
    assert cfg.model.sample.cfg_interval == (0.1, 0.9)
    for bad in ["model.nope=1", "model.mot=3", "train.lr", "model.mot.dim=abc"]:
        with pytest.raises(ValueError):
            apply_overrides(get_config("toy"), [bad])
    with pytest.raises(ValueError, match="unknown config"):
        get_config("huge")
