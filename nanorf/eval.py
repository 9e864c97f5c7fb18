"""Shapes-world evaluation of a trained model: GenEval-style generation scores.

Prompts are held-out captions of the shapes world (data.held_out_prompts): their
exact wording never appears in training. Each generated image is scored by pixel
analysis (data.score_image): colour, position and shape of each expected object,
"object" when all three are right, "exact" when the whole scene is right.
"""

from __future__ import annotations

import torch

from .data import held_out_prompts, score_image
from .model import RFModel, tensor_to_images
from .sampler import text_to_image


@torch.no_grad()
def generation_score(model: RFModel, n: int = 64, seed: int = 0, batch_size: int = 64,
                     prompt_seed: int = 1234, **sample_overrides) -> dict:
    """Sample one image per held-out prompt and average the per-image scores.

    Returns {"n", "object", "color", "position", "shape", "exact", "single", "two"}
    ("single"/"two": object accuracy on one- and two-object prompts) plus the samples
    under "images" and "prompts" for a grid."""
    pairs = held_out_prompts(n, seed=prompt_seed, size=model.cfg.image_size)
    gen = torch.Generator().manual_seed(seed)
    rows, images = [], []
    for i in range(0, n, batch_size):
        chunk = pairs[i:i + batch_size]
        x, _ = text_to_image(model, [p for p, _ in chunk], generator=gen, **sample_overrides)
        for img, (_, scene) in zip(tensor_to_images(x), chunk):
            rows.append((len(scene.objects), score_image(img, scene)))
            images.append(img)
    keys = ("object", "color", "position", "shape", "exact")
    out = {"n": n, **{k: sum(r[k] for _, r in rows) / n for k in keys}}
    for name, k in (("single", 1), ("two", 2)):
        sub = [r["object"] for nobj, r in rows if nobj == k]
        out[name] = sum(sub) / len(sub) if sub else float("nan")
    out["images"], out["prompts"] = images, [p for p, _ in pairs]
    return out
