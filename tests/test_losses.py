"""Objectives: every parameterisation is a weighted x0 error, min-SNR clips that weight, bad names fail."""
import pytest
import torch

from diffusion_lab.losses import diffusion_loss, loss_weight, target, x0_weight
from diffusion_lab.schedules import NoiseSchedule, x0_from_eps, x0_from_v

SCHEDULE = NoiseSchedule.from_name("cosine", T=1000)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_objective_equals_weighted_x0_error(objective):
    """For any prediction, MSE on the target == x0_weight(snr) * MSE on the implied x0_hat."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    t = torch.tensor([5, 100, 300, 500, 700, 900])
    ab = SCHEDULE.alpha_bars[t].view(-1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    prediction = target(objective, x0, eps, ab) + 0.1 * torch.randn(6, 10, generator=g, dtype=torch.float64)
    x0_hat = {"eps": lambda: x0_from_eps(x_t, prediction, ab), "x0": lambda: prediction,
              "v": lambda: x0_from_v(x_t, prediction, ab)}[objective]()
    lhs = (prediction - target(objective, x0, eps, ab)).pow(2).mean(1)
    rhs = x0_weight(objective, SCHEDULE.snr[t]) * (x0_hat - x0).pow(2).mean(1)
    assert torch.allclose(lhs, rhs, rtol=1e-6)


def test_min_snr_weight_is_clipped_snr():
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    for objective in ("eps", "x0", "v"):
        total = loss_weight(objective, "min_snr", snr, gamma=5.0) * x0_weight(objective, snr)
        assert torch.allclose(total, snr.clamp(max=5.0))
    assert torch.equal(loss_weight("eps", "none", snr), torch.ones(4))


def test_perfect_model_has_zero_loss_and_noise_model_does_not():
    x0 = torch.randn(8, 1, 4, 4)
    eps = torch.randn_like(x0)
    t = torch.randint(0, 1000, (8,))
    assert diffusion_loss(lambda x_t, tt: eps, SCHEDULE, x0, "eps", t=t, eps=eps).item() == pytest.approx(0.0, abs=1e-10)
    assert diffusion_loss(lambda x_t, tt: torch.zeros_like(x_t), SCHEDULE, x0, "eps", t=t, eps=eps).item() > 0.5
    per_sample = diffusion_loss(lambda x_t, tt: x_t, SCHEDULE, x0, prediction="v", weighting="min_snr", reduce=False)
    assert per_sample.shape == (8,)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown prediction"):
        target("score", torch.zeros(1), torch.zeros(1), torch.ones(1))
    with pytest.raises(ValueError, match="unknown prediction"):
        x0_weight("score", torch.ones(1))
    with pytest.raises(ValueError, match="weighting"):
        loss_weight("eps", "p2", torch.ones(1))
    with pytest.raises(ValueError, match="gamma"):
        loss_weight("eps", "min_snr", torch.ones(1), gamma=0)
    with pytest.raises(ValueError, match="shape"):
        diffusion_loss(lambda x_t, t: x_t[:, :1], SCHEDULE, torch.zeros(2, 3), "eps")
