"""Data: the shapes world, image-caption folders, and a GenEval-style pixel scorer.

The shapes world (DESIGN.md §3) is the CPU smoke test: a procedural text-image world,
generated on the fly and deterministic from a seed, small enough to train the whole method
on a laptop in minutes and simple enough to score generated images exactly by pixel analysis.
Scenes hold one object, or two objects in different cells with different colours; captions
read `a red circle at the top left` or `... and a blue square at the right`.

Choices the design leaves open, made here:
- Rasterisation samples pixel centres, no antialiasing, so only palette colours appear. The
  upright triangle grows linearly row by row to the full box width at the base, with at least
  the pixel nearest its axis on the apex row, so its pixel box is as tall and wide as the box.
- A box that would poke off the canvas (edge cells allow 3% of a cell) is pulled back; two
  boxes that would overlap are redrawn, so every object keeps all its pixels.
- The held-out split hashes the caption with its objects in cell order, so `A and B` and
  `B and A` (the same scene) always fall on the same side.

Also here: `ImageCaptionFolder` (images + captions.jsonl) and `score_image` / `score_batch`.
Run `python -m nanorf.data --dump DIR --n N` to write N images and a prompts.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import operator
import os
import random
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (40, 80, 255),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 220, 220),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right",
             "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # the 3x3 grid of cells, row-major


class DataError(ValueError):
    """A dataset on disk is missing or malformed; the message is one line naming the culprit."""


@dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    position: str

    def __post_init__(self):
        if self.color not in PALETTE or self.shape not in SHAPES or self.position not in POSITIONS:
            raise ValueError(f"not an object of the shapes world: {self!r}")


@dataclass(frozen=True)
class Scene:
    """One or two objects; two objects sit in different cells and have different colours."""
    objects: tuple[Obj, ...]

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        n = len(self.objects)
        if n not in (1, 2):
            raise ValueError(f"a scene holds 1 or 2 objects, got {n}")
        if len({o.position for o in self.objects}) < n or len({o.color for o in self.objects}) < n:
            raise ValueError("two objects need different cells and different colours")


def caption(scene: Scene) -> str:
    return " and ".join(f"a {o.color} {o.shape} at the {o.position}" for o in scene.objects)


_OBJ = (f"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) at the "
        f"({'|'.join(sorted(POSITIONS, key=len, reverse=True))})")
_CAPTION = re.compile(f"{_OBJ}(?: and {_OBJ})?")


def parse_caption(text: str) -> Scene | None:
    """Inverse of `caption`; None for text that is not a caption of a legal scene."""
    if not isinstance(text, str):
        return None
    m = _CAPTION.fullmatch(" ".join(text.lower().split()))
    if m is None:
        return None
    words = [g for g in m.groups() if g is not None]
    try:
        return Scene(tuple(Obj(*words[k:k + 3]) for k in range(0, len(words), 3)))
    except ValueError:  # e.g. two red objects, or two objects in one cell
        return None


def sample_scene(rng: random.Random, p_two: float = 0.5) -> Scene:
    n = 2 if rng.random() < p_two else 1
    colors, positions = rng.sample(COLORS, n), rng.sample(POSITIONS, n)
    return Scene(tuple(Obj(c, rng.choice(SHAPES), p) for c, p in zip(colors, positions)))


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 16 or size % 16:
        raise ValueError(f"canvas size must be a positive multiple of 16, got {size!r}")


def _object_mask(obj: Obj, size: int, rng: random.Random) -> np.ndarray:
    """(size, size) bool mask of one object, its box size and jitter drawn from rng."""
    cell = size / 3
    row, col = divmod(POSITIONS.index(obj.position), 3)
    half = rng.uniform(0.6, 0.9) * cell / 2
    cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
    cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
    # Pulling the box back onto the canvas only moves it toward its cell centre.
    cx, cy = min(max(cx, half), size - half), min(max(cy, half), size - half)
    y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres, each (size, size)
    if obj.shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if obj.shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
    rows = np.abs(y[:, 0] - cy) <= half  # (size,) rows the triangle spans
    k = np.cumsum(rows) - 1  # row index inside the triangle, apex = 0
    # The apex row keeps at least the pixel nearest the axis, else it can vanish between pixels.
    half_width = np.maximum(half * (k + 1) / rows.sum(), 0.5)  # (size,)
    return rows[:, None] & (np.abs(x - cx) <= half_width[:, None])


def render(scene: Scene, size: int, rng: random.Random) -> np.ndarray:
    """(size, size, 3) uint8 image of the scene on black; rng draws box sizes and jitter."""
    _check_size(size)
    for _ in range(1000):
        masks = [_object_mask(o, size, rng) for o in scene.objects]
        # Neighbouring boxes can overlap by up to 6% of a cell; redraw so neither is clipped.
        if len(masks) == 1 or not (masks[0] & masks[1]).any():
            break
    else:
        raise RuntimeError(f"could not lay out {caption(scene)!r} without overlap")
    image = np.zeros((size, size, 3), np.uint8)
    for obj, mask in zip(scene.objects, masks):
        image[mask] = PALETTE[obj.color]
    return image


def questions(scene: Scene) -> list[tuple[str, str]]:
    """All (question, answer) pairs for the scene, the caption first."""
    qa = [("describe the image.", caption(scene))]
    shapes = [o.shape for o in scene.objects]
    for o in scene.objects:
        if shapes.count(o.shape) == 1:  # "the circle" is ambiguous when there are two
            qa.append((f"what color is the {o.shape}?", o.color))
        qa.append((f"where is the {o.color} {o.shape}?", o.position))
        qa.append((f"what shape is at the {o.position}?", o.shape))
    return qa


def is_held_out(text: str, fraction: float = 1 / 16) -> bool:
    """Deterministic split: a stable hash (not Python's salted hash()) of the caption."""
    scene = parse_caption(text)
    if scene is not None:  # both orders of a two-object caption name the same scene
        text = caption(Scene(tuple(sorted(scene.objects, key=lambda o: POSITIONS.index(o.position)))))
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


class ShapesWorld:
    """Deterministic, unbounded dataset: item i is a pure function of (seed, split, i).

    split "train" resamples scenes whose caption is held out; "test" yields only held-out ones.
    There is no __len__: index it with any i >= 0.
    """

    def __init__(self, size=32, seed=0, p_two=0.5, split="train", held_out_fraction=1 / 16):
        _check_size(size)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not 0.0 <= p_two <= 1.0:
            raise ValueError(f"p_two must lie in [0, 1], got {p_two}")
        if not 0.0 < held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction}")
        self.size, self.seed, self.p_two = size, seed, p_two
        self.split, self.held_out_fraction = split, held_out_fraction

    def _draw(self, i: int) -> tuple[Scene, random.Random]:
        i = operator.index(i)
        if i < 0:
            raise IndexError(f"ShapesWorld index must be >= 0, got {i}")
        rng = random.Random(f"{self.seed}:{self.split}:{i}")  # str seeds hash stably
        want = self.split == "test"
        for _ in range(100_000):
            scene = sample_scene(rng, self.p_two)
            if is_held_out(caption(scene), self.held_out_fraction) == want:
                return scene, rng
        raise RuntimeError(f"no {self.split} scene found; is held_out_fraction too extreme?")

    def scene(self, i: int) -> Scene:
        """The scene of item i, without rendering it."""
        return self._draw(i)[0]

    def __getitem__(self, i: int) -> dict:
        scene, rng = self._draw(i)
        return {"image": render(scene, self.size, rng), "caption": caption(scene),
                "scene": scene, "qa": questions(scene)}


