"""The paper's central ablations in miniature (Table 3a-c), every variant on the same budget.

    python -m experiments.ablate                          # all four variants, seeds 0 and 1, toy preset
    python -m experiments.ablate --variants rf no-rf      # Table 3a only
    python -m experiments.ablate --seeds 0 1 2 --max-steps 700 --out-dir out/ablate
    python -m experiments.ablate --cfg-interval 0 0.5     # sample.py's sampler flags: every variant scored alike

Each variant x seed is one `train.py` run in its own process (so every run has the
machine to itself and its wall-clock is honest), then `nanorf.eval` scores it on the
same held-out prompts and images, with the same sampler settings (each checkpoint's own, or
the ones sample.py's flags give): strict accuracy per prompt kind (GenEval's rules, nothing
extra allowed), the overall mean, GenEval's lenient overall and the extra objects per image
beside it, and understanding per question kind. A run whose checkpoint already reached the
budget is reused, and so is its score when it is newer than the checkpoint and used the same
--n-per-kind and sampler flags, so an interrupted ablation picks up where it stopped. Writes
<out-dir>/results.md (the table, mean +- half the range over seeds, and RF's gain over
pixel-only), results.json, and grid.png (the same counting, two-object and position prompts,
one row per variant, seed 0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nanorf.sampler import add_sampling_args, sampling_argv, sampling_overrides

VARIANTS = {
    "rf": [],                                   # discrete rep tokens (the method)
    "no-rf": ["--no-rf"],                       # Table 3a: pixels only
    "repa": ["--no-rf", "--repa"],              # Table 3b: no rep tokens, REPA alignment loss instead
    "continuous": ["--continuous-rep"],         # Table 3c: continuous rep targets, per-position diffusion head
}
# the paper's numbers beside ours (Table 3a-c, pixel space, GenEval overall)
PAPER = {"rf": 0.76, "no-rf": 0.25, "repa": 0.43, "continuous": 0.26}
GEN_KEYS = ("single", "two", "counting", "position", "located", "overall", "lenient_overall", "extras")
UND_KEYS = ("describe", "count", "where", "shape", "color")


def run(cmd, log):
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"experiments.ablate: error: {' '.join(cmd)} failed (exit {r.returncode}); see {log}")


def score_is_fresh(ev: Path, ck: Path, n_per_kind: int, sampling: dict) -> bool:
    """A saved nanorf.eval score (ev) is of this checkpoint, at this --n-per-kind, with these
    sampler overrides (a score saved without them used the checkpoint's own settings)."""
    if not ev.exists() or ev.stat().st_mtime < ck.stat().st_mtime:
        return False
    r = json.loads(ev.read_text())
    return r.get("n_per_kind") == n_per_kind and r.get("sampling", {}) == json.loads(json.dumps(sampling))


def main(argv=None):
    p = argparse.ArgumentParser(description="Train and score RF vs pixel-only with the same budget.")
    p.add_argument("--config", default="toy", help="preset to train (default: toy)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds per variant")
    p.add_argument("--max-steps", type=int, default=None, help="steps per run (default: the preset's)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="variants to run")
    p.add_argument("--n-per-kind", type=int, default=50,
                   help="held-out prompts per prompt kind to score (and twice as many images for understanding)")
    p.add_argument("--out-dir", default="out/ablate", help="where runs, table and grid go")
    p.add_argument("--vit-init", default=None,
                   help="every run starts its ViT from these weights (experiments.pretrain_vit; the paper's DINOv3)")
    add_sampling_args(p)  # each overrides every checkpoint's own sampling setting, in the scores and the grid
    args = p.parse_args(argv)
    args.sampling = sampling_overrides(args)
    from nanorf.checkpoint import load_checkpoint
    from nanorf.presets import get_config
    steps = args.max_steps or get_config(args.config).train.max_steps
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for v in args.variants:
        for seed in args.seeds:
            d = out / f"{v}-s{seed}"
            ck = d / "ckpt.pt"
            done = False
            if ck.exists():
                prev = load_checkpoint(ck)
                if prev["config"]["train"].get("vit_init", "") != (args.vit_init or ""):
                    sys.exit(f"experiments.ablate: error: {d} was trained with another --vit-init; use another --out-dir")
                done = prev["step"] >= steps
            wall = None
            if not done:
                t0 = time.time()
                run([sys.executable, "train.py", "--config", args.config, "--out-dir", str(d), "--seed", str(seed),
                     "--max-steps", str(steps), "--eval-per-kind", "0", *VARIANTS[v],
                     *(["--vit-init", args.vit_init] if args.vit_init else [])], out / f"{v}-s{seed}.train.log")
                wall = time.time() - t0
                (d / "wall.txt").write_text(f"{wall:.0f}\n")
            elif (d / "wall.txt").exists():
                wall = float((d / "wall.txt").read_text())
            ev = d / "eval.json"
            if not score_is_fresh(ev, ck, args.n_per_kind, args.sampling):
                run([sys.executable, "-m", "nanorf.eval", "--ckpt", str(ck), "--n-per-kind", str(args.n_per_kind),
                     "--n-images", str(2 * args.n_per_kind), "--json", str(ev), *sampling_argv(args.sampling)],
                    out / f"{v}-s{seed}.eval.log")
                r = json.loads(ev.read_text())
                ev.write_text(json.dumps({**r, "n_per_kind": args.n_per_kind}))
            r = json.loads(ev.read_text())
            r["wall_s"] = wall
            results[(v, seed)] = r
            g = r["generation"]
            print(f"{v} seed {seed}: strict overall {g['overall']:.3f}, lenient {g['lenient_overall']:.3f}, "
                  f"extras {g['extras']:.2f}" + (f", {wall:.0f}s" if wall else ""), flush=True)
    write_table(results, args, steps, out)
    write_grid(args, out)


def write_table(results, args, steps, out: Path):
    def cell(v, group, key):
        xs = [results[(v, s)][group][key] for s in args.seeds]
        return f"{np.mean(xs):.3f} ± {(max(xs) - min(xs)) / 2:.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    lines = [f"Shapes world v2, `{args.config}` preset, {steps} steps, seeds {args.seeds}, {args.n_per_kind} held-out "
             f"prompts per kind and {2 * args.n_per_kind} held-out images; strict accuracy per kind (extras per image: "
             f"mean count); mean ± half the range over seeds"
             + (f"; every ViT starts from `{args.vit_init}`" if args.vit_init else "")
             + (f"; every run sampled with {args.sampling}" if getattr(args, "sampling", None) else "") + ".", "",
             "| variant | paper GenEval (Table 3) | " + " | ".join(GEN_KEYS) + " | wall-clock per seed |",
             "|---|---|" + "---|" * (len(GEN_KEYS) + 1)]
    for v in args.variants:
        # per seed, not a mean: a run this call did not train (or whose wall.txt is gone) has no
        # time, and a mean over the others would pass for the variant's
        walls = [results[(v, s)]["wall_s"] for s in args.seeds]
        wall = " / ".join(f"{w / 60:.1f}" if w else "n/a" for w in walls) + (" min" if any(walls) else "")
        lines.append(f"| {v} | {PAPER[v]:.2f} | " + " | ".join(cell(v, "generation", k) for k in GEN_KEYS)
                     + f" | {wall} |")
    if "rf" in args.variants and "no-rf" in args.variants:
        gap = [results[("rf", s)]["generation"]["overall"] - results[("no-rf", s)]["generation"]["overall"]
               for s in args.seeds]
        lines += ["", f"RF − pixel-only, strict overall, per seed: {', '.join(f'{g:+.3f}' for g in gap)} "
                      f"(mean {np.mean(gap):+.3f})"]
    lines += ["", "| variant (understanding, exact match) | " + " | ".join(UND_KEYS) + " |",
              "|---|" + "---|" * len(UND_KEYS)]
    for v in args.variants:
        lines.append(f"| {v} | " + " | ".join(cell(v, "understanding", k) for k in UND_KEYS) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({f"{v}-s{s}": r for (v, s), r in results.items()}, indent=1))
    print("\n".join(lines))


def write_grid(args, out: Path):
    """Seed-0 checkpoints of each variant on the same held-out prompts (3 counting, 3 two-object,
    2 position), one row each."""
    import torch
    from nanorf.checkpoint import load_model
    from nanorf.data import held_out_prompts
    from nanorf.patches import tensor_to_images
    from nanorf.sampler import save_grid, text_to_image
    rows, prompts = [], None
    for v in args.variants:
        model, cfg, _ = load_model(out / f"{v}-s{args.seeds[0]}" / "ckpt.pt")
        prompts = prompts or ([p.text for p in held_out_prompts(3, kinds=("counting", "two"))]
                              + [p.text for p in held_out_prompts(2, kinds=("position",))])
        x, _ = text_to_image(model, prompts, torch.Generator().manual_seed(0), **args.sampling)
        rows += tensor_to_images(x)
    save_grid(rows, out / "grid.png", ncol=len(prompts), scale=4)
    (out / "grid.txt").write_text("rows: " + ", ".join(args.variants) + "\n" + "\n".join(prompts) + "\n")


if __name__ == "__main__":
    main()
