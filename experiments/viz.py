"""Pictures of the method, drawn by the code itself.

    python -m experiments.viz --mask docs/mask.png
    python -m experiments.viz --plans docs/plans.png --ckpt out/toy/ckpt.pt [--prompt "three red circles"]
    python -m experiments.viz --plan-swap docs/plan_swap.png --ckpt out/toy/ckpt.pt
    python -m experiments.viz --plans p.png --ckpt out/toy/ckpt.pt --cfg-interval 0 1   # sample.py's sampler flags

--plans: one prompt, four sampling seeds; top row the sampled plan (each representation token
drawn as its code's mean training patch), bottom row the picture painted from it. Different
seeds give different plans, and each picture follows its plan.
--plan-swap: held-out prompts that leave the cells open, one per row: a real image of a scene
that fits the prompt, its plan (the EMA encoder's codes, drawn the same way), the picture the
model paints from the prompt and that plan, and the picture it paints with the plan hidden.

The mask panel:
Rows are queries, columns keys; a filled cell means "may attend". Cells are coloured
by the key's expert (grey: understanding, orange: representation, blue: pixel), and
the strip along the top and left shows each token's type. The generation sequence
is drawn twice: as trained, and with the representation sequence dropped for CFG.
"""

from __future__ import annotations

import argparse

import numpy as np

import torch

from nanorf.presets import get_config
from nanorf.model import RFModel
from nanorf.patches import images_to_tensor, tensor_to_images
from nanorf.sampler import add_sampling_args, sampling_overrides
from nanorf.mot import PAD, PIX, REP, UND
from nanorf.targets import targets_from_checkpoint

COLOURS = {UND: (120, 120, 120), REP: (235, 140, 30), PIX: (40, 110, 230), PAD: (225, 225, 225)}


def mask_image(mask: np.ndarray, modality: np.ndarray, cell: int = 8) -> np.ndarray:
    """(L, L) bool mask + (L,) expert ids -> (H, W, 3) uint8 picture with a type strip."""
    L = len(modality)
    img = np.full(((L + 2) * cell, (L + 2) * cell, 3), 255, np.uint8)
    for i in range(L):
        c = COLOURS[int(modality[i])]
        img[(i + 2) * cell:(i + 3) * cell, :cell] = c          # row strip
        img[:cell, (i + 2) * cell:(i + 3) * cell] = c          # column strip
        for j in range(L):
            if mask[i, j]:
                y, x = (i + 2) * cell, (j + 2) * cell
                img[y + 1:y + cell, x + 1:x + cell] = COLOURS[int(modality[j])]
    return img


def draw_masks(path: str):
    from PIL import Image
    cfg = get_config("toy").model
    # a 16 px image: 2x2 = 4 pixel patches of 8 px; a 4x4 ViT grid pooled 2x2 -> 4 rep tokens
    cfg.image_size, cfg.patch_size, cfg.vit.patch_size, cfg.vq.pool = 16, 8, 4, 2
    model = RFModel(cfg)
    prompt = [[ord(c) for c in "a cat"]]
    gen = model.gen_layout(prompt, model.n_rep, model.n_pix)
    cfg2 = get_config("toy").model
    cfg2.image_size, cfg2.vit.patch_size = 16, 8                     # 2x2 = 4 ViT tokens
    und = RFModel(cfg2).und_layout([[ord(c) for c in "what? "]], [[ord(c) for c in "a cat"]])
    panels = []
    for lay, drop in ((gen, False), (gen, True), (und, False)):
        m = lay.mask(torch.tensor([drop]))[0, 0].numpy()
        panels.append(mask_image(m, lay.modality[0].numpy()))
    h = max(p.shape[0] for p in panels)
    gap = np.full((h, 16, 3), 255, np.uint8)
    row = []
    for p in panels:
        row += [np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255), gap]
    Image.fromarray(np.concatenate(row[:-1], axis=1)).resize(
        (sum(p.shape[1] for p in panels) * 2 + 64, h * 2), Image.NEAREST).save(path)


