"""Matplotlib helpers shared by the chapters. A leaf module: nothing in the package imports it.

Images are shown as the reader would see them: ink white on black, in [-1, 1] or uint8.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from .schedules import q_sample
from .utils import tile


def _to_numpy_images(images) -> np.ndarray:
    """(N, H, W) uint8 or (N, 1, H, W) / (N, H, W) float in [-1, 1] -> (N, H, W) float in [0, 1]."""
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected one channel, got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"expected a batch of images (N, H, W) or (N, 1, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().numpy() / 255
    return ((x.float().clamp(-1, 1) + 1) / 2).numpy()


def image_grid(images, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile a batch into one (H', W') array in [0, 1], `nrow` images per row."""
    x = _to_numpy_images(images).astype(np.float64)
    return tile(x, nrow or math.ceil(math.sqrt(len(x))), pad, fill=0.5)


def show_images(images, nrow: int | None = None, title: str | None = None, ax=None, figsize=None):
    """Show a batch of digits as one grid. Returns the Axes."""
    grid = image_grid(images, nrow)
    if ax is None:
        _, ax = plt.subplots(figsize=figsize or (min(12, grid.shape[1] / 30), min(12, grid.shape[0] / 30)))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def show_strip(images, labels=None, title: str | None = None, figsize=None):
    """One row of images with a caption under each (e.g. x_t at several t). Returns the Figure."""
    x = _to_numpy_images(images)
    fig, axes = plt.subplots(1, len(x), figsize=figsize or (1.4 * len(x), 1.8))
    for i, (ax, img) in enumerate(zip(np.atleast_1d(axes), x)):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if labels is not None:
            ax.set_xlabel(str(labels[i]), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def forward_process_strip(schedule, x0: torch.Tensor, steps=(0, 50, 100, 200, 400, 600, 800, 999),
                          generator: torch.Generator | None = None):
    """The forward process q(x_t | x0) for one image at several steps t, with one shared noise draw
    so only the noise level changes from panel to panel. Returns the Figure."""


    if x0.ndim == 3:
        x0 = x0[None]
    steps = [t for t in steps if t < schedule.T]
    eps = torch.randn(x0.shape, generator=generator)
    x_t = torch.cat([q_sample(schedule, x0, torch.tensor([t]), eps) for t in steps])
    snr = schedule.snr[steps]
    labels = [f"t={t}\nSNR={s:.2g}" for t, s in zip(steps, snr.tolist())]
    return show_strip(x_t, labels, title=f"forward process, {schedule.name} schedule")


def plot_losses(losses, window: int = 50, ax=None, label: str | None = None):
    """Training loss per step, raw (faint) and as a moving average."""
    losses = np.asarray(losses, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    line = ax.plot(losses, alpha=0.25)[0]
    if len(losses) >= window:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, len(losses)), smooth, color=line.get_color(), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if label:
        ax.legend()
    return ax


def plot_schedules(schedules, axes=None):
    """alpha_bar_t and log-SNR against t/T for several NoiseSchedules, side by side (chapter 03).

    The horizontal axis is the fraction t/(T-1), so schedules with different T share one plot. A
    zero-terminal-SNR schedule has log-SNR = -inf at its last step: that point is marked with a
    downward triangle on the bottom edge instead of being dropped silently. Returns the Figure.
    """
    if not schedules:
        raise ValueError("plot_schedules needs at least one schedule")
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    ax_alpha_bar, ax_log_snr = axes
    finite_min = min(s.log_snr[torch.isfinite(s.log_snr)].min().item() for s in schedules)
    for s in schedules:
        frac = np.linspace(0, 1, s.T)
        style = "--" if "zsnr" in s.name else "-"  # a rescaled schedule lies on its parent until the end
        line = ax_alpha_bar.plot(frac, s.alpha_bars.numpy(), style, label=s.name)[0]
        log_snr = s.log_snr.numpy()
        finite = np.isfinite(log_snr)
        ax_log_snr.plot(frac[finite], log_snr[finite], style, color=line.get_color(), label=s.name)
        if not finite.all():
            ax_log_snr.plot(frac[~finite], np.full((~finite).sum(), finite_min - 1.5), "v",
                            color=line.get_color(), clip_on=False)
    ax_alpha_bar.set(xlabel="t / (T-1)", ylabel=r"$\bar\alpha_t$", title=r"signal kept: $\bar\alpha_t$")
    ax_log_snr.set(xlabel="t / (T-1)", ylabel="log SNR", title=r"log SNR $=\log\bar\alpha_t/(1-\bar\alpha_t)$")
    ax_log_snr.axhline(np.log(0.01), color="gray", lw=0.8, ls=":")
    ax_alpha_bar.legend(fontsize=8)
    fig = ax_alpha_bar.figure
    fig.tight_layout()
    return fig


def schedule_strips(schedules, x0: torch.Tensor, fractions=(0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                    generator: torch.Generator | None = None):
    """One image under each schedule (rows) at the same fractions t/(T-1) of the chain (columns), with one
    shared noise draw, so only the schedule differs between rows (chapter 03). Returns the Figure."""
    if not schedules:
        raise ValueError("schedule_strips needs at least one schedule")
    if x0.ndim == 3:
        x0 = x0[None]
    if x0.shape[0] != 1:
        raise ValueError(f"schedule_strips shows one image, got a batch of {x0.shape[0]}")
    if any(not 0 <= f <= 1 for f in fractions):
        raise ValueError(f"fractions must lie in [0, 1], got {list(fractions)}")
    eps = torch.randn(x0.shape, generator=generator)
    fig, axes = plt.subplots(len(schedules), len(fractions), squeeze=False,
                             figsize=(1.1 * len(fractions) + 1.2, 1.25 * len(schedules) + 0.5))
    for row, s in zip(axes, schedules):
        for ax, f in zip(row, fractions):
            t = round(f * (s.T - 1))
            x_t = q_sample(s, x0, torch.tensor([t]), eps)
            ax.imshow(_to_numpy_images(x_t)[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"SNR={s.snr[t].item():.2g}", fontsize=7)
        row[0].set_ylabel(s.name, fontsize=9)
    for ax, f in zip(axes[0], fractions):
        ax.set_title(f"t/T={f:g}", fontsize=9)
    fig.tight_layout()
    return fig
