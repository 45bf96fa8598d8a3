"""generate(), the one front door to sampling: any shape, the model's own contract, and known regions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_lab import data
from diffusion_lab.denoiser import Denoiser, load_denoiser, save_denoiser
from diffusion_lab.losses import optimal_x0
from diffusion_lab.sample import generate
from diffusion_lab.schedules import NoiseSchedule
from diffusion_lab.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEDULE = NoiseSchedule.from_name("cosine", T=100)


def perturbed(net: nn.Module, seed: int = 0) -> nn.Module:
    """A fresh UNet's output layer is zero; random weights make its output depend on the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.mark.parametrize("shape, unet", [
    ((1, 28, 28), dict(in_channels=1, num_classes=10)),
    ((4, 64, 32), dict(in_channels=4)),                       # a piano roll: 4 voices x 64 pitches x 32 steps
    ((3, 16, 16), dict(in_channels=3, num_classes=10)),
    ((1, 8, 16, 16), dict(in_channels=1, dims="2+1d", num_classes=10)),   # an 8-frame clip
    ((4, 32), dict(in_channels=4, dims="1d")),                # 4 voices x 32 steps of continuous pitch
])
def test_generate_runs_on_any_shape(shape, unet):
    net = perturbed(UNet(channels=(8, 16, 16), attention=False, **unet))
    denoiser = Denoiser(net, "v", SCHEDULE, shape, num_classes=unet.get("num_classes"))
    labels = torch.tensor([3, 7]) if denoiser.num_classes else None
    for sampler in ("ddpm", "ddim", "dpm++2m"):
        x = generate(denoiser, labels, n=None if labels is not None else 2, sampler=sampler, steps=3,
                     guidance=2.0, seed=1)
        assert x.shape == (2, *shape) and torch.isfinite(x).all() and x.abs().max() <= 1
        assert not torch.equal(x[0], x[1])  # two different noises, two different samples


def test_the_shipped_model_needs_no_prediction_argument_and_draws_what_it_drew_before():
    """Golden images drawn from mnist-cond before the model carried its own contract (with prediction="v"
    passed by hand): through generate, with nothing but codes and sampler settings, every pixel is the same."""
    golden = np.load(Path(__file__).parent / "golden_mnist_cond.npz")
    denoiser = load_denoiser("mnist-cond-small", device="cpu")
    assert denoiser.prediction == "v" and denoiser.shape == (1, 28, 28) and denoiser.schedule.T == 1000
    labels = torch.arange(20) % 10
    for sampler, steps, guidance in (("dpm++2m", 20, 2.0), ("ddpm", 10, 1.0), ("ddim", 10, 2.0)):
        x = generate(denoiser, labels, sampler=sampler, steps=steps, guidance=guidance, seed=0)
        assert np.array_equal(data.from_unit_range(x)[:, 0].numpy(), golden[sampler.replace("+", "p")]), sampler


class PointsDenoiser(nn.Module):
    """The exact denoiser of a dataset of a few points: E[x0 | x_t] (an x0-prediction)."""

    def __init__(self, points: torch.Tensor, schedule: NoiseSchedule):
        super().__init__()
        self.register_buffer("points", points)
        self.anchor = nn.Parameter(torch.zeros(()))  # a Denoiser finds its device through a parameter
        self.schedule = schedule

    def forward(self, x_t, t):
        return optimal_x0(x_t, self.schedule.alpha_bars[t].to(x_t.dtype), self.points.to(x_t.dtype))


def points_denoiser() -> Denoiser:
    # four 2x4 "images" whose left halves are distinct, so the left half decides the right half
    points = torch.tensor([[[-1, -1, 1, 1], [1, -1, -1, 1]], [[1, 1, -1, -1], [-1, 1, 1, -1]],
                           [[-1, 1, -1, 1], [1, 1, -1, -1]], [[1, -1, 1, -1], [-1, -1, 1, 1]]],
                          dtype=torch.float32)[:, None]                                   # (4, 1, 2, 4)
    return Denoiser(PointsDenoiser(points, SCHEDULE), "x0", SCHEDULE, (1, 2, 4))


@pytest.mark.parametrize("sampler, resample", [("ddpm", 1), ("ddim", 1), ("dpm++2m", 1), ("ddpm", 4)])
def test_inpainting_keeps_the_known_pixels_exactly_and_completes_the_rest(sampler, resample):
    denoiser = points_denoiser()
    points = denoiser.net.points
    known = points[torch.arange(12) % 4]                          # (12, 1, 2, 4): each sample's own target
    mask = torch.zeros(1, 2, 4)
    mask[..., :2] = 1                                             # the left half is given
    x = generate(denoiser, n=12, sampler=sampler, steps=30, known=known, mask=mask, resample=resample, seed=3)
    assert torch.equal(x[..., :2], known[..., :2])                # kept exactly, bit for bit
    # the right half is completed from the left half: the only data point with that left half
    assert torch.allclose(x[..., 2:], known[..., 2:], atol=0.05), (x[..., 2:] - known[..., 2:]).abs().max()
    free = generate(denoiser, n=12, sampler=sampler, steps=30, seed=3)
    assert not torch.allclose(free, known, atol=0.05)             # without the known half it draws other points


def test_repaint_resampling_costs_resample_evaluations_per_step():
    denoiser = points_denoiser()
    calls = []
    net = denoiser.net
    net.register_forward_hook(lambda *args: calls.append(1))
    mask = torch.ones(1, 2, 4)
    generate(denoiser, n=2, sampler="ddpm", steps=5, known=net.points[:2], mask=mask, resample=3)
    assert len(calls) == 4 * 3 + 1  # the last step is deterministic and is taken once


def test_a_saved_denoiser_comes_back_with_its_contract(tmp_path):
    net = perturbed(UNet(in_channels=4, channels=(8, 16), attention=False, dims="1d"))
    schedule = NoiseSchedule.from_name("sigmoid", T=50)
    path = tmp_path / "rolls.safetensors"
    save_denoiser(path, Denoiser(net, "eps", schedule, (4, 16)))
    back = load_denoiser(path, device="cpu")
    assert (back.prediction, back.shape, back.schedule.name, back.schedule.T) == ("eps", (4, 16), "sigmoid", 50)
    assert torch.equal(back.schedule.betas, schedule.betas)
    x_t, t = torch.randn(2, 4, 16), torch.tensor([3, 40])
    assert torch.equal(back(x_t, t), net(x_t, t))
    assert torch.equal(generate(back, n=2, steps=3), generate(Denoiser(net, "eps", schedule, (4, 16)), n=2, steps=3))
