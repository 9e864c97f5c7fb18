"""Two-process gloo DDP on CPU gives the same training as one process on the same global batch.

train.py promises that every random draw is a function of (seed, step, example index), so
one optimiser step on 2 ranks x 4 examples must equal one step on 1 rank x 8 examples: DDP
averages the gradients, the online VQ all-reduces its statistics. We launch train.py's own
code under the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), one
helper process per rank, and run all DDP scenarios in that one launch to pay the start-up once:

  resume  world 2, resumed from a 1-step world-1 checkpoint, to step 3
  accum   the same with --micro-batch-size 2 (2 micro-steps per rank), against the same world-1
          reference (one micro-batch of 8): the online VQ labels a step's whole global batch
  fresh   world 2 from scratch, 1 step, --micro-batch-size 2: the codebook's initialisation
          draws from all ranks' and all micro-steps' features, in example order
  shapes  world 2 from scratch on the shapes world, 1 step, with the end-of-run eval
  variants  world 2 from scratch, 2 steps, continuous rep targets and the REPA loss together
            (the ablations' own random draws and targets)

The compared runs train on a folder of random-noise images (see noise_folder) with no LR
warmup, so the weights move ~1e-3 per step against a 1e-5 tolerance.

Resuming from a checkpoint whose codebook is already initialised isolates gradient sync and
the VQ all-reduce from the (rank-0, local-batch) codebook initialisation, which `fresh`
checks separately. Rank 1 gets its own --out-dir so we can see it writes nothing."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from nanorf.checkpoint import load_checkpoint

from conftest import ROOT, TINY_ARGS, noise_folder, read_log, state_equal, subprocess_env

TINY = [*TINY_ARGS, "--set", "train.log_every=1", "--set", "train.ckpt_every=0", "--device", "cpu"]
ATOL = 1e-5  # reduction order differs (gradient all-reduce, VQ sums), so not bit-exact

HELPER = """
import json, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
import train
rank = int(os.environ["RANK"])
for sc in json.loads(sys.argv[1]):
    os.environ["MASTER_PORT"] = str(sc["port"])  # a fresh rendezvous per run
    train.main(sc["argv"][rank])
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_ranks(tmp: Path, scenarios: list[dict], world: int = 2) -> list[subprocess.Popen]:
    script = tmp / "ddp_helper.py"
    script.write_text(HELPER.format(root=str(ROOT)))
    procs = []
    for rank in range(world):
        env = subprocess_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                             LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
        log = open(tmp / f"rank{rank}.out", "w")
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(scenarios)], cwd=tmp, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_ranks(tmp: Path, procs: list[subprocess.Popen], timeout: float = 240.0):
    """All ranks must exit 0 within `timeout`; if one fails or time runs out, kill the rest and fail."""
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if any(p.returncode != 0 for p in procs):
        logs = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n" + (tmp / f"rank{r}.out").read_text()[-3000:]
                         for r, p in enumerate(procs))
        pytest.fail(f"DDP ranks failed or timed out:\n{logs}")


