"""Shapes-world evaluation: GenEval's rules made strict, and understanding accuracy.

    python -m nanorf.eval --ckpt out/toy/ckpt.pt [--n-per-kind 50] [--n-images 100] [--json [FILE]]

Generation (docs/method.md, "Evaluation"). Prompts are shapes.held_out_prompts: n per kind,
held-out captions wherever the kind has them (single: all 18). Each image is read by pixel
analysis (`detect`): every pixel takes the nearest of black and the six palette colours
(data.palette_index); each colour's 4-connected components are objects; an object's cell is the
one holding its centroid; its shape comes from its geometry: `triangle` when the top half of its
bounding box holds < 0.58x the pixels of the bottom half, else `square` when it fills > 97% of
its box, else `circle`. Then `judge` rules each image right or wrong:
  single    exactly one object, of that colour and shape
  two       exactly the two
  counting  exactly that many of that colour and shape, nothing else
  position  exactly the two, and the relation holds between their cells
  located   every named object in its cell with its colour and shape, nothing else
Strict: "nothing else" means no other component at all, so a fragment or a stray pixel of
another colour is an extra object and the image is wrong. MIN_PIXELS = 1 keeps it strict as
written; a pixel scorer cannot tell a fragment from a tiny object, and GenEval's detector
ignores fragments, which is the leniency that hides incoherent composition. Note what that
means for blur: a soft edge of a yellow, cyan or magenta object passes through colours nearer
green, green and red than black or itself, so blurred rims count as extras.
Lenient is GenEval's own rule: the named objects are found and extras are allowed, except that
counting still needs exactly n of its colour and shape. `extras` per image counts the
components matched to no named object (a maximum matching): the coherence figure.
Overall = the mean of the per-kind accuracies (strict and lenient alike).

Understanding. Test-split (held-out) images, greedy answers to all their questions
(shapes.questions), exact match, accuracy per question kind: describe, count, where, shape,
color.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import COLORS, KINDS, POSITIONS, QUESTION_KINDS, Prompt, ShapesWorld, held_out_prompts, holds, \
    palette_index, parse_caption, question_kind
from .patches import images_to_tensor, tensor_to_images
from .sampler import add_sampling_args, answer, sampling_overrides, text_to_image

MIN_PIXELS = 1         # components this small or larger are objects: strict, every component counts
# The shape thresholds sit between the classes as measured on clean renders at 32 px, where they
# are closest: the top/bottom mass ratio is <= 0.50 for triangles and >= 0.67 for circles;
# circles fill <= 0.94 of their box, rasterised squares exactly 1.0.
TRIANGLE_TOP = 0.58    # triangle: top half of its box holds < 0.58x the pixels of the bottom half
SQUARE_FILL = 0.97     # square: fills > 97% of its box (a rasterised circle misses its corners)


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    position: str
    area: int


@dataclass(frozen=True)
class Verdict:
    strict: bool    # the prompt's objects and nothing else
    lenient: bool   # GenEval's rule: the prompt's objects, extras allowed
    extras: int     # components matched to no named object


def _components(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal nonzero class in an (H, W) int map.

    Returns (H, W) labels, each pixel labelled with the smallest flat index in its component
    (background: -1). Min-label propagation plus pointer jumping: every label is the index of a
    pixel in the same component, so looking up a label's own label is always a safe shortcut.
    """
    h, w = cls.shape
    fg = cls > 0
    big = h * w
    lab = np.where(fg, np.arange(h * w).reshape(h, w), big)  # (H, W)
    # Background pixels join each other too, harmlessly: their label `big` never wins a min.
    join_x = cls[:, 1:] == cls[:, :-1]  # (H, W-1) pixel joined to its right neighbour
    join_y = cls[1:, :] == cls[:-1, :]  # (H-1, W) pixel joined to the one below
    while True:
        new = lab.copy()
        new[:, :-1] = np.minimum(new[:, :-1], np.where(join_x, lab[:, 1:], big))
        new[:, 1:] = np.minimum(new[:, 1:], np.where(join_x, lab[:, :-1], big))
        new[:-1, :] = np.minimum(new[:-1, :], np.where(join_y, lab[1:, :], big))
        new[1:, :] = np.minimum(new[1:, :], np.where(join_y, lab[:-1, :], big))
        flat = new.reshape(-1)  # a view: the jump below writes into new
        flat[fg.reshape(-1)] = flat[flat[fg.reshape(-1)]]
        if np.array_equal(new, lab):
            return np.where(fg, lab, -1)
        lab = new


