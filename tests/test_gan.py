"""Tests for diffusion_lab.gan: shapes, the losses' values, a tiny training run that learns, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab import gan


def test_generator_and_discriminator_shapes_and_range():
    G, D = gan.Generator(z_dim=16, width=8), gan.Discriminator(width=8)
    x = G(torch.randn(5, 16))
    assert x.shape == (5, 1, 28, 28)
    assert x.min() >= -1 and x.max() <= 1  # tanh output, the data range
    assert D(x).shape == (5,)


def test_dcgan_initialisation():
    G = gan.Generator(z_dim=16, width=32)
    weight = G.body[0].weight
    assert abs(weight.std().item() - 0.02) < 0.004
    assert G.project[1].weight.mean().item() == pytest.approx(1.0, abs=0.01)


def test_losses_at_an_undecided_discriminator():
    zeros = torch.zeros(4)  # D(x) = 1/2 everywhere
    assert gan.discriminator_loss(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    assert gan.generator_loss(zeros).item() == pytest.approx(math.log(2))
    # a D that is confident and right has a small loss; the generator's loss is then large
    assert gan.discriminator_loss(torch.full((4,), 10.0), torch.full((4,), -10.0)).item() < 1e-3
    assert gan.generator_loss(torch.full((4,), -10.0)).item() > 9


def test_sample_gan_is_deterministic_and_keeps_the_mode():
    G = gan.Generator(z_dim=8, width=8).train()
    z = torch.randn(6, 8)
    a, b = gan.sample_gan(G, 6, z=z, batch_size=4), gan.sample_gan(G, 6, z=z, batch_size=6)
    torch.testing.assert_close(a, b)  # eval mode: an image depends on its own z only, not on the batch
    assert G.training
    assert gan.sample_gan(G, 3, generator=torch.Generator().manual_seed(0)).shape == (3, 1, 28, 28)


def test_training_learns_a_constant_image():
    # Data: every digit is the blank image (all -1). A working GAN loop drives the generator there.
    images = torch.zeros(64, 28, 28, dtype=torch.uint8)
    run = gan.train_gan(images, steps=60, batch_size=16, z_dim=8, width=8, lr_g=2e-3, lr_d=2e-3,
                        snapshot_every=30, n_snapshot=4, progress=False, device="cpu")
    first, last = run["snapshots"][0][1], run["snapshots"][-1][1]
    assert [s for s, _ in run["snapshots"]] == [0, 30, 60]
    assert first.mean() > -0.2          # untrained: tanh of small numbers, around 0
    assert last.mean() < first.mean() - 0.3
    assert len(run["d_losses"]) == len(run["g_losses"]) == len(run["d_real"]) == 60 == run["step"]
    assert all(math.isfinite(v) for v in run["d_losses"] + run["g_losses"])
    assert run["elapsed_s"] > 0 and run["images_per_s"] > 0
    assert not run["generator"].training


def test_same_seed_same_run():
    images = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    runs = [gan.train_gan(images, steps=3, batch_size=8, z_dim=8, width=8, seed=3, progress=False, device="cpu")
            for _ in range(2)]
    assert runs[0]["d_losses"] == runs[1]["d_losses"]


def test_callback_sees_steps_and_can_stop_training():
    images = torch.rand(16, 1, 28, 28) * 2 - 1
    seen = []

    def callback(step, G, elapsed):
        seen.append((step, isinstance(G, gan.Generator), elapsed > 0))
        return step >= 4

    run = gan.train_gan(images, steps=100, batch_size=4, z_dim=8, width=4, callback=callback, callback_every=2,
                        progress=False, device="cpu")
    assert run["step"] == 4
    assert seen == [(2, True, True), (4, True, True)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(images=torch.zeros(4, 28, 28, dtype=torch.int64)), "uint8"),
        (dict(images=torch.zeros(4, 3, 28, 28)), "shape"),
        (dict(images=torch.full((4, 1, 28, 28), 255.0)), r"\[-1, 1\]"),
        (dict(images=torch.zeros(0, 28, 28, dtype=torch.uint8)), "empty"),
        (dict(images=[[0]]), "tensor"),
        (dict(steps=0), "steps"),
        (dict(batch_size=2.5), "batch_size"),
        (dict(lr_d=0.0), "learning rates"),
        (dict(snapshot_every=-1), ">= 0"),
        (dict(callback_every=5), "callback"),
    ],
)
def test_train_gan_rejects_bad_input(kwargs, message):
    args = dict(images=torch.zeros(8, 28, 28, dtype=torch.uint8), steps=1, batch_size=4, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        gan.train_gan(**args)


def test_networks_reject_bad_shapes():
    with pytest.raises(ValueError, match="z of shape"):
        gan.Generator(z_dim=8, width=4)(torch.randn(2, 9))
    with pytest.raises(ValueError, match="28, 28"):
        gan.Discriminator(width=4)(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="positive"):
        gan.Generator(z_dim=0)
    with pytest.raises(ValueError, match="positive"):
        gan.Discriminator(width=0)
    with pytest.raises(ValueError, match="at least 1"):
        gan.sample_gan(gan.Generator(z_dim=8, width=4), 0)
