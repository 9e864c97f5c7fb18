"""experiments.gpu_check: the MFU arithmetic and the peak table on hand-made cases, the DDP
loss comparison, and the whole check in its CPU dry mode (every stage at tiny sizes; the
CUDA-only stages say why they skipped)."""

import json
import math
import subprocess

import pytest

from experiments.gpu_check import STAGES, losses_agree, mfu, peak_tflops, table

from conftest import ROOT, subprocess_env


def test_mfu_hand_computed():
    # 6e12 FLOPs a step in 0.02 s = 300 TFLOP/s; on a 989 TFLOP/s chip that is 30.33%
    assert mfu(6e12, 0.02, 989.0) == pytest.approx(300 / 989)
    assert mfu(6e12, 0.02, 1000.0) == pytest.approx(0.3)
    assert mfu(6e12, 0.02, None) is None


def test_peak_table_and_override():
    assert peak_tflops("NVIDIA H200")[0] == 989.0
    assert peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert peak_tflops("NVIDIA L4")[0] == 121.0
    peak, why = peak_tflops("NVIDIA L40S")  # not the L4: unknown, said so
    assert peak is None and "L40S" in why and "--peak-tflops" in why
    assert peak_tflops("NVIDIA L40S", 362.0) == (362.0, "--peak-tflops")


def test_losses_agree():
    ref = [{"step": 1, "lm": 5.0, "rep": 2.0, "fm": 0.5}, {"step": 2, "lm": 4.0, "rep": 1.9, "fm": 0.4},
           {"event": "bad_items"}]  # records that are not steps are ignored
    close = [dict(r, fm=r["fm"] + 1e-3) if "fm" in r else r for r in ref]
    ok, worst, where = losses_agree(ref, close, 2e-3)
    assert ok and worst == pytest.approx(1e-3) and where.startswith("fm at step")
    assert not losses_agree(ref, close, 1e-4)[0]
    assert not losses_agree(ref, ref[:1], 1.0)[0]  # a missing step
    nan = [dict(r, lm=math.nan) if "fm" in r else r for r in ref]
    assert not losses_agree(ref, nan, 1.0)[0]


def test_table_columns():
    rows = [("train", {"status": "ok", "seconds": 12.3, "result": "0.1 s/step"}),
            ("ddp", {"status": "skipped", "seconds": 0.4, "result": "skipped: one GPU"})]
    lines = table(rows).splitlines()
    assert lines[0].split() == ["stage", "status", "time", "result"]
    assert lines[2].split()[:3] == ["train", "ok", "12s"] and lines[3].endswith("skipped: one GPU")


def test_cpu_dry_run_prints_one_row_per_stage(tmp_path):
    out = tmp_path / "check.json"
    r = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_check.sh"), "--device", "cpu", "--quick",
                        "--json", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       env=subprocess_env(), timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tail = r.stdout[r.stdout.rindex("stage  "):].splitlines()
    assert tail[0].split() == ["stage", "status", "time", "result"]
    assert [ln.split()[0] for ln in tail[2:]] == list(STAGES)
    res = json.loads(out.read_text())["stages"]
    assert res["tests"] == {**res["tests"], "status": "skipped", "result": "skipped: no CUDA"}
    assert res["ddp"]["status"] == "skipped" and res["ddp"]["result"].startswith("skipped: no CUDA")
    for stage in ("train", "train-mid", "sample"):
        assert res[stage]["status"] == "ok", res[stage]
    for stage in ("train", "train-mid"):
        n = res[stage]["numbers"]
        assert n["sec"] > 0 and n["flops"] > 0 and math.isfinite(n["loss"]) and n["mfu"] is None
        assert "MFU n/a (no peak for a CPU" in res[stage]["result"]
    s = res["sample"]["numbers"]
    assert (s["n_rep"], s["n_pix"]) == (16, 64) and s["decode_cached_s"] > 0 and s["per_image_uncached_s"] > 0
