"""Baseline image denoisers that chapter 05 measures the UNet against.

- ConvStack: the "few stacked convolutions that map z to z" of many introductions. With time_aware=False it
  never sees t, so one set of weights must denoise every noise level at once; time_aware=True adds t (as a
  per-channel shift after each hidden conv) and nothing else, so the pair isolates the effect of seeing t.
- PlainConvNet: the UNet's own residual blocks and time embedding, all at 28x28: no down- or up-sampling,
  no skips across scales, no attention. Sized to the UNet's parameter count, it isolates the multi-scale design.

Both take (x_t, t) and return a tensor shaped like x_t, so losses.diffusion_loss and the samplers accept them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import ResBlock, SinusoidalTimeEmbedding, group_norm


def _check_image(name: str, x_t: torch.Tensor, channels: int) -> None:
    if x_t.ndim != 4 or x_t.shape[1] != channels:
        raise ValueError(f"{name} expects x_t of shape (B, {channels}, H, W), got {tuple(x_t.shape)}")


class ConvStack(nn.Module):
    """`depth` 3x3 convolutions with ReLU between them, mapping x_t (B, C, H, W) to a prediction of the same
    shape (chapter 05). Its receptive field is (2 * depth + 1) pixels square: 7x7 for three layers.

    forward(x_t, t=None): with time_aware=False, t is accepted and ignored (the point of the baseline);
    with time_aware=True, t is required.
    """

    def __init__(self, in_channels: int = 1, width: int = 64, depth: int = 3, time_aware: bool = False,
                 time_dim: int = 32):
        super().__init__()
        if depth < 2:
            raise ValueError(f"ConvStack needs depth >= 2 (an input and an output conv), got {depth}")
        self.in_channels, self.time_aware = in_channels, time_aware
        widths = [in_channels] + [width] * (depth - 1) + [in_channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:]))
        if time_aware:
            self.time_embed = SinusoidalTimeEmbedding(time_dim)
            self.time_shift = nn.ModuleList(nn.Linear(time_dim, width) for _ in range(depth - 1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        _check_image("ConvStack", x_t, self.in_channels)
        if self.time_aware:
            if t is None:
                raise ValueError("this ConvStack is time-aware: pass the step t")
            t = torch.as_tensor(t, device=x_t.device)
            emb = self.time_embed(t.expand(len(x_t)) if t.ndim == 0 else t).to(x_t.dtype)
        h = x_t
        for i, conv in enumerate(self.convs[:-1]):
            h = conv(h)
            if self.time_aware:
                h = h + self.time_shift[i](emb)[:, :, None, None]
            h = F.relu(h)
        return self.convs[-1](h)


class PlainConvNet(nn.Module):
    """A single-resolution residual network: stem conv -> `blocks` UNet ResBlocks (with GroupNorm and the
    time embedding) -> GroupNorm, SiLU, conv head (chapter 05). Compare it with a UNet of equal parameter
    count: the FLOPs differ a lot, because every layer here runs on all H x W pixels."""

    def __init__(self, in_channels: int = 1, width: int = 64, blocks: int = 4):
        super().__init__()
        if width % 8 or blocks < 1:
            raise ValueError(f"PlainConvNet needs a width divisible by 8 (GroupNorm) and blocks >= 1, got {width}, {blocks}")
        self.in_channels = in_channels
        self.config = dict(in_channels=in_channels, width=width, blocks=blocks)
        emb_dim = 4 * width  # as in the UNet
        self.time_embed = nn.Sequential(SinusoidalTimeEmbedding(width), nn.Linear(width, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(width, width, emb_dim) for _ in range(blocks))
        self.head = nn.Sequential(group_norm(width), nn.SiLU(), nn.Conv2d(width, in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # starts by predicting 0, as the UNet does
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_image("PlainConvNet", x_t, self.in_channels)
        t = torch.as_tensor(t, device=x_t.device)
        emb = self.time_embed(t.expand(len(x_t)) if t.ndim == 0 else t)
        h = self.stem(x_t)
        for block in self.blocks:
            h = block(h, emb)
        return self.head(h)
