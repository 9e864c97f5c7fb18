"""The paper's ablations of representation forcing (Table 3; docs/method.md, "Ablations (Table 3)").

The method's code (model.py) does not branch on them: each plugs in from the side, and
`build_model` picks the class a config asks for.

Pixel-only (Table 3a, `model.rf = False`): no representation tokens at all; RFModel simply
has no rep module and the sequence has no [BOR].

Both use the same EMA encoder features as RF's targets (last layer, before the final norm,
pooled, L2-normalised); only what the decoder does with them changes.

REPA (Table 3b, `REPAModel`, `model.repa_weight > 0`, run with `--no-rf`): no representation tokens in
the sequence. The pixel tokens' hidden states after `repa_depth` blocks, h (B, M, D), go
through a small MLP projector and are pulled towards the encoder feature of the same image
region, f (B, M, D_vit), by cosine similarity (REPA, Yu et al. 2024):

    L_REPA = mean over tokens of (1 - cos(proj(h), f)),     L = L_LM + L_FM + lambda L_REPA

REPA's default lambda is 0.5 and its projector a 3-layer SiLU MLP; we keep both. The features
are pooled to the pixel-patch grid, so each pixel token has one target.

Continuous targets (Table 3c, `ContinuousRepModel`, `model.rep_target = "continuous"`): the representation
tokens are the encoder features themselves, x = sqrt(D_vit) f (unit RMS per element, the
scale the Gaussian noise has), read in by a linear layer instead of looked up by code id.
The decoder's hidden state at the previous position, c (B, N, D), conditions a small
per-position diffusion head (MAR's MLP with adaLN), trained with the same x-prediction
flow matching as the pixels (flow.py), on `DIFF_MUL` noise draws per token (MAR's
batch multiplier: the head is cheap, and more draws steady its loss):

    L_Rep = E || v_theta(z_t, t | c) - (x - eps) ||^2

Sampling integrates the head's ODE per token (guided by c of the prompt-dropped branch,
as the discrete logits are), projects the result back onto the sphere the targets live
on, and feeds it in as the next token. The paper's verdict: this AR regression
accumulates errors (0.26 against 0.76 for discrete tokens).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .flow import add_noise, fm_loss, sample_t, time_grid, timestep_embedding, velocity
from .model import GenBatch, GenOutput, RFModel

DIFF_MUL = 4


class REPAProjector(nn.Module):
    """(B, M, D) hidden states -> (B, M, D_vit); REPA's 3-layer SiLU MLP."""

    def __init__(self, dim: int, feat_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 4 * dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, feat_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def repa_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos) over tokens: pred, target (B, M, D_vit). 0 when aligned, 2 when opposite."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1)).mean()


