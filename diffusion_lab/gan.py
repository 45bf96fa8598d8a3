"""The DCGAN pair for 28x28 MNIST and a small adversarial training loop (chapter 01).

Architecture after Radford et al. (2016): no pooling (strided and transposed convolutions do the resizing),
BatchNorm in both nets except the generator's output and the discriminator's input, ReLU in the generator,
LeakyReLU(0.2) in the discriminator, a tanh output in [-1, 1], weights drawn from N(0, 0.02), Adam with
beta1 = 0.5. The loss is the non-saturating one of Goodfellow et al. (2014), sec. 3.

Like every network in the package, this module knows nothing about data files or noise schedules: the
training images come in as a tensor.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .utils import IMAGE_SIZE, get_device, seed_everything



class Generator(nn.Module):
    """z (B, z_dim) -> image (B, 1, 28, 28) in [-1, 1]:  z -> 7x7 -> 14x14 -> 28x28 (chapter 01)."""

    def __init__(self, z_dim: int = 64, width: int = 64):
        super().__init__()
        if z_dim < 1 or width < 1:
            raise ValueError(f"z_dim and width must be positive, got z_dim={z_dim}, width={width}")
        self.z_dim, self.width = z_dim, width
        self.project = nn.Sequential(  # (B, z_dim) -> (B, 2w * 7 * 7)
            nn.Linear(z_dim, 2 * width * 7 * 7, bias=False), nn.BatchNorm1d(2 * width * 7 * 7), nn.ReLU(True))
        self.body = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1, bias=False),  # (B, w, 14, 14)
            nn.BatchNorm2d(width), nn.ReLU(True),
            nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1),                       # (B, 1, 28, 28)
            nn.Tanh(),
        )
        self.apply(init_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"Generator expects z of shape (B, {self.z_dim}), got {tuple(z.shape)}")
        h = self.project(z).view(len(z), 2 * self.width, 7, 7)
        return self.body(h)


class Discriminator(nn.Module):
    """image (B, 1, 28, 28) in [-1, 1] -> one logit per image (B,): "how real does this look?" (chapter 01)."""

    def __init__(self, width: int = 64):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1),                          # (B, w, 14, 14), no BN on the input
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False),      # (B, 2w, 7, 7)
            nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2, True),
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, 1),                                       # (B, 1)
        )
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"Discriminator expects images of shape (B, 1, 28, 28), got {tuple(x.shape)}")
        return self.body(x).squeeze(1)


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv/linear weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), averaged: binary cross-entropy with real = 1, fake = 0."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss -log D(G(z)) (Goodfellow et al. 2014, sec. 3): strong gradients
    early on, when D easily rejects the fakes and log(1 - D(G(z))) would be flat."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def _as_float_images(images: torch.Tensor) -> torch.Tensor:
    # uint8 pixels 0..255 -> float [-1, 1] with the same map as data.to_unit_range (nets may not import data)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0
    elif not images.is_floating_point():
        raise ValueError(f"images must be uint8 pixels or float in [-1, 1], got dtype {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must have shape (N, 28, 28) or (N, 1, 28, 28), got {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("images is empty")
    if images.min() < -1.001 or images.max() > 1.001:
        raise ValueError(f"float images must lie in [-1, 1], got [{images.min().item():.3g}, {images.max().item():.3g}]")
    return images


@torch.no_grad()
def sample_gan(net: Generator, n: int, z: torch.Tensor | None = None, generator: torch.Generator | None = None,
               batch_size: int = 500) -> torch.Tensor:
    """n images (n, 1, 28, 28) in [-1, 1] on the CPU: one generator forward pass per batch (chapter 01).

    Uses the generator network `net` in eval mode (BatchNorm running statistics), so an image depends only on its
    own z, and restores the mode it found. z defaults to N(0, I) noise drawn on the CPU from the RNG `generator`.
    """
    if z is None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        z = torch.randn(n, net.z_dim, generator=generator)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        out = [net(z[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(z), batch_size)]
    finally:
        net.train(was_training)
    return torch.cat(out)


def train_gan(images: torch.Tensor, steps: int = 1000, batch_size: int = 64, z_dim: int = 64, width: int = 64,
              lr_g: float = 2e-4, lr_d: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999), seed: int = 0,
              device: str | torch.device | None = None, snapshot_every: int = 0, n_snapshot: int = 16,
              callback=None, callback_every: int = 0, progress: bool = True) -> dict:
    """Train a DCGAN on `images` (uint8 (N, 28, 28) or float (N, 1, 28, 28) in [-1, 1]) (chapter 01).

    Each step: one discriminator update on a real and a fake batch, then one generator update (the
    alternating scheme of Goodfellow et al. 2014, Algorithm 1, with k = 1).
    Every `snapshot_every` steps the generator draws the same fixed z, so the snapshots show one set of
    digits evolving. Every `callback_every` steps `callback(step, generator, elapsed_s)` runs (e.g. to
    measure FID); its time is not counted in elapsed_s, and a truthy return value stops training.

    Returns {"generator", "discriminator", "d_losses", "g_losses", "d_real", "d_fake", "snapshots",
    "z_fixed", "step", "elapsed_s", "images_per_s"}; d_real / d_fake are the mean probabilities D gives
    real and generated images per step, and snapshots is a list of (step, images (n, 1, 28, 28)).
    """
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if lr_g <= 0 or lr_d <= 0:
        raise ValueError(f"learning rates must be positive, got lr_g={lr_g}, lr_d={lr_d}")
    if snapshot_every < 0 or callback_every < 0:
        raise ValueError("snapshot_every and callback_every must be >= 0 (0: never)")
    if callback_every and callback is None:
        raise ValueError("callback_every is set but no callback was given")
    x_all = _as_float_images(images)
    device = get_device(None if device in (None, "auto") else device)
    rng = seed_everything(seed)
    G, D = Generator(z_dim, width).to(device), Discriminator(width).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=lr_g, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=lr_d, betas=betas)
    x_all = x_all.to(device)
    z_fixed = torch.randn(n_snapshot, z_dim, generator=rng)
    history = {"d_losses": [], "g_losses": [], "d_real": [], "d_fake": []}
    snapshots = []
    if snapshot_every:
        snapshots.append((0, sample_gan(G, n_snapshot, z_fixed)))

    elapsed, step = 0.0, 0
    bar = tqdm(total=steps, desc="GAN", disable=not progress, dynamic_ncols=True)
    while step < steps:
        start = time.perf_counter()
        idx = torch.randint(0, len(x_all), (batch_size,), generator=rng).to(device)
        real = x_all[idx]
        z = torch.randn(batch_size, z_dim, generator=rng).to(device)
        fake = G(z)
        # discriminator: push D(real) -> 1 and D(fake) -> 0; fake is detached, so G is left alone
        real_logits, fake_logits = D(real), D(fake.detach())
        loss_d = discriminator_loss(real_logits, fake_logits)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # generator: push the (just updated) D(fake) -> 1
        loss_g = generator_loss(D(fake))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        step += 1
        history["d_losses"].append(loss_d.item())
        history["g_losses"].append(loss_g.item())
        history["d_real"].append(torch.sigmoid(real_logits).mean().item())
        history["d_fake"].append(torch.sigmoid(fake_logits).mean().item())
        elapsed += time.perf_counter() - start
        bar.update(1)
        if step % 50 == 0 or step == steps:
            bar.set_postfix(loss_d=f"{loss_d.item():.3f}", loss_g=f"{loss_g.item():.3f}")
        if snapshot_every and (step % snapshot_every == 0 or step == steps):
            snapshots.append((step, sample_gan(G, n_snapshot, z_fixed)))
        if callback_every and step % callback_every == 0 and callback(step, G, elapsed):
            break
    bar.close()
    return {"generator": G.eval(), "discriminator": D.eval(), **history, "snapshots": snapshots, "z_fixed": z_fixed,
            "step": step, "elapsed_s": elapsed, "images_per_s": step * batch_size / elapsed if elapsed > 0 else float("nan")}
