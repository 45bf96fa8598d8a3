"""The UNet: shapes, codes, parameter budget, and clear errors."""
import pytest
import torch

from diffusion_lab.unet import SinusoidalTimeEmbedding, UNet, count_parameters


def test_shapes_and_parameter_budget():
    model = UNet(channels=(32, 64, 64), num_classes=10, style_dim=3)
    assert count_parameters(model) < 2_000_000  # the foundation issue's budget for the small UNet
    x = torch.randn(3, 1, 28, 28)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]), torch.randn(3, 3))
    assert out.shape == x.shape


def test_starts_as_zero_map_and_codes_reach_the_output():
    """The output layer starts at zero (a stable start); once weights move, label and style change the output."""
    torch.manual_seed(0)
    model = UNet(channels=(8, 16, 16), num_classes=10, style_dim=3)
    x, t = torch.randn(4, 1, 28, 28), torch.full((4,), 10)
    assert model(x, t).abs().max() == 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    base = model(x, t, torch.zeros(4, dtype=torch.long))
    assert not torch.allclose(base, model(x, t, torch.full((4,), 9)))
    assert not torch.allclose(base, model(x, t, torch.zeros(4, dtype=torch.long), torch.ones(4, 3)))
    assert not torch.allclose(base, model(x, t + 500, torch.zeros(4, dtype=torch.long)))


def test_time_embedding_is_distinct_per_step():
    emb = SinusoidalTimeEmbedding(32)(torch.arange(0, 1000, 100))
    assert emb.shape == (10, 32)
    distances = torch.cdist(emb, emb) + torch.eye(10) * 1e3
    assert distances.min() > 0.1
    with pytest.raises(ValueError):
        SinusoidalTimeEmbedding(7)


def test_bad_input():
    model = UNet(channels=(8, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="num_classes"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="style"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), style=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="three"):
        UNet(channels=(8, 16))
