"""GPU check: everything worth measuring in the few minutes a GPU is lent, in one command
that finishes in under 8 minutes and ends with one summary table.

    bash experiments/gpu_check.sh                            # on the GPU machine
    python -m experiments.gpu_check --device cpu --quick     # the same stages, tiny, here (< 1 min)

Stages, in order:
  tests      `pytest -m cuda`: the tests with CUDA-only paths (tests/test_cuda.py)
  train      full training steps (EMA-encoder targets, forward + backward under bf16
             autocast, AdamW) of the `small` preset: s/step, tokens/s, MFU
  train-mid  the same for paper256's 760M-parameter trunk (dim 1024, depth 24) at batch 32 + 16
  ddp        train.py under torchrun, 2 processes (nccl), against 1 process: the logged losses
             of every step agree (needs two GPUs; on CPU, --quick checks the same with gloo)
  sample     cached against uncached sampling at the paper's 1024-px token counts
             (experiments.bench.paper1024_probe: 1,024 rep tokens, 4,096 pixel patches)

MFU = the step's analytic FLOPs (experiments.bench.train_step_flops) / seconds / the chip's
dense bf16 peak, looked up by device name in PEAK_BF16_TFLOPS (--peak-tflops overrides it; an
unknown chip gets "n/a" and the reason).

Each stage runs in its own subprocess (this module with --stage) under its own time limit,
and all limits together fit in --budget: a hang, a crash or an out-of-memory error is one
failed row of the table, and the other stages still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Dense (no 2:4 sparsity) bfloat16 tensor-core peaks from the vendor's data sheets, in
# TFLOP/s, matched against torch.cuda.get_device_name() in this order (the first match wins,
# so the more specific pattern comes first).
PEAK_BF16_TFLOPS = [
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\b(PCIe)\b", 756.0),
    (r"\bH100\b.*\b(SXM|HBM3)\b", 989.0),   # the SXM part reports itself as "H100 80GB HBM3"
    (r"\bA100\b", 312.0),
    (r"\bL4\b", 121.0),
]

STAGES = ("tests", "train", "train-mid", "ddp", "sample")
# seconds per stage on a GPU; together 450 s, inside the default 470 s budget
LIMITS = {"tests": 60, "train": 75, "train-mid": 90, "ddp": 75, "sample": 150}
QUICK_LIMITS = {"tests": 60, "train": 60, "train-mid": 60, "ddp": 90, "sample": 60}

# --quick: the toy recipe at the test suite's tiny widths on the 32 px world (as tests/conftest.py)
TINY = ["model.mot.dim=32", "model.mot.depth=2", "model.mot.heads=2", "model.vit.dim=32", "model.vit.depth=1",
        "model.vit.heads=2", "model.vq.codebook_size=16", "model.image_size=32", "model.patch_size=8",
        "model.vit.patch_size=4", "model.vq.pool=2"]
TINY_BATCH = ["train.batch_size=8", "train.und_batch_size=4"]


# ---- the numbers ------------------------------------------------------------------------------

def peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOP/s or None, where the number comes from or why there is none)."""
    if override:
        return override, "--peak-tflops"
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, f"{device_name} dense bf16 peak"
    return None, f"no bf16 peak known for {device_name!r}; pass --peak-tflops"


