"""Schedules and the forward process: endpoints, monotonicity, closed-form statistics, bad input."""
import math

import pytest
import torch

from diffusion_lab.schedules import (NoiseSchedule, cosine_betas, eps_from_v, eps_from_x0, linear_betas, make_betas,
                                     q_posterior, q_sample, rescale_zero_terminal_snr, v_target, x0_from_eps,
                                     x0_from_v)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_endpoints_and_monotonicity(name):
    s = NoiseSchedule.from_name(name, T=1000)
    assert s.alpha_bars[0] > 0.99  # the first step barely noises
    assert s.alpha_bars[-1] < 0.01  # the last is nearly pure noise
    assert (s.alpha_bars.diff() < 0).all()  # strictly more noise at every step
    assert (s.snr.diff() < 0).all()
    assert torch.allclose(s.sigmas, 1 / s.snr.sqrt())


def test_linear_matches_ddpm_values():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_cosine_alpha_bar_formula():
    # Nichol & Dhariwal (2021) eq. 17, before clipping: alpha_bar(t/T) = f(t/T) / f(0)
    s = NoiseSchedule.from_name("cosine", T=1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert s.alpha_bars[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)


def test_zero_terminal_snr():
    betas = rescale_zero_terminal_snr(linear_betas(1000))
    s = NoiseSchedule(betas)
    assert s.alpha_bars[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert s.alpha_bars[0].item() == pytest.approx(NoiseSchedule(linear_betas(1000)).alpha_bars[0].item())
    assert betas[-1].item() == pytest.approx(1.0)


def test_q_sample_matches_closed_form_statistics():
    s = NoiseSchedule.from_name("cosine", T=1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7)
    for t in (10, 500, 990):
        x_t = q_sample(s, x0, torch.full((len(x0),), t), generator=g)
        ab = s.alpha_bars[t].item()
        assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=5e-3)
        assert x_t.var().item() == pytest.approx(1 - ab, rel=2e-2, abs=1e-4)


def test_q_sample_equals_step_by_step_noising():
    """One jump with alpha_bar_t has the same distribution as t small steps with beta_1..beta_t."""
    s = NoiseSchedule.from_name("linear", T=200)
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((100_000,), -0.5)
    x = x0.clone()
    for beta in s.betas[:120].float():
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g)
    jump = q_sample(s, x0, torch.full((len(x0),), 119), generator=g)
    assert x.mean().item() == pytest.approx(jump.mean().item(), abs=1e-2)
    assert x.std().item() == pytest.approx(jump.std().item(), rel=1e-2)


def test_posterior_is_consistent():
    s = NoiseSchedule.from_name("linear", T=100)
    x0, x_t = torch.randn(4, 3), torch.randn(4, 3)
    mean, var = q_posterior(s, x0, x_t, torch.tensor([0, 1, 50, 99]))
    assert var[0].item() == 0.0  # t = 0: x_{-1} is x0 itself
    assert torch.allclose(mean[0], x0[0], atol=1e-6)
    assert (var[1:] > 0).all() and (var[1:].squeeze() < s.betas[[1, 50, 99]]).all()  # beta_tilde < beta


def test_prediction_conversions_round_trip():
    ab = torch.tensor(0.3)
    x0, eps = torch.randn(5), torch.randn(5)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert torch.allclose(x0_from_eps(x_t, eps, ab), x0, atol=1e-6)
    assert torch.allclose(eps_from_x0(x_t, x0, ab), eps, atol=1e-6)
    v = v_target(x0, eps, ab)
    assert torch.allclose(eps_from_v(x_t, v, ab), eps, atol=1e-6)
    assert torch.allclose(x0_from_v(x_t, v, ab), x0, atol=1e-6)


@pytest.mark.parametrize("betas", [[0.1, 1.5], [0.0, 0.1], [-0.1, 0.2], [0.1, float("nan")], [[0.1]]])
def test_bad_betas_raise(betas):
    with pytest.raises(ValueError):
        NoiseSchedule(torch.tensor(betas))


def test_unknown_schedule_and_bad_steps():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError):
        cosine_betas(0)
    s = NoiseSchedule.from_name("linear", T=10)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        q_sample(s, torch.zeros(2, 3), torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="integer"):
        q_sample(s, torch.zeros(2, 3), torch.tensor([0.5, 0.2]))
    with pytest.raises(ValueError, match="one step per sample"):
        q_sample(s, torch.zeros(2, 3), torch.tensor([1, 2, 3]))
