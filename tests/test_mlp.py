"""Tests of diffusion_lab.mlp: the 2-D toy denoiser and the sliced Wasserstein distance (chapter 04)."""
import pytest
import torch

from diffusion_lab.losses import diffusion_loss
from diffusion_lab.mlp import ToyMLP, sliced_wasserstein
from diffusion_lab.schedules import NoiseSchedule


def test_toy_mlp_shapes_and_time_dependence():
    torch.manual_seed(0)
    model = ToyMLP(dim=2, hidden=32, layers=2)
    x = torch.randn(5, 2)
    out = model(x, torch.arange(5))
    assert out.shape == (5, 2)
    # a scalar t is broadcast; different t gives a different output (the net sees time)
    assert torch.allclose(model(x, torch.tensor(3)), model(x, torch.full((5,), 3)))
    assert not torch.allclose(model(x, torch.tensor(0)), model(x, torch.tensor(900)))


def test_toy_mlp_labels_and_null_code():
    torch.manual_seed(0)
    model = ToyMLP(hidden=16, layers=1, num_classes=2)
    x, t = torch.randn(4, 2), torch.zeros(4, dtype=torch.long)
    null = model(x, t)
    assert torch.allclose(null, model(x, t, torch.full((4,), 2)))  # None means the null label 2
    assert not torch.allclose(model(x, t, torch.zeros(4, dtype=torch.long)), model(x, t, torch.ones(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="without num_classes"):
        ToyMLP(hidden=8)(x, t, torch.zeros(4, dtype=torch.long))


def test_toy_mlp_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        ToyMLP()(torch.randn(3, 3), torch.zeros(3))
    with pytest.raises(ValueError):
        ToyMLP(layers=0)


def test_toy_mlp_learns_a_gaussian_denoiser():
    """On x0 ~ N(0, s^2) the optimal eps predictor is linear; a short run must get close to its loss."""
    torch.manual_seed(0)
    schedule = NoiseSchedule.from_name("cosine", T=100)
    model = ToyMLP(hidden=32, layers=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss = diffusion_loss(model, schedule, 0.5 * torch.randn(256, 2, generator=g), "eps", generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Bayes error of eps given x_t for Gaussian data: E_t[(1 - ab) s^2... ] = E_t[ab s^2 / (ab s^2 + 1 - ab)]
    ab = schedule.alpha_bars.float()
    bayes = (ab * 0.25 / (ab * 0.25 + 1 - ab)).mean().item()
    with torch.no_grad():
        final = diffusion_loss(model, schedule, 0.5 * torch.randn(4096, 2, generator=g), "eps", generator=g).item()
    assert final < bayes + 0.05, (final, bayes)


def test_sliced_wasserstein_basic_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 2, generator=g)
    assert sliced_wasserstein(a, a, generator=g) == pytest.approx(0.0, abs=1e-12)
    # a shift by c moves every 1-D projection by c . theta: SW^2 = |c|^2 E[cos^2] = |c|^2 / 2 in 2-D
    shift = torch.tensor([3.0, 0.0])
    sw = sliced_wasserstein(a, a + shift, projections=4000, generator=g)
    assert sw == pytest.approx(3.0 / 2**0.5, rel=0.03)
    # symmetric, and works for unequal sizes
    b = torch.randn(300, 2, generator=g) + 1
    assert sliced_wasserstein(a, b, generator=torch.Generator().manual_seed(1)) == pytest.approx(
        sliced_wasserstein(b, a, generator=torch.Generator().manual_seed(1)), rel=1e-9)
    near = sliced_wasserstein(a, torch.randn(300, 2, generator=g), generator=g)
    far = sliced_wasserstein(a, b, generator=g)
    assert near < far


def test_sliced_wasserstein_rejects_bad_input():
    with pytest.raises(ValueError):
        sliced_wasserstein(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(ValueError):
        sliced_wasserstein(torch.randn(0, 2), torch.randn(5, 2))
    with pytest.raises(ValueError):
        sliced_wasserstein(torch.randn(5, 2), torch.randn(5, 2), projections=0)


def test_toy_mlp_works_with_classifier_free_guidance():
    from diffusion_lab.conditioning import guided
    torch.manual_seed(0)
    model = ToyMLP(hidden=16, layers=1, num_classes=2)
    x, t, labels = torch.randn(4, 2), torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1])
    assert torch.allclose(guided(model, labels, guidance=1.0)(x, t), model(x, t, labels))
    assert torch.allclose(guided(model, labels, guidance=0.0)(x, t), model(x, t), atol=1e-6)
    with pytest.raises(ValueError, match="style"):
        model(x, t, labels, torch.zeros(4, 3))
