"""Tests for nanorf/flow.py: the loss against hand arithmetic, the noising path, time sampling,
the shifted time grid, ODE steps with exact oracle denoisers, and the timestep embedding."""

import math

import pytest
import torch

from nanorf.flow import (add_noise, fm_loss, ode_step, resolution_shift, sample_t, time_grid,
                         timestep_embedding, velocity)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_fm_loss_hand_computed():
    x = torch.tensor([[1.0, -1.0]])
    eps = torch.tensor([[0.5, 0.5]])
    t = torch.tensor([0.5])
    z = add_noise(x, t, eps)                       # 0.5 x + 0.5 eps = [0.75, -0.25]
    assert torch.allclose(z, torch.tensor([[0.75, -0.25]]))
    x_pred = torch.tensor([[0.8, -0.6]])
    # v_pred = (x_pred - z) / 0.5 = [0.1, -0.7];  v = x - eps = [0.5, -1.5]
    # diff = [-0.4, 0.8];  mean of squares = (0.16 + 0.64) / 2 = 0.4
    assert fm_loss(x_pred, x, eps, z, t, t_eps=0.05).item() == pytest.approx(0.4, abs=1e-6)


def test_fm_loss_clamps_one_minus_t():
    x = torch.tensor([[1.0, -1.0]])
    eps = torch.tensor([[0.5, 0.5]])
    t = torch.tensor([0.99])
    z = add_noise(x, t, eps)                       # [0.995, -0.985]
    # x_pred = x is the perfect prediction; unclamped v_pred = (x - z)/0.01 = v exactly (loss 0).
    # Clamped at 0.05: v_pred = [0.005, -0.015] / 0.05 = [0.1, -0.3]; v = [0.5, -1.5]
    # diff = [-0.4, 1.2];  mean of squares = (0.16 + 1.44) / 2 = 0.8
    assert fm_loss(x, x, eps, z, t, t_eps=0.05).item() == pytest.approx(0.8, abs=1e-5)
    assert fm_loss(x, x, eps, z, t, t_eps=1e-4).item() == pytest.approx(0.0, abs=1e-8)


def test_fm_loss_mean_over_batch_with_per_example_t():
    x = torch.tensor([[1.0], [2.0]])
    eps = torch.tensor([[0.0], [0.0]])
    t = torch.tensor([0.5, 0.75])
    z = add_noise(x, t, eps)                       # [0.5], [1.5]
    x_pred = torch.tensor([[0.0], [0.0]])
    # v_pred = [-0.5/0.5, -1.5/0.25] = [-1, -6];  v = [1, 2];  ((-2)^2 + (-8)^2) / 2 = 34
    assert fm_loss(x_pred, x, eps, z, t, 0.05).item() == pytest.approx(34.0)


def test_add_noise_endpoints_and_broadcast():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    z = add_noise(x, torch.tensor([0.0, 1.0, 0.25]), eps)
    assert torch.equal(z[0], eps[0])
    assert torch.equal(z[1], x[1])
    assert torch.allclose(z[2], 0.25 * x[2] + 0.75 * eps[2])


def test_velocity_formula():
    z, x = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])
    assert torch.allclose(velocity(x, z, torch.tensor([0.5]), 0.05), torch.tensor([[4.0, -4.0]]))
    assert torch.allclose(velocity(x, z, torch.tensor([1.0]), 0.05), torch.tensor([[40.0, -40.0]]))


def test_sample_t_is_logit_normal():
    t = sample_t(100_000, -0.8, 0.8, generator=torch.Generator().manual_seed(0))
    assert t.shape == (100_000,) and (t > 0).all() and (t < 1).all()
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(-0.8, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)
    t2 = sample_t(100_000, 0.5, 1.5, generator=torch.Generator().manual_seed(0))
    logit2 = torch.log(t2 / (1 - t2))
    assert logit2.mean().item() == pytest.approx(0.5, abs=0.02)
    assert logit2.std().item() == pytest.approx(1.5, abs=0.02)