def _shape_of(ys: np.ndarray, xs: np.ndarray) -> str:
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    fill = len(ys) / ((y1 - y0 + 1) * (x1 - x0 + 1))
    mid = (y0 + y1) / 2
    if (ys < mid).sum() < TRIANGLE_TOP * (ys > mid).sum():
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def detect(image: np.ndarray, min_pixels: int = MIN_PIXELS) -> list[Detection]:
    """The single-colour 4-connected components of an (H, W, 3) uint8 RGB image, in raster
    order of their first pixel."""
    image = np.asarray(image)
    # A float image in [-1, 1] or [0, 1] would silently read as black: insist on uint8.
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    cls = palette_index(image)
    labels = _components(cls)
    ids, areas = np.unique(labels[labels >= 0], return_counts=True)
    found = []
    for lab, area in zip(ids, areas):
        if area < min_pixels:
            continue
        ys, xs = np.nonzero(labels == lab)
        row = min(int((ys.mean() + 0.5) * 3 / h), 2)
        col = min(int((xs.mean() + 0.5) * 3 / w), 2)
        found.append(Detection(COLORS[cls[ys[0], xs[0]] - 1], _shape_of(ys, xs),
                               POSITIONS[3 * row + col], int(area)))
    return found


def judge(prompt: Prompt, found: list[Detection]) -> Verdict:
    """The rules of the module docstring for one image's detections."""
    # A named object is a colour+shape (+ cell for located). Distinct keys never match the same
    # detection (other kinds name distinct colour+shapes; located names distinct cells), so
    # matching each key to min(needed, present) detections is a maximum matching.
    key = (lambda o: (o.color, o.shape, o.position)) if prompt.kind == "located" else (lambda o: (o.color, o.shape))
    need = Counter(key(o) for o in prompt.objects)
    have = Counter(key(d) for d in found)
    extras = len(found) - sum(min(n, have[k]) for k, n in need.items())
    if prompt.kind == "counting":
        lenient = all(have[k] == n for k, n in need.items())
    elif prompt.kind == "position":
        a, b = prompt.objects
        lenient = any(holds(prompt.relation, da.position, db.position)
                      for da in found if key(da) == key(a) for db in found if key(db) == key(b))
    else:
        lenient = all(have[k] >= n for k, n in need.items())
    return Verdict(strict=lenient and len(found) == len(prompt.objects), lenient=lenient, extras=extras)


def score_images(images, prompts, min_pixels: int = MIN_PIXELS) -> dict:
    """(H, W, 3) uint8 images and their prompts (Prompt or caption) -> flat scores: per kind
    present, strict accuracy under the kind's name and GenEval's as lenient_<kind>; overall and
    lenient_overall (means over those kinds); extras (mean per image); n."""
    images, prompts = list(images), [parse_caption(p) if isinstance(p, str) else p for p in prompts]
    if len(images) != len(prompts) or not images:
        raise ValueError(f"need as many prompts as images (> 0), got {len(prompts)} and {len(images)}")
    if not all(isinstance(p, Prompt) for p in prompts):
        raise ValueError("every prompt must be a Prompt or a shapes-world caption")
    rows = [(p.kind, judge(p, detect(im, min_pixels))) for im, p in zip(images, prompts)]
    kinds = [k for k in KINDS if any(kind == k for kind, _ in rows)]
    mean = lambda xs: float(np.mean(xs))
    out = {}
    for k in kinds:
        out[k] = mean([v.strict for kind, v in rows if kind == k])
        out[f"lenient_{k}"] = mean([v.lenient for kind, v in rows if kind == k])
    out["overall"] = mean([out[k] for k in kinds])
    out["lenient_overall"] = mean([out[f"lenient_{k}"] for k in kinds])
    out["extras"] = mean([v.extras for _, v in rows])
    out["n"] = len(rows)
    return out


