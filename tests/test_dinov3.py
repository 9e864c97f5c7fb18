"""Tests for nanorf/dinov3.py: official DINOv3 ViT weights load into nanorf's ViT with parity.

The reference outputs come from the official DINOv3 code, run by tests/fixtures/make_dinov3_fixture.py
into tests/fixtures/dinov3_parity.pt (random weights, tiny widths); these tests read only that file
(no network, no DINOv3 checkout). The Hugging Face files the tests write with `dinov3_to_hf` were
checked against transformers' DINOv3ViTModel when the fixture was made.
"""

import copy
import hashlib
import math
import sys
from pathlib import Path

import pytest
import torch

from nanorf.checkpoint import CheckpointError
from nanorf.config import ViTConfig
from nanorf.dinov3 import (IMAGENET_MEAN, IMAGENET_STD, dinov3_config, dinov3_to_hf, fold_imagenet_normalization,
                           hf_to_dinov3, load_dinov3)
from nanorf.vit import ViT, ffn_hidden_size

FIXTURE = Path(__file__).parent / "fixtures" / "dinov3_parity.pt"
# In _compare, relative to the largest reference value (~13 for the pre-norm tokens): the
# fixture was made on another CPU, and float32 sums over a few blocks differ there by ~2e-6
# relative (2.6e-5 absolute on one machine); a wrong eps, RoPE variant or weight mapping
# differs by 1e-3 or more.
TOL = 1e-5
# What the tensors cannot say about options_p4 (built with DINOv3's "layernorm" and "max" coordinates).
OVERRIDES = {"options_p4": dict(norm_eps=1e-6, rope_normalize_coords="max")}
NAMES = ["mlp_p4", "swiglu_p16", "vit7b_like_p16", "options_p4"]
HF_NAMES = ["mlp_p4", "swiglu_p16", "vit7b_like_p16"]  # transformers has no untied CLS norm / min-max RoPE


@pytest.fixture(scope="module")
def fx():
    torch.set_num_threads(1)
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)["models"]


def _save_pth(sd, path):
    torch.save(sd, path)
    return path


def _compare(vit, entry):
    """Max |diff| / max |reference| of pre-norm and normed patch tokens (and CLS/storage) against
    the official outputs."""
    with torch.no_grad():
        out = vit.eval()(entry["input"])

    def rel(a, ref):
        return ((a - ref).abs().max() / ref.abs().max()).item()
    diffs = {"x_prenorm": rel(out["x_prenorm"], entry["x_prenorm_patch"]),
             "x_norm_patchtokens": rel(out["x_norm_patchtokens"], entry["x_norm_patchtokens"]),
             "x_norm_clstoken": rel(out["x_norm_clstoken"], entry["x_norm_clstoken"])}
    if entry["x_storage_tokens"].numel():
        diffs["x_storage_tokens"] = rel(out["x_storage_tokens"], entry["x_storage_tokens"])
    assert out["x_prenorm"].shape == entry["x_prenorm_patch"].shape  # patch tokens only
    return diffs


def _one_line_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.mark.parametrize("name", NAMES)
def test_official_pth_parity(fx, name, tmp_path):
    e = fx[name]
    vit = load_dinov3(_save_pth(e["state_dict"], tmp_path / "model.pth"), normalize=False, **OVERRIDES.get(name, {}))
    diffs = _compare(vit, e)
    assert max(diffs.values()) <= TOL, diffs
    # the loader applied bias_mask: the raw key bias in the file is nonzero, the loaded one is zero
    if "blocks.0.attn.qkv.bias_mask" in e["state_dict"]:
        D = vit.cfg.dim
        assert e["state_dict"]["blocks.0.attn.qkv.bias"][D:2 * D].abs().max() > 0
        assert torch.all(vit.blocks[0].attn.qkv.bias[D:2 * D] == 0)


