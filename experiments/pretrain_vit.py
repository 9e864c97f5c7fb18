"""Stage 0 for the shapes world: an encoder that already knows the world, as DINOv3 does.

    python -m experiments.pretrain_vit --out out/vit_toy.pt          # a few minutes on 2 CPU cores
    python train.py --vit-init out/vit_toy.pt                    # RF on top of it

RF's targets are only as good as the encoder's features (docs/method.md, "Representation
targets and online VQ"): the paper starts from
DINOv3-H+, pretrained on 1.7B images. The toy's ViT starts from random weights and learns
only from ~800 steps of understanding loss, and `experiments.probe` shows what that gives: codes
that tell colours apart but not shapes, so the rep tokens cannot plan what the pixels fail
to draw. This stage stands in for the pretrained encoder: it trains the same ViT, once,
to label every patch with what covers it, so that its features separate shapes before the
RF run starts. The paper's recipe stays as it is afterwards: the encoder is trained
jointly through the understanding loss and its EMA copy makes the targets.

The task (our choice; any shape-aware pretraining would do): each ViT patch gets one of
1 + 6 x 3 classes, background or (colour, shape) of the object that covers at least a
quarter of it (or, for patches as large as a cell, holds most of the object), read from the
item's exact object_map (in the world v2 two objects may share a colour).
A linear head reads the patch tokens before the final norm, the features the targets use;
the loss is the mean CE over object patches plus that over background patches (about 90%
of the patches are background and would otherwise drown the shapes).
Labels are per patch but the shape is a property of the whole object, so the features
must carry it from the object's other patches.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanorf.checkpoint import save_vit_weights
from nanorf.config import ViTConfig, apply_overrides
from nanorf.presets import PRESETS, get_config
from nanorf.data import COLORS, SHAPES, ShapesWorld, palette_index
from nanorf.patches import images_to_tensor
from nanorf.vit import ViT

N_CLASSES = 1 + len(COLORS) * len(SHAPES)


def patch_labels(image: np.ndarray, scene, patch: int, objects: np.ndarray | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 render and its scene -> (H/p * W/p,) class ids in raster order: 0 background,
    else 1 + 3 * colour + shape of the object with the most pixels in the patch, when it covers at
    least a quarter of the patch or holds at least half of its own pixels there (a patch as
    large as a cell holds most of a small triangle, which covers less than a quarter of it).
    objects: the item's exact object_map (0 background, k + 1 for scene.objects[k]); the world v2
    lets two objects share a colour, so pass it. Without it, colour picks the object (v1 scenes)."""
    if objects is None:
        first = {COLORS.index(o.color) + 1: k + 1 for k, o in reversed(list(enumerate(scene.objects)))}
        objects = np.vectorize(lambda c: first.get(int(c), 0), otypes=[np.int64])(palette_index(image))
    objs = np.asarray(objects).astype(np.int64)                                   # (H, W) 0 bg, k+1 object k
    n = len(scene.objects)
    label_of = [0] + [1 + 3 * COLORS.index(o.color) + SHAPES.index(o.shape) for o in scene.objects]
    sizes = np.bincount(objs.ravel(), minlength=n + 1)
    H, W = objs.shape
    tiles = objs.reshape(H // patch, patch, W // patch, patch).transpose(0, 2, 1, 3).reshape(-1, patch * patch)
    out = []
    for t in tiles:
        counts = np.bincount(t, minlength=n + 1)
        counts[0] = 0
        k = int(counts.argmax())
        ok = k > 0 and (counts[k] * 4 >= patch * patch or counts[k] * 2 >= sizes[k])
        out.append(label_of[k] if ok else 0)
    return torch.tensor(out)


def batch(world: ShapesWorld, start: int, n: int, patch: int):
    items = [world[i] for i in range(start, start + n)]
    return (images_to_tensor([it["image"] for it in items]),
            torch.stack([patch_labels(it["image"], it["scene"], patch, it["object_map"]) for it in items]))


@torch.no_grad()
def accuracy(vit: ViT, head: nn.Linear, images, labels) -> dict:
    pred = head(vit(images)["x_prenorm"]).argmax(-1)                              # (B, h*w)
    obj = labels > 0
    shape_ok = ((pred - 1) % 3 == (labels - 1) % 3) & (pred > 0)
    return {"patch": float((pred == labels).float().mean()),
            "object_patch": float((pred == labels)[obj].float().mean()),
            "shape_of_object_patch": float(shape_ok[obj].float().mean())}


def pretrain(vcfg: ViTConfig, size: int, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
             log=print) -> tuple[ViT, dict]:
    torch.manual_seed(seed)
    vit, head = ViT(vcfg), nn.Linear(vcfg.dim, N_CLASSES)
    opt = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.05)
    world = ShapesWorld(size, seed=seed + 7)                                      # not the RF run's stream
    test = batch(ShapesWorld(size, seed=seed + 7, split="test"), 0, 256, vcfg.patch_size)
    t0 = time.time()
    for step in range(steps):
        x, y = batch(world, step * batch_size, batch_size, vcfg.patch_size)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50)
        ce = F.cross_entropy(head(vit(x)["x_prenorm"]).flatten(0, 1), y.flatten(), reduction="none")
        obj = y.flatten() > 0  # ~90% of patches are background: weigh the two kinds equally
        loss = ce[obj].mean() + ce[~obj].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            acc = accuracy(vit.eval(), head, *test)
            vit.train()
            log(f"step {step + 1}: loss {loss.item():.3f}, held-out "
                + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + f"; {time.time() - t0:.0f}s")
    return vit, acc


def main(argv=None):
    p = argparse.ArgumentParser(description="Pretrain the toy's ViT to tell shapes apart (a stand-in for DINOv3).")
    p.add_argument("--config", default="toy", choices=sorted(PRESETS), help="preset whose ViT and image size to use")
    p.add_argument("--steps", type=int, default=1000, help="optimiser steps (batch 64)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the preset, as train.py --set (e.g. model.image_size=48)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data stream")
    p.add_argument("--out", required=True, help="where to write the ViT weights (for train.py --vit-init)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.parent.is_dir():
        print(f"experiments.pretrain_vit: error: folder {out.parent} does not exist", file=sys.stderr)
        sys.exit(2)
    cfg = apply_overrides(get_config(args.config), args.set).model
    vit, acc = pretrain(cfg.vit, cfg.image_size, args.steps, seed=args.seed)
    save_vit_weights(out, vit, {"held_out": acc})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
