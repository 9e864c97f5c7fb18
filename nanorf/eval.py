"""Shapes-world evaluation: GenEval-style generation scores and understanding accuracy.

    python -m nanorf.eval --ckpt out/toy/ckpt.pt [--n 64] [--json out/toy/eval.json]

Generation. Prompts are held-out captions of the shapes world (data.held_out_prompts):
their exact wording never appears in training. Each image is scored by pixel analysis
(data.score_image), and the scores are grouped as GenEval groups its tasks:
  single      one-object prompts: the object has its colour, shape and cell
  two         two-object prompts: both objects have colour, shape and cell
  colors      an object of the asked colour is present
  position    the asked colour sits in the asked cell
  color_attr  two-object prompts: each shape carries its own colour
  overall     the mean of the five (as GenEval averages its tasks)
plus "object" (colour, shape and cell all right, over all objects: the headline
number of the toy) and "exact" (the whole scene right, nothing extra).

Understanding. Held-out images (test split), greedy answers to every question the
world asks about them: colour, shape and position questions by exact match, and the
caption parsed back into a scene and compared with the true one.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .data import ShapesWorld, held_out_prompts, parse_caption, score_image
from .model import RFModel, images_to_tensor, tensor_to_images
from .sampler import answer, text_to_image


@torch.no_grad()
def generation_score(model: RFModel, n: int = 64, seed: int = 0, batch_size: int = 64,
                     prompt_seed: int = 1234, **sample_overrides) -> dict:
    """Sample one image per held-out prompt and score it. Returns the groups above, "n",
    and the samples under "images" / "prompts" (for a grid)."""
    pairs = held_out_prompts(n, seed=prompt_seed, size=model.cfg.image_size)
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, n, batch_size):
        chunk = pairs[i:i + batch_size]
        x, _ = text_to_image(model, [p for p, _ in chunk], generator=gen, **sample_overrides)
        images += tensor_to_images(x)
    out = group_scores(images, [s for _, s in pairs])
    out["images"], out["prompts"] = images, [p for p, _ in pairs]
    return out


def group_scores(images, scenes) -> dict:
    """(H, W, 3) uint8 images and the scenes they should show -> the GenEval groups above."""
    rows = []
    for img, scene in zip(images, scenes):
        s = score_image(img, scene)
        s["all_objects"] = float(s["object"] == 1.0)
        rows.append((len(scene.objects), s))

    def mean(key, n_obj=None):
        vals = [s[key] for k, s in rows if n_obj is None or k == n_obj]
        return sum(vals) / len(vals) if vals else float("nan")
    out = {"n": len(rows), "object": mean("object"), "exact": mean("exact"),
           "single": mean("object", 1), "two": mean("all_objects", 2),
           "colors": mean("color"), "position": mean("position"),
           # score_image's "shape" asks for the shape in the object's own colour: attribution
           "color_attr": mean("shape", 2)}
    out["overall"] = sum(out[k] for k in ("single", "two", "colors", "position", "color_attr")) / 5
    return out


def question_kind(q: str) -> str:
    return ("caption" if q.startswith("describe") else "color" if q.startswith("what color")
            else "position" if q.startswith("where") else "shape")


@torch.no_grad()
def understanding_score(model: RFModel, n: int = 64, seed: int = 4321, batch_size: int = 64) -> dict:
    """Accuracy per question kind on n held-out images (all their questions)."""
    world = ShapesWorld(model.cfg.image_size, seed=seed, split="test")
    items = [world[i] for i in range(n)]
    qa = [(it, q, a) for it in items for q, a in it["qa"]]
    right = {}
    for i in range(0, len(qa), batch_size):
        chunk = qa[i:i + batch_size]
        imgs = images_to_tensor([it["image"] for it, _, _ in chunk]).to(next(model.parameters()).device)
        outs = answer(model, imgs, [q for _, q, _ in chunk], max_new_tokens=80)
        for (it, q, a), o in zip(chunk, outs):
            kind = question_kind(q)
            ok = parse_caption(o) == it["scene"] if kind == "caption" else o.strip() == a
            right.setdefault(kind, []).append(float(ok))
    out = {k: sum(v) / len(v) for k, v in sorted(right.items())}
    out["n_images"], out["n_questions"] = n, len(qa)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a nanorf checkpoint on held-out shapes-world prompts and images.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--n", type=int, default=64, help="held-out prompts (and held-out images) to score")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", help="also write the scores to this JSON file")
    p.add_argument("--raw", action="store_true", help="score the raw weights instead of the EMA weights")
    args = p.parse_args(argv)
    from .checkpoint import CheckpointError, load_model
    try:
        model, cfg, step = load_model(args.ckpt, ema=not args.raw)
    except CheckpointError as e:
        print(f"nanorf.eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.n < 1:
        print("nanorf.eval: error: --n must be at least 1", file=sys.stderr)
        sys.exit(2)
    g = generation_score(model, n=args.n, seed=args.seed)
    u = understanding_score(model, n=args.n)
    gen = {k: v for k, v in g.items() if k not in ("images", "prompts")}
    print(f"{args.ckpt} (step {step}, rf={cfg.model.rf}): {args.n} held-out prompts, {u['n_images']} held-out images "
          f"({u['n_questions']} questions)")
    keys = ("single", "two", "colors", "position", "color_attr", "overall", "object", "exact")
    print("| generation | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    print("| | " + " | ".join(f"{gen[k]:.3f}" for k in keys) + " |")
    ukeys = [k for k in ("color", "shape", "position", "caption") if k in u]
    print("| understanding | " + " | ".join(ukeys) + " |")
    print("|---|" + "---|" * len(ukeys))
    print("| | " + " | ".join(f"{u[k]:.3f}" for k in ukeys) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ckpt": args.ckpt, "step": step, "rf": cfg.model.rf, "generation": gen, "understanding": u}, f, indent=1)


if __name__ == "__main__":
    main()
