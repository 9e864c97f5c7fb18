"""Where training examples come from: the shapes world or a folder of images and captions.

The shapes world itself (scenes, prompts, rendering, questions, the held-out split) lives in
nanorf.shapes and is re-exported here (docs/method.md, "The shapes world"). This module adds:
- `ImageCaptionFolder`: a folder of images plus captions.jsonl, for training on real pictures;
- `palette_index`: the nearest-palette classifier that both the pixel scorer (nanorf.eval) and
  the encoder's patch labels (experiments.pretrain_vit) read images with;
- `python -m nanorf.data --dump DIR --n N`: N images cycling through the five prompt kinds, so
  any N >= 5 shows every kind, and DIR/prompts.txt whose line i is image i's caption;
- `python -m nanorf.data --check DIR`: decode every image of a folder, with a progress bar, and
  list the ones that fail (exit 1 if any), so a long run never meets them. A run that does meet
  one substitutes another image for it (nanorf.stream) and goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .shapes import (COLORS, DEFAULT_KINDS, HELD_OUT_FRACTION, KINDS, MAX_ANSWER_BYTES, NUMBERS, PALETTE,  # noqa: F401
                     POSITIONS, QUESTION_KINDS, RELATIONS, SHAPES, Obj, Prompt, Scene, ShapesWorld, canonical,
                     describe, draw_prompt, draw_scene, held_out_prompts, holds, is_held_out, located,
                     object_map, parse_caption, question_kind, questions, render)


class DataError(ValueError):
    """A dataset on disk is missing or malformed; the message is one line naming the culprit."""


def palette_index(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) index of the nearest of black and the palette (Euclidean RGB):
    0 background, k -> COLORS[k - 1]."""
    refs = np.array([(0, 0, 0), *PALETTE.values()], np.float32)  # (7, 3): background first
    dist = ((image[:, :, None, :].astype(np.float32) - refs) ** 2).sum(-1)  # (H, W, 7)
    return dist.argmin(-1)