@pytest.mark.parametrize("name", NAMES)
def test_architecture_inference(fx, name):
    e = fx[name]
    kw = e["kwargs"]
    cfg = dinov3_config(e["state_dict"], **OVERRIDES.get(name, {}))
    assert (cfg.dim, cfg.depth, cfg.patch_size) == (kw["embed_dim"], kw["depth"], kw["patch_size"])
    assert cfg.heads == kw["num_heads"]  # from the RoPE periods: D_head / 4 of them
    assert cfg.n_storage_tokens == kw["n_storage_tokens"]
    assert (cfg.ffn_layer == "mlp") == (kw["ffn_layer"] == "mlp")
    assert cfg.qkv_bias == kw["qkv_bias"]
    assert (cfg.layerscale_init > 0) == bool(kw["layerscale_init"])
    assert cfg.untie_cls_and_patch_norms == kw.get("untie_cls_and_patch_norms", False)
    # the hidden width read from the tensors is DINOv3's rounding of the official ffn_ratio
    official = ViTConfig(dim=kw["embed_dim"], mlp_ratio=kw["ffn_ratio"], ffn_layer=kw["ffn_layer"])
    assert cfg.ffn_hidden == ffn_hidden_size(official)
    if kw["pos_embed_rope_base"] is None:
        assert (cfg.rope_min_period, cfg.rope_max_period) == pytest.approx(
            (kw["pos_embed_rope_min_period"], kw["pos_embed_rope_max_period"]))
    else:
        assert cfg.rope_base == pytest.approx(kw["pos_embed_rope_base"]) and cfg.rope_min_period == 0
    # a fresh ViT of the inferred config regenerates the stored RoPE periods
    fresh = ViT(cfg).rope_embed.periods
    assert torch.allclose(fresh, e["state_dict"]["rope_embed.periods"], rtol=1e-5)


def test_released_ffn_hidden_sizes():
    # dinov3/hub/backbones.py: ViT-S+ and H+ are swiglu with ratio 6, 7B swiglu64 with ratio 3;
    # transformers' conversion lists their intermediate sizes as 1536, 5120 and 8192.
    assert ffn_hidden_size(ViTConfig(dim=384, mlp_ratio=6, ffn_layer="swiglu")) == 1536
    assert ffn_hidden_size(ViTConfig(dim=1024, mlp_ratio=6, ffn_layer="swiglu")) == 4096
    assert ffn_hidden_size(ViTConfig(dim=1280, mlp_ratio=6, ffn_layer="swiglu")) == 5120
    assert ffn_hidden_size(ViTConfig(dim=4096, mlp_ratio=3, ffn_layer="swiglu64")) == 8192
    assert ffn_hidden_size(ViTConfig(dim=768, mlp_ratio=4, ffn_layer="mlp")) == 3072
    assert ffn_hidden_size(ViTConfig(dim=100, mlp_ratio=1.0, ffn_layer="swiglu")) == 72  # int(66.67) = 66 -> 72
    assert ffn_hidden_size(ViTConfig(dim=100, mlp_ratio=1.0, ffn_layer="swiglu128")) == 128
    with pytest.raises(ValueError, match="unknown vit.ffn_layer"):
        ffn_hidden_size(ViTConfig(ffn_layer="geglu"))


