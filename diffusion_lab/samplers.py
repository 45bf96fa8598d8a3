"""Samplers: plain functions that turn noise x_T into images with a trained denoiser.

Each takes `model(x_t, t) -> prediction` (bind labels or guidance with functools.partial or
diffusion_lab.conditioning), a NoiseSchedule, the starting noise x_T, and an optional
`callback(step, x_t, x0_hat)` called after every network evaluation (chapter 06 animates with it).
There is no hidden state: the same inputs and generator give the same images.
Introduced in chapter 06; the quickstart (chapter 00) uses sample_ddim.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .schedules import NoiseSchedule, eps_from_v, eps_from_x0, x0_from_eps, x0_from_v

PREDICTIONS = ("eps", "x0", "v")


def sampling_timesteps(T: int, steps: int) -> torch.Tensor:
    """`steps` integer steps from T-1 down towards 0, evenly spaced and starting at the last one
    ("trailing" spacing; Lin et al. 2024, sec. 3.3), so the first step sees the noisiest level."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the number of sampling steps must be a positive integer, got {steps!r}")
    if steps > T:
        raise ValueError(f"cannot take {steps} sampling steps with a schedule of only T={T} training steps")
    return (T - torch.arange(steps, dtype=torch.float64) * T / steps).round().long() - 1


def predict(model, x_t: torch.Tensor, t: int, alpha_bar_t: torch.Tensor, prediction: str,
            clip_x0: float | None = None):
    """Run the network at integer step t and return (eps_hat, x0_hat), whatever it was trained to predict.

    clip_x0=c clamps x0_hat to [-c, c] and recomputes eps_hat to match (as Ho et al.'s released code does).
    It matters for eps-prediction at the noisiest steps: there x0_hat = (x_t - sqrt(1 - alpha_bar) eps_hat) /
    sqrt(alpha_bar) divides the network's error by sqrt(alpha_bar), about 5e-5 at the cosine schedule's last step.
    """
    out = model(x_t, torch.full((len(x_t),), t, device=x_t.device, dtype=torch.long)).to(x_t.dtype)
    if prediction == "eps":
        eps_hat, x0_hat = out, x0_from_eps(x_t, out, alpha_bar_t)
    elif prediction == "x0":
        eps_hat, x0_hat = eps_from_x0(x_t, out, alpha_bar_t), out
    elif prediction == "v":
        eps_hat, x0_hat = eps_from_v(x_t, out, alpha_bar_t), x0_from_v(x_t, out, alpha_bar_t)
    else:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        eps_hat = eps_from_x0(x_t, x0_hat, alpha_bar_t)
    return eps_hat, x0_hat


