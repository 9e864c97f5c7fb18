"""experiments.bench: the analytic FLOP counts behind its MFU figures, and one timed train step
that runs (the numbers themselves are printed by the benchmark, never asserted)."""

import pytest

from experiments.bench import bench_train, train_step_flops, trunk_flops, vit_flops
from nanorf.config import apply_overrides
from nanorf.presets import get_config

from conftest import TINY_ARGS

pytestmark = pytest.mark.usefixtures("single_thread")


def test_trunk_flops_hand_count():
    # 10 tokens in sequences of 5, dim 4, depth 2, hidden 8:
    # per token per layer 2*(4*16 + 3*4*8) = 320 projection FLOPs + 4*5*4 = 80 attention FLOPs
    assert trunk_flops(10, 5, 4, 2, 8) == 10 * 2 * (320 + 80)


def test_vit_flops_hand_count():
    cfg = get_config("toy").model
    v = cfg.vit  # 48 px, patch 16: 9 patches + CLS + 4 registers = 14 tokens, dim 96, depth 3, MLP 384
    n = 14
    per_token_layer = 2 * (4 * 96 * 96 + 2 * 96 * 384) + 4 * n * 96
    patch_embed = 2 * 48 * 48 * 3 * 96
    assert vit_flops(2, cfg) == 2 * (n * v.depth * per_token_layer + patch_embed)


def test_train_step_flops_scales_with_the_batch():
    """Twice the batch is twice the FLOPs; dropping the rep tokens removes the rep head and targets."""
    cfg = get_config("toy")
    one = train_step_flops(cfg, 30, 90)
    apply_overrides(cfg, ["train.batch_size=128", "train.und_batch_size=32"])
    assert train_step_flops(cfg, 30, 90) == pytest.approx(2 * one)
    apply_overrides(cfg, ["model.rf=false"])
    assert train_step_flops(cfg, 30, 90) < 2 * one


def test_bench_train_runs_a_step_of_a_tiny_preset():
    overrides = [a for a in TINY_ARGS[2:] if a != "--set" and "=" in a]
    r = bench_train("toy", overrides, repeat=1)
    assert r["sec"] > 0 and r["tokens_s"] > 0 and r["gflops"] > 0 and 0 < r["params_m"] < 1


def test_pack_bench_runs_and_packs_tighter(tmp_path, capsys):
    """experiments.pack_bench on a tiny model: both layouts run the same examples, the packed rows
    hold fewer padding slots; a written folder reads back with the same image sizes."""
    from experiments import pack_bench
    tiny = ["model.mot.dim=32", "model.mot.depth=1", "model.mot.heads=2", "model.vit.dim=32",
            "model.vit.depth=1", "model.vit.heads=2", "model.vq.codebook_size=16"]
    args = [f"--set={kv}" for kv in tiny] + ["--examples", "6", "--batch", "3", "--repeat", "1",
                                             "--tokens-per-rank", "1200"]
    r = pack_bench.main(args)
    assert r["slots"]["packed"] < r["slots"]["padded"] and r["slots"]["packed"] >= r["real_tokens"]
    assert "packed / padded throughput" in capsys.readouterr().out
    pack_bench.main([*args, "--write-folder", str(tmp_path / "mixed")])
    r2 = pack_bench.main([*args, "--data", str(tmp_path / "mixed")])
    assert r2["sizes"] == r["sizes"] and len(set(r["sizes"])) > 1     # mixed sizes, read back unchanged