def mfu(flops_per_step: float, sec_per_step: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (in TFLOP/s); None without a peak."""
    if not peak:
        return None
    return flops_per_step / sec_per_step / (peak * 1e12)


def losses_agree(ref: list[dict], other: list[dict], tol: float) -> tuple[bool, float, str]:
    """Compare the per-step losses of two train.py log.jsonl files: (every step's lm, rep and fm
    within tol x max(1, |value|), the largest difference, a word on what differed)."""
    a = {r["step"]: r for r in ref if "fm" in r}
    b = {r["step"]: r for r in other if "fm" in r}
    if not a or a.keys() != b.keys():
        return False, math.inf, f"logged steps differ: {sorted(a)} vs {sorted(b)}"
    worst, where = 0.0, ""
    for step in sorted(a):
        for k in ("lm", "rep", "fm"):
            d = abs(a[step][k] - b[step][k]) / max(1.0, abs(a[step][k]))
            if math.isnan(d):
                return False, d, f"{k} at step {step} is nan"
            if d > worst:
                worst, where = d, f"{k} at step {step}"
    return worst <= tol, worst, where


# ---- the stages (each runs in a subprocess: `--stage NAME`) ------------------------------------

class Skipped(Exception):
    """A stage that does not apply here (no CUDA, one GPU): a row that says why."""


def dtype_of(args):
    import torch
    return {"bf16": torch.bfloat16, "fp32": None}[args.dtype]


def stage_tests(args) -> dict:
    import torch
    if args.device != "cuda" or not torch.cuda.is_available():
        raise Skipped("skipped: no CUDA")
    # pytest's own limit is a little under the stage's, so its summary still comes back on a hang
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                       cwd=ROOT, capture_output=True, text=True, timeout=max(10, args.limit - 10))
    print(r.stdout[-6000:], r.stderr[-3000:], sep="\n")
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else f"pytest exit {r.returncode}"
    if r.returncode == 5:
        return {"ok": False, "result": "no test is marked cuda"}
    return {"ok": r.returncode == 0, "result": summary}


def stage_train(args, name: str, overrides: list[str]) -> dict:
    import torch
    from experiments.bench import bench_train
    dev = torch.device(args.device)
    if args.peak_tflops:
        peak, why = args.peak_tflops, "--peak-tflops"
    elif dev.type != "cuda":
        peak, why = None, "no peak for a CPU; pass --peak-tflops"
    elif args.dtype != "bf16":
        peak, why = None, "the peak table is bf16's; pass --peak-tflops for fp32"
    else:
        peak, why = peak_tflops(torch.cuda.get_device_name(dev))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    warmup, repeat = (1, 1) if args.quick else (2, 5)
    r = bench_train(name, overrides, repeat=repeat, device=dev, dtype=dtype_of(args), warmup=warmup)
    u = mfu(r["flops"], r["sec"], peak)
    mem = f", peak memory {torch.cuda.max_memory_allocated(dev) / 2 ** 30:.1f} GiB" if dev.type == "cuda" else ""
    text = (f"{name}{' (tiny widths)' if args.quick else ''} {r['params_m']:.1f}M params, {args.dtype}: "
            f"{r['sec']:.3f} s/step, {r['tokens_s']:,.0f} tokens/s, {r['gflops'] / 1e3:.3g} TFLOP/s, MFU "
            + (f"{100 * u:.1f}% of {peak:g} TFLOP/s ({why})" if u is not None else f"n/a ({why})") + mem)
    ok = math.isfinite(r["loss"])
    return {"ok": ok, "result": text if ok else f"non-finite loss {r['loss']}; " + text,
            "numbers": {**r, "mfu": u, "peak_tflops": peak}}


def stage_ddp(args) -> dict:
    import torch
    if args.device == "cuda":
        n = torch.cuda.device_count()
        if n < 2:
            raise Skipped("skipped: one GPU" if n == 1 else "skipped: no CUDA")
        tol, what = 2e-2, "nccl, bf16"  # bf16 autocast: reduction order moves the 3rd digit
    elif not args.ddp_cpu:
        raise Skipped("skipped: no CUDA (--ddp-cpu runs it with gloo)")
    else:
        tol, what = 2e-4, "gloo on CPU, float32"
    # the toy recipe (tiny widths with --quick), 3 steps, the global batch split over the ranks
    common = ["train.py", "--config", "toy", "--max-steps", str(args.ddp_steps), "--device", args.device,
              "--eval-per-kind", "0", "--set", "train.log_every=1", "--set", "train.ckpt_every=0"]
    for kv in (TINY + TINY_BATCH if args.quick else []):
        common += ["--set", kv]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.device == "cpu":
        env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        deadline = time.time() + args.limit - 12  # room to stop torchrun cleanly before the driver's kill

        def run(cmd) -> int:
            # torchrun starts each worker in a session of its own, out of reach of the driver's
            # process-group kill; on SIGTERM it stops them itself, so a late run gets SIGTERM first
            p = subprocess.Popen(cmd, cwd=ROOT, env=env)
            try:
                return p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(timeout=8)
                except subprocess.TimeoutExpired:
                    p.kill()
                raise
        # one after the other: side by side, the 1-process run and rank 0 would share GPU 0
        r1 = run([sys.executable, *common, "--out-dir", str(one)])
        if r1:
            return {"ok": False, "result": f"1 process: train.py exit {r1}"}
        r2 = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  *common, "--out-dir", str(two)])
        if r2:
            return {"ok": False, "result": f"torchrun 2 processes: exit {r2}"}
        read = lambda d: [json.loads(ln) for ln in (d / "log.jsonl").read_text().splitlines()]
        ok, worst, where = losses_agree(read(one), read(two), tol)
    text = (f"2 processes ({what}) vs 1, {args.ddp_steps} steps: lm/rep/fm of every step agree, largest "
            f"relative difference {worst:.1e}{' (' + where + ')' if where else ''}, tolerance {tol:g}")
    return {"ok": ok, "result": text if ok else "DIFFER: " + text, "numbers": {"worst": worst}}


def stage_sample(args) -> dict:
    import torch
    from experiments.bench import paper1024_probe
    overrides = ["model.image_size=128"] if args.quick else []  # 16 rep tokens, 64 pixel patches
    r = paper1024_probe(args.sample_dim, args.sample_depth, args.sample_heads, args.sample_fit,
                        device=torch.device(args.device), dtype=dtype_of(args), overrides=overrides)
    text = (f"{r['n_rep']} rep + {r['n_pix']} pixel tokens, trunk dim {r['dim']} depth {r['depth']} heads {r['heads']}, "
            f"{args.dtype}, batch 1, no CFG: decode cached {r['decode_cached_s']:.2f} s / uncached "
            f"{r['decode_uncached_s']:.2f} s{' (fitted)' if r['fit'] else ''} "
            f"({r['decode_uncached_s'] / r['decode_cached_s']:.1f}x); one ODE step cached {1e3 * r['step_cached_s']:.1f} / "
            f"uncached {1e3 * r['step_uncached_s']:.1f} / pixels alone {1e3 * r['step_pixels_alone_s']:.1f} ms; "
            f"per image at 25 steps {r['per_image_cached_s']:.2f} / {r['per_image_uncached_s']:.2f} s "
            f"({r['per_image_uncached_s'] / r['per_image_cached_s']:.1f}x)")
    return {"ok": True, "result": text, "numbers": r}


def run_stage(args) -> dict:
    if args.device == "cpu" and args.quick:
        import torch
        torch.set_num_threads(1)  # tiny tensors: one thread beats two contended ones (tests/conftest.py)
    if args.stage == "tests":
        return stage_tests(args)
    if args.stage == "train":
        return stage_train(args, args.train_config, (TINY + TINY_BATCH if args.quick else []) + args.train_set)
    if args.stage == "train-mid":
        mid = (TINY + TINY_BATCH if args.quick
               else ["train.batch_size=32", "train.und_batch_size=16"])
        return stage_train(args, args.mid_config, mid + args.mid_set)
    if args.stage == "ddp":
        return stage_ddp(args)
    if args.stage == "sample":
        return stage_sample(args)
    raise ValueError(f"unknown stage {args.stage!r}")


def stage_main(args):
    """Run one stage and write {"status", "result", ...} to --result; the exit code says ok."""
    if args.limit is None:  # run by hand, not by the driver
        args.limit = (QUICK_LIMITS if args.quick else LIMITS)[args.stage]
    if args.result is None:
        args.result = os.devnull
    try:
        out = run_stage(args)
        out["status"] = "ok" if out.pop("ok") else "FAIL"
    except Skipped as e:
        out = {"status": "skipped", "result": str(e)}
    except subprocess.TimeoutExpired as e:
        cmd = " ".join(map(str, e.cmd))
        out = {"status": "timeout", "result": f"{cmd[:80]}{'...' if len(cmd) > 80 else ''}: stopped at the stage's limit"}
    except Exception as e:  # reported in the table; the traceback goes to the log above it
        import traceback
        traceback.print_exc()
        out = {"status": "FAIL", "result": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    print(f"[{args.stage}] {out['status']}: {out['result']}", flush=True)
    Path(args.result).write_text(json.dumps(out, default=float))
    sys.exit(0 if out["status"] in ("ok", "skipped") else 1)


# ---- the driver --------------------------------------------------------------------------------

def launch(stage: str, argv: list[str], limit: float) -> dict:
    """Run one stage in a subprocess of its own (its own process group, so a timeout also ends
    what it started: pytest, torchrun's workers) and read back its result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    t0 = time.time()
    p = subprocess.Popen([sys.executable, "-m", "experiments.gpu_check", *argv, "--stage", stage, "--result", path,
                          "--limit", str(limit)], cwd=ROOT, start_new_session=True)
    try:
        p.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun, if running, then stops its workers (they are in sessions of their own)
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        res = {"status": "timeout", "result": f"killed after its {limit:.0f}s limit"}
    else:
        try:
            res = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            res = {"status": "FAIL", "result": f"exit {p.returncode} without a result (crashed: see the log above)"}
    finally:
        Path(path).unlink(missing_ok=True)
    res["seconds"] = time.time() - t0
    return res


def table(rows: list[tuple[str, dict]]) -> str:
    """The summary: one row per stage, columns stage | status | time | result."""
    head = ("stage", "status", "time", "result")
    body = [(name, r["status"], f"{r['seconds']:.0f}s", r["result"]) for name, r in rows]
    w = [max(len(x[i]) for x in [head, *body]) for i in range(3)]
    fmt = lambda x: f"{x[0]:<{w[0]}}  {x[1]:<{w[1]}}  {x[2]:>{w[2]}}  {x[3]}"
    return "\n".join([fmt(head), fmt(("-" * w[0], "-" * w[1], "-" * w[2], "-" * 6)), *map(fmt, body)])


def describe(device: str) -> str:
    import torch
    if device == "cuda":
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The GPU check: CUDA tests, bf16 training MFU, nccl DDP, cached vs "
                                            "uncached sampling at 1024-px token counts; one summary table.")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, to check every stage's logic (on CPU well under a minute)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="autocast dtype of training and sampling (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the chip's peak TFLOP/s for MFU, instead of the PEAK_BF16_TFLOPS table")
    p.add_argument("--budget", type=float, default=470,
                   help="seconds all stages may take together; stage limits are cut to fit (default 470)")
    p.add_argument("--limit-for", action="append", default=[], metavar="STAGE=SECONDS",
                   help="change one stage's time limit (repeatable)")
    p.add_argument("--train-config", default="small", help="preset of the train stage (default: small)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the train stage (repeatable)")
    p.add_argument("--mid-config", default="paper256",
                   help="preset of the train-mid stage (default: paper256, at batch 32 + 16)")
    p.add_argument("--mid-set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the train-mid stage (repeatable)")
    p.add_argument("--ddp-steps", type=int, default=3, help="optimiser steps of the DDP comparison")
    p.add_argument("--ddp-cpu", action="store_true",
                   help="with --device cpu, run the DDP comparison with gloo instead of skipping it "
                        "(~30 s on 2 shared cores: 4 Python start-ups)")
    p.add_argument("--sample-dim", type=int, default=None,
                   help="trunk width of the 1024-px sampling probe (default: 1024 on cuda, the paper1024 "
                        "preset's; 32 with --quick; 64 otherwise)")
    p.add_argument("--sample-depth", type=int, default=None, help="its blocks (default: 24 on cuda; 1 --quick; 2)")
    p.add_argument("--sample-heads", type=int, default=None, help="its heads (default: 16 on cuda; 2 otherwise)")
    p.add_argument("--sample-fit", action=argparse.BooleanOptionalAction, default=None,
                   help="fit the uncached decode from 9 prefix lengths instead of timing all 1,024 "
                        "(default: fit on cuda, where the full trunk is deep; measure all otherwise)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    # set by the driver for the subprocess that runs one stage
    p.add_argument("--stage", default=None, help="internal: run only this stage, in this process")
    p.add_argument("--result", default=None, help="internal: where --stage writes its result")
    p.add_argument("--limit", type=float, default=None, help="internal: the stage's time limit in seconds")
    args = p.parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    gpu = args.device == "cuda" and not args.quick
    for name, gpu_default, quick_default, cpu_default in (("sample_dim", 1024, 32, 64), ("sample_depth", 24, 1, 2),
                                                          ("sample_heads", 16, 2, 2)):
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if gpu else quick_default if args.quick else cpu_default)
    if args.sample_fit is None:
        args.sample_fit = gpu
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.stage:
        return stage_main(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        sys.exit(f"gpu_check: unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGES)}")
    limits = dict(QUICK_LIMITS if args.quick else LIMITS)
    for item in args.limit_for:
        k, _, v = item.partition("=")
        if k not in STAGES or not v:
            sys.exit(f"gpu_check: bad --limit-for {item!r}; expected STAGE=SECONDS")
        limits[k] = float(v)
    # the driver's own flags go to every stage as they are (the stage ignores --json)
    passed = list(argv)
    header = f"GPU check on {describe(args.device)}" + (" (--quick: tiny sizes)" if args.quick else "")
    print(header, flush=True)
    deadline, rows = time.time() + args.budget, []
    for stage in stages:
        left = deadline - time.time()
        if left < 5:
            rows.append((stage, {"status": "timeout", "result": "no time left in --budget", "seconds": 0}))
            continue
        print(f"\n=== {stage} (limit {min(limits[stage], left):.0f}s) ===", flush=True)
        rows.append((stage, launch(stage, passed, min(limits[stage], left))))
    print("\n" + header)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "stages": dict(rows)}, indent=1, default=float) + "\n")
    # the exit code: 0 unless a stage failed or ran out of time (skipped is fine)
    return 0 if all(r["status"] in ("ok", "skipped") for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