def test_sample_t_uniform_share():
    """p_uniform = 0 is the plain logit-normal draw for draw (resume and old runs depend on
    the stream); p_uniform = 0.3 puts 0.3 * 0.1 of the times above 0.9, where the
    logit-normal (-0.8, 0.8) puts ~1e-4."""
    g = lambda: torch.Generator().manual_seed(3)
    assert torch.equal(sample_t(1000, -0.8, 0.8, g(), 0.0), sample_t(1000, -0.8, 0.8, g()))
    plain, mixed = sample_t(200_000, -0.8, 0.8, g()), sample_t(200_000, -0.8, 0.8, g(), 0.3)
    assert (plain > 0.9).float().mean().item() < 1e-3
    assert (mixed > 0.9).float().mean().item() == pytest.approx(0.03, abs=0.002)
    assert mixed.mean().item() == pytest.approx(0.7 * plain.mean().item() + 0.3 * 0.5, abs=0.003)
    uni = sample_t(200_000, -0.8, 0.8, g(), 1.0)
    assert uni.mean().item() == pytest.approx(0.5, abs=0.003)
    assert uni.std().item() == pytest.approx(12 ** -0.5, abs=0.003)


def test_time_grid():
    assert torch.allclose(time_grid(5, 1.0), torch.linspace(0, 1, 6))
    for s in (1.0, 3.0, 0.5):
        g = time_grid(25, s)
        assert g.shape == (26,)
        assert g[0].item() == 0.0 and g[-1].item() == 1.0
        assert (g[1:] > g[:-1]).all()
    # SD3 shift on sigma = 1 - t, by hand for step 1 of 5 with s = 3:
    # sigma = 0.8 -> 3 * 0.8 / (1 + 2 * 0.8) = 2.4 / 2.6;  t = 1 - 2.4 / 2.6 = 0.0769231
    assert time_grid(5, 3.0)[1].item() == pytest.approx(1 - 2.4 / 2.6, abs=1e-6)
    # s > 1 spends more of the grid at high noise: every interior t is smaller
    assert (time_grid(10, 3.0)[1:-1] < time_grid(10, 1.0)[1:-1]).all()


def test_resolution_shift():
    assert resolution_shift(32) == 1.0
    assert resolution_shift(256) == 1.0
    assert resolution_shift(1024) == 4.0


def test_ode_step_hand_values():
    f = lambda z, t: z + t   # noqa: E731
    z = torch.tensor([1.0])
    # Euler: 1 + 0.5 * 1 = 1.5
    assert ode_step(f, z, 0.0, 0.5, "euler").item() == pytest.approx(1.5)
    # Heun: v0 = 1, z1 = 1.5, v1 = 1.5 + 0.5 = 2, z = 1 + 0.5 * (1 + 2) / 2 = 1.75
    assert ode_step(f, z, 0.0, 0.5, "heun").item() == pytest.approx(1.75)
    # Heun falls back to Euler on the last step into t = 1: 1 + 0.5 * (1 + 0.5) = 1.75
    assert ode_step(f, z, 0.5, 1.0, "heun").item() == pytest.approx(1.75)
    with pytest.raises(ValueError, match="unknown solver"):
        ode_step(f, z, 0.0, 0.5, "rk4")


def _integrate(v_fn, z, steps, shift, solver):
    ts = time_grid(steps, shift).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        z = ode_step(v_fn, z, t0, t1, solver)
    return z


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("steps,shift", [(25, 1.0), (7, 3.0)])
def test_ode_with_point_oracle_lands_on_target(solver, steps, shift):
    """One known target x*: the ideal x-prediction is x* itself, v = (x* - z)/(1 - t) is
    constant (x* - eps) along the straight path, and both solvers are exact."""
    g = torch.Generator().manual_seed(0)
    x_star = torch.randn(2, 12, generator=g)
    z0 = torch.randn(2, 12, generator=g)
    calls = []

    def v_fn(z, t):
        calls.append(t)
        return velocity(x_star, z, torch.full((z.shape[0],), t), t_eps=1e-6)

    z = _integrate(v_fn, z0.clone(), steps, shift, solver)
    assert torch.allclose(z, x_star, atol=1e-5)
    assert len(calls) == (steps if solver == "euler" else 2 * steps - 1)
    assert max(calls) < 1.0   # the velocity is never evaluated at t = 1


