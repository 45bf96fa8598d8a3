"""The 2-D toy lab of chapter 04: a small time-aware MLP denoiser, and a distance to score its samples.

On 2-D point clouds (data.swiss_roll, data.two_moons) a whole diffusion model trains in seconds on a CPU, so
chapter 04 can compare objectives and weightings by measurement instead of by anecdote. The network is the
same kind of object as the UNet: it maps (x_t, t, labels) to a prediction and never sees a noise schedule.
Its time embedding is the UNet's own sinusoidal one (Vaswani et al. 2017; Ho et al. 2020).

`sliced_wasserstein` lives here, not in metrics.py, because it is the toy chapter's yardstick for point clouds;
metrics.py measures MNIST images with the repo's classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import SinusoidalTimeEmbedding


class ToyMLP(nn.Module):
    """Denoiser for points (B, dim): forward(x_t, t, labels=None) -> prediction (B, dim) (chapter 04).

    The input layer sees x_t, a sinusoidal embedding of the integer step t, and (if num_classes is set) a
    learned embedding of the class label; `num_classes` itself is the null label, as in the UNet
    (Ho & Salimans 2022). Hidden layers are residual (Linear -> SiLU) blocks, so depth does not hurt early
    training. What the output means (eps_hat, x0_hat or v_hat) is decided by the loss it is trained with.
    """

    def __init__(self, dim: int = 2, hidden: int = 64, layers: int = 3, time_dim: int = 32,
                 num_classes: int | None = None):
        super().__init__()
        if dim < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"ToyMLP needs dim, hidden and layers >= 1, got {dim}, {hidden}, {layers}")
        self.dim, self.num_classes = dim, num_classes
        self.config = dict(dim=dim, hidden=hidden, layers=layers, time_dim=time_dim, num_classes=num_classes)
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        self.label_embed = nn.Embedding(num_classes + 1, time_dim) if num_classes else None
        self.inp = nn.Linear(dim + time_dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                style: None = None) -> torch.Tensor:
        # `style` exists so conditioning.guided can call every denoiser alike; the toy has no style code
        if style is not None:
            raise ValueError("ToyMLP takes no continuous style code")
        if x_t.ndim != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"ToyMLP expects x_t of shape (B, {self.dim}), got {tuple(x_t.shape)}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(len(x_t))
        emb = self.time_embed(t)
        if self.label_embed is not None:
            if labels is None:  # no label given: the null code
                labels = torch.full((len(x_t),), self.num_classes, device=x_t.device, dtype=torch.long)
            emb = emb + self.label_embed(labels)
        elif labels is not None:
            raise ValueError("this ToyMLP was built without num_classes, so it cannot take labels")
        h = F.silu(self.inp(torch.cat([x_t, emb.to(x_t.dtype)], dim=1)))
        for block in self.blocks:
            h = h + F.silu(block(h))
        return self.out(h)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between two point clouds a (N, D) and b (M, D) (chapter 04).

    Project both clouds on `projections` random unit directions; in 1-D the optimal transport pairs the
    sorted values (quantiles), so W2^2 along a direction is the mean squared gap between matching quantiles.
    Returns sqrt(mean over directions of W2^2), in the data's units (Rabin et al. 2011; Bonneel et al. 2015).
    It is 0 for identical clouds and is a true distance between distributions, unlike a loss value. Two
    independent samples of one distribution still differ by a finite-sample floor: measure that floor too.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"sliced_wasserstein needs two clouds (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 1 or len(b) < 1:
        raise ValueError("sliced_wasserstein needs at least one point in each cloud")
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    directions = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa, pb = (a @ directions).sort(dim=0).values, (b @ directions).sort(dim=0).values
    if len(a) != len(b):  # compare at common quantile levels
        levels = (torch.arange(max(len(a), len(b)), dtype=torch.float64) + 0.5) / max(len(a), len(b))
        pa, pb = torch.quantile(pa, levels, dim=0), torch.quantile(pb, levels, dim=0)
    return (pa - pb).pow(2).mean().sqrt().item()