class _AdaLNBlock(nn.Module):
    """Residual MLP whose LayerNorm is shifted, scaled and gated by the condition (DiT / MAR)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c):
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    """Per-position diffusion head: x_theta(z_t, t | c) for one continuous rep vector.

    z (n, F) noisy features, t (n,), c (n, D) the decoder's hidden state -> x_pred (n, F).
    """

    def __init__(self, feat_dim: int, cond_dim: int, width: int, depth: int = 3):
        super().__init__()
        self.feat_dim = feat_dim
        self.inp = nn.Linear(feat_dim, width)
        self.t_emb = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.cond = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(_AdaLNBlock(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(width, feat_dim)
        nn.init.zeros_(self.out.weight)  # starts at x = 0, like the pixel head
        nn.init.zeros_(self.out.bias)

    def forward(self, z, t, c):
        c = self.cond(c) + self.t_emb(timestep_embedding(t, 256))                  # (n, W)
        x = self.inp(z)
        for blk in self.blocks:
            x = blk(x, c)
        return self.out(self.out_norm(x))

    def loss(self, c: torch.Tensor, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, t_eps: float):
        """c (B, N, D) conditions, x (B, N, F) targets; t (B, DIFF_MUL, N) and eps
        (B, DIFF_MUL, N, F) the noise draws. Mean v-loss over every element."""
        B, R, N, Fd = eps.shape
        xx = x[:, None].expand(B, R, N, Fd).reshape(-1, Fd)                          # (B*R*N, F)
        cc = c[:, None].expand(B, R, N, c.shape[-1]).reshape(-1, c.shape[-1])
        tt, ee = t.reshape(-1), eps.reshape(-1, Fd)
        z = add_noise(xx, tt, ee)
        return fm_loss(self(z, tt, cc), xx, ee, z, tt, t_eps)

    @torch.no_grad()
    def sample(self, c: torch.Tensor, n_cond: int, w: float, steps: int, generator=None) -> torch.Tensor:
        """Euler ODE from noise for each row of c (R, D) -> (n_cond, F) on the unit sphere
        scaled by sqrt(F). With w != 1, c holds the conditional rows then as many
        unconditional ones, and v = v_u + w (v_c - v_u)."""
        z = torch.randn(n_cond, self.feat_dim, generator=generator).to(c.device)
        ts = time_grid(steps).tolist()
        for t0, t1 in zip(ts[:-1], ts[1:]):
            zz = z.repeat(c.shape[0] // n_cond, 1)
            tt = torch.full((zz.shape[0],), t0, device=c.device)
            v = velocity(self(zz, tt, c).float(), zz, tt, 1e-6)
            if c.shape[0] > n_cond:
                v_c, v_u = v.split(n_cond)
                v = v_u + w * (v_c - v_u)
            z = z + (t1 - t0) * v
        return F.normalize(z, dim=-1) * self.feat_dim ** 0.5


class ContinuousRep(nn.Module):
    """Table 3c's rep-target kind, with DiscreteRep's interface (rep_tokens.py): features
    (B, n, D_vit) in through a linear layer, and a diffusion head conditioned on the
    hidden state out."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim, feat_dim = cfg.mot.dim, cfg.vit.dim
        self.cfg, self.feat_dim, self.n = cfg.flow, feat_dim, cfg.rep_grid ** 2
        self.inp = nn.Linear(feat_dim, dim)
        self.head = DiffusionHead(feat_dim, dim, dim)

    def init_weights(self):
        pass  # DiffusionHead initialises itself (zero output layer, like the pixel head)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.inp(codes)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        return h  # the hidden state conditions the head; there are no logits

    def loss(self, out: torch.Tensor, targets: torch.Tensor, draws) -> torch.Tensor:
        """draws: (t (B, DIFF_MUL, N), eps (B, DIFF_MUL, N, D_vit)), from `target_draws`."""
        t, eps = draws
        return self.head.loss(out, targets, t, eps, self.cfg.t_eps)

    def draw(self, out: torch.Tensor, n: int, w: float, settings, generator=None) -> torch.Tensor:
        """out (n or 2n, D): the head's ODE per row, guided on its velocity -> (n, D_vit)."""
        guided = w != 1.0 and out.shape[0] > n
        return self.head.sample(out if guided else out[:n], n, w, settings.steps, generator)

    def buffer(self, rows: int, n: int, device) -> torch.Tensor:
        return torch.zeros(rows, n, self.feat_dim, device=device)

    def target_draws(self, B: int, g: torch.Generator):
        """The head's noise for a batch, drawn from the step's generator (train.Stream):
        t (B, DIFF_MUL, N) and eps (B, DIFF_MUL, N, D_vit)."""
        return (sample_t(B * DIFF_MUL * self.n, self.cfg.p_mean, self.cfg.p_std, g).view(B, DIFF_MUL, self.n),
                torch.randn(B, DIFF_MUL, self.n, self.feat_dim, generator=g))


class ContinuousRepModel(RFModel):
    """Table 3c: RF with continuous representation targets."""

    def make_rep(self) -> nn.Module:
        return ContinuousRep(self.cfg)


class REPAModel(RFModel):
    """Table 3b: the pixel block's hidden states after `repa_depth` blocks are aligned to the
    EMA encoder's features; the weighted loss is logged in the rep slot."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.tap_depth = cfg.repa_depth or cfg.mot.depth // 2
        self.repa_proj = REPAProjector(cfg.mot.dim, cfg.vit.dim)

    def new_by_module(self) -> list[nn.Parameter]:
        return super().new_by_module() + list(self.repa_proj.parameters())

    def rep_loss(self, out: GenOutput, b: GenBatch) -> torch.Tensor:
        return super().rep_loss(out, b) + self.cfg.repa_weight * repa_loss(self.repa_proj(out.tapped), b.align)


class ContinuousREPAModel(REPAModel, ContinuousRepModel):
    """Continuous targets and REPA at once: not a paper variant, but the two compose."""


def model_class(cfg: ModelConfig) -> type[RFModel]:
    """The class a config asks for: RF, or one of the Table 3 variants."""
    continuous = cfg.rf and cfg.rep_target == "continuous"
    if cfg.repa_weight:
        return ContinuousREPAModel if continuous else REPAModel
    return ContinuousRepModel if continuous else RFModel


def build_model(cfg: ModelConfig) -> RFModel:
    return model_class(cfg)(cfg)
