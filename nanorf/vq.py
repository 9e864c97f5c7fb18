"""EMA target encoder and online cosine VQ: the representation targets (the paper's Algorithm 1;
docs/method.md, "Representation targets and online VQ").

The decoder learns to predict discrete representation tokens. Their ids come from quantising
features of an EMA copy of the (jointly trained) ViT against K momentum-updated prototypes.
Algorithm 1, step by step, and the line that implements it:

  1. Z = f_ema(X), (B*L, D), L2-normalised        EMAEncoder.features: `x_prenorm` -> pool_features
                                                  -> F.normalize (the caller flattens B*L)
  2. score = Z C^T / tau                          OnlineVQ.assign: `s = z.float() @ self.prototypes.T / self.tau`
  3. softmax over codes (dim 1)                   OnlineVQ.assign: `q = s.softmax(dim=1)`
  4. softmax over the batch (dim 0), one          OnlineVQ.assign: `e = q.exp()`, `col = e.sum(dim=0)`
     "Sinkhorn" step                              (`dist.all_reduce(col)` under DDP), `p = e / col`
  5. A = argmax over codes                        OnlineVQ.assign: `return p.argmax(dim=1)`
  6. C_new[k] = normalize(sum_{a_i=k} z_i / N_k)  OnlineVQ.update: `stats[...].index_add_(0, codes, ...)`
                                                  (sums and counts), then `c_new = F.normalize(sums / counts...)`
  7. C = normalize(m C + (1-m) C_new)             OnlineVQ.update: `c_upd = F.normalize(self.momentum * ...)`,
                                                  applied only where `used` (torch.where)

Choices the paper leaves open:
  * Pooling: average pooling of p x p neighbouring patch features (cfg.pool), before the L2 norm.
  * Features are the last block's patch tokens before the final LayerNorm (paper), so no
    CLS/storage tokens and no norm affine.
  * Step 4 literally applies a second softmax to probabilities in [0, 1], so exp never overflows
    and no max-subtraction is needed. softmax over dim 0 = exp(q_ik) / sum_i exp(q_ik); the argmax
    per row only needs the per-code column sums, so under DDP we all-reduce K numbers instead of
    gathering Z, and the codes equal those of one process holding the whole global batch.
  * Empty codes (N_k = 0, a 0/0 in the pseudocode) keep their prototype bit-exactly (torch.where).
  * DDP: per-code sums and counts are all-reduced (one collective on a (K, D+1) tensor), so every
    rank applies the same update and the codebook stays identical across ranks without broadcasts.
  * Initialisation: on the first forward, prototypes are K features of that global batch plus
    small Gaussian noise (0.01 / sqrt(D) per coordinate), re-normalised; the features are
    all-gathered and every draw uses a fixed-seed generator, so DDP picks what one process would.
    Why not random unit vectors: in high dimension they are nearly orthogonal to every real
    feature (which lie in a small cone), so early assignments collapse onto the few prototypes
    that happen to be closest. Which K features (`VQConfig.init`):
      "random" (default): K features drawn at random (without replacement if M >= K).
      "farthest": farthest-point sampling (k-centre greedy) in cosine distance, from a
        random first feature, over at most max(4K, 16,384) of the batch's features drawn at
        random. A random draw copies the batch's imbalance: in the shapes world 2/3 of the cells
        are empty, so 2/3 of a random codebook starts on empty cells, and a random 64-code draw
        left 5 of the 19 cell contents (18 colour+shape classes and empty) without a code of
        their own (measured on the toy's encoder at step 0, 600 images: 14/19 contents own a
        code after a pass of updates, 19/19 from farthest points; purity 0.89 vs 0.94).
        Farthest points cover every distinct kind of feature first, however rare. It is not the
        default, nor the toy's: with the toy's encoder trained from scratch and its EMA at 0.999
        the contents merged again within 300 steps (64 -> 18 codes in use). With the paper's EMA
        0.9999 (or 0.9995) the target encoder stays near its start and 23-51 codes stay in use,
        10-14 of the 19 contents keeping a code of their own; on the toy's recipe (two seeds
        each) its pixels then follow a real image's plan a little better (plan-swap on 256
        prompts 0.944-0.977 against 0.955 / 0.936), but strict overall does not rise (0.796 / 0.856
        and 0.724 / 0.812 against 0.852 / 0.796) and RF's where-answers fall below pixel-only's
        (docs/toy_log.md, "Codes that keep the shapes apart").
    Past M distinct features the rest are drawn with replacement. The noise separates duplicates
    (e.g. many identical background patches), which otherwise tie forever and the higher-index
    copy is never chosen. The `initialized` buffer is saved in checkpoints,
    so a resumed run does not re-initialise.
  * One codebook update per forward in training mode; no update in eval mode; no dead-code
    restarts beyond the Sinkhorn step. train.py makes one forward per optimiser step, over the
    concatenated features of all of the step's micro-batches (targets.RepresentationTargets.label),
    so "the batch" of steps 4 and 6 (and of the initialisation) is the step's global batch, all
    ranks x all gradient-accumulation micro-steps, and the codes do not depend on the split.
  * The VQ runs in fp32 with autocast disabled: cosine logits / tau in bf16 would tie codes.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from nanorf.config import VQConfig
from nanorf.vit import ViT

INIT_NOISE = 0.01  # norm of the noise added to sampled init features (relative to unit features)


def _ddp() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_rows(z: Tensor) -> Tensor:
    """Concatenate every rank's rows in rank order (ranks may hold different counts)."""
    if not _ddp():
        return z
    n = torch.tensor([z.shape[0]], device=z.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(x) for x in sizes]
    padded = torch.zeros(max(sizes), z.shape[1], device=z.device, dtype=z.dtype)
    padded[: z.shape[0]] = z
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:k] for o, k in zip(out, sizes)])


