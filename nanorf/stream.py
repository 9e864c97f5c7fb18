"""The training stream: which examples and random draws make up each step's global batch.

Every random draw of a step (which examples, the flow times t, the noise, the CFG drops of
docs/method.md, "Classifier-free guidance") is a function of (seed, step, example index),
never of the rank or the gradient-accumulation micro-step. With the online VQ assigning codes
over a step's whole batch (nanorf/targets.py), a run gives the same result on any number of
processes and any micro-batch size, and resumes exactly from a checkpoint that holds only the
weights, the optimiser, the codebook and the step.

A folder image that fails to decode is replaced by the next index that does (`_folder_item`):
a function of the folder alone, so every rank and a resumed run substitute the same image. The
stream records each bad index once (`bad`); train.py shares new ones between ranks, logs
their paths and stops the run when too many of the folder's images fail.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .config import Config
from .data import DataError, ImageCaptionFolder, ShapesWorld
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
        self.bad: dict[int, str] = {}  # folder index -> why it does not decode (every bad item known here)
        self.fresh: list[int] = []     # bad indices this process found since the last `take_fresh`
        if t.data:  # packed runs keep each image's aspect ratio (nanorf/packing.py); padded ones crop squares
            self.gen = self.und = ImageCaptionFolder(t.data, m.image_size, keep_aspect=t.tokens_per_rank > 0,
                                                     multiple=m.size_multiple)
        else:
            self.gen = ShapesWorld(m.image_size, seed=t.seed, kinds=t.kinds)
            self.und = ShapesWorld(m.image_size, seed=t.seed + 1_000_003, kinds=t.kinds)

    def _item(self, ds, i: int):
        return ds[i] if isinstance(ds, ShapesWorld) else self._folder_item(ds, self.item_id(i))

    def item_id(self, i: int) -> int:
        """Stream position i -> the item it reads: i itself in the shapes world, a folder index
        (a line of captions.jsonl) for a folder, under a fresh permutation every epoch."""
        if isinstance(self.gen, ShapesWorld):
            return i
        n, epoch = len(self.gen), i // len(self.gen)
        if self._perm[0] != epoch:  # drawn once per epoch
            g = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=g))
        return int(self._perm[1][i % n])

    def _folder_item(self, ds: ImageCaptionFolder, j: int) -> dict:
        """Folder item j, or, if its image does not decode, the next index (cyclically) that does."""
        for k in range(len(ds)):
            jj = (j + k) % len(ds)
            if jj in self.bad:
                continue
            try:
                return ds[jj]
            except DataError as e:
                self.bad[jj] = str(e)
                self.fresh.append(jj)
        raise DataError(f"no image in {ds.root} decodes: {next(iter(self.bad.values()))}")

    def take_fresh(self) -> list[tuple[int, str]]:
        """The bad items found since the last call, as (index, error)."""
        out = [(j, self.bad[j]) for j in self.fresh]
        self.fresh = []
        return out

    def gen_ids(self, step: int, ks) -> list[int]:
        """The items examples ks of the step's global generation batch read (before any substitution)."""
        return [self.item_id(step * self.cfg.train.batch_size + k) for k in ks]

    def und_ids(self, step: int, ks) -> list[int]:
        return [self.item_id(step * self.cfg.train.und_batch_size + k) for k in ks]

    def draws(self, step: int) -> StepDraws:
        m, model = self.cfg.model, self.model
        B = self.cfg.train.batch_size
        g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + step)
        d = StepDraws(t=sample_t(B, m.flow.p_mean, m.flow.p_std, g, m.flow.p_uniform),
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

    def gen_examples(self, step: int, idx: range, d: StepDraws, device) -> list[GenBatch]:
        """Examples idx one by one, for packing: each keeps its image's own size. An image of
        another size than the config's square canvas gets noise of its own grid, drawn from a
        generator seeded with (seed, step, example), so it too is independent of rank and pack."""
        m = self.cfg.model
        out = []
        for k in idx:
            b = self.gen_batch(step, range(k, k + 1), d, device)
            n_pix = m.grids(b.images.shape[-2:]).n_pix
            if n_pix != b.eps.shape[1]:
                g = torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + step) * 1_000_033 + k)
                b.eps = (torch.randn(1, n_pix, m.patch_size ** 2 * 3, generator=g) * m.flow.noise_scale).to(device)
            out.append(b)
        return out

    def und_examples(self, step: int, idx: range, device) -> list[UndBatch]:
        """Understanding examples idx one by one, for packing (each image at its own size)."""
        return [self.und_batch(step, range(k, k + 1), device) for k in idx]

    def und_batch(self, step: int, idx: range, device) -> UndBatch:
        """Examples idx of the step's global understanding batch: one image each and
        train.und_turns of its questions (distinct, in random order; fewer if it has fewer)."""
        t, tok, L = self.cfg.train, self.model.tok, self.cfg.model.max_text_len
        qs, ans, more, imgs = [], [], [], []
        for k in idx:
            it = self._item(self.und, step * t.und_batch_size + k)
            rng = random.Random(f"{t.seed}:qa:{step * t.und_batch_size + k}")
            # one turn keeps the single-question draw runs made before und_turns existed
            turns = [rng.choice(it["qa"])] if t.und_turns == 1 else rng.sample(it["qa"], min(t.und_turns, len(it["qa"])))
            (q, a), *rest = [(self.model.question_ids(q), tok.encode(a, L)) for q, a in turns]
            qs.append(q), ans.append(a), more.append(rest), imgs.append(it["image"])
        return UndBatch(images_to_tensor(imgs).to(device), qs, ans, more if t.und_turns > 1 else None)