@pytest.mark.parametrize("name", HF_NAMES)
def test_hf_safetensors_parity(fx, name, tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="safetensors not installed (pip install -e '.[pretrained]')")
    import json

    e = fx[name]
    hf_sd = dinov3_to_hf(e["state_dict"])
    assert "layer.0.attention.q_proj.weight" in hf_sd and "layer.0.attention.k_proj.bias" not in hf_sd
    assert "embeddings.register_tokens" in hf_sd and hf_sd["embeddings.mask_token"].ndim == 3
    # a Hub-style folder: model.safetensors + config.json (heads, eps, rope_theta from config.json)
    folder = tmp_path / "hf"
    folder.mkdir()
    st.save_file(hf_sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(e["hf_config"]))
    diffs = _compare(load_dinov3(folder, normalize=False), e)
    assert max(diffs.values()) <= TOL, diffs
    # the lone file, with transformers 5's in-memory names (model.layer.{i}); no config.json, so
    # heads default to width / 64 and must be given for these head dims
    lone = tmp_path / "model.safetensors"
    st.save_file({("model." + k if k.startswith("layer.") else k): v for k, v in hf_sd.items()}, str(lone))
    diffs = _compare(load_dinov3(lone, normalize=False, heads=e["kwargs"]["num_heads"]), e)
    assert max(diffs.values()) <= TOL, diffs
    # sharded, as the Hub stores the largest models: model-0000k-of-00002.safetensors + index
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(hf_sd)
    weight_map = {}
    for j, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
        fname = f"model-{j + 1:05d}-of-00002.safetensors"
        st.save_file({k: hf_sd[k] for k in part}, str(sharded / fname))
        weight_map.update({k: fname for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "config.json").write_text(json.dumps(e["hf_config"]))
    diffs = _compare(load_dinov3(sharded, normalize=False), e)
    assert max(diffs.values()) <= TOL, diffs


def test_hf_mapping_inverts(fx):
    sd = fx["mlp_p4"]["state_dict"]
    back = hf_to_dinov3(dinov3_to_hf(sd))
    assert set(back) == set(sd) - {"rope_embed.periods"}  # HF does not store periods
    D = sd["cls_token"].shape[-1]
    for k in back:
        if k.endswith("qkv.bias"):  # the masked raw key bias does not survive: HF drops it
            assert torch.equal(back[k][:D], sd[k][:D]) and torch.equal(back[k][2 * D:], sd[k][2 * D:])
            assert torch.all(back[k][D:2 * D] == 0)
        else:
            assert torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("name", ["mlp_p4", "swiglu_p16"])
def test_folded_normalization_is_exact(fx, name, tmp_path):
    # folded(x) on nanorf's [-1, 1] pixels == unfolded(ImageNet-normalised x), DINOv3's input
    path = _save_pth(fx[name]["state_dict"], tmp_path / "m.pth")
    folded, plain = load_dinov3(path).eval(), load_dinov3(path, normalize=False).eval()
    assert not torch.allclose(folded.patch_embed.proj.weight, plain.patch_embed.proj.weight)
    H, W = fx[name]["input"].shape[-2:]
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        # as loaded (float32): the patch embeddings agree to float32 rounding ...
        z = (((x.double() + 1) / 2 - mean) / std).float()
        assert (folded.patch_embed(x) - plain.patch_embed(z)).abs().max() <= TOL
        a, b = folded(x), plain(z)
        for k in ("x_prenorm", "x_norm_patchtokens"):  # ... which these sharp random weights amplify a little
            assert (a[k] - b[k]).abs().max() <= TOL * b[k].abs().max(), k
        # the fold itself is exact: in float64 the patch embeddings (all it touches) agree to rounding.
        # (Not the whole ViT: its RoPE runs in float32 whatever the model dtype, as DINOv3's.)
        plain64 = copy.deepcopy(plain.patch_embed).double()
        folded64 = copy.deepcopy(plain64)
        fold_imagenet_normalization(folded64.proj)
        x64 = x.double()
        diff = folded64(x64) - plain64(((x64 + 1) / 2 - mean) / std)
        assert diff.abs().max() <= 1e-12


def test_fold_by_hand():
    conv = torch.nn.Conv2d(3, 2, 2, stride=2)
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    fold_imagenet_normalization(conv)
    for c in range(3):
        assert torch.allclose(conv.weight[:, c], w0[:, c] / (2 * IMAGENET_STD[c]))
    shift = sum(w0[:, c].sum((1, 2)) * (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c] for c in range(3))
    assert torch.allclose(conv.bias, b0 + shift, atol=1e-6)


def test_nanorf_vit_state_dict_loads(tmp_path):
    # nanorf's ViT state dict is a DINOv3 one: the toy architecture round-trips through the loader
    torch.manual_seed(0)
    vit = ViT(ViTConfig(patch_size=4, dim=32, depth=2, heads=2, n_storage_tokens=2, layerscale_init=0.1)).eval()
    loaded = load_dinov3(_save_pth(vit.state_dict(), tmp_path / "toy.pth"), normalize=False, heads=2).eval()
    assert loaded.cfg.mask_k_bias is False and loaded.cfg.ffn_layer == "mlp"
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vit(x)["x_norm_patchtokens"], loaded(x)["x_norm_patchtokens"])


