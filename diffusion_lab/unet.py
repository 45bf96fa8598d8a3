"""A small time- and condition-aware UNet for any shape (Ronneberger et al. 2015; Ho et al. 2020).

Built up piece by piece in chapter 05: sinusoidal time embedding -> residual block with GroupNorm ->
down and up paths with skips -> self-attention at the lowest resolution. Chapter 07 adds the style codes
(class label and a continuous style vector). The same network takes three layouts (`dims`): 1-D signals,
2-D images, and (2+1)-D clips with factorised space-time blocks (Ho et al. 2022, Video Diffusion Models), and
an optional context sequence read by cross-attention (Rombach et al. 2022). The network never sees a
schedule: it maps (x_t, t, codes) to a prediction.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DIMS = ("1d", "2d", "2+1d")
LAYOUTS = {"1d": "(B, {C}, L)", "2d": "(B, {C}, H, W)", "2+1d": "(B, {C}, F, H, W)"}


def conv_nd(conv_dims: int, *args, **kwargs) -> nn.Module:
    """nn.Conv1d or nn.Conv2d: the 1-D layout convolves along L, the 2-D and (2+1)-D layouts over H x W."""
    return (nn.Conv1d, nn.Conv2d)[conv_dims - 1](*args, **kwargs)


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
    (He et al. 2016). The embedding is how t and the style codes reach every layer.
    `conv_dims` = 2 convolves (B, C, H, W) maps, 1 convolves (B, C, L) signals."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0, conv_dims: int = 2):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), conv_nd(conv_dims, c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = group_norm(c_out), conv_nd(conv_dims, c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = conv_nd(conv_dims, c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[(..., *[None] * (x.ndim - 2))].chunk(2, dim=1)  # (B, C, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SpaceTimeResBlock(ResBlock):
    """The (2+1)-D block (Ho et al. 2022): the ResBlock above runs on each frame alone (a 1x3x3 space-time
    kernel), then a 3x1x1 temporal conv mixes each pixel across neighbouring frames, added as a residual.
    The temporal conv starts at zero, so a fresh clip model treats its frames independently."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__(c_in, c_out, emb_dim, dropout, conv_dims=2)
        self.temporal_norm = group_norm(c_out)
        self.temporal = nn.Conv3d(c_out, c_out, (3, 1, 1), padding=(1, 0, 0))
        nn.init.zeros_(self.temporal.weight)
        nn.init.zeros_(self.temporal.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, frames: int) -> torch.Tensor:
        h = super().forward(x, emb)  # (B*F, C, H, W): space, one frame at a time
        BF, C, H, W = h.shape
        clip = h.reshape(BF // frames, frames, C, H, W).transpose(1, 2)  # (B, C, F, H, W)
        mix = self.temporal(F.silu(self.temporal_norm(clip)))  # (B, C, F, H, W): time, one pixel at a time
        return h + mix.transpose(1, 2).reshape(BF, C, H, W)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (or the positions of a 1-D signal); used only
    at the lowest resolution, where the tokens are few (49 at 7x7)."""

    def __init__(self, channels: int, heads: int = 4, conv_dims: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = conv_nd(conv_dims, channels, 3 * channels, 1)
        self.out = conv_nd(conv_dims, channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, -1)  # (B, 3, heads, C/heads, N)
        q, k, v = qkv.unbind(1)
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(h.transpose(-1, -2).reshape(x.shape))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from the pixels of a feature map, keys and values from a context
    sequence (B, L, context_dim), e.g. the tokens of a prompt (Rombach et al. 2022). No context (None), or an
    all-zero context row, is the null context: the layer then adds nothing to that sample."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4, conv_dims: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.q = conv_nd(conv_dims, channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = conv_nd(conv_dims, channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if context is None:
            return x
        B, C, L = *x.shape[:2], context.shape[1]
        q = self.q(self.norm(x)).reshape(B, self.heads, C // self.heads, -1).transpose(-1, -2)  # (B, heads, N, C/heads)
        kv = self.kv(context).reshape(B, L, 2, self.heads, C // self.heads)  # (B, L, 2, heads, C/heads)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        h = self.out(h.transpose(-1, -2).reshape(x.shape))  # (B, C, H, W)
        present = context.flatten(1).ne(0).any(1).to(h.dtype)  # (B,): 0 for a null (all-zero) context row
        return x + h * present[(..., *[None] * (x.ndim - 1))]


class UNet(nn.Module):
    """Denoiser for signals, images or clips; with channels (c0, c1, ..., cn) it works at n+1 resolutions,
    halving the spatial size n times (28 -> 14 -> 7 for MNIST and three widths).

    Layouts (`dims`), with C = in_channels and n = len(channels) - 1:
      "1d":   x_t is (B, C, L), L divisible by 2**n (e.g. a piano roll's pitches as channels, time as L).
      "2d":   x_t is (B, C, H, W), H and W divisible by 2**n; rectangles are fine (the default layout).
      "2+1d": x_t is (B, C, F, H, W), a clip of F >= 1 frames, H and W divisible by 2**n. Every spatial layer
              (convs, GroupNorm, down/up-sampling, self-attention) works on each frame alone; frames are never
              down-sampled, and only each block's zero-initialised temporal conv mixes them (Ho et al. 2022).

    forward(x_t, t, labels=None, style=None, context=None) -> prediction with x_t's shape (eps_hat, x0_hat or
    v_hat, depending on the objective it was trained with).
      t:       (B,) integer steps (any float works: the embedding is continuous).
      labels:  (B,) long in 0..num_classes, where num_classes itself is the null code (Ho & Salimans 2022).
      style:   (B, style_dim) float; the all-zero row is the null style (see diffusion_lab.conditioning).
      context: (B, L, context_dim) float, read by cross-attention wherever self-attention sits (the lowest
               resolution); None, or an all-zero row, is the null context. Needs context_dim > 0.
    `config` holds the constructor's keyword arguments (JSON-serialisable): UNet(**net.config) rebuilds it.
    """

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (32, 64, 128), blocks_per_level: int = 1,
                 attention: bool = True, num_classes: int | None = None, style_dim: int = 0, dropout: float = 0.0,
                 out_channels: int | None = None, dims: str = "2d", context_dim: int = 0):
        super().__init__()
        channels = tuple(channels)
        if dims not in DIMS:
            raise ValueError(f"dims must be one of {DIMS}, got {dims!r}")
        if not channels or any(w < 1 or w % min(8, w) for w in channels) or channels[0] % 2:
            raise ValueError("channels needs at least one width; each width must be a multiple of 8 (GroupNorm's 8 "
                             f"groups) or below 8, and the first one even; got {channels}")
        if (attention or context_dim) and channels[-1] % 4:
            raise ValueError(f"attention uses 4 heads, so the last width must be a multiple of 4; got {channels}")
        self.config = dict(in_channels=in_channels, channels=list(channels), blocks_per_level=blocks_per_level,
                           attention=attention, num_classes=num_classes, style_dim=style_dim, dropout=dropout,
                           out_channels=out_channels, dims=dims, context_dim=context_dim)
        self.in_channels, self.num_classes, self.style_dim = in_channels, num_classes, style_dim
        self.dims, self.levels, self.context_dim = dims, len(channels), context_dim
        conv_dims = 1 if dims == "1d" else 2  # a clip's frames go through the 2-D layers one at a time
        emb_dim = 4 * channels[0]

        def block(c_in: int, c_out: int) -> ResBlock:
            if dims == "2+1d":
                return SpaceTimeResBlock(c_in, c_out, emb_dim, dropout)
            return ResBlock(c_in, c_out, emb_dim, dropout, conv_dims)

        def conv(*args, **kwargs) -> nn.Module:
            return conv_nd(conv_dims, *args, **kwargs)

        def attend(c: int) -> list[nn.Module]:  # what sits at the lowest resolution: self- then cross-attention
            return (([SelfAttention(c, conv_dims=conv_dims)] if attention else [])
                    + ([CrossAttention(c, context_dim, conv_dims=conv_dims)] if context_dim else []))

        self.time_embed = nn.Sequential(SinusoidalTimeEmbedding(channels[0]), nn.Linear(channels[0], emb_dim),
                                        nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.style_embed = (nn.Sequential(nn.Linear(style_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                            if style_dim else None)

        self.stem = conv(in_channels, channels[0], 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [channels[0]], channels[0]
        for level, width in enumerate(channels):
            for _ in range(blocks_per_level):
                self.down.append(block(c, width))
                c = width
                skips.append(c)
            if level < len(channels) - 1:
                self.down.append(conv(c, c, 3, stride=2, padding=1))  # halve the size: 28 -> 14 -> 7
                skips.append(c)
        # without attention an Identity keeps the place, so the state_dict keys (mid.2 = the second block) never move
        self.mid = nn.ModuleList([block(c, c), *(attend(c) or [nn.Identity()]), block(c, c)])
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(channels))):
            for _ in range(blocks_per_level + 1):
                self.up.append(block(c + skips.pop(), width))
                c = width
            if level == len(channels) - 1:
                self.up.extend(attend(c))
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv(c, c, 3, padding=1)))
        self.head = nn.Sequential(group_norm(c), nn.SiLU(), conv(c, out_channels or in_channels, 3, padding=1))
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

    def check_input(self, x_t: torch.Tensor, context: torch.Tensor | None) -> None:
        """Raise a one-line ValueError unless x_t (and context) have the layout this UNet was built for."""
        factor = 2 ** (self.levels - 1)
        sizes = x_t.shape[-1:] if self.dims == "1d" else x_t.shape[-2:]
        ndim = {"1d": 3, "2d": 4, "2+1d": 5}[self.dims]
        if (x_t.ndim != ndim or x_t.shape[1] != self.in_channels or any(s < 1 or s % factor for s in sizes)
                or (self.dims == "2+1d" and x_t.shape[2] < 1)):
            names = "L" if self.dims == "1d" else "H and W"
            rule = f"{names} divisible by {factor}" + (" and F >= 1" if self.dims == "2+1d" else "")
            levels = f"{self.levels} level" + "s" * (self.levels > 1)
            raise ValueError(f"UNet(dims={self.dims!r}, {levels}) needs x_t of shape "
                             f"{LAYOUTS[self.dims].format(C=self.in_channels)} with {rule}; got {tuple(x_t.shape)}")
        if context is not None:
            if not self.context_dim:
                raise ValueError("this UNet was built with context_dim=0, so it cannot take a context")
            if context.ndim != 3 or context.shape[0] != len(x_t) or context.shape[2] != self.context_dim:
                raise ValueError(f"context must have shape (B, L, {self.context_dim}) with B = {len(x_t)}; "
                                 f"got {tuple(context.shape)}")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                style: torch.Tensor | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        # Shapes are written for "2d" with three widths (c0, c1, c2); "1d" has L where the comments say H, W,
        # and "2+1d" runs the same layers on B*F frames.
        self.check_input(x_t, context)
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(len(x_t))
        emb = self.embed(t, labels, style)  # (B, 4*c0)
        frames = x_t.shape[2] if self.dims == "2+1d" else 0
        if frames:  # fold the frames into the batch
            B = len(x_t)
            x_t = x_t.transpose(1, 2).flatten(0, 1)  # (B*F, C, H, W)
            emb = emb.repeat_interleave(frames, dim=0)  # (B*F, 4*c0)
            context = None if context is None else context.repeat_interleave(frames, dim=0)  # (B*F, L, context_dim)
        h = self.stem(x_t)  # (B, c0, H, W)
        hs = [h]
        for layer in self.down:  # (B, c0, H, W) -> (B, c1, H/2, W/2) -> (B, c2, H/4, W/4)
            h = self.apply_layer(layer, h, emb, context, frames)
            hs.append(h)
        for layer in self.mid:  # (B, c2, H/4, W/4)
            h = self.apply_layer(layer, h, emb, context, frames)
        for layer in self.up:  # (B, c2 + skip, H/4, W/4) -> ... -> (B, c0, H, W)
            if isinstance(layer, ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)  # (B, c + c_skip, ., .): the skip from the same resolution
            h = self.apply_layer(layer, h, emb, context, frames)
        out = self.head(h)  # (B, out_channels, H, W)
        if frames:  # unfold the frames
            out = out.unflatten(0, (B, frames)).transpose(1, 2)  # (B, out_channels, F, H, W)
        return out

    @staticmethod
    def apply_layer(layer: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                    frames: int) -> torch.Tensor:
        if isinstance(layer, SpaceTimeResBlock):
            return layer(h, emb, frames)
        if isinstance(layer, ResBlock):
            return layer(h, emb)
        if isinstance(layer, CrossAttention):
            return layer(h, context)
        return layer(h)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
