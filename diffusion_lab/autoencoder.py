"""A tiny KL-regularised autoencoder: 1x28x28 digits <-> Cx7x7 latents, the first stage of latent diffusion
(Rombach et al. 2022, after the VAE of Kingma & Welling 2014). Chapter 10.

The encoder outputs a mean and a log-variance per latent element; training reconstructs from a sample
z = mean + std * noise and adds a small KL term that keeps the latents near N(0, 1), so that a diffusion model
has a smooth, bounded space to work in. It is a one-shot encoder/decoder: one pass each way, no noise schedule.
Sampling never uses it alone; a latent diffusion model draws latents and the decoder turns them into pixels.

The latent scale factor is measured the way latent diffusion does: 1 / (standard deviation of the encoded
latents of a batch of training images), so that scaled latents have unit variance like the diffusion's noise.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data
from .checkpoint import SHIPPED, CheckpointError, load_checkpoint, save_checkpoint

FORMAT = "diffusion_lab/autoencoder-1"


class Autoencoder(nn.Module):
    """x (B, 1, 28, 28) in [-1, 1] -> (mean, logvar), each (B, C, 7, 7) -> decoded (B, 1, 28, 28).

    Two stride-2 convolutions down (28 -> 14 -> 7) and two nearest-neighbour upsamplings back; `config` rebuilds it.
    """

    def __init__(self, latent_channels: int = 4, widths: tuple[int, int] = (32, 64), kl_weight: float = 1e-3):
        super().__init__()
        w0, w1 = widths
        self.config = dict(latent_channels=latent_channels, widths=[w0, w1], kl_weight=kl_weight)
        self.latent_channels, self.kl_weight = latent_channels, kl_weight
        act = nn.SiLU
        self.encoder = nn.Sequential(
            nn.Conv2d(1, w0, 3, padding=1), act(),                      # (B, w0, 28, 28)
            nn.Conv2d(w0, w0, 3, stride=2, padding=1), act(),           # (B, w0, 14, 14)
            nn.Conv2d(w0, w1, 3, padding=1), act(),
            nn.Conv2d(w1, w1, 3, stride=2, padding=1), act(),           # (B, w1, 7, 7)
            nn.Conv2d(w1, 2 * latent_channels, 3, padding=1))           # (B, 2C, 7, 7): mean and log-variance
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, w1, 3, padding=1), act(),        # (B, w1, 7, 7)
            nn.Conv2d(w1, w1, 3, padding=1), act(),
            nn.Upsample(scale_factor=2, mode="nearest"),                # (B, w1, 14, 14)
            nn.Conv2d(w1, w0, 3, padding=1), act(),
            nn.Upsample(scale_factor=2, mode="nearest"),                # (B, w0, 28, 28)
            nn.Conv2d(w0, w0, 3, padding=1), act(),
            nn.Conv2d(w0, 1, 3, padding=1))                             # (B, 1, 28, 28)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of q(z | x), each (B, C, 7, 7); logvar is clamped for numerical safety."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        z = mean + (0.5 * logvar).exp() * noise
        return self.decode(z), mean, logvar


def vae_loss(model: Autoencoder, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
    """Per image: squared error summed over pixels + kl_weight * KL(q(z|x) || N(0, I)) summed over latents."""
    x_hat, mean, logvar = model(x, generator)
    recon = (x_hat - x).pow(2).flatten(1).sum(1).mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
    return {"loss": recon + model.kl_weight * kl, "recon": recon, "kl": kl}


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), averaged over images."""
    mse = (x.float() - x_hat.float().clamp(-1, 1)).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(4.0 / mse)).mean().item()