def _alpha_bar(schedule: NoiseSchedule, t: int, x: torch.Tensor) -> torch.Tensor:
    """alpha_bar at integer step t as a 0-d tensor in x's dtype; t = -1 means the clean data (alpha_bar = 1)."""
    value = schedule.alpha_bars[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)
    return value.to(device=x.device, dtype=x.dtype)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # drawn on the CPU so a seed gives the same images on every device
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def _steps(schedule, x_T, steps, progress, desc):
    if x_T.ndim < 2:
        raise ValueError(f"x_T must be a batch (B, ...), got shape {tuple(x_T.shape)}")
    ts = sampling_timesteps(schedule.T, steps).tolist()
    pairs = list(zip(ts, ts[1:] + [-1]))
    return tqdm(pairs, desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def sample_ddpm(model, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int | None = None, prediction: str = "eps",
                generator: torch.Generator | None = None, callback=None, progress: bool = False,
                clip_x0: float | None = None) -> torch.Tensor:
    """Ancestral sampling, Ho et al. (2020), Algorithm 2, with the posterior variance beta_tilde.

    Paper -> code: x_t -> x; alpha_bar_t -> alpha_bar_t; beta_t -> beta_t (respaced: 1 - alpha_bar_t / alpha_bar_prev);
    sigma_t^2 = beta_tilde_t -> variance; z -> _noise. With steps < T the chain is respaced over
    `sampling_timesteps` (Nichol & Dhariwal 2021, sec. 4); steps=None uses all T steps.
    """
    x = x_T.clone()
    for i, (t, t_prev) in enumerate(_steps(schedule, x_T, steps or schedule.T, progress, "DDPM")):
        alpha_bar_t, alpha_bar_prev = _alpha_bar(schedule, t, x), _alpha_bar(schedule, t_prev, x)
        eps_hat, x0_hat = predict(model, x, t, alpha_bar_t, prediction, clip_x0)
        beta_t = 1 - alpha_bar_t / alpha_bar_prev
        # posterior mean of q(x_{t-1} | x_t, x0_hat), DDPM eq. 7
        mean = (alpha_bar_prev.sqrt() * beta_t * x0_hat + (1 - beta_t).sqrt() * (1 - alpha_bar_prev) * x) / (1 - alpha_bar_t)
        variance = beta_t * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        x = mean + variance.sqrt() * _noise(x, generator) if t_prev >= 0 else mean
        if callback is not None:
            callback(i, x, x0_hat)
    return x


@torch.no_grad()
def sample_ddim(model, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 50, eta: float = 0.0,
                prediction: str = "eps", generator: torch.Generator | None = None, callback=None,
                progress: bool = False, clip_x0: float | None = None) -> torch.Tensor:
    """DDIM, Song et al. (2021), eq. 12 (their Algorithm is the loop below); eta=0 is deterministic, eta=1
    matches DDPM's ancestral sampler on the same steps.

    Paper -> code: alpha_t (their notation) -> alpha_bar_t here; epsilon_theta^(t)(x_t) -> eps_hat;
    "predicted x_0" -> x0_hat; sigma_t(eta) -> sigma; "direction pointing to x_t" -> dir_xt.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    x = x_T.clone()
    for i, (t, t_prev) in enumerate(_steps(schedule, x_T, steps, progress, "DDIM")):
        alpha_bar_t, alpha_bar_prev = _alpha_bar(schedule, t, x), _alpha_bar(schedule, t_prev, x)
        eps_hat, x0_hat = predict(model, x, t, alpha_bar_t, prediction, clip_x0)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()
        dir_xt = (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps_hat
        x = alpha_bar_prev.sqrt() * x0_hat + dir_xt
        if eta > 0 and t_prev >= 0:
            x = x + sigma * _noise(x, generator)
        if callback is not None:
            callback(i, x, x0_hat)
    return x


@torch.no_grad()
def ddim_invert(model, schedule: NoiseSchedule, x0: torch.Tensor, steps: int = 50, prediction: str = "eps",
                callback=None) -> torch.Tensor:
    """Run deterministic DDIM (eta=0) backwards, from data x0 to a noise x_T that DDIM maps back to x0
    (Song et al. 2021, sec. 4.3). Each step evaluates the network at the current point and the level being
    entered, the usual first-order approximation; it is exact when eps_hat does not change along the path."""
    ts = sampling_timesteps(schedule.T, steps).flip(0).tolist()
    x = x0.clone()
    for i, t in enumerate(ts):
        alpha_bar_t = _alpha_bar(schedule, t, x)
        alpha_bar_prev = _alpha_bar(schedule, ts[i - 1] if i else -1, x)
        eps_hat, _ = predict(model, x, t, alpha_bar_t, prediction)
        x0_hat = (x - (1 - alpha_bar_prev).sqrt() * eps_hat) / alpha_bar_prev.sqrt()
        x = alpha_bar_t.sqrt() * x0_hat + (1 - alpha_bar_t).sqrt() * eps_hat
        if callback is not None:
            callback(i, x, x0_hat)
    return x


@torch.no_grad()
def sample_dpm_solver_pp(model, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 20, prediction: str = "eps",
                         callback=None, progress: bool = False, clip_x0: float | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. (2022b, arXiv 2211.01095), Algorithm 2: a second-order multistep solver of
    the diffusion ODE in data-prediction form, with a first-order first and last step.

    Paper -> code: alpha_t -> sqrt(alpha_bar_t); sigma_t -> sqrt(1 - alpha_bar_t) (not this package's `sigmas`);
    lambda_t = log(alpha_t / sigma_t) -> lam; x_theta -> x0_hat; D_i -> d; r_i = h_{i-1} / h_i -> r.
    One network evaluation per step (NFE = steps). Deterministic: `generator` is accepted and ignored, so all
    samplers share one call signature.
    """
    x = x_T.clone()
    lam = lambda ab: 0.5 * (ab.log() - (1 - ab).log())  # noqa: E731  half log-SNR
    x0_prev, h_prev = None, None
    for i, (t, t_next) in enumerate(_steps(schedule, x_T, steps, progress, "DPM-Solver++(2M)")):
        alpha_bar_t, alpha_bar_next = _alpha_bar(schedule, t, x), _alpha_bar(schedule, t_next, x)
        _, x0_hat = predict(model, x, t, alpha_bar_t, prediction, clip_x0)
        if t_next < 0:  # the clean end: sigma = 0, and the update reduces to x = x0_hat
            x = x0_hat
        else:
            h = lam(alpha_bar_next) - lam(alpha_bar_t)
            d = x0_hat
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * x0_prev
            x = ((1 - alpha_bar_next) / (1 - alpha_bar_t)).sqrt() * x - alpha_bar_next.sqrt() * torch.expm1(-h) * d
            x0_prev, h_prev = x0_hat, h
        if callback is not None:
            callback(i, x, x0_hat)
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpm++2m": sample_dpm_solver_pp}
