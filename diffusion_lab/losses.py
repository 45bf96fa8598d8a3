"""Training objectives: what the network predicts (eps, x0 or v) and how each noise level is weighted.

Every objective here is a weighted x0 error: with x0_hat recovered from the prediction,
  ||eps - eps_hat||^2 = snr * ||x0 - x0_hat||^2,   ||v - v_hat||^2 = (1 + snr) * ||x0 - x0_hat||^2.
So choosing a parameterisation is choosing a weight w(snr) (Kingma et al. 2021; Salimans & Ho 2022).
min-SNR-gamma clips that weight at gamma (Hang et al. 2023). Introduced in chapter 04.
"""
from __future__ import annotations

import torch

from .schedules import NoiseSchedule, check_steps, q_sample, v_target
from .utils import append_dims

OBJECTIVES = ("eps", "x0", "v")
WEIGHTINGS = ("none", "min_snr")


def target(objective: str, x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """What the network is trained to output for this objective."""
    if objective == "eps":
        return eps
    if objective == "x0":
        return x0
    if objective == "v":
        return v_target(x0, eps, alpha_bar_t)
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def x0_weight(objective: str, snr: torch.Tensor) -> torch.Tensor:
    """The implied weight on ||x0 - x0_hat||^2 of an unweighted MSE on `objective`'s target."""
    weights = {"eps": lambda: snr, "x0": lambda: torch.ones_like(snr), "v": lambda: snr + 1}
    if objective not in weights:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    return weights[objective]()


def loss_weight(objective: str, weighting: str, snr: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample factor multiplying the MSE on `objective`'s target.

    "none": 1. "min_snr": makes the total x0 weight min(snr, gamma) (Hang et al. 2023), i.e.
    min(snr, gamma) / x0_weight(objective, snr).
    """
    if weighting == "none":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        if gamma <= 0:
            raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
        return snr.clamp(max=gamma) / x0_weight(objective, snr)
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def diffusion_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, objective: str = "eps", weighting: str = "none",
                   gamma: float = 5.0, t: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, reduce: bool = True) -> torch.Tensor:
    """Monte-Carlo estimate of the diffusion objective on a batch x0.

    Draw t ~ U{0..T-1} and eps ~ N(0, I), form x_t = q_sample(x0, t, eps), ask `model(x_t, t)` for its
    prediction and take the (weighted) mean squared error to the target. With objective="eps" and no weighting
    this is L_simple of Ho et al. (2020), eq. 14. `model` is any callable (x_t, t) -> prediction; bind
    style codes with functools.partial or a lambda.
    """
    B = len(x0)
    if t is None:
        t = torch.randint(0, schedule.T, (B,), generator=generator).to(x0.device)
    t = check_steps(schedule, t).to(x0.device)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = q_sample(schedule, x0, t, eps)
    alpha_bar_t = append_dims(schedule.alpha_bars.to(x0.device)[t].to(x0.dtype), x0.ndim)
    prediction = model(x_t, t)
    if prediction.shape != x0.shape:
        raise ValueError(f"model returned shape {tuple(prediction.shape)}, expected {tuple(x0.shape)}")
    per_sample = (prediction.float() - target(objective, x0, eps, alpha_bar_t).float()).pow(2).flatten(1).mean(1)
    snr = schedule.snr.to(x0.device)[t].float()
    per_sample = per_sample * loss_weight(objective, weighting, snr, gamma)
    return per_sample.mean() if reduce else per_sample