@torch.no_grad()
def latents(model: Autoencoder, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """The posterior means of uint8 (N, 28, 28) images (or [-1, 1] floats), (N, C, 7, 7) float32."""
    x = data.as_image_batch(images)
    return torch.cat([model.encode(x[i : i + batch_size])[0] for i in range(0, len(x), batch_size)])


@torch.no_grad()
def reconstruct(model: Autoencoder, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Encode (posterior mean) and decode: float (N, 1, 28, 28) in [-1, 1]."""
    z = latents(model, images, batch_size)
    return torch.cat([model.decode(z[i : i + batch_size]) for i in range(0, len(z), batch_size)]).clamp(-1, 1)


def scale_factor(z: torch.Tensor) -> float:
    """Latent diffusion's rescaling: 1 / std of a batch of encoded training latents, so z * factor has unit
    variance (Rombach et al. 2022, section on the latent space's scaling)."""
    return 1.0 / z.float().std().item()


@torch.no_grad()
def evaluate(model: Autoencoder, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Reconstruction PSNR (dB) and the repository classifier's accuracy on the reconstructions."""
    from . import metrics

    x = data.as_image_batch(images)
    x_hat = reconstruct(model, images)
    return {"psnr_db": psnr(x, x_hat), "classifier_accuracy": metrics.conditional_accuracy(x_hat, labels),
            "n": len(x)}


def train_autoencoder(model: Autoencoder, images: torch.Tensor, *, steps: int, batch_size: int = 128,
                      lr: float = 2e-3, seed: int = 0, checkpoint: str | os.PathLike | None = None,
                      ckpt_every: int = 100, stop_at: int | None = None, log=print) -> dict:
    """Adam with a cosine decay to 10% of lr, on uint8 (N, 28, 28) images drawn with replacement.
    With `checkpoint`, the run (weights, optimizer, data generator, losses) is saved every `ckpt_every` steps and a
    re-run resumes from it exactly; a checkpoint of another configuration is refused. `stop_at` ends the call after
    that step (as a kill would, but after a checkpoint). Returns the run's record."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    run = {"model": model.config, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
    step, losses, elapsed = 0, [], 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        tensors, meta = load_checkpoint(checkpoint)
        if meta.get("format") != FORMAT + "/run" or {k: meta["run"].get(k) for k in run if k != "steps"} != \
                {k: v for k, v in run.items() if k != "steps"}:
            raise CheckpointError(f"{checkpoint} is another autoencoder run; delete it or choose another path")
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        groups = optimizer.state_dict()["param_groups"]
        state = {i: {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
                 for i in groups[0]["params"]}
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        generator.set_state(tensors["rng.data"])
        losses, step, elapsed = tensors["history.loss"].tolist(), meta["step"], meta["elapsed_s"]
        log(f"resuming from {checkpoint} at step {step}")

    def save():
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        for i, s in optimizer.state_dict()["state"].items():
            tensors.update({f"optim.{i}.{k}": torch.as_tensor(v) for k, v in s.items()})
        tensors["rng.data"] = generator.get_state()
        tensors["history.loss"] = torch.tensor(losses)
        save_checkpoint(checkpoint, tensors, {"format": FORMAT + "/run", "run": run, "step": step,
                                              "elapsed_s": round(elapsed, 2)})

    start = time.perf_counter() - elapsed
    model.train()
    while step < steps:
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = data.to_unit_range(images[idx])
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        parts = vae_loss(model, x, generator)
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        optimizer.step()
        losses.append(parts["loss"].item())
        step += 1
        elapsed = time.perf_counter() - start
        if step % 50 == 0 or step == steps:
            log(f"step {step}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f} "
                f"recon {parts['recon'].item():.3f} kl {parts['kl'].item():.1f} ({elapsed:.0f} s)")
        if checkpoint is not None and (step % ckpt_every == 0 or step == steps or step == stop_at):
            save()
        if step == stop_at:
            break
    model.eval()
    return {**run, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])), "train_seconds": round(elapsed, 1)}


def save_autoencoder(path: str | os.PathLike, model: Autoencoder, scale: float, **record) -> str:
    """The shipped file: weights, config, the latent scale factor and how it was made. Returns its SHA-256."""
    tensors = {f"net.{k}": v for k, v in model.state_dict().items()}
    return save_checkpoint(path, tensors, {"format": FORMAT, "kind": "autoencoder", "config": model.config,
                                           "scale_factor": scale, **record})


def load_autoencoder(name_or_path: str | os.PathLike = "mnist-vae") -> tuple[Autoencoder, float]:
    """(autoencoder in eval mode, latent scale factor) from a shipped name (SHA-256 verified) or a path."""
    name = str(name_or_path)
    if name in SHIPPED and SHIPPED[name].kind != "autoencoder":
        raise CheckpointError(f"{name} is a shipped {SHIPPED[name].kind}, not an autoencoder")
    tensors, meta = load_checkpoint(name_or_path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not an autoencoder checkpoint (format {meta.get('format')!r})")
    model = Autoencoder(**meta["config"])
    model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    return model.eval(), float(meta["scale_factor"])
