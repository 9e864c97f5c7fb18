"""train.py --fsdp on two gloo ranks on CPU trains as one process does, resumes exactly from its
sharded checkpoint, and that checkpoint loads in one process for sampling.

FSDP2 reduce-scatters the same mean gradient DDP all-reduces, and the EMA, the EMA encoder and
the optimiser work on each rank's shard of the same tensors, so a world-2 FSDP step equals a
world-1 step on the same global batch (train.py's draws depend on (seed, step, example) only).
One launch of two helper processes (tests/test_ddp.py's) runs every FSDP scenario in turn,
both ranks with the same --out-dir, as DCP needs:

  resumed  2 steps, then `--resume --max-steps 4` in the same folder
  full     4 steps uninterrupted, a checkpoint every step, --keep 2
  accum    2 steps with --micro-batch-size 2 (2 micro-steps per rank), continuous rep targets
           and REPA (the EMA encoder's other readers)

while this process runs the world-1 references. Random-noise images and no LR warmup, as in
test_ddp.py, so the weights move ~1e-3 per step against a 1e-5 tolerance.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import sample
import train
from nanorf.checkpoint import load_checkpoint, load_model

from conftest import TINY_ARGS, expect_cli_error, noise_folder, read_log, state_equal
from test_ddp import free_ports, start_ranks, wait_ranks


def _unsupported() -> str | None:
    """Why this torch cannot run FSDP on CPU with gloo, or None (then the GPU check is the only one)."""
    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no torch.distributed with the gloo backend"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"torch.distributed.fsdp.fully_shard is missing in torch {torch.__version__}: {e}"
    return None


pytestmark = pytest.mark.skipif(_unsupported() is not None, reason=str(_unsupported()))

TINY = [*TINY_ARGS, "--set", "train.log_every=1", "--set", "train.ckpt_every=0", "--device", "cpu"]
ATOL = 1e-5  # reduction order differs (reduce-scatter, VQ sums), so not bit-exact


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("fsdp")
    data = ["--data", str(noise_folder(tmp / "data")), "--set", "train.warmup_steps=1"]
    variants = [*data, "--micro-batch-size", "2", "--continuous-rep", "--repa", "--max-steps", "2"]
    d = {name: tmp / name for name in ("resumed", "full", "accum", "ref", "ref_accum", "packed")}
    both = lambda args, out: [[*TINY, *args, "--fsdp", "--out-dir", str(out)]] * 2  # noqa: E731
    ports = free_ports(5)
    scenarios = [
        {"port": ports[0], "argv": both([*data, "--max-steps", "2"], d["resumed"])},
        {"port": ports[1], "argv": both([*data, "--resume", "--max-steps", "4"], d["resumed"])},
        {"port": ports[2], "argv": both([*data, "--max-steps", "4", "--set", "train.ckpt_every=1", "--keep", "2"],
                                        d["full"])},
        {"port": ports[3], "argv": both(variants, d["accum"])},
        # packed rows (nanorf/packing.py) under FSDP: rows of 400 tokens, as many as each rank needs
        {"port": ports[4], "argv": both([*data, "--max-steps", "4", "--tokens-per-rank", "400"], d["packed"])},
    ]
    try:
        procs = start_ranks(tmp, scenarios)
        try:  # the world-1 references, while the ranks run
            train.main([*TINY, *data, "--max-steps", "4", "--out-dir", str(d["ref"])])
            # 1 rank x 2 micro-batches of 4 = the global micro-batches of 2 ranks x 2 x 2
            train.main([*TINY, *data, "--micro-batch-size", "4", "--continuous-rep", "--repa", "--max-steps", "2",
                        "--out-dir", str(d["ref_accum"])])
        finally:
            wait_ranks(tmp, procs)
        d["rank_output"] = (tmp / "rank0.out").read_text()
        yield d
    finally:
        torch.set_num_threads(n)


def assert_same_weights(ref: dict, got: dict, atol: float = ATOL):
    assert ref["step"] == got["step"]
    for part in ("model", "ema", "targets"):
        state_equal(ref[part], got[part], atol=atol, what=part)


def test_fsdp_matches_single_process(runs):
    ref, got = load_checkpoint(runs["ref"] / "ckpt.pt"), load_checkpoint(runs["full"])  # the out-dir: ckpt.dcp
    assert got["step"] == 4 and got["optimizer"] is None  # one-process reads leave the optimiser out
    assert_same_weights(ref, got)
    # the weights move between steps far more than the tolerance: the comparison is not vacuous
    step3 = load_checkpoint(runs["full"] / "ckpt-3.dcp")["model"]["pix_emb.weight"]
    assert (got["model"]["pix_emb.weight"] - step3).abs().max() > 50 * ATOL  # ~lr per step
    lr, lf = read_log(runs["ref"]), read_log(runs["full"])
    assert [r["step"] for r in lf] == [1, 2, 3, 4]
    for a, b in zip(lr, lf):
        for k in ("lm", "rep", "fm"):
            assert a[k] == pytest.approx(b[k], abs=2e-4), (k, a, b)
        assert a["lr"] == b["lr"] and a["codes_used"] == b["codes_used"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=2e-3)


def test_fsdp_with_packing_matches_single_padded_process(runs):
    ref, got = load_checkpoint(runs["ref"] / "ckpt.pt"), load_checkpoint(runs["packed"])
    assert_same_weights(ref, got)
    for a, b in zip(read_log(runs["ref"]), read_log(runs["packed"])):
        for k in ("lm", "rep", "fm"):
            assert a[k] == pytest.approx(b[k], abs=2e-4), (k, a, b)


def test_fsdp_resume_equals_uninterrupted_run(runs):
    assert "resumed from" in runs["rank_output"] and "ckpt.dcp at step 2" in runs["rank_output"]
    full, resumed = load_checkpoint(runs["full"]), load_checkpoint(runs["resumed"] / "ckpt.dcp")
    assert_same_weights(full, resumed, atol=1e-6)
    assert [r["step"] for r in read_log(runs["resumed"])] == [1, 2, 3, 4]
    for a, b in zip(read_log(runs["full"]), read_log(runs["resumed"])):
        assert {k: a[k] for k in ("lm", "rep", "fm", "grad_norm")} == {k: b[k] for k in ("lm", "rep", "fm", "grad_norm")}


def test_fsdp_accumulation_and_ablations_match_single_process(runs):
    ref, got = load_checkpoint(runs["ref_accum"] / "ckpt.pt"), load_checkpoint(runs["accum"])
    assert_same_weights(ref, got)
    assert got["config"]["model"]["rep_target"] == "continuous" and got["config"]["train"]["fsdp"]
    for a, b in zip(read_log(runs["ref_accum"]), read_log(runs["accum"])):
        assert a["rep"] == pytest.approx(b["rep"], abs=2e-4) and a["fm"] == pytest.approx(b["fm"], abs=2e-4)


def test_fsdp_checkpoint_folder(runs):
    out = runs["full"]
    # --keep 2: the two newest sharded folders, ckpt.dcp a relative link to the newest, no temporaries
    assert sorted(p.name for p in out.iterdir()) == ["ckpt-3.dcp", "ckpt-4.dcp", "ckpt.dcp", "log.jsonl"]
    assert os.readlink(out / "ckpt.dcp") == "ckpt-4.dcp"
    assert sorted(p.name for p in (out / "ckpt-4.dcp").iterdir()) == [".metadata", "__0_0.distcp",
                                                                       "__1_0.distcp", "meta.pt"]
    assert load_checkpoint(out / "ckpt-3.dcp")["step"] == 3
    # the sharded run's file set, whatever the rank: rank 1 shared rank 0's folder and wrote no log of its own
    assert sorted(p.name for p in runs["resumed"].iterdir()) == ["ckpt-4.dcp", "ckpt.dcp", "log.jsonl"]


def test_sample_reads_fsdp_checkpoint_in_one_process(runs, tmp_path, capsys):
    for ckpt in (runs["resumed"], runs["resumed"] / "ckpt.dcp", runs["resumed"] / "ckpt-4.dcp"):
        out = tmp_path / f"{Path(ckpt).name}.png"
        sample.main(["--ckpt", str(ckpt), "--prompt", "a red circle", "--out", str(out), "--rep-map"])
        assert out.is_file()
        assert "checkpoint step 4" in capsys.readouterr().out
    # --rep-map read the code patches: this run's targets are discrete codes
    model, cfg, step = load_model(runs["resumed"])
    ref = load_checkpoint(runs["ref"] / "ckpt.pt")
    state_equal(ref["ema"], model.state_dict(), atol=ATOL, what="ema")
    assert step == 4 and cfg.train.fsdp


def test_bad_checkpoint_paths_give_one_error_line(runs, tmp_path, capsys):
    run = lambda ckpt: sample.main(["--ckpt", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "x.png")])  # noqa: E731
    assert "no checkpoint at" in expect_cli_error(capsys, lambda: run(tmp_path / "missing"), "sample.py: error:")
    (tmp_path / "empty").mkdir()
    assert "neither ckpt.pt nor ckpt.dcp" in expect_cli_error(capsys, lambda: run(tmp_path / "empty"),
                                                               "sample.py: error:")
    broken = tmp_path / "broken.dcp"  # DCP's files without nanorf's meta.pt: a save that never finished
    broken.mkdir()
    (broken / ".metadata").write_bytes((runs["full"] / "ckpt-4.dcp" / ".metadata").read_bytes())
    assert "not a nanorf sharded checkpoint" in expect_cli_error(capsys, lambda: run(broken), "sample.py: error:")


def test_fsdp_cli_errors(runs, monkeypatch, capsys):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    line = expect_cli_error(capsys, lambda: train.main([*TINY, "--fsdp", "--out-dir", str(runs["full"])]),
                            "train.py: error:")
    assert "torchrun" in line
    # a sharded run resumed without --fsdp: say so, do not start fresh over it
    line = expect_cli_error(capsys, lambda: train.main([*TINY, "--resume", "auto", "--out-dir", str(runs["full"])]),
                            "train.py: error:")
    assert "with --fsdp" in line