def pool_features(feats: Tensor, grid: tuple[int, int], pool: int) -> Tensor:
    """Average-pool raster-order patch features on their grid: (B, h*w, D) -> (B, (h/p)(w/p), D)."""
    B, N, D = feats.shape
    h, w = grid
    if h * w != N:
        raise ValueError(f"grid {h}x{w} does not match {N} tokens")
    if h % pool or w % pool:
        raise ValueError(f"patch grid {h}x{w} is not divisible by the pooling factor {pool}")
    x = feats.transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w)
    x = F.avg_pool2d(x, pool)  # (B, D, h/p, w/p)
    return x.flatten(2).transpose(1, 2)  # (B, L, D), raster order over the pooled grid


def farthest_points(z: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Indices (k,) into unit rows z (M, D) by k-centre greedy: a random first row, then each
    time the row farthest (in cosine) from all chosen. Runs over at most max(4k, 16,384) random
    rows (O(rows * k * D) work); past the distinct rows (every remaining distance 0) the rest
    are drawn with replacement."""
    M = z.shape[0]
    pool = torch.randperm(M, generator=generator)[: max(4 * k, 16384)].to(z.device)  # (P,) candidates
    x = z[pool]                                                                   # (P, D)
    chosen = [0]
    gap = 1 - x @ x[0]                                                            # (P,) to the nearest chosen
    while len(chosen) < min(k, len(pool)):
        j = int(gap.argmax())
        if gap[j] <= 0:
            break
        chosen.append(j)
        gap = torch.minimum(gap, 1 - x @ x[j])
    extra = torch.randint(0, len(pool), (k - len(chosen),), generator=generator).to(z.device)
    return pool[torch.cat([torch.tensor(chosen, device=z.device), extra])]


class EMAEncoder(nn.Module):
    """A frozen EMA copy of the online ViT that only produces VQ target features (never trained).

    It stays in eval mode whatever `.train()` says; its parameters never require grad.
    """

    def __init__(self, online: ViT, pool: int):
        super().__init__()
        self.pool = pool
        self.encoder = copy.deepcopy(online)
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # no dropout/RoPE jitter today, but the target must stay deterministic
        return self

    @torch.no_grad()
    def update(self, online: ViT, decay: float):
        """p_ema = decay * p_ema + (1 - decay) * p; buffers (RoPE periods) are copied.

        Pass the unwrapped module (`ddp_model.module`'s ViT), whose names match ours.
        """
        online_params = dict(online.named_parameters())
        for name, p_ema in self.encoder.named_parameters():
            p_ema.mul_(decay).add_(online_params[name].detach(), alpha=1 - decay)
        online_bufs = dict(online.named_buffers())
        for name, b_ema in self.encoder.named_buffers():
            b_ema.copy_(online_bufs[name])

    @torch.no_grad()
    def features(self, images: Tensor, pool: int | None = None) -> Tensor:
        """images (B, 3, H, W) -> L2-normalised pooled targets (B, L, D), L = (H/ps/pool)(W/ps/pool).
        pool defaults to the VQ's; REPA pools to the pixel-patch grid instead."""
        out = self.encoder(images)
        z = pool_features(out["x_prenorm"].float(), out["grid"], pool or self.pool)  # (B, L, D)
        return F.normalize(z, dim=-1)


class OnlineVQ(nn.Module):
    """K unit-norm prototypes updated by momentum (SwAV-style); forward(z (M, D)) -> codes (M,).

    Buffers (saved in checkpoints): `prototypes` (K, D), `initialized` (bool, 0-dim).
    After each update: `last_usage` = number of codes hit by the global batch and
    `last_perplexity` = exp(entropy of the global code histogram), both 0-dim float tensors on the
    prototypes' device (no host sync; call .item() when logging).
    """

    def __init__(self, dim: int, cfg: VQConfig):
        super().__init__()
        self.K, self.dim = cfg.codebook_size, dim
        self.tau, self.momentum, self.init = cfg.tau, cfg.momentum, cfg.init
        if self.init not in ("farthest", "random"):
            raise ValueError(f"vq.init must be 'farthest' or 'random', got {self.init!r}")
        self.register_buffer("prototypes", F.normalize(torch.randn(self.K, dim), dim=1))
        self.register_buffer("initialized", torch.tensor(False))
        self._init_cached = False  # python mirror of `initialized`, so forward needs no host sync
        self.last_usage = torch.zeros(())
        self.last_perplexity = torch.zeros(())

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._init_cached = False  # re-read the loaded `initialized` flag on the next forward

    @torch.no_grad()
    def init_from(self, z: Tensor):
        """Prototypes <- K features of the global batch (+ noise), drawn from a fixed-seed
        generator, so every rank, and a single process holding the same global batch,
        picks the same codebook."""
        z = _gather_rows(z.float())                                       # (M_global, D), rank order
        M = z.shape[0]
        g = torch.Generator().manual_seed(0)
        if self.init == "farthest":
            idx = farthest_points(z, self.K, g)
        elif M >= self.K:
            idx = torch.randperm(M, generator=g)[: self.K]
        else:
            idx = torch.randint(0, M, (self.K,), generator=g)
        noise = torch.randn(self.K, self.dim, generator=g) * (INIT_NOISE / math.sqrt(self.dim))
        self.prototypes.copy_(F.normalize(z[idx.to(z.device)] + noise.to(z.device), dim=1))
        self.initialized.fill_(True)

    @torch.no_grad()
    def assign(self, z: Tensor) -> Tensor:
        """z (M, D) unit rows -> codes (M,) long: argmax of softmax_batch(softmax_codes(z C^T / tau))."""
        s = z.float() @ self.prototypes.T / self.tau  # (M, K) cosine / tau
        q = s.softmax(dim=1)  # (M, K) over codes
        # Softmax over the (global) batch: p_ik = exp(q_ik) / sum_i exp(q_ik). q is in [0, 1], so
        # exp is in [1, e]: no max-shift needed, and only the column sums cross ranks.
        e = q.exp()  # (M, K)
        col = e.sum(dim=0)  # (K,)
        if _ddp():
            dist.all_reduce(col)
        p = e / col  # (M, K)
        return p.argmax(dim=1)  # (M,)

    @torch.no_grad()
    def update(self, z: Tensor, codes: Tensor):
        """Move each used prototype toward the normalised mean of its (global) assigned features."""
        stats = torch.zeros(self.K, self.dim + 1, device=z.device)  # [:, :D] sums, [:, D] counts
        stats[:, : self.dim].index_add_(0, codes, z.float())
        stats[:, self.dim].index_add_(0, codes, torch.ones_like(codes, dtype=stats.dtype))
        if _ddp():
            dist.all_reduce(stats)  # one collective: every rank gets the global sums and counts
        sums, counts = stats[:, : self.dim], stats[:, self.dim]  # (K, D), (K,)
        used = counts > 0  # (K,)
        c_new = F.normalize(sums / counts.clamp_min(1).unsqueeze(1), dim=1)  # (K, D)
        c_upd = F.normalize(self.momentum * self.prototypes + (1 - self.momentum) * c_new, dim=1)
        # where(), not arithmetic masking: empty codes must keep their prototype bit-exactly.
        self.prototypes.copy_(torch.where(used.unsqueeze(1), c_upd, self.prototypes))

        self.last_usage = used.sum().float()
        self.last_perplexity = perplexity(counts)

    @torch.no_grad()
    def snapshot(self) -> dict[str, Tensor]:
        """Copies of the buffers a training forward changes (prototypes, initialized), for `restore`."""
        return {"prototypes": self.prototypes.clone(), "initialized": self.initialized.clone()}

    @torch.no_grad()
    def restore(self, snap: dict[str, Tensor]):
        """Undo every update since `snapshot` (train.py: a skipped, non-finite step)."""
        self.prototypes.copy_(snap["prototypes"])
        self.initialized.copy_(snap["initialized"])
        self._init_cached = False  # re-read `initialized` on the next forward

    def forward(self, z: Tensor, update: bool = True) -> Tensor:
        """z (M, D) L2-normalised target features -> codes (M,) long. No gradient flows anywhere."""
        with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
            z = z.detach().float()
            if not self._init_cached:
                if not bool(self.initialized):  # one host sync, until the flag is known to be set
                    self.init_from(z)
                self._init_cached = True
            codes = self.assign(z)
            if update and self.training:
                self.update(z, codes)
        return codes


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of a code histogram (K,): the number of equally used codes it is worth."""
    hist = counts.float() / counts.sum().clamp_min(1)
    return torch.exp(-(hist * torch.log(hist.clamp_min(1e-30))).sum())


def codebook_stats(codes: Tensor, K: int) -> dict:
    """Usage of a batch of codes (any shape): {"used": distinct codes, "perplexity": exp(entropy)}."""
    counts = torch.bincount(codes.flatten(), minlength=K)  # (K,)
    return {"used": int((counts > 0).sum()), "perplexity": float(perplexity(counts))}