@torch.no_grad()
def generation_score(model, n_per_kind: int = 50, seed: int = 0, batch_size: int = 64,
                     prompt_seed: int = 1234, **sample_overrides) -> dict:
    """Sample one image per held-out prompt (sampler.text_to_image; overrides go to it) and score
    them. Returns score_images' keys plus "images" (uint8 arrays) and "prompts" (captions)."""
    prompts = [p.text for p in held_out_prompts(n_per_kind, seed=prompt_seed)]
    gen = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(prompts), batch_size):
        x, _ = text_to_image(model, prompts[i:i + batch_size], generator=gen, **sample_overrides)
        images += tensor_to_images(x)
    out = score_images(images, prompts)
    out["images"], out["prompts"] = images, prompts
    return out


@torch.no_grad()
def understanding_score(model, n_images: int = 100, seed: int = 4321, batch_size: int = 64) -> dict:
    """Exact-match accuracy per question kind over all questions about n test-split images."""
    world = ShapesWorld(model.cfg.image_size, seed=seed, split="test")
    qa = [(it["image"], q, a) for it in map(world.__getitem__, range(n_images)) for q, a in it["qa"]]
    right = {k: [] for k in QUESTION_KINDS}
    device = next(model.parameters()).device
    for i in range(0, len(qa), batch_size):
        chunk = qa[i:i + batch_size]
        # One byte past the longest true answer: a longer output is wrong however it goes on.
        room = max(len(a.encode()) for _, _, a in chunk) + 1
        outs = answer(model, images_to_tensor([im for im, _, _ in chunk]).to(device),
                      [q for _, q, _ in chunk], max_new_tokens=room)
        for (_, q, a), o in zip(chunk, outs):
            right[question_kind(q)].append(o.strip() == a)
    out = {k: float(np.mean(v)) for k, v in right.items() if v}
    out["n_images"], out["n_questions"] = n_images, len(qa)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanorf.eval",
                                description="Score a nanorf checkpoint on held-out shapes-world prompts and images.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (ckpt.pt, ckpt.dcp, or the run's out-dir)")
    p.add_argument("--n-per-kind", type=int, default=50, help="held-out prompts per prompt kind (default 50)")
    p.add_argument("--n-images", type=int, default=100, help="held-out images for understanding (default 100)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--raw", action="store_true", help="score the raw weights instead of the EMA weights")
    add_sampling_args(p)  # each overrides the checkpoint's own sampling setting
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="print the scores as one JSON object instead of tables; --json FILE writes it there "
                        "and prints the tables")
    args = p.parse_args(argv)
    from .checkpoint import CheckpointError, load_model
    try:
        if args.n_per_kind < 1 or args.n_images < 1:
            raise CheckpointError("--n-per-kind and --n-images must be at least 1")
        model, cfg, step = load_model(args.ckpt, ema=not args.raw)
    except CheckpointError as e:
        print(f"nanorf.eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    sampling = sampling_overrides(args)
    g = generation_score(model, n_per_kind=args.n_per_kind, seed=args.seed, **sampling)
    gen = {k: v for k, v in g.items() if k not in ("images", "prompts")}
    und = understanding_score(model, n_images=args.n_images)
    result = json.dumps({"ckpt": args.ckpt, "step": step, "rf": cfg.model.rf, "sampling": sampling,
                         "generation": gen, "understanding": und})
    if args.json == "-":
        print(result)
        return
    if args.json:
        Path(args.json).write_text(result + "\n")
    print(f"{args.ckpt} (step {step}, rf={cfg.model.rf}): {gen['n']} held-out prompts ({args.n_per_kind} per kind), "
          f"{und['n_images']} held-out images ({und['n_questions']} questions)"
          + (f"; sampling {sampling}" if sampling else ""))
    cols = [*KINDS, "overall"]
    print("| generation | " + " | ".join(cols) + " | extra objects per image |")
    print("|---|" + "---|" * (len(cols) + 1))
    print("| strict | " + " | ".join(f"{gen[k]:.3f}" for k in cols) + f" | {gen['extras']:.2f} |")
    print("| lenient (GenEval) | " + " | ".join(f"{gen['lenient_' + k]:.3f}" for k in cols) + " | |")
    ucols = [k for k in QUESTION_KINDS if k in und]
    print("| understanding | " + " | ".join(ucols) + " |")
    print("|---|" + "---|" * len(ucols))
    print("| exact match | " + " | ".join(f"{und[k]:.3f}" for k in ucols) + " |")


if __name__ == "__main__":
    main()