def held_out_prompts(n: int, seed: int = 1234, p_two=0.5, size=32) -> list[tuple[str, Scene]]:
    """The captions and scenes of the first n test items of ShapesWorld(size, seed, p_two).

    Captions can repeat (there are few one-object captions); scoring repeats is fine.
    """
    world = ShapesWorld(size, seed, p_two, split="test")
    return [(caption(s), s) for s in map(world.scene, range(n))]


class ImageCaptionFolder:
    """A folder of images plus captions.jsonl, one {"file": ..., "text": ...} per line.

    Images become RGB, the shorter side is resized to `size` (bicubic), then centre-cropped.
    """

    def __init__(self, root, size):
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root}")
        index = self.root / "captions.jsonl"
        if not index.is_file():
            raise DataError(f"no captions.jsonl in {self.root}")
        self.entries = []
        with open(index, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{index} line {lineno}"
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: bad JSON ({e.msg})") from None
                if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                        and isinstance(entry.get("text"), str)):
                    raise DataError(f'{where}: expected {{"file": str, "text": str}}')
                if not (self.root / entry["file"]).is_file():
                    raise DataError(f"{where}: image file not found: {self.root / entry['file']}")
                self.entries.append((entry["file"], entry["text"]))
        if not self.entries:
            raise DataError(f"{index} has no entries")

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        file, text = self.entries[i]
        path = self.root / file
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"cannot read image {path}: {' '.join(str(e).split())}") from None
        w, h = im.size
        scale = self.size / min(w, h)
        new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        image = np.asarray(im.crop((left, top, left + self.size, top + self.size)), np.uint8)
        return {"image": image, "caption": text, "scene": parse_caption(text),
                "qa": [("describe the image.", text)]}


# ---------------------------------------------------------------------------------------------
# Scoring. The shape thresholds sit midway between the classes as measured on clean renders
# at 32 px, where they are closest: the top/bottom mass ratio is <= 0.50 for triangles and
# >= 0.67 for circles; circles fill <= 0.94 of their box, rasterised squares exactly 1.0.
# At 16 px small circles can rasterise to full squares, so no threshold separates them.

