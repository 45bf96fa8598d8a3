"""A small time- and condition-aware UNet for 28x28 images (Ronneberger et al. 2015; Ho et al. 2020).

Built up piece by piece in chapter 05: sinusoidal time embedding -> residual block with GroupNorm ->
down and up paths with skips -> self-attention at 7x7. Chapter 07 adds the style codes (class label and
a continuous style vector). The network never sees a schedule: it maps (x_t, t, codes) to a prediction.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalTimeEmbedding(nn.Module):
    """Map a step t (B,) to (B, dim) sines and cosines at geometric frequencies (Vaswani et al. 2017)."""

    def __init__(self, dim: int, max_period: float = 10_000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time-embedding dim must be even, got {dim}")
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None]  # (B, dim/2)
        return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    # 8 groups divide every width used here; GroupNorm does not depend on the batch size (Wu & He 2018).
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the embedding as a per-channel scale and shift, again, plus a skip
    (He et al. 2016). The embedding is how t and the style codes reach every layer."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map; used only at 7x7, where 49 tokens are cheap."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """Denoiser for (B, C, 28, 28) images at resolutions 28 -> 14 -> 7 and back.

    forward(x_t, t, labels=None, style=None) -> prediction with x_t's shape (eps_hat, x0_hat or v_hat,
    depending on the objective it was trained with).
      t:      (B,) integer steps (any float works: the embedding is continuous).
      labels: (B,) long in 0..num_classes, where num_classes itself is the null code (Ho & Salimans 2022).
      style:  (B, style_dim) float; the all-zero row is the null style (see diffusion_lab.conditioning).
    """

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (32, 64, 128), blocks_per_level: int = 1,
                 attention: bool = True, num_classes: int | None = None, style_dim: int = 0, dropout: float = 0.0,
                 out_channels: int | None = None):
        super().__init__()
        if len(channels) != 3:
            raise ValueError("this UNet has three resolutions (28, 14, 7): pass three channel widths")
        self.config = dict(in_channels=in_channels, channels=list(channels), blocks_per_level=blocks_per_level,
                           attention=attention, num_classes=num_classes, style_dim=style_dim, dropout=dropout,
                           out_channels=out_channels)
        self.in_channels, self.num_classes, self.style_dim = in_channels, num_classes, style_dim
        emb_dim = 4 * channels[0]
        self.time_embed = nn.Sequential(SinusoidalTimeEmbedding(channels[0]), nn.Linear(channels[0], emb_dim),
                                        nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.style_embed = (nn.Sequential(nn.Linear(style_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                            if style_dim else None)

        self.stem = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [channels[0]], channels[0]
        for level, width in enumerate(channels):
            for _ in range(blocks_per_level):
                self.down.append(ResBlock(c, width, emb_dim, dropout))
                c = width
                skips.append(c)
            if level < len(channels) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # 28 -> 14 -> 7
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout),
                                  SelfAttention(c) if attention else nn.Identity(),
                                  ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(channels))):
            for _ in range(blocks_per_level + 1):
                self.up.append(ResBlock(c + skips.pop(), width, emb_dim, dropout))
                c = width
            if level == len(channels) - 1 and attention:
                self.up.append(SelfAttention(c))
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))
        self.head = nn.Sequential(group_norm(c), nn.SiLU(), nn.Conv2d(c, out_channels or in_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def embed(self, t: torch.Tensor, labels: torch.Tensor | None, style: torch.Tensor | None) -> torch.Tensor:
        emb = self.time_embed(t)
        B = len(t)
        if self.label_embed is not None:
            if labels is None:  # no label given: the null code
                labels = torch.full((B,), self.num_classes, device=t.device, dtype=torch.long)
            emb = emb + self.label_embed(labels)
        elif labels is not None:
            raise ValueError("this UNet was built without num_classes, so it cannot take labels")
        if self.style_embed is not None:
            if style is None:
                style = torch.zeros(B, self.style_dim, device=t.device)
            emb = emb + self.style_embed(style.to(emb.dtype))
        elif style is not None:
            raise ValueError("this UNet was built with style_dim=0, so it cannot take a style code")
        return emb

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                style: torch.Tensor | None = None) -> torch.Tensor:
        if x_t.ndim != 4 or x_t.shape[1] != self.in_channels or x_t.shape[-2:] != (28, 28):
            raise ValueError(f"UNet expects x_t of shape (B, {self.in_channels}, 28, 28), got {tuple(x_t.shape)}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(len(x_t))
        emb = self.embed(t, labels, style)
        h = self.stem(x_t)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.head(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