def test_masked_key_bias_stays_zero_in_training(fx, tmp_path):
    vit = load_dinov3(_save_pth(fx["mlp_p4"]["state_dict"], tmp_path / "m.pth"))
    D = vit.cfg.dim
    bias = vit.blocks[0].attn.qkv.bias
    before = bias.detach().clone()
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        loss = (vit(torch.rand(2, 3, 16, 16) * 2 - 1)["x_norm_patchtokens"] * torch.randn(2, 16, D)).sum()
        opt.zero_grad()
        loss.backward()
        assert torch.all(bias.grad[D:2 * D] == 0)
        opt.step()
    assert torch.all(bias[D:2 * D] == 0)  # exactly zero, as DINOv3's training keeps it
    assert not torch.equal(bias[:D], before[:D])  # the q and v biases train


# --- errors: one line each, a CheckpointError -------------------------------------------------

def test_truncated_pth(fx, tmp_path):
    path = _save_pth(fx["mlp_p4"]["state_dict"], tmp_path / "m.pth")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as ei:
        load_dinov3(path)
    _one_line_error(ei, "cannot read", "m.pth")


def test_truncated_safetensors(fx, tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="safetensors not installed")
    path = tmp_path / "model.safetensors"
    st.save_file(dinov3_to_hf(fx["mlp_p4"]["state_dict"]), str(path))
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError) as ei:
        load_dinov3(path, heads=4)
    _one_line_error(ei, "cannot read")


def test_state_dict_of_another_model(fx, tmp_path):
    sd = fx["mlp_p4"]["state_dict"]
    cases = {
        "mot": ({"blocks.0.attn.wq.weight": torch.zeros(4, 4), "norm.weight": torch.ones(4)}, ["not a DINOv3 ViT"]),
        "convnext": ({"downsample_layers.0.0.weight": torch.zeros(4, 3, 4, 4), "stages.0.0.gamma": torch.ones(4)},
                     ["ConvNeXt"]),
        "dinov2": (dict(sd, pos_embed=torch.zeros(1, 197, 64)), ["unexpected pos_embed"]),
        "cut": ({k: v for k, v in sd.items() if k != "blocks.1.norm2.weight"}, ["missing blocks.1.norm2.weight"]),
        "shape": (dict(sd, **{"blocks.1.mlp.fc2.weight": torch.zeros(64, 128)}), ["shape blocks.1.mlp.fc2.weight"]),
        "nan_mask": (dict(sd, **{"blocks.0.attn.qkv.bias_mask": torch.full((192,), math.nan)}), ["bias_mask"]),
        "not_tensors": ({"teacher": {"backbone.cls_token": torch.zeros(1)}}, ["not a state dict"]),
    }
    for case, (bad, fragments) in cases.items():
        with pytest.raises(CheckpointError) as ei:
            load_dinov3(_save_pth(bad, tmp_path / f"{case}.pth"))
        _one_line_error(ei, *fragments)


def test_sha256_prefix_in_name(fx, tmp_path):
    tmp = _save_pth(fx["mlp_p4"]["state_dict"], tmp_path / "tmp.pth")
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    good = tmp.rename(tmp_path / f"dinov3_vitx4_pretrain_test-{digest[:8]}.pth")
    load_dinov3(good)  # matches: loads
    bad_name = "0" * 8 if not digest.startswith("0" * 8) else "f" * 8
    bad = good.rename(tmp_path / f"dinov3_vitx4_pretrain_test-{bad_name}.pth")
    with pytest.raises(CheckpointError) as ei:
        load_dinov3(bad)
    _one_line_error(ei, "SHA-256", bad_name)
    load_dinov3(bad, check_hash=False)  # the caller may skip the check


def test_missing_path_and_bad_override(fx, tmp_path):
    with pytest.raises(CheckpointError) as ei:
        load_dinov3(tmp_path / "nope.pth")
    _one_line_error(ei, "no DINOv3 checkpoint")
    with pytest.raises(CheckpointError) as ei:
        load_dinov3(tmp_path)  # a folder with no safetensors
    _one_line_error(ei, "model.safetensors")
    with pytest.raises(TypeError, match="ViTConfig"):
        load_dinov3(_save_pth(fx["mlp_p4"]["state_dict"], tmp_path / "m.pth"), head=4)


def test_safetensors_missing_says_what_to_install(fx, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors -> ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError) as ei:
        load_dinov3(path)
    _one_line_error(ei, 'pip install -e ".[pretrained]"')