MIN_AREA = 0.02        # components below this fraction of a cell's area are noise
TRIANGLE_TOP = 0.58    # triangle: top half of its box holds < 0.58x the pixels of the bottom half
SQUARE_FILL = 0.97     # square: fills > 97% of its box (a rasterised circle misses its corners)


@dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    position: str
    area: int


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


def palette_index(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) index of the nearest of black and the palette (Euclidean RGB):
    0 background, k -> COLORS[k - 1]."""
    refs = np.array([(0, 0, 0), *PALETTE.values()], np.float32)  # (7, 3): background first
    dist = ((image[:, :, None, :].astype(np.float32) - refs) ** 2).sum(-1)  # (H, W, 7)
    return dist.argmin(-1)


def detect(image: np.ndarray) -> list[Detection]:
    """The significant single-colour components of an (H, W, 3) uint8 RGB image."""
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
        if area < MIN_AREA * h * w / 9:
            continue
        ys, xs = np.nonzero(labels == lab)
        row = min(int((ys.mean() + 0.5) * 3 / h), 2)
        col = min(int((xs.mean() + 0.5) * 3 / w), 2)
        found.append(Detection(COLORS[cls[ys[0], xs[0]] - 1], _shape_of(ys, xs),
                               POSITIONS[3 * row + col], int(area)))
    return found


def score_image(image: np.ndarray, scene: Scene) -> dict:
    """GenEval-style score of one (H, W, 3) uint8 image against the scene it should show.

    Rules: each pixel takes the nearest of black and the six palette colours (Euclidean RGB);
    each colour's 4-connected components smaller than 2% of a cell's area are ignored; a
    component's cell is the one holding its centroid; its shape is `triangle` when the top
    half of its bounding box holds < 0.58x the pixels of the bottom half, else `square` when it
    fills > 97% of its box, else `circle`. Per expected object:
      color     a component of its colour exists
      position  a component of its colour lies in its cell
      shape     a component of its colour has its shape
      object    one component of its colour has its cell and its shape
    each averaged over the scene's objects, and per image:
      count     1 if the number of components equals the number of objects
      exact     1 if every object is found (object == 1) and there is no extra component
    """
    found = detect(image)
    n = len(scene.objects)

    def frac(match) -> float:
        return sum(any(d.color == o.color and match(o, d) for d in found) for o in scene.objects) / n

    obj = frac(lambda o, d: d.position == o.position and d.shape == o.shape)
    return {
        "objects": n,
        "color": frac(lambda o, d: True),
        "position": frac(lambda o, d: d.position == o.position),
        "shape": frac(lambda o, d: d.shape == o.shape),
        "object": obj,
        "exact": float(obj == 1.0 and len(found) == n),
        "count": float(len(found) == n),
    }


def score_batch(images, scenes) -> dict:
    """Mean of score_image over a batch of images and their scenes."""
    images, scenes = list(images), list(scenes)
    if len(images) != len(scenes) or not images:
        raise ValueError(f"need as many scenes as images (>0), got {len(images)} and {len(scenes)}")
    scores = [score_image(im, s) for im, s in zip(images, scenes)]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanorf.data",
                                     description="Dump shapes-world images and their captions.")
    parser.add_argument("--dump", required=True, metavar="DIR",
                        help="output folder: DIR/0000.png, ... and DIR/prompts.txt (line i = caption of image i)")
    parser.add_argument("--n", type=int, default=16, help="number of images to write (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="world seed; item i depends only on (seed, split, i)")
    parser.add_argument("--size", type=int, default=32, help="canvas side in pixels, a multiple of 16 (default 32)")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="train: captions outside the held-out set; test: only held-out captions")
    args = parser.parse_args(argv)
    if args.size < 16 or args.size % 16:
        print(f"nanorf.data: error: --size must be a positive multiple of 16, got {args.size}", file=sys.stderr)
        raise SystemExit(2)
    if args.n < 1:
        print(f"nanorf.data: error: --n must be at least 1, got {args.n}", file=sys.stderr)
        raise SystemExit(2)

    world = ShapesWorld(args.size, args.seed, split=args.split)
    digits = max(4, len(str(args.n - 1)))
    out = Path(args.dump)
    out.mkdir(parents=True, exist_ok=True)
    # Write into a hidden staging folder and move files out only when all are done, so an
    # interrupted dump leaves no half-written set behind.
    staging = Path(tempfile.mkdtemp(prefix=".dump-", dir=out))
    try:
        captions = []
        for i in range(args.n):
            item = world[i]
            Image.fromarray(item["image"]).save(staging / f"{i:0{digits}d}.png")
            captions.append(item["caption"])
        (staging / "prompts.txt").write_text("".join(c + "\n" for c in captions), encoding="utf-8")
        for f in sorted(staging.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.n} images and prompts.txt to {out}")


if __name__ == "__main__":
    main()
