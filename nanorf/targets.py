"""Representation targets: what the rep tokens are trained to predict (docs/method.md,
"Representation targets and online VQ").

An EMA copy of the image encoder (no gradient) reads the clean image; its last-layer patch
features before the final norm are 2x2-pooled and L2-normalised (vq.EMAEncoder), and the
online VQ of the paper's Algorithm 1 (vq.OnlineVQ) turns them into N code ids, raster order.
train.py labels a step's generation micro-batches together (`label`): one assignment and one
codebook update per optimiser step, over the step's whole (global) batch, so the targets do not
depend on how the batch is split into ranks and gradient-accumulation micro-steps.
This module composes the two for train.py; it is not part of RFModel, is not averaged into the
sampling EMA, and is not needed to sample.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ModelConfig
from .model import GenBatch
from .patches import patchify
from .vit import ViT
from .vq import EMAEncoder, OnlineVQ


class RepresentationTargets(nn.Module):
    """The EMA copy of the encoder and the online VQ that turn a clean image into
    N discrete target ids (docs/method.md, "Representation targets and online VQ"). Not part of RFModel: it has no gradient, is not
    averaged into the sampling EMA, and is not needed to sample.
    The ablations read the same EMA features: continuous targets skip the VQ; REPA pools
    them to the pixel-patch grid (`align`).

    With the codebook it keeps `code_patches` (K, s*s*3): a running mean of the image patch
    (s = image side / rep grid, in [-1, 1], patchify's layout) under each code, so that a plan
    of codes can be drawn as a coarse preview of the picture (sample.py --rep-map). A display
    aid, not part of the method: it never feeds the model."""

    PATCH_MOMENTUM = 0.99  # of code_patches; a code seen for the first time takes its batch mean

    def __init__(self, cfg: ModelConfig, vit: ViT):
        super().__init__()
        self.cfg = cfg
        self.encoder = EMAEncoder(vit, cfg.vq.pool)
        self.vq = OnlineVQ(cfg.vit.dim, cfg.vq) if cfg.rf and cfg.rep_target == "discrete" else None
        self.decay = cfg.vq.encoder_ema
        if self.vq is not None:
            s = cfg.image_size // cfg.rep_grid
            self.register_buffer("code_patches", torch.zeros(cfg.vq.codebook_size, s * s * 3))
            self.register_buffer("code_seen", torch.zeros(cfg.vq.codebook_size, dtype=torch.bool))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, update: bool = True) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N) code ids, raster order over the pooled grid; with
        continuous targets, the features x = sqrt(D) f (B, N, D) instead."""
        return self.targets_of([images], update)[0]

    @torch.no_grad()
    def targets_of(self, images: list[torch.Tensor], update: bool = True) -> list[torch.Tensor]:
        """The targets of several image batches labelled as ONE batch: one EMA-encoder forward
        per batch (so the encoder's peak memory stays that of one batch), then one VQ assignment,
        codebook update (or first-forward initialisation) and `track_patches` over all of their
        features together. train.py passes a step's micro-batches, so the batch softmax and the
        update see the step's whole batch whatever `--micro-batch-size` is (under DDP, with the
        VQ's all-reduces, the whole global batch). Returns one tensor per input batch, as forward."""
        feats = [self.encoder.features(x) for x in images]                        # (B_i, N_i, D) each, unit norm
        if self.vq is None:
            return [z * z.shape[-1] ** 0.5 for z in feats]
        # batches may differ in size (packing: N_i = that size's rep grid), so the VQ sees the
        # rows of all of them as one flat (sum B_i N_i, D) batch
        flat = torch.cat([z.flatten(0, 1) for z in feats])
        codes = self.vq(flat, update=update).split([z.shape[0] * z.shape[1] for z in feats])
        out = [c.view(z.shape[0], z.shape[1]) for c, z in zip(codes, feats)]     # (B_i, N_i) each
        if update and self.training:
            self.track_patches(images, out)
        return out

    @torch.no_grad()
    def track_patches(self, images, codes):
        """Move each used code's mean patch toward this (global) batch's mean under it.
        images (B, 3, H, W) and codes (B, N), or lists of such batches of different sizes."""
        if isinstance(images, torch.Tensor):
            images, codes = [images], [codes]
        s = self.cfg.image_size // self.cfg.rep_grid
        tiles = torch.cat([patchify(x.float(), s).flatten(0, 1) for x in images])   # (sum B_i N_i, s*s*3)
        flat = torch.cat([c.flatten() for c in codes])
        stats = torch.zeros(self.code_patches.shape[0], tiles.shape[1] + 1, device=tiles.device)
        stats[:, :-1].index_add_(0, flat, tiles)
        stats[:, -1].index_add_(0, flat, torch.ones_like(flat, dtype=stats.dtype))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)  # every rank keeps the same table, as with the codebook
        used = stats[:, -1] > 0
        mean = stats[:, :-1] / stats[:, -1:].clamp_min(1)
        m = torch.where(self.code_seen, self.PATCH_MOMENTUM, 0.0)[:, None]
        self.code_patches.copy_(torch.where(used[:, None], m * self.code_patches + (1 - m) * mean, self.code_patches))
        self.code_seen |= used

    @torch.no_grad()
    def label(self, *batches: GenBatch):
        """Fill in the targets of one step's generation micro-batches from their clean images:
        the rep targets (with rep tokens), assigned over all the batches together
        (`targets_of`), and REPA's features (with a REPA weight), per batch."""
        if self.cfg.rf:
            for b, t in zip(batches, self.targets_of([b.images for b in batches])):
                b.targets = t
        if self.cfg.repa_weight:
            for b in batches:
                b.align = self.align(b.images)

    @torch.no_grad()
    def align(self, images: torch.Tensor) -> torch.Tensor:
        """REPA's targets: (B, 3, H, W) -> unit features (B, M, D) on the pixel-patch grid: each
        pixel patch gets the feature of the encoder region it lies in. Pixel patches r times the
        encoder's average r x r encoder patches; pixel patches r times smaller (the toy: 8 px
        against 16) each take the feature of the encoder patch that contains them."""
        p, v = self.cfg.patch_size, self.cfg.vit.patch_size
        if p >= v:
            return self.encoder.features(images, pool=p // v)
        z = self.encoder.features(images, pool=1)                                  # (B, h*w, D) on the encoder grid
        B, _, D = z.shape
        h, w = images.shape[-2] // v, images.shape[-1] // v
        z = z.transpose(1, 2).reshape(B, D, h, w)                                  # (B, D, h, w)
        z = z.repeat_interleave(v // p, dim=2).repeat_interleave(v // p, dim=3)    # (B, D, H/p, W/p)
        return z.flatten(2).transpose(1, 2)                                        # (B, M, D), raster order

    @torch.no_grad()
    def ema_update(self, vit: ViT):
        self.encoder.update(vit, self.decay)

    @torch.no_grad()
    def snapshot(self) -> dict | None:
        """Copies of all a training forward changes (the codebook and the mean patch per code),
        for `restore`; None without a VQ (nothing changes then)."""
        if self.vq is None:
            return None
        return {"vq": self.vq.snapshot(), "code_patches": self.code_patches.clone(),
                "code_seen": self.code_seen.clone()}

    @torch.no_grad()
    def restore(self, snap: dict | None):
        """Undo every update since `snapshot` (train.py: a skipped, non-finite step)."""
        if snap is not None:
            self.vq.restore(snap["vq"])
            self.code_patches.copy_(snap["code_patches"])
            self.code_seen.copy_(snap["code_seen"])


def targets_from_checkpoint(ck: dict, cfg: ModelConfig, vit: ViT) -> RepresentationTargets | None:
    """A loaded checkpoint's target maker (EMA encoder, codebook, code patches), in eval mode;
    None for a run that had none (pixel-only)."""
    if ck.get("targets") is None:
        return None
    targets = RepresentationTargets(cfg, vit).eval()
    targets.load_state_dict(ck["targets"])
    return targets
