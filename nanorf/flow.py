"""Flow matching in pixel space: x-prediction with the velocity loss (JiT), and ODE sampling.

docs/method.md, "Losses and flow matching". Convention (JiT): t = 1 is the clean image,
t = 0 is noise.

    z_t = t * x + (1 - t) * eps,        eps ~ N(0, noise_scale^2 I)
    the network predicts x_theta(z_t, t)
    v_theta = (x_theta - z_t) / (1 - t)        target v = x - eps
    L_FM = E || v_theta - v ||^2

The paper is silent on what JiT fixes, so we take JiT's public defaults:
t = sigmoid(N(p_mean, p_std)) with (-0.8, 0.8), optionally mixed with a uniform share
(FlowConfig.p_uniform, our addition; 0 is JiT), and
(1 - t) clamped below at t_eps = 0.05 so the division never blows up near t = 1.

Sampling (docs/method.md, "Sampling") integrates dz/dt = v from t = 0 to 1 (stochastic from
some t on with `renoise_step`, our addition) over a time grid with the SD3 shift (the paper's
"dynamic timestep shifting"), applied to the noise level sigma = 1 - t:
sigma' = s * sigma / (1 + (s - 1) * sigma). s > 1 spends more steps at high noise,
which larger images need because their noise destroys less of the signal per pixel.
"""

from __future__ import annotations

import math

import torch


def sample_t(n: int, p_mean: float, p_std: float, generator: torch.Generator | None = None,
             p_uniform: float = 0.0) -> torch.Tensor:
    """Logit-normal times in (0, 1): (n,). With p_uniform > 0, each time is instead drawn
    uniform on (0, 1) with that probability, so the nearly clean end, which the logit-normal
    almost never visits (P(t > 0.9) ~ 1e-4 at JiT's (-0.8, 0.8)), is trained too; the last
    sampler step's x-prediction is made there. p_uniform = 0 draws exactly what it always did."""
    t = torch.sigmoid(torch.randn(n, generator=generator) * p_std + p_mean)
    if p_uniform > 0:
        u = torch.rand(2, n, generator=generator)     # (which branch, the uniform time)
        t = torch.where(u[0] < p_uniform, u[1], t)
    return t


def add_noise(x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z_t = t x + (1 - t) eps, with t broadcast over the trailing dims of x."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return t * x + (1 - t) * eps


def velocity(x_pred: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """v_theta = (x_theta - z_t) / max(1 - t, t_eps)."""
    t = t.view(-1, *([1] * (z.dim() - 1)))
    return (x_pred - z) / (1 - t).clamp_min(t_eps)


def fm_loss(x_pred: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, z: torch.Tensor,
            t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """Mean squared error between v_theta and v = x - eps, averaged over every element."""
    v_pred = velocity(x_pred, z, t, t_eps)
    return ((v_pred - (x - eps)) ** 2).mean()


def resolution_shift(image_size: int, base: int = 256) -> float:
    """Our choice for the unstated "dynamic" shift: s = side / 256, never below 1
    (1 at 256 px, 4 at 1024 px, as SD3 uses ~3 at 1024 px)."""
    return max(1.0, image_size / base)


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) times from 0 (noise) to 1 (clean), shifted on sigma = 1 - t."""
    sigma = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    sigma = shift * sigma / (1 + (shift - 1) * sigma)
    return (1 - sigma).float()


def ode_step(velocity_fn, z: torch.Tensor, t0: float, t1: float, solver: str = "euler") -> torch.Tensor:
    """One step of dz/dt = v(z, t) from t0 to t1; velocity_fn(z, t: float) -> v.

    Heun falls back to Euler on the last step into t = 1, where (1 - t) hits the clamp.
    """
    dt = t1 - t0
    v0 = velocity_fn(z, t0)
    if solver == "euler" or t1 >= 1.0:
        return z + dt * v0
    if solver != "heun":
        raise ValueError(f"unknown solver {solver!r}; use 'euler' or 'heun'")
    z1 = z + dt * v0
    v1 = velocity_fn(z1, t1)
    return z + dt * 0.5 * (v0 + v1)


def renoise_step(velocity_fn, z: torch.Tensor, t0: float, t1: float, noise_scale: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One stochastic step from t0 to t1: the x-prediction implied by v, noised afresh to t1.

        x = z + (1 - t0) v          (the x_theta that v = (x_theta - z) / (1 - t0) came from)
        z' = t1 x + (1 - t1) eps',  eps' ~ N(0, noise_scale^2 I), new at every step

    The Euler step is the same with eps' = z - t0 v, the noise the prediction implies, kept
    (z + (t1 - t0) v = t1 x + (1 - t1)(z - t0 v)); drawing it afresh instead is DDPM's ancestral
    step in flow terms (DDIM's eta = 1). Each step then hands the network a state of the kind
    it was trained on, a clean image plus Gaussian noise, where an ODE state near t = 1 can hold
    soft, noiseless edges that no training input had. Into t1 = 1 it returns x itself."""
    v = velocity_fn(z, t0)
    x = z + (1 - t0) * v
    if t1 >= 1.0:
        return x
    eps = torch.randn(z.shape, generator=generator).to(z.device, z.dtype) * noise_scale
    return t1 * x + (1 - t1) * eps


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000 as in DiT): (n,) -> (n, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
