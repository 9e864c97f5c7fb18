"""The paper's stages end to end on tiny random "pretrained" checkpoints written here: a
Qwen3-shaped safetensors folder and a DINOv3-shaped .pth. Stage 1 trains only the connector,
on understanding data; stage 2 continues from it with everything training; stage 3 continues
from stage 2 at a larger image size (the rep position table is resized)."""

import pytest
import torch

import train
from nanorf.checkpoint import load_checkpoint
from nanorf.config import ViTConfig
from nanorf.stages import freeze
from nanorf.vit import ViT

from conftest import expect_cli_error, read_log

pytest.importorskip("safetensors", reason="the loaders read safetensors (the [pretrained] extra)")
pytest.importorskip("tokenizers", reason="the Qwen tokenizer needs the tokenizers package (the [pretrained] extra)")
pytestmark = pytest.mark.usefixtures("single_thread_module")

# 64 px, DINOv3's patch 16: a 4x4 ViT grid pooled 2x2 -> 4 rep tokens; pixel patch 16 -> 16 patches
RUN = ["--config", "toy", "--set", "model.image_size=64", "--set", "model.patch_size=16", "--set", "model.vq.pool=2",
       "--set", "model.vq.codebook_size=16", "--set", "model.max_text_len=40", "--set", "model.sample.steps=2",
       "--set", "train.batch_size=4", "--set", "train.und_batch_size=4", "--set", "train.warmup_steps=1",
       "--set", "train.log_every=1", "--eval-per-kind", "0", "--max-steps", "2"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from test_qwen3 import write_qwen3_folder
    root = tmp_path_factory.mktemp("pretrained")
    qwen = write_qwen3_folder(root / "qwen3")
    torch.manual_seed(0)
    vit = ViT(ViTConfig(patch_size=16, dim=64, depth=1, heads=1, n_storage_tokens=4, layerscale_init=0.1))
    torch.save(vit.state_dict(), root / "dinov3_tiny.pth")                         # official key names
    return qwen, root / "dinov3_tiny.pth"


def _moved(a: dict, b: dict) -> set:
    """Names of the float tensors that differ between two state dicts."""
    return {k for k in a if torch.is_tensor(a[k]) and a[k].is_floating_point() and not torch.equal(a[k], b[k])}


@pytest.fixture(scope="module")
def stages(pretrained, tmp_path_factory):
    qwen, vit = pretrained
    root = tmp_path_factory.mktemp("stages")
    train.main([*RUN, "--init-llm", str(qwen), "--init-vit", str(vit), "--stage", "1", "--out-dir", str(root / "s0"),
                "--max-steps", "0"])                                               # the starting weights
    train.main([*RUN, "--init-llm", str(qwen), "--init-vit", str(vit), "--stage", "1", "--out-dir", str(root / "s1")])
    train.main([*RUN, "--init-from", str(root / "s1" / "ckpt.pt"), "--out-dir", str(root / "s2")])
    train.main([*RUN, "--init-from", str(root / "s2" / "ckpt.pt"), "--set", "model.image_size=128",
                "--out-dir", str(root / "s3")])
    return {s: load_checkpoint(root / s / "ckpt.pt") for s in ("s0", "s1", "s2", "s3")} | {"root": root}


def test_stage1_trains_only_the_connector_on_understanding(stages):
    s0, s1 = stages["s0"], stages["s1"]
    assert s0["config"]["model"]["mot"]["dim"] == 32 and s0["config"]["model"]["vit"]["dim"] == 64  # from the files
    moved = _moved(s0["model"], s1["model"])
    assert moved and all(k.startswith("connector.") for k in moved), moved
    assert {k for k in s1["model"] if k.startswith("connector.")} == moved        # every connector tensor moved
    log = read_log(stages["root"] / "s1")
    assert all(r["lm"] > 0 and r["rep"] == 0 and r["fm"] == 0 for r in log)       # no generation examples
    assert s1["config"]["train"]["batch_size"] == 0 and s1["config"]["train"]["freeze"] == "vit,llm,gen"


def test_stage2_continues_with_everything_training(stages):
    s1, s2 = stages["s1"], stages["s2"]
    assert s2["config"]["model"] == s1["config"]["model"]                          # the model is stage 1's
    moved = _moved(s1["model"], s2["model"])
    for prefix in ("vit.", "connector.", "mot.", "tok_emb.", "pix_head.", "rep.", "rep_pos"):
        assert any(k.startswith(prefix) for k in moved), prefix
    assert _moved(s1["targets"], s2["targets"])                                     # the targets start learning
    log = read_log(stages["root"] / "s2")
    assert all(r["lm"] > 0 and r["rep"] > 0 and r["fm"] > 0 for r in log)
    # the parameters loaded from Qwen3 and DINOv3 stay "loaded": the x4 LR still goes to the rest
    assert torch.equal(s1["model"]["loaded_names"], s2["model"]["loaded_names"])


def test_stage3_continues_at_a_larger_image_size(stages):
    s2, s3 = stages["s2"], stages["s3"]
    assert s3["config"]["model"]["image_size"] == 128 and s2["config"]["model"]["image_size"] == 64
    assert s2["model"]["rep_pos"].shape == (4, 32) and s3["model"]["rep_pos"].shape == (16, 32)
    shared = {k for k in s2["model"] if k != "rep_pos" and k in s3["model"]}
    assert _moved({k: s2["model"][k] for k in shared}, {k: s3["model"][k] for k in shared})
    assert read_log(stages["root"] / "s3")[-1]["fm"] > 0


def test_freeze_groups_and_bad_input(tiny_model, capsys, tmp_path):
    m = tiny_model()
    freeze(m, "vit,gen")
    assert not any(p.requires_grad for p in m.vit.parameters()) and not m.rep_pos.requires_grad
    assert all(p.requires_grad for p in m.mot.parameters()) and all(p.requires_grad for p in m.connector.parameters())
    opt = m.configure_optimizer(train.build_config(train.parse_args([])).train)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all((id(p) in in_opt) == p.requires_grad for p in m.parameters())
    expect_cli_error(capsys, lambda: train.main([*RUN, "--freeze", "vit,brain", "--out-dir", str(tmp_path / "x")]),
                     "train.py: error: --freeze: unknown group(s) brain")
    expect_cli_error(capsys, lambda: train.main([*RUN, "--init-from", str(tmp_path / "nope.pt"),
                                                 "--out-dir", str(tmp_path / "x")]), "train.py: error: no checkpoint")
    assert not (tmp_path / "x").exists()