def test_ode_with_two_point_mixture_oracle_lands_on_a_mode():
    """Data = two points a, b with equal mass; the exact posterior-mean denoiser
    E[x | z_t] = sum_c w_c c, w_c ∝ exp(-|z - t c|^2 / (2 (1 - t)^2)), carries noise to one of them."""
    a, b = torch.tensor([1.0, 1.0, -1.0, 0.5]), torch.tensor([-1.0, 0.0, 1.0, -0.5])
    pts = torch.stack([a, b])                                                   # (2, d)
    n = 64
    z0 = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def v_fn(z, t):
        logw = -((z[:, None] - t * pts[None]) ** 2).sum(-1) / (2 * (1 - t) ** 2)    # (n, 2)
        x_pred = logw.softmax(-1) @ pts                                             # (n, d)
        return velocity(x_pred, z, torch.full((n,), t), t_eps=1e-6)

    for solver in ("euler", "heun"):
        z = _integrate(v_fn, z0.clone(), 50, 1.0, solver)
        d = torch.cdist(z, pts)                                                     # (n, 2)
        assert (d.min(1).values < 1e-3).all()
        hits = d.argmin(1)
        assert 0 < hits.sum() < n   # both modes are reached from different noise


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0.0, 0.3, 1.0]), 256)
    assert e.shape == (3, 256)
    assert torch.equal(e[0, :128], torch.ones(128)) and torch.equal(e[0, 128:], torch.zeros(128))
    # dim 4: freqs exp(-ln(1e4) * [0, 1] / 2) = [1, 0.01]; t = 0.5 -> args 1000 * 0.5 * freqs = [500, 5]
    e4 = timestep_embedding(torch.tensor([0.5]), 4)
    want = torch.tensor([math.cos(500), math.cos(5), math.sin(500), math.sin(5)])
    assert torch.allclose(e4[0], want, atol=1e-4)
    # distinct times give distinct embeddings
    assert (e[1] - e[2]).abs().max() > 0.1


def test_renoise_step_hand_check_and_euler_identity():
    """z' = t1 x + (1 - t1) eps' with x = z + (1 - t0) v and eps' fresh from the generator; with
    eps' = z - t0 v instead it is the Euler step; into t = 1 it returns x."""
    from nanorf.flow import ode_step, renoise_step
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    fn = lambda zz, t: v
    t0, t1, s = 0.6, 0.7, 2.0
    x = z + 0.4 * v
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(5)) * s
    got = renoise_step(fn, z, t0, t1, s, torch.Generator().manual_seed(5))
    assert torch.allclose(got, 0.7 * x + 0.3 * eps, atol=1e-6)
    assert torch.allclose(ode_step(fn, z, t0, t1), t1 * x + (1 - t1) * (z - t0 * v), atol=1e-6)
    assert torch.equal(renoise_step(fn, z, 0.9, 1.0, s, g), z + 0.1 * v)


def test_renoise_step_lands_on_the_forward_marginal():
    """With a perfect denoiser of a point mass x*, one step gives z' ~ N(t1 x*, ((1 - t1) s)^2)
    whatever z was: the marginal the network was trained on at t1."""
    from nanorf.flow import renoise_step
    xs, s = torch.tensor([0.5, -1.0]), 2.0
    fn = lambda zz, t: (xs - zz) / (1 - t)                       # v of x_theta = x*
    z = torch.full((20000, 2), 7.0)                              # any state at t0
    out = renoise_step(fn, z, 0.5, 0.8, s, torch.Generator().manual_seed(1))
    assert torch.allclose(out.mean(0), 0.8 * xs, atol=0.02)
    assert torch.allclose(out.std(0), torch.full((2,), 0.2 * s), rtol=0.03)