def load(ckpt: str):
    """The checkpoint's EMA model and its target maker (EMA encoder, codebook, code patches)."""
    from nanorf.checkpoint import load_checkpoint, load_model
    ck = load_checkpoint(ckpt)
    if ck.get("targets") is None or "code_patches" not in ck["targets"]:
        raise SystemExit("experiments.viz: error: this checkpoint has no discrete rep tokens to draw")
    model, cfg, _ = load_model(ckpt, ck=ck)
    return model, targets_from_checkpoint(ck, cfg.model, model.vit)


@torch.no_grad()
def draw_plans(path: str, ckpt: str, prompt: str, seeds=(0, 1, 2, 3), sampling: dict | None = None):
    """sampling: SamplingSettings fields that override the checkpoint's own."""
    from nanorf.sampler import draw_plan, save_grid, settings_for, text_to_image
    model, targets = load(ckpt)
    s = settings_for(model, **(sampling or {}))
    plans, pictures = [], []
    for seed in seeds:
        x, codes = text_to_image(model, [prompt], torch.Generator().manual_seed(seed), settings=s)
        plans += tensor_to_images(draw_plan(codes, targets.code_patches))
        pictures += tensor_to_images(x)
    save_grid(plans + pictures, path, ncol=len(seeds), scale=max(1, 128 // model.cfg.image_size))


@torch.no_grad()
def draw_plan_swap(path: str, ckpt: str, n: int = 4, seed: int = 0, sampling: dict | None = None):
    """sampling: SamplingSettings fields that override the checkpoint's own."""
    import random
    from dataclasses import replace
    from nanorf.data import draw_scene, held_out_prompts, render
    from nanorf.sampler import draw_plan, sample_pixels, save_grid, settings_for
    model, targets = load(ckpt)
    cfg, s = model.cfg, settings_for(model, **(sampling or {}))
    held = held_out_prompts(1, kinds=("counting", "two", "position", "single"))[:n]
    rng = random.Random(seed)
    real = images_to_tensor([render(draw_scene(p, rng), cfg.image_size, rng) for p in held])
    plan = targets(real, update=False)
    ids = [model.tok.encode(p.text, cfg.max_text_len) for p in held]
    painted = sample_pixels(model, ids, plan, s, torch.Generator().manual_seed(seed))
    blind = sample_pixels(model, ids, plan, replace(s, cfg_mode="norep"), torch.Generator().manual_seed(seed))
    cols = [tensor_to_images(t) for t in (real, draw_plan(plan, targets.code_patches), painted, blind)]
    save_grid([im for row in zip(*cols) for im in row], path, ncol=4, scale=max(1, 128 // cfg.image_size))
    print("rows: " + "; ".join(p.text for p in held) + "\ncolumns: real image, its plan, painted from that plan, "
          "painted with the plan hidden")


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw pictures of the method.")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--mask", help="output PNG: generation, generation with rep dropped, understanding")
    out.add_argument("--plans", help="output PNG: four seeds' plans (top) and pictures (bottom) for --prompt")
    out.add_argument("--plan-swap", help="output PNG: real image, its plan, painted from it, painted without a plan")
    p.add_argument("--ckpt", help="checkpoint for --plans and --plan-swap")
    p.add_argument("--prompt", default="three red circles", help="the prompt of --plans")
    add_sampling_args(p)  # each overrides the checkpoint's own sampling setting
    args = p.parse_args(argv)
    if args.mask:
        return draw_masks(args.mask)
    if not args.ckpt:
        p.error("--plans and --plan-swap need --ckpt")
    if args.plans:
        draw_plans(args.plans, args.ckpt, args.prompt, sampling=sampling_overrides(args))
    else:
        draw_plan_swap(args.plan_swap, args.ckpt, sampling=sampling_overrides(args))


if __name__ == "__main__":
    main()
