"""Sample from a trained nanorf checkpoint: text -> image, and image -> text (docs/method.md, "Sampling").

    python sample.py --ckpt out/toy/ckpt.pt --prompt "a red circle at the top left" --out red.png
    python sample.py --ckpt out/toy/ckpt.pt --prompts-file prompts.txt --out-dir samples/
    python sample.py --ckpt out/toy/ckpt.pt --prompts-file prompts.txt --grid grid.png
    python sample.py --ckpt out/toy/ckpt.pt --prompt "a red circle" --size 48x64 --out wide.png   # H x W
    python sample.py --ckpt out/toy/ckpt.pt --image red.png --question "what color is the circle?"
    python sample.py --ckpt out/run/ --prompt "two blue squares" --out b.png   # an --fsdp run's ckpt.dcp too

Images are written at the model's native resolution; `--rep-map` also writes the sampled
plan beside each image (NAME.rep.png): each representation token drawn as the mean image
patch its code stood for in training (kept with the codebook in the checkpoint), so the plan
reads as a coarse preview of the picture, and you can see what the model planned before it
painted.
Every output file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def parse_args(argv=None):
    from nanorf.sampler import add_sampling_args
    p = argparse.ArgumentParser(description="Sample from a nanorf checkpoint.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py: out/toy/ckpt.pt, an --fsdp run's ckpt.dcp "
                        "folder, or the run's out-dir (its newest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one text prompt to turn into an image")
    src.add_argument("--prompts-file", help="text file, one prompt per line")
    src.add_argument("--image", help="an image to ask --question about (image -> text)")
    p.add_argument("--question", default="describe the image.", help="question about --image")
    p.add_argument("--out", help="output PNG for --prompt")
    p.add_argument("--out-dir", help="folder for --prompts-file: writes 0000.png, 0001.png, ...")
    p.add_argument("--grid", help="also (or only) write all images of --prompts-file as one PNG grid")
    p.add_argument("--rep-map", action="store_true",
                   help="also write NAME.rep.png: the sampled plan, each rep token drawn as its code's mean patch")
    p.add_argument("--size", default=None, metavar="HxW",
                   help="image size to paint, height x width in pixels (e.g. 48x64); any multiple of the "
                        "model's patch x pool works (default: the config's square canvas)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_sampling_args(p)
    p.add_argument("--batch-size", type=int, default=16, help="prompts sampled together")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="use the uncached reference sampler (slow; for checking the fast path)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    return p.parse_args(argv)


def fail(msg: str):
    print(f"sample.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def save_png(img: np.ndarray, path: Path):
    from PIL import Image
    from nanorf.checkpoint import atomic_path
    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def rep_map(codes: torch.Tensor, code_patches: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """(N,) sampled codes on an h x w grid -> (H, W, 3) uint8: the plan drawn as each code's
    mean training patch."""
    from nanorf.patches import tensor_to_images
    from nanorf.sampler import draw_plan
    return tensor_to_images(draw_plan(codes[None], code_patches, grid))[0]


def parse_size(text: str | None, cfg) -> tuple[int, int] | None:
    """'48x64' -> (48, 64), checked against the model (ModelConfig.grids)."""
    if text is None:
        return None
    try:
        H, W = (int(v) for v in text.lower().split("x"))
    except ValueError:
        fail(f"--size {text!r} is not HxW (e.g. 48x64)")
    try:
        cfg.grids((H, W))
    except ValueError as e:
        fail(f"--size {text}: {e}")
    return H, W


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        return [args.prompt]
    path = Path(args.prompts_file)
    if not path.is_file():
        fail(f"no prompts file at {path}")
    prompts = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        fail(f"{path} has no prompts")
    return prompts


def main(argv=None):
    args = parse_args(argv)
    from nanorf.checkpoint import CheckpointError, load_checkpoint, load_model
    from nanorf.patches import images_to_tensor, tensor_to_images
    from nanorf.sampler import answer, sampling_overrides, save_grid, text_to_image
    from nanorf.tokenizer import TokenizerError

    if args.prompt is not None and not args.out:
        fail("--prompt needs --out FILE.png")
    if args.prompts_file is not None and not (args.out_dir or args.grid):
        fail("--prompts-file needs --out-dir DIR and/or --grid FILE.png")
    for out in (args.out, args.grid):  # fail before the slow part, not after it
        if out and not Path(out).resolve().parent.is_dir():
            fail(f"output folder {Path(out).parent} does not exist")
    prompts = None if args.image else read_prompts(args)
    try:
        ck = load_checkpoint(args.ckpt)
        model, cfg, step = load_model(args.ckpt, args.device, ema=not args.raw, ck=ck)
    except CheckpointError as e:
        fail(str(e))
    code_patches = (ck.get("targets") or {}).get("code_patches")  # None: no discrete codes to draw
    gen = torch.Generator().manual_seed(args.seed)
    size = parse_size(args.size, cfg.model)

    if args.image:
        from nanorf.data import DataError, decode_rgb, fit_to_budget, resize_to
        try:
            im = decode_rgb(args.image)
        except DataError as e:
            fail(str(e))
        # any size: read the way training folders are (aspect kept, the model's pixel budget)
        m = cfg.model
        img = resize_to(im, fit_to_budget(im.size[1], im.size[0], m.image_size ** 2, m.size_multiple))
        try:
            print(answer(model, images_to_tensor([img]).to(args.device), [args.question],
                         kv_cache=not args.no_kv_cache)[0])
        except TokenizerError as e:
            fail(str(e))
        return

    overrides = sampling_overrides(args)
    for p in prompts:  # check every prompt before sampling any
        try:
            model.tok.encode(p, cfg.model.max_text_len)
        except TokenizerError as e:
            fail(str(e))
    images, codes = [], []
    for i in range(0, len(prompts), args.batch_size):
        x, c = text_to_image(model, prompts[i:i + args.batch_size], generator=gen,
                             kv_cache=not args.no_kv_cache, size=size, **overrides)
        images += tensor_to_images(x)
        codes += [None] * len(x) if c is None else list(c)

    if args.out:
        outs = [Path(args.out)]
    elif args.out_dir:
        digits = max(4, len(str(len(prompts) - 1)))
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        outs = [Path(args.out_dir) / f"{i:0{digits}d}.png" for i in range(len(prompts))]
    else:
        outs = []
    for img, c, path in zip(images, codes, outs):
        save_png(img, path)
        if args.rep_map and code_patches is not None:  # pixel-only and continuous targets have no codes
            save_png(rep_map(c, code_patches, cfg.model.grids(size).rep), path.with_suffix(".rep.png"))
    if args.grid:
        save_grid(images, args.grid, scale=max(1, 128 // cfg.model.image_size))
    where = args.out or args.out_dir or args.grid
    print(f"wrote {len(images)} image(s) to {where} (checkpoint step {step})")


if __name__ == "__main__":
    main()
