"""Pictures of the method, drawn by the code itself: the attention mask of both sequences.

    python -m experiments.viz --mask docs/mask.png

Rows are queries, columns keys; a filled cell means "may attend". Cells are coloured
by the key's expert (grey: understanding, orange: representation, blue: pixel), and
the strip along the top and left shows each token's type. The generation sequence
is drawn twice: as trained, and with the representation sequence dropped for CFG.
"""

from __future__ import annotations

import argparse

import numpy as np

from nanorf.config import get_config
from nanorf.model import RFModel
from nanorf.mot import PAD, PIX, REP, UND

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
    import torch
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw nanorf's attention masks.")
    p.add_argument("--mask", required=True, help="output PNG: generation, generation with rep dropped, understanding")
    draw_masks(p.parse_args(argv).mask)


if __name__ == "__main__":
    main()
