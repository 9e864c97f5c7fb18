"""The training stream: which examples and random draws make up each step's global batch.

Every random draw of a step (which examples, the flow times t, the noise, the CFG drops of
docs/method.md, "Classifier-free guidance") is a function of (seed, step, example index),
never of the rank or the gradient-accumulation micro-step. So a run gives the same result
on any number of processes, and resumes exactly from a checkpoint that holds only the
weights, the optimiser, the codebook and the step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .config import Config
from .data import ImageCaptionFolder, ShapesWorld
from .flow import sample_t
from .model import GenBatch, RFModel, UndBatch
from .patches import images_to_tensor


@dataclass
class StepDraws:
    """Every random draw of one step's global generation batch, (B, ...) each."""
    t: torch.Tensor
    eps: torch.Tensor
    drop_text: torch.Tensor
    drop_rep: torch.Tensor
    target_draws: tuple | None     # what the rep-target kind's loss draws (None for RF's codes)


class Stream:
    """Which examples and random draws make up each step's global batch.

    Example k of step s is item `s * B + k` of the generation stream (its own seed for
    understanding); the step's t, noise and CFG drops come from a generator seeded with
    (seed, step), drawn for the whole global batch so each rank just slices its part."""

    def __init__(self, cfg: Config, model: RFModel):
        m, t = cfg.model, cfg.train
        self.cfg, self.model = cfg, model
        self._perm = (-1, None)  # (epoch, permutation) of a folder dataset
        if t.data:
            self.gen = self.und = ImageCaptionFolder(t.data, m.image_size)
        else:
            self.gen = ShapesWorld(m.image_size, seed=t.seed, kinds=t.kinds)
            self.und = ShapesWorld(m.image_size, seed=t.seed + 1_000_003, kinds=t.kinds)

    def _item(self, ds, i: int):
        if isinstance(ds, ShapesWorld):
            return ds[i]
        n, epoch = len(ds), i // len(ds)  # a folder: a fresh permutation every epoch, drawn once
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=g))
        return ds[int(self._perm[1][i % n])]

    def draws(self, step: int) -> StepDraws:
        m, model = self.cfg.model, self.model
        B = self.cfg.train.batch_size
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step)
        d = StepDraws(t=sample_t(B, m.flow.p_mean, m.flow.p_std, g),
                      eps=torch.randn(B, model.n_pix, m.patch_size ** 2 * 3, generator=g) * m.flow.noise_scale,
                      drop_text=torch.rand(B, generator=g) < m.p_drop_text,
                      drop_rep=torch.rand(B, generator=g) < m.p_drop_rep,
                      target_draws=None)
        if model.rep is not None:  # drawn after the rest, so RF's stream does not depend on it
            d.target_draws = model.rep.target_draws(B, g)
        return d

    def gen_batch(self, step: int, idx: range, d: StepDraws, device) -> GenBatch:
        """Examples idx of the step's global generation batch, with their slice of the draws."""
        B, tok, sl = self.cfg.train.batch_size, self.model.tok, slice(idx.start, idx.stop)
        items = [self._item(self.gen, step * B + k) for k in idx]
        extra = None if d.target_draws is None else tuple(x[sl].to(device) for x in d.target_draws)
        return GenBatch(prompts=[tok.encode(it["caption"], self.cfg.model.max_text_len) for it in items],
                        images=images_to_tensor([it["image"] for it in items]).to(device), targets=None,
                        t=d.t[sl].to(device), eps=d.eps[sl].to(device), drop_text=d.drop_text[sl],
                        drop_rep=d.drop_rep[sl], target_draws=extra)

    def und_batch(self, step: int, idx: range, device) -> UndBatch:
        """Examples idx of the step's global understanding batch: one question per image."""
        B, tok = self.cfg.train.und_batch_size, self.model.tok
        qs, ans, imgs = [], [], []
        for k in idx:
            it = self._item(self.und, step * B + k)
            q, a = random.Random(f"{self.cfg.train.seed}:qa:{step * B + k}").choice(it["qa"])
            qs.append(self.model.question_ids(q)), ans.append(tok.encode(a, self.cfg.model.max_text_len))
            imgs.append(it["image"])
        return UndBatch(images_to_tensor(imgs).to(device), qs, ans)