def ranked_argv(args: list[str], dirs: list[Path]) -> list[list[str]]:
    return [[*TINY, *args, "--out-dir", str(d)] for d in dirs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ddp")
    # lr 1e-3 from the first step, so weights move ~1e-3 per step, far above ATOL
    data = ["--data", str(noise_folder(tmp / "data")), "--set", "train.warmup_steps=1"]
    try:
        base = tmp / "base"  # world 1, 1 step from scratch: the checkpoint both resumes start from
        train.main([*TINY, *data, "--max-steps", "1", "--out-dir", str(base)])
        d = {"base": base, "base_bytes": (base / "ckpt.pt").read_bytes()}
        for name, who in [("resume", "ref"), ("resume", "rank0"), ("resume", "rank1"),
                          ("accum", "rank0"), ("accum", "rank1"), ("packed", "rank0"), ("packed", "rank1")]:
            (tmp / name / who).mkdir(parents=True)
            shutil.copy(base / "ckpt.pt", tmp / name / who / "ckpt.pt")
            shutil.copy(base / "log.jsonl", tmp / name / who / "log.jsonl")
        for name in ("resume", "accum", "fresh", "shapes", "variants", "packed", "turns"):
            d[name] = tmp / name
        ports = free_ports(7)
        # the toy's own understanding format and attention on the shapes world (a folder's
        # images have one caption, so one turn): three questions per image, per-modality q/k/v/o
        turns = ["--max-steps", "2", "--set", "train.warmup_steps=1", "--set", "train.und_turns=3",
                 "--set", "model.mot.shared_attention=false"]
        variants = [*data, "--continuous-rep", "--repa", "--max-steps", "2"]
        scenarios = [
            {"port": ports[0], "argv": ranked_argv([*data, "--resume", "--max-steps", "3"],
                                                   [d["resume"] / "rank0", d["resume"] / "rank1"])},
            {"port": ports[1], "argv": ranked_argv([*data, "--resume", "--max-steps", "3", "--micro-batch-size", "2"],
                                                   [d["accum"] / "rank0", d["accum"] / "rank1"])},
            {"port": ports[2], "argv": ranked_argv([*data, "--max-steps", "1", "--micro-batch-size", "2"],
                                                   [d["fresh"] / "rank0", d["fresh"] / "rank1"])},
            # the shapes world with its end-of-run eval, to see what each rank writes
            {"port": ports[3], "argv": ranked_argv(["--max-steps", "1", "--eval-per-kind", "2"],
                                                   [d["shapes"] / "rank0", d["shapes"] / "rank1"])},
            {"port": ports[4], "argv": ranked_argv(variants, [d["variants"] / "rank0", d["variants"] / "rank1"])},
            # packed rows (nanorf/packing.py): each rank's 4 + 2 examples in rows of 400 tokens
            {"port": ports[5], "argv": ranked_argv([*data, "--resume", "--max-steps", "3", "--tokens-per-rank", "400"],
                                                   [d["packed"] / "rank0", d["packed"] / "rank1"])},
            {"port": ports[6], "argv": ranked_argv(turns, [d["turns"] / "rank0", d["turns"] / "rank1"])},
        ]
        procs = start_ranks(tmp, scenarios)
        try:
            # world-1 references on the same global batches, while the ranks start up; the
            # resume reference (1 rank x 1 micro-batch of 8) is also accum's (2 ranks x 2 x 2)
            train.main([*TINY, *data, "--resume", "--max-steps", "3", "--out-dir", str(d["resume"] / "ref")])
            train.main([*TINY, *variants, "--out-dir", str(d["variants"] / "ref")])
            train.main([*TINY, *turns, "--out-dir", str(d["turns"] / "ref")])
        finally:
            wait_ranks(tmp, procs)
        yield d
    finally:
        torch.set_num_threads(n)


def assert_state_close(a: dict, b: dict, what: str):
    state_equal(a, b, atol=ATOL, what=what)


def assert_same_training(ref_dir: Path, ddp_dir: Path, step: int):
    ref, ddp = load_checkpoint(ref_dir / "ckpt.pt"), load_checkpoint(ddp_dir / "ckpt.pt")
    assert ref["step"] == ddp["step"] == step
    assert_state_close(ref["model"], ddp["model"], "model")
    assert_state_close(ref["ema"], ddp["ema"], "ema")
    assert_state_close(ref["targets"], ddp["targets"], "targets (EMA encoder + codebook)")
    for i, (sa, sb) in enumerate(zip(ref["optimizer"]["state"].values(), ddp["optimizer"]["state"].values())):
        assert_state_close(sa, sb, f"optimizer state {i}")


def test_ddp_with_understanding_turns_and_per_modality_attention_matches_single_process(runs):
    assert_same_training(runs["turns"] / "ref", runs["turns"] / "rank0", 2)
    ck = load_checkpoint(runs["turns"] / "rank0" / "ckpt.pt")
    assert ck["config"]["train"]["und_turns"] == 3 and not ck["config"]["model"]["mot"]["shared_attention"]


def test_ddp_matches_single_process(runs):
    ref, ddp = runs["resume"] / "ref", runs["resume"] / "rank0"
    assert_same_training(ref, ddp, 3)
    # the weights moved: this is not comparing two copies of the starting checkpoint
    start = load_checkpoint(runs["base"] / "ckpt.pt")["model"]
    assert not torch.allclose(start["pix_emb.weight"], load_checkpoint(ddp / "ckpt.pt")["model"]["pix_emb.weight"])
    # quantities computed after the collectives are global and must agree
    lr, ld = read_log(ref), read_log(ddp)
    assert [r["step"] for r in ld] == [1, 2, 3]
    for a, b in zip(lr[1:], ld[1:]):
        assert a["lr"] == b["lr"] and a["codes_used"] == b["codes_used"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=2e-3)
        assert a["code_perplexity"] == pytest.approx(b["code_perplexity"], abs=0.11)


def test_ddp_gradient_accumulation_matches_single_process(runs):
    ref, ddp = runs["resume"] / "ref", runs["accum"] / "rank0"
    assert_same_training(ref, ddp, 3)
    for a, b in zip(read_log(ref)[1:], read_log(ddp)[1:]):
        assert a["codes_used"] == b["codes_used"]
        for k in ("lm", "rep", "fm"):
            assert a[k] == pytest.approx(b[k], abs=2e-4), (k, a, b)


def test_ddp_with_packing_matches_single_process(runs):
    """2 ranks packing their examples into rows against one process with one padded batch."""
    ref, ddp = runs["resume"] / "ref", runs["packed"] / "rank0"
    assert_same_training(ref, ddp, 3)
    for a, b in zip(read_log(ref)[1:], read_log(ddp)[1:]):
        assert a["codes_used"] == b["codes_used"]
        for k in ("lm", "rep", "fm"):
            assert a[k] == pytest.approx(b[k], abs=2e-4), (k, a, b)


def test_ddp_rank1_writes_nothing(runs):
    for name in ("resume", "accum"):
        r1 = runs[name] / "rank1"
        assert sorted(p.name for p in r1.iterdir()) == ["ckpt.pt", "log.jsonl"]
        assert (r1 / "ckpt.pt").read_bytes() == runs["base_bytes"]  # read for resuming, never written
        assert len(read_log(r1)) == 1
    for name in ("fresh", "shapes"):
        r1 = runs[name] / "rank1"
        assert not r1.exists() or [p.name for p in r1.iterdir()] == []
    assert sorted(p.name for p in (runs["fresh"] / "rank0").iterdir()) == ["ckpt.pt", "log.jsonl"]
    r0 = runs["shapes"] / "rank0"
    assert sorted(p.name for p in r0.iterdir()) == ["ckpt.pt", "log.jsonl", "samples.png", "samples.txt",
                                                     "score.json"]
    assert json.loads((r0 / "score.json").read_text())["generation"]["n"] == 5 * 2


def test_ddp_fresh_run_matches_single_process(runs):
    ref = load_checkpoint(runs["base"] / "ckpt.pt")
    ddp = load_checkpoint(runs["fresh"] / "rank0" / "ckpt.pt")
    torch.testing.assert_close(ref["targets"]["vq.prototypes"], ddp["targets"]["vq.prototypes"], rtol=0, atol=ATOL)
    assert_same_training(runs["base"], runs["fresh"] / "rank0", 1)


def test_ddp_ablation_variants_match_single_process(runs):
    ref, ddp = runs["variants"] / "ref", runs["variants"] / "rank0"
    assert_same_training(ref, ddp, 2)
    ck = load_checkpoint(ddp / "ckpt.pt")
    assert ck["config"]["model"]["rep_target"] == "continuous" and ck["config"]["model"]["repa_weight"] == 0.5
    assert "repa_proj.net.0.weight" in ck["model"] and "rep.head.out.weight" in ck["model"]
    for a, b in zip(read_log(ref), read_log(ddp)):
        assert a["rep"] == pytest.approx(b["rep"], abs=2e-4) and a["rep"] > 0


def test_ddp_logged_losses_are_global(runs):
    lr, ld = read_log(runs["resume"] / "ref"), read_log(runs["resume"] / "rank0")
    for a, b in zip(lr[1:], ld[1:]):
        for k in ("lm", "rep", "fm"):
            assert a[k] == pytest.approx(b[k], abs=2e-4), (k, a, b)
