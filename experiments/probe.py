"""What the representation tokens carry, and what the pixel block does with them.

    python -m experiments.probe --ckpt out/ablate/rf-s0/ckpt.pt [--n 64] [--json probe.json]
    python -m experiments.probe --ckpt out/toy/ckpt.pt --cfg-interval 0 0.5   # sample.py's sampler flags

RF's claim (docs/method.md, "Ablations (Table 3)"; the paper's Table 3a) is that the rep tokens plan the picture and the pixel
block follows the plan. When a checkpoint falls short, this says which half fails:

  codebook      how many of the K codes the held-out images use, and their perplexity
                (exp of the entropy of the code histogram), for real images and for the
                sampled rep tokens.
  plan alone    how often the sampled rep tokens by themselves already get the layout
                right. Each code is drawn as the mean image patch it stood for in training
                (kept with the codebook; sample.py --rep-map draws plans the same way), and
                the mosaic is scored like any sample. "real" draws the held-out image's own
                codes the same way: the most that this rendering of codes can show.
  plan-swap     does the plan decide the picture? For held-out prompts that leave the cells
                open (single, two, counting, position), a real image of a scene that fits
                the prompt is drawn; the pixel block paints from the prompt and that image's
                rep tokens, and `plan_following` is the fraction of the scene's objects drawn
                in that image's cells (its colour and shape in its cell). The baseline paints
                the same prompts with the plan hidden (cfg_mode "norep"): what a picture that
                ignores the plan scores by chance. RF's claim is plan-following near 1.
  pixels given  the pixel block's samples, scored, when it is given (a) its own sampled
                rep tokens, as in normal sampling; (b) none: the rep sequence hidden from
                the pixel block in both CFG branches (cfg_mode "norep"); (c) the codes of
                the real held-out image of the same scene (teacher forcing the plan).
                (c) high and (a) low: the planner is wrong; (c) low: the pixel block cannot
                draw even a right plan.

The EMA encoder and codebook come from the checkpoint's "targets" (they are not part of
the sampling model). Continuous-target checkpoints skip the code parts.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace

import torch

from nanorf.data import KINDS, draw_scene, held_out_prompts, render
from nanorf.eval import detect, score_images
from nanorf.patches import images_to_tensor, tensor_to_images
from nanorf.config import SamplingSettings
from nanorf.sampler import (add_sampling_args, draw_plan, sample_pixels, sampling_overrides, settings_for,
                            text_to_image)
from nanorf.targets import RepresentationTargets, targets_from_checkpoint
from nanorf.vq import codebook_stats

OPEN_KINDS = ("single", "two", "counting", "position")   # the kinds whose prompts leave the cells open
KEYS = ("single", "two", "counting", "position", "located", "overall", "lenient_overall", "extras")


def usage(codes: torch.Tensor, K: int) -> dict:
    """Distinct codes and the perplexity of their histogram over all positions of (B, N) ids."""
    st = codebook_stats(codes, K)
    return {"codes_used": st["used"], "perplexity": st["perplexity"]}


@torch.no_grad()
def plan_following(images, scenes) -> float:
    """Fraction of the scenes' objects that the images draw in the same cell with the same
    colour and shape (each detection matched at most once)."""
    hit = total = 0
    for img, scene in zip(images, scenes):
        found = [(d.color, d.shape, d.position) for d in detect(img)]
        for o in scene.objects:
            total += 1
            if (o.color, o.shape, o.position) in found:
                found.remove((o.color, o.shape, o.position))
                hit += 1
    return hit / max(1, total)


@torch.no_grad()
def plan_swap(model, targets: RepresentationTargets, n: int = 64, seed: int = 0,
              settings: SamplingSettings | None = None) -> dict:
    """Paint held-out open-cell prompts from a real fitting image's plan, and with no plan.
    settings: the sampler's (default: the checkpoint's own)."""
    cfg, s = model.cfg, settings_for(model, settings)
    held = [p for p in held_out_prompts(-(-n // len(OPEN_KINDS)), kinds=OPEN_KINDS)][:n]
    rng = random.Random(4321)
    scenes = [draw_scene(p, rng) for p in held]
    real = images_to_tensor([render(s, cfg.image_size, rng) for s in scenes])
    plan = targets(real, update=False)                                            # (B, N) the real images' codes
    ids = [model.tok.encode(p.text, cfg.max_text_len) for p in held]
    out = {"n": len(held)}
    for name, mode in (("with_real_plan", s.cfg_mode), ("no_plan", "norep")):
        x = sample_pixels(model, ids, plan, replace(s, cfg_mode=mode), torch.Generator().manual_seed(seed))
        out[f"plan_following_{name}"] = round(plan_following(tensor_to_images(x), scenes), 4)
    return out


def probe(model, targets: RepresentationTargets | None, n: int = 64, seed: int = 0,
          settings: SamplingSettings | None = None) -> dict:
    """Every row of the module docstring, on n held-out prompts. settings: the sampler's, the same
    for every row (default: the checkpoint's own)."""
    cfg, s = model.cfg, settings_for(model, settings)
    held = held_out_prompts(-(-n // len(KINDS)))               # nanorf.eval's prompts, whole rounds of kinds
    prompts, rng = [p.text for p in held], random.Random(1234)
    real = images_to_tensor([render(draw_scene(p, rng), cfg.image_size, rng) for p in held])  # a scene fitting each
    score = lambda x: {k: round(v, 4) for k, v in score_images(tensor_to_images(x), held).items() if k in KEYS}
    out = {"n": len(held), "real_images": score(real)}

    x, codes = text_to_image(model, prompts, torch.Generator().manual_seed(seed), settings=s)
    out["pixels_given_sampled_reps"] = score(x)
    if not cfg.rf:
        return out
    x, _ = text_to_image(model, prompts, torch.Generator().manual_seed(seed), settings=s, cfg_mode="norep")
    out["pixels_given_no_reps"] = score(x)
    true = targets(real, update=False)                                            # ids or features
    ids = [model.tok.encode(p, cfg.max_text_len) for p in prompts]
    x = sample_pixels(model, ids, true, s, torch.Generator().manual_seed(seed))
    out["pixels_given_real_reps"] = score(x)
    if targets.vq is not None:
        K = cfg.vq.codebook_size
        out["codebook_real"], out["codebook_sampled"] = usage(true, K), usage(codes, K)
        patches = targets.code_patches                                            # (K, s*s*3) mean patch per code
        out["plan_alone_sampled"] = score(draw_plan(codes, patches))
        out["plan_alone_real"] = score(draw_plan(true, patches))
    out["plan_swap"] = plan_swap(model, targets, n, seed, s)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Which half of RF falls short: the rep-token plan or the pixels.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (ckpt.pt, ckpt.dcp, or the run's out-dir)")
    p.add_argument("--n", type=int, default=64, help="held-out prompts (and their real renders) to use")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", help="also write the results to this JSON file")
    add_sampling_args(p)  # each overrides the checkpoint's own sampling setting, on every row
    args = p.parse_args(argv)
    from nanorf.checkpoint import CheckpointError, load_checkpoint, load_model
    try:
        if args.n < 1:
            raise CheckpointError("--n must be at least 1")
        ck = load_checkpoint(args.ckpt)
        model, cfg, step = load_model(args.ckpt, ck=ck)
    except CheckpointError as e:
        print(f"experiments.probe: error: {e}", file=sys.stderr)
        sys.exit(2)
    targets = targets_from_checkpoint(ck, cfg.model, model.vit)
    sampling = sampling_overrides(args)
    r = probe(model, targets, args.n, args.seed, settings_for(model, **sampling))
    print(f"{args.ckpt} (step {step}): {args.n} held-out prompts and their real renders"
          + (f"; sampling {sampling}" if sampling else ""))
    print("| images scored | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for name, v in r.items():
        if isinstance(v, dict) and "overall" in v:
            print(f"| {name} | " + " | ".join(f"{v[k]:.3f}" for k in KEYS) + " |")
    for name in ("codebook_real", "codebook_sampled"):
        if name in r:
            print(f"{name}: {r[name]['codes_used']} of {cfg.model.vq.codebook_size} codes, "
                  f"perplexity {r[name]['perplexity']:.1f}")
    if "plan_swap" in r:
        ps = r["plan_swap"]
        print(f"plan-swap on {ps['n']} open-cell prompts: objects drawn in the real plan's cells "
              f"{ps['plan_following_with_real_plan']:.3f} with its plan, {ps['plan_following_no_plan']:.3f} with none")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ckpt": args.ckpt, "step": step, "sampling": sampling, **r}, f, indent=1)


if __name__ == "__main__":
    main()
