"""Training objectives: what the network predicts (its `prediction`: eps, x0 or v) and how each noise level is weighted.

Every objective here is a weighted x0 error: with x0_hat recovered from the prediction,
  ||eps - eps_hat||^2 = snr * ||x0 - x0_hat||^2,   ||v - v_hat||^2 = (1 + snr) * ||x0 - x0_hat||^2.
So choosing a parameterisation is choosing a weight w(snr) (Kingma et al. 2021; Salimans & Ho 2022).
min-SNR-gamma clips that weight at gamma (Hang et al. 2023). Introduced in chapter 04.
"""
from __future__ import annotations

import torch

from .schedules import NoiseSchedule, check_prediction, check_steps, q_sample, v_target
from .utils import append_dims

WEIGHTINGS = ("none", "min_snr")


def target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """What the network is trained to output when it predicts `prediction`."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "flow":
        return eps - x0  # the straight path's velocity (chapter 13)
    return v_target(x0, eps, alpha_bar_t)


def x0_weight(prediction: str, snr: torch.Tensor) -> torch.Tensor:
    """The implied weight on ||x0 - x0_hat||^2 of an unweighted MSE on `prediction`'s target."""
    # flow: x0_hat = x_s - s u_hat with s = 1 / (1 + sqrt(snr)), so the u error is the x0 error over s
    weights = {"eps": lambda: snr, "x0": lambda: torch.ones_like(snr), "v": lambda: snr + 1,
               "flow": lambda: (1 + snr.sqrt()) ** 2}
    return weights[check_prediction(prediction)]()


def loss_weight(prediction: str, weighting: str, snr: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample factor multiplying the MSE on `prediction`'s target.

    "none": 1. "min_snr": makes the total x0 weight min(snr, gamma) (Hang et al. 2023), i.e.
    min(snr, gamma) / x0_weight(prediction, snr).
    """
    if weighting == "none":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        if gamma <= 0:
            raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
        return snr.clamp(max=gamma) / x0_weight(prediction, snr)
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def diffusion_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, prediction: str, weighting: str = "none",
                   gamma: float = 5.0, t: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, reduce: bool = True) -> torch.Tensor:
    """Monte-Carlo estimate of the diffusion objective on a batch x0.

    Draw t ~ U{0..T-1} and eps ~ N(0, I), form x_t = q_sample(x0, t, eps), ask `model(x_t, t)` for its
    output and take the (weighted) mean squared error to the target. With prediction="eps" and no weighting
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
    output = model(x_t, t)
    if output.shape != x0.shape:
        raise ValueError(f"model returned shape {tuple(output.shape)}, expected {tuple(x0.shape)}")
    per_sample = (output.float() - target(prediction, x0, eps, alpha_bar_t).float()).pow(2).flatten(1).mean(1)
    snr = schedule.snr.to(x0.device)[t].float()
    per_sample = per_sample * loss_weight(prediction, weighting, snr, gamma)
    return per_sample.mean() if reduce else per_sample


def implied_x0_weight(prediction: str, weighting: str, snr: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """The total weight a prediction target and a weighting put on ||x0 - x0_hat||^2 at each SNR (chapter 04):
    x0_weight(prediction, snr) * loss_weight(prediction, weighting, snr, gamma). With "min_snr" this is
    min(snr, gamma) whatever the prediction; plotted against log-SNR it shows where each loss spends its effort."""
    return x0_weight(prediction, snr) * loss_weight(prediction, weighting, snr, gamma)


def elbo_weight(schedule: NoiseSchedule) -> torch.Tensor:
    """Weight (T,) on the summed squared x0 error of each step's term in the DDPM ELBO (chapter 04).

    For t >= 1 the term is L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) with both variances equal to
    the posterior's; it is exactly 1/2 (snr[t-1] - snr[t]) ||x0 - x0_hat||^2 (Kingma et al. 2021, eq. 13 in
    discrete time). For t = 0 the term is the decoder L_0; taking it Gaussian with variance 1 / snr[0] (the
    noise left at step 0, in data units) gives 1/2 snr[0] ||x0 - x0_hat||^2 up to a constant. The prior term
    L_T has no parameters and no weight here.
    """
    snr = schedule.snr
    return 0.5 * torch.cat([snr[:1], snr[:-1] - snr[1:]])


def optimal_x0(x_t: torch.Tensor, alpha_bar_t, data: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] when x0 is drawn uniformly from the N points `data` (N, ...) (chapter 04).

    This is the minimiser of every objective in this module (any positive weighting, any parameterisation):
    with unlimited capacity all of them learn the same denoiser. x_t is (B, ...) like data's points;
    alpha_bar_t is a number or a (B,) tensor. Each point's posterior weight is a softmax of
    -||x_t - sqrt(alpha_bar_t) x0_i||^2 / (2 (1 - alpha_bar_t)). Memory is B x N x D: meant for toy data.
    """
    if x_t.shape[1:] != data.shape[1:]:
        raise ValueError(f"x_t points have shape {tuple(x_t.shape[1:])}, data points {tuple(data.shape[1:])}")
    alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    if alpha_bar_t.ndim == 0:
        alpha_bar_t = alpha_bar_t.expand(len(x_t))
    if alpha_bar_t.shape != (len(x_t),):
        raise ValueError(f"alpha_bar_t must be a number or one value per point, shape ({len(x_t)},)")
    if (alpha_bar_t <= 0).any() or (alpha_bar_t >= 1).any():
        raise ValueError("alpha_bar_t must lie strictly between 0 and 1")
    x, d = x_t.flatten(1).double(), data.flatten(1).double()
    alpha_bar_t = alpha_bar_t.to(x.device)[:, None]
    sq_dist = (x[:, None, :] - alpha_bar_t.sqrt()[:, :, None] * d[None]).pow(2).sum(-1)  # (B, N)
    weights = torch.softmax(-sq_dist / (2 * (1 - alpha_bar_t)), dim=1)
    return (weights @ d).reshape(x_t.shape).to(x_t.dtype)