def fit_to_budget(h: int, w: int, budget: int, multiple: int) -> tuple[int, int]:
    """The (H, W) an h x w image is resized to: its aspect ratio kept, H * W <= budget pixels
    (a token budget: budget / patch^2 patches; unless even one multiple squared exceeds it),
    both sides multiples of `multiple` and at least one multiple (NaViT-style variable
    resolution; docs/method.md, "Sequences and the attention mask"). Larger images shrink into
    the budget, smaller ones keep their size (our choice: mixed resolutions stay mixed), both
    rounded down to multiples; a square image at the budget's side keeps its size exactly."""
    scale = min(1.0, (budget / (h * w)) ** 0.5)
    H = max(multiple, int(h * scale + 1e-6) // multiple * multiple)
    W = max(multiple, int(w * scale + 1e-6) // multiple * multiple)
    if H * W > budget:  # a side held at one multiple (an extreme aspect ratio): shrink the other
        if H == multiple:
            W = max(multiple, budget // H // multiple * multiple)
        else:
            H = max(multiple, budget // W // multiple * multiple)
    return H, W


def resize_to(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """An RGB PIL image resized (bicubic) to (H, W) -> (H, W, 3) uint8."""
    H, W = size
    if im.size != (W, H):
        im = im.resize((W, H), Image.BICUBIC)
    return np.asarray(im, np.uint8)


class ImageCaptionFolder:
    """A folder of images plus captions.jsonl, one {"file": ..., "text": ...} per line.

    Images become RGB. By default the shorter side is resized to `size` (bicubic), then
    centre-cropped to size x size: one square size batches without packing. With
    `keep_aspect` (train.py --tokens-per-rank, which packs examples of any size) each image
    keeps its aspect ratio instead and is resized to a budget of size x size pixels with sides
    that are multiples of `multiple` (fit_to_budget).
    Items: image, caption, qa (describe -> the caption), and prompt (parse_caption's reading of
    the caption, None for text that is no shapes-world caption).
    """

    def __init__(self, root, size, keep_aspect: bool = False, multiple: int = 16):
        self.root, self.size = Path(root), size
        self.keep_aspect, self.multiple = keep_aspect, multiple
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

    def path(self, i: int) -> Path:
        return self.root / self.entries[i][0]

    def decode(self, i: int) -> Image.Image:
        """Image i as RGB (greyscale, palette, RGBA, CMYK... converted); DataError if it does not decode."""
        return decode_rgb(self.path(i))

    def __getitem__(self, i: int) -> dict:
        im, text = self.decode(i), self.entries[i][1]
        w, h = im.size
        if self.keep_aspect:
            image = resize_to(im, fit_to_budget(h, w, self.size ** 2, self.multiple))
            return {"image": image, "caption": text, "prompt": parse_caption(text),
                    "qa": [("describe the image.", text)]}
        scale = self.size / min(w, h)
        new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        image = np.asarray(im.crop((left, top, left + self.size, top + self.size)), np.uint8)
        return {"image": image, "caption": text, "prompt": parse_caption(text),
                "qa": [("describe the image.", text)]}


def decode_rgb(path) -> Image.Image:
    """The image at `path`, fully decoded, as RGB; DataError (one line) if it cannot be."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # convert() loads every pixel, so a truncated file fails here
    except Exception as e:  # noqa: BLE001 -- PIL raises OSError, ValueError, SyntaxError, EOFError, ... on bad files
        raise DataError(f"cannot read image {path}: {' '.join(str(e).split()) or type(e).__name__}") from None


def _check_one(path) -> str | None:
    try:
        decode_rgb(path)
    except DataError as e:
        return str(e)
    return None


def check_folder(root, workers: int = 1, progress: bool = True) -> tuple[int, list[tuple[int, str]]]:
    """Decode every image of an image-caption folder: (number of items, [(index, error), ...])."""
    from tqdm import tqdm
    ds = ImageCaptionFolder(root, 16)
    paths = [ds.path(i) for i in range(len(ds))]
    bar = tqdm(total=len(paths), desc=f"checking {root}", unit="img", disable=not progress, dynamic_ncols=True)
    if workers > 1:
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = []
            for r in pool.imap(_check_one, paths, chunksize=64):
                results.append(r)
                bar.update(1)
    else:
        results = []
        for p in paths:
            results.append(_check_one(p))
            bar.update(1)
    bar.close()
    return len(paths), [(i, r) for i, r in enumerate(results) if r is not None]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanorf.data",
                                     description="Dump shapes-world images and their captions, or check that "
                                                 "every image of an image-caption folder decodes.")
    todo = parser.add_mutually_exclusive_group(required=True)
    todo.add_argument("--dump", metavar="DIR",
                      help="output folder: DIR/0000.png, ... and DIR/prompts.txt (line i = caption of image i)")
    todo.add_argument("--check", metavar="DIR",
                      help="decode every image listed in DIR/captions.jsonl and list those that fail "
                           "(exit 1 if any, 2 if the folder itself is malformed)")
    parser.add_argument("--workers", type=int, default=1,
                        help="--check: decoding processes (default 1; use your core count for big folders)")
    parser.add_argument("--n", type=int, default=16, help="number of images to write, cycling through the prompt kinds (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="world seed; item i depends only on (seed, split, i)")
    parser.add_argument("--size", type=int, default=32, help="canvas side in pixels, a multiple of 16 (default 32)")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="train: captions outside the held-out set; test: only held-out captions")
    args = parser.parse_args(argv)
    if args.check:
        raise SystemExit(run_check(args.check, args.workers))
    if args.size < 16 or args.size % 16:
        print(f"nanorf.data: error: --size must be a positive multiple of 16, got {args.size}", file=sys.stderr)
        raise SystemExit(2)
    if args.n < 1:
        print(f"nanorf.data: error: --n must be at least 1, got {args.n}", file=sys.stderr)
        raise SystemExit(2)

    world = ShapesWorld(args.size, args.seed, split=args.split)
    kinds = [k for k, w in zip(KINDS, world.kinds) if w > 0]  # the test split has no single prompts
    digits = max(4, len(str(args.n - 1)))
    out = Path(args.dump)
    out.mkdir(parents=True, exist_ok=True)
    # Write into a hidden staging folder and move files out only when all are done, so an
    # interrupted dump leaves no half-written set behind.
    staging = Path(tempfile.mkdtemp(prefix=".dump-", dir=out))
    try:
        captions = []
        for i in range(args.n):
            item = world.item(i, kinds[i % len(kinds)])
            Image.fromarray(item["image"]).save(staging / f"{i:0{digits}d}.png")
            captions.append(item["caption"])
        (staging / "prompts.txt").write_text("".join(c + "\n" for c in captions), encoding="utf-8")
        for f in sorted(staging.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.n} images and prompts.txt to {out}")


def run_check(root, workers: int) -> int:
    """--check: the exit status (0 all decode, 1 some do not, 2 a malformed folder)."""
    if workers < 1:
        print(f"nanorf.data: error: --workers must be at least 1, got {workers}", file=sys.stderr)
        return 2
    try:
        n, bad = check_folder(root, workers, progress=True)
    except DataError as e:
        print(f"nanorf.data: error: {e}", file=sys.stderr)
        return 2
    for _, msg in bad:
        print(msg)
    if bad:
        print(f"{len(bad)} of {n} images in {root} do not decode; a training run substitutes the next "
              f"image for each (train.max_bad_fraction caps how many), or remove them from captions.jsonl")
        return 1
    print(f"all {n} images in {root} decode")
    return 0


if __name__ == "__main__":
    main()
