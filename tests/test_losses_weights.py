"""Tests of the weighting helpers chapter 04 adds to diffusion_lab.losses: implied_x0_weight, elbo_weight,
optimal_x0. (Kept apart from the core loss tests.)"""
import pytest
import torch

from diffusion_lab.losses import elbo_weight, implied_x0_weight, optimal_x0, x0_weight
from diffusion_lab.schedules import PREDICTIONS
from diffusion_lab.schedules import NoiseSchedule, q_posterior


def test_implied_x0_weight():
    snr = torch.logspace(-4, 4, 50, dtype=torch.float64)
    for objective in PREDICTIONS:
        assert torch.allclose(implied_x0_weight(objective, "none", snr), x0_weight(objective, snr))
        assert torch.allclose(implied_x0_weight(objective, "min_snr", snr, gamma=5.0), snr.clamp(max=5.0))
    with pytest.raises(ValueError):
        implied_x0_weight("eps", "snr_squared", snr)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_elbo_weight_matches_the_gaussian_kl(name):
    """KL(q(x_{t-1}|x_t,x0) || p_theta) with equal variances is |mu - mu_theta|^2 / (2 var): check the weight."""
    schedule = NoiseSchedule.from_name(name, T=50)
    g = torch.Generator().manual_seed(0)
    x0, x0_hat, x_t = (torch.randn(49, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.arange(1, 50)
    mean_q, var = q_posterior(schedule, x0, x_t, t)
    mean_p, _ = q_posterior(schedule, x0_hat, x_t, t)
    kl = ((mean_q - mean_p) ** 2 / (2 * var)).sum(1)
    expected = elbo_weight(schedule)[t] * ((x0 - x0_hat) ** 2).sum(1)
    assert torch.allclose(kl, expected, rtol=1e-8)


def test_elbo_weight_is_ddpm_eq12_in_eps_form():
    """Divided by snr, the ELBO weight is DDPM's beta^2 / (2 sigma^2 alpha (1 - alpha_bar)) with sigma^2 = beta_tilde."""
    s = NoiseSchedule.from_name("linear", T=1000)
    beta, alpha, alpha_bar = s.betas[1:], s.alphas[1:], s.alpha_bars[1:]
    beta_tilde = beta * (1 - s.alpha_bars[:-1]) / (1 - alpha_bar)
    ddpm = beta**2 / (2 * beta_tilde * alpha * (1 - alpha_bar))
    assert torch.allclose(elbo_weight(s)[1:] / s.snr[1:], ddpm, rtol=1e-8)
    w = elbo_weight(s)
    assert w.shape == (1000,) and (w > 0).all() and w[0] == pytest.approx(0.5 * s.snr[0].item())


def test_optimal_x0_limits():
    point = torch.tensor([[1.0, -2.0]])
    x_t = torch.randn(7, 2)
    assert torch.allclose(optimal_x0(x_t, 0.3, point), point.expand(7, 2))
    pair = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(optimal_x0(torch.zeros(1, 2), 0.5, pair), torch.zeros(1, 2), atol=1e-7)
    # almost no noise: the nearest data point; almost all noise: the data mean
    near = optimal_x0(torch.tensor([[0.9, 0.1]]), torch.tensor([0.999999]), pair)
    assert torch.allclose(near, pair[1:], atol=1e-4)
    far = optimal_x0(torch.tensor([[0.9, 0.1]]), 1e-8, pair)
    assert torch.allclose(far, torch.zeros(1, 2), atol=1e-3)


def test_optimal_x0_is_the_gaussian_posterior_mean_for_gaussian_data():
    g = torch.Generator().manual_seed(0)
    s2 = 0.25
    data = 0.5 * torch.randn(20_000, 1, generator=g, dtype=torch.float64)
    x_t = torch.linspace(-1.5, 1.5, 7, dtype=torch.float64)[:, None]
    ab = 0.5
    exact = ab**0.5 * s2 / (ab * s2 + 1 - ab) * x_t
    assert torch.allclose(optimal_x0(x_t, ab, data), exact, atol=0.02)


def test_optimal_x0_rejects_bad_input():
    with pytest.raises(ValueError):
        optimal_x0(torch.randn(3, 2), 0.5, torch.randn(4, 3))
    with pytest.raises(ValueError):
        optimal_x0(torch.randn(3, 2), 1.0, torch.randn(4, 2))
    with pytest.raises(ValueError):
        optimal_x0(torch.randn(3, 2), torch.full((2,), 0.5), torch.randn(4, 2))
