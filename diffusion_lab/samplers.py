"""Samplers: plain functions that turn noise x_T into data with a trained denoiser.

Every sampler in `SAMPLERS` has one signature:

    sampler(model, schedule, x_T, steps, *, prediction=None, generator=None, callback=None, progress=False,
            clip_x0=None) -> x0

`model(x_t, t)` is any callable (bind codes and guidance with `conditioning.guided`). What it predicts (eps, x0
or v) is read from `model.prediction` (a `Denoiser`, or `guided` around one, carries it); pass `prediction=`
only for a bare callable, and a mismatch with the model's own is an error. `callback(step, x_t, x0_hat)` runs
after every network evaluation (chapter 06 animates with it). There is no hidden state: the same inputs and
generator give the same samples. Known-region conditioning (inpainting, harmonisation, video prediction) is
`with_known_region` around any sampler, or RePaint's resampling loop `sample_repaint`.
Introduced in chapter 06; the quickstart (chapter 00) uses sample_ddim.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .schedules import (NoiseSchedule, check_prediction, eps_from_flow, eps_from_v, eps_from_x0, flow_time,
                        x0_from_eps, x0_from_flow, x0_from_v)


def sampling_timesteps(T: int, steps: int) -> torch.Tensor:
    """`steps` integer steps from T-1 down towards 0, evenly spaced and starting at the last one
    ("trailing" spacing; Lin et al. 2024, sec. 3.3), so the first step sees the noisiest level."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the number of sampling steps must be a positive integer, got {steps!r}")
    if steps > T:
        raise ValueError(f"cannot take {steps} sampling steps with a schedule of only T={T} training steps")
    return (T - torch.arange(steps, dtype=torch.float64) * T / steps).round().long() - 1


def prediction_of(model, prediction: str | None = None) -> str:
    """What `model` predicts: its own `prediction` attribute, or the one passed for a bare callable."""
    own = getattr(model, "prediction", None)
    if own is not None and prediction is not None and own != prediction:
        raise ValueError(f"this model predicts {own!r}; prediction={prediction!r} contradicts it (leave it out)")
    found = own or prediction
    if found is None:
        raise ValueError("the model does not say what it predicts: use a Denoiser (diffusion_lab.denoiser) "
                         "or pass prediction='eps', 'x0' or 'v'")
    return check_prediction(found)


def predict(model, x_t: torch.Tensor, t: int, alpha_bar_t: torch.Tensor, prediction: str,
            clip_x0: float | None = None):
    """Run the network at integer step t (or one step per sample, a (B,) tensor) and return (eps_hat, x0_hat),
    whatever it was trained to predict.

    clip_x0=c clamps x0_hat to [-c, c] and recomputes eps_hat to match (as Ho et al.'s released code does).
    It matters for eps-prediction at the noisiest steps: there x0_hat = (x_t - sqrt(1 - alpha_bar) eps_hat) /
    sqrt(alpha_bar) divides the network's error by sqrt(alpha_bar), about 5e-5 at the cosine schedule's last step.
    """
    t = t.to(x_t.device) if torch.is_tensor(t) else torch.full((len(x_t),), t, device=x_t.device, dtype=torch.long)
    out = model(x_t, t).to(x_t.dtype)
    if prediction == "eps":
        eps_hat, x0_hat = out, x0_from_eps(x_t, out, alpha_bar_t)
    elif prediction == "x0":
        eps_hat, x0_hat = eps_from_x0(x_t, out, alpha_bar_t), out
    elif prediction == "flow":
        eps_hat, x0_hat = eps_from_flow(x_t, out, alpha_bar_t), x0_from_flow(x_t, out, alpha_bar_t)
    else:
        eps_hat, x0_hat = eps_from_v(x_t, out, alpha_bar_t), x0_from_v(x_t, out, alpha_bar_t)
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        eps_hat = eps_from_x0(x_t, x0_hat, alpha_bar_t)
    return eps_hat, x0_hat


def _alpha_bar(schedule: NoiseSchedule, t: int, x: torch.Tensor) -> torch.Tensor:
    """alpha_bar at integer step t as a 0-d tensor in x's dtype; t = -1 means the clean data (alpha_bar = 1)."""
    value = schedule.alpha_bars[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)
    return value.to(device=x.device, dtype=x.dtype)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # drawn on the CPU so a seed gives the same samples on every device
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def _steps(schedule, x_T, steps, progress, desc):
    """The (t, t_prev) pairs of a sampling run, t_prev = -1 at the clean end, with a progress bar if asked."""
    if x_T.ndim < 2:
        raise ValueError(f"x_T must be a batch (B, ...), got shape {tuple(x_T.shape)}")
    ts = sampling_timesteps(schedule.T, steps).tolist()
    pairs = list(zip(ts, ts[1:] + [-1]))
    return tqdm(pairs, desc=desc, disable=not progress, leave=False)


def ddpm_posterior(schedule: NoiseSchedule, x: torch.Tensor, x0_hat: torch.Tensor, t: int, t_prev: int):
    """Mean and standard deviation of q(x_{t_prev} | x_t = x, x0 = x0_hat), DDPM eq. 7 (std 0 at the clean end)."""
    alpha_bar_t, alpha_bar_prev = _alpha_bar(schedule, t, x), _alpha_bar(schedule, t_prev, x)
    beta_t = 1 - alpha_bar_t / alpha_bar_prev
    mean = (alpha_bar_prev.sqrt() * beta_t * x0_hat + (1 - beta_t).sqrt() * (1 - alpha_bar_prev) * x) / (1 - alpha_bar_t)
    return mean, (beta_t * (1 - alpha_bar_prev) / (1 - alpha_bar_t)).sqrt()


def ddpm_step(model, schedule: NoiseSchedule, x: torch.Tensor, t: int, t_prev: int, prediction: str,
              generator: torch.Generator | None = None, clip_x0: float | None = None):
    """One ancestral step from level t to t_prev < t: returns (x_{t_prev}, x0_hat). Used by DDPM and RePaint."""
    _, x0_hat = predict(model, x, t, _alpha_bar(schedule, t, x), prediction, clip_x0)
    mean, std = ddpm_posterior(schedule, x, x0_hat, t, t_prev)
    if t_prev < 0:
        return mean, x0_hat
    return mean + std * _noise(x, generator), x0_hat


@torch.no_grad()
def sample_ddpm(model, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int | None = None, *,
                prediction: str | None = None, generator: torch.Generator | None = None, callback=None,
                progress: bool = False, clip_x0: float | None = None) -> torch.Tensor:
    """Ancestral sampling, Ho et al. (2020), Algorithm 2, with the posterior variance beta_tilde.

    Paper -> code: x_t -> x; alpha_bar_t -> alpha_bar_t; beta_t -> beta_t (respaced: 1 - alpha_bar_t / alpha_bar_prev);
    sigma_t^2 = beta_tilde_t -> variance; z -> _noise. With steps < T the chain is respaced over
    `sampling_timesteps` (Nichol & Dhariwal 2021, sec. 4); steps=None uses all T steps.
    """
    prediction = prediction_of(model, prediction)
    x = x_T.clone()
    for i, (t, t_prev) in enumerate(_steps(schedule, x_T, steps or schedule.T, progress, "DDPM")):
        x, x0_hat = ddpm_step(model, schedule, x, t, t_prev, prediction, generator, clip_x0)
        if callback is not None:
            callback(i, x, x0_hat)
    return x


@torch.no_grad()
def sample_ddim(model, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 50, *, eta: float = 0.0,
                prediction: str | None = None, generator: torch.Generator | None = None, callback=None,
                progress: bool = False, clip_x0: float | None = None) -> torch.Tensor:
    """DDIM, Song et al. (2021), eq. 12 (their Algorithm is the loop below); eta=0 is deterministic, eta=1
    matches DDPM's ancestral sampler on the same steps. In `SAMPLERS` it runs with eta=0; bind another eta
    with functools.partial.

    Paper -> code: alpha_t (their notation) -> alpha_bar_t here; alpha_{t-1} -> alpha_bar_prev;
    epsilon_theta^(t)(x_t) -> eps_hat; "predicted x_0" -> x0_hat; sigma_t(eta) -> noise_std (not this
    package's `sigmas`); "direction pointing to x_t" -> dir_xt.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    prediction = prediction_of(model, prediction)
    x = x_T.clone()
    for i, (t, t_prev) in enumerate(_steps(schedule, x_T, steps, progress, "DDIM")):
        alpha_bar_t, alpha_bar_prev = _alpha_bar(schedule, t, x), _alpha_bar(schedule, t_prev, x)
        eps_hat, x0_hat = predict(model, x, t, alpha_bar_t, prediction, clip_x0)
        noise_std = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()
        dir_xt = (1 - alpha_bar_prev - noise_std**2).clamp(min=0).sqrt() * eps_hat
        x = alpha_bar_prev.sqrt() * x0_hat + dir_xt
        if eta > 0 and t_prev >= 0:
            x = x + noise_std * _noise(x, generator)
        if callback is not None:
            callback(i, x, x0_hat)
    return x


@torch.no_grad()
def ddim_invert(model, schedule: NoiseSchedule, x0: torch.Tensor, steps: int = 50, *, prediction: str | None = None,
                callback=None) -> torch.Tensor:
    """Run deterministic DDIM (eta=0) backwards, from data x0 to a noise x_T that DDIM maps back to x0
    (Song et al. 2021, sec. 4.3). Each step evaluates the network at the current point and the level being
    entered, the usual first-order approximation; it is exact when eps_hat does not change along the path."""
    prediction = prediction_of(model, prediction)
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
def sample_dpm_solver_pp(model, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 20, *,
                         prediction: str | None = None, generator: torch.Generator | None = None, callback=None,
                         progress: bool = False, clip_x0: float | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. (2022b, arXiv 2211.01095), Algorithm 2: a second-order multistep solver of
    the diffusion ODE in data-prediction form, with a first-order first and last step.

    Paper -> code: alpha_t -> sqrt(alpha_bar_t); sigma_t -> sqrt(1 - alpha_bar_t) (not this package's `sigmas`);
    lambda_t = log(alpha_t / sigma_t) -> lam; x_theta -> x0_hat; D_i -> d; r_i = h_{i-1} / h_i -> r;
    t_{i-1} -> t, t_i -> t_prev (the next, less noisy level). One network evaluation per step (NFE = steps).
    Deterministic: `generator` is accepted and ignored, so all samplers share one call signature.
    """
    prediction = prediction_of(model, prediction)
    x = x_T.clone()
    lam = lambda ab: 0.5 * (ab.log() - (1 - ab).log())  # noqa: E731  half log-SNR
    x0_last, h_last = None, None
    for i, (t, t_prev) in enumerate(_steps(schedule, x_T, steps, progress, "DPM-Solver++(2M)")):
        alpha_bar_t, alpha_bar_prev = _alpha_bar(schedule, t, x), _alpha_bar(schedule, t_prev, x)
        _, x0_hat = predict(model, x, t, alpha_bar_t, prediction, clip_x0)
        if t_prev < 0:  # the clean end: sigma = 0, and the update reduces to x = x0_hat
            x = x0_hat
        else:
            h = lam(alpha_bar_prev) - lam(alpha_bar_t)
            d = x0_hat
            if x0_last is not None:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * x0_last
            x = ((1 - alpha_bar_prev) / (1 - alpha_bar_t)).sqrt() * x - alpha_bar_prev.sqrt() * torch.expm1(-h) * d
            x0_last, h_last = x0_hat, h
        if callback is not None:
            callback(i, x, x0_hat)
    return x


@torch.no_grad()
def sample_heun(model, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 10, *, prediction: str | None = None,
                generator: torch.Generator | None = None, callback=None, progress: bool = False,
                clip_x0: float | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1) on the straight-path ODE of rectified flow
    (Liu et al. 2023): dx_s/ds = u = eps_hat - x0_hat, with x_s = (1 - s) x0 + s eps and s falling from 1 to 0.

    Any denoiser works: a VP point x_t is the path point x_s times a known scale (`schedules.flow_time`), and
    every prediction gives eps_hat and x0_hat. One Euler step in these coordinates is exactly one DDIM step (chapter
    13 shows it), so DDIM is this method's first-order half. Paper -> code: t_i -> s, t_{i+1} -> s_prev;
    d_i -> u; d'_i -> u_prev; the last step, to s = 0, is Euler's. NFE = 2 * steps - 1. Deterministic.
    """
    prediction = prediction_of(model, prediction)
    x = x_T.clone()
    for i, (t, t_prev) in enumerate(_steps(schedule, x_T, steps, progress, "Heun")):
        alpha_bar_t, alpha_bar_prev = _alpha_bar(schedule, t, x), _alpha_bar(schedule, t_prev, x)
        (s, scale), (s_prev, scale_prev) = flow_time(alpha_bar_t), flow_time(alpha_bar_prev)
        eps_hat, x0_hat = predict(model, x, t, alpha_bar_t, prediction, clip_x0)
        u = eps_hat - x0_hat
        x_s_prev = x / scale + (s_prev - s) * u                     # Euler
        if t_prev >= 0:                                             # correct with the slope at the end
            eps_prev, x0_prev = predict(model, x_s_prev * scale_prev, t_prev, alpha_bar_prev, prediction, clip_x0)
            x_s_prev = x / scale + (s_prev - s) * 0.5 * (u + eps_prev - x0_prev)
        x = x_s_prev * scale_prev
        if callback is not None:
            callback(i, x, x0_hat)
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpm++2m": sample_dpm_solver_pp, "heun": sample_heun}


# --- known regions: inpainting, harmonisation, prediction -------------------------------------------------------

def check_known_region(known: torch.Tensor, mask: torch.Tensor, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (known, mask) against a batch of `shape` (B, ...): known broadcasts to it and is finite; mask is
    0/1 (1 = known) and broadcasts too. Returns both expanded to `shape` as floats."""
    known, mask = torch.as_tensor(known), torch.as_tensor(mask)
    try:
        known_b, mask_b = known.expand(shape), mask.expand(shape)
    except RuntimeError:
        raise ValueError(f"known {tuple(known.shape)} and mask {tuple(mask.shape)} must broadcast to the samples' "
                         f"shape {tuple(shape)}") from None
    if not torch.isfinite(known_b.float()).all():
        raise ValueError("known holds NaN or inf")
    if not ((mask_b == 0) | (mask_b == 1)).all():
        raise ValueError("mask must hold only 0 (generate) and 1 (known)")
    return known_b.float(), mask_b.float()


def with_known_region(model, schedule: NoiseSchedule, known: torch.Tensor, mask: torch.Tensor,
                      generator: torch.Generator | None = None):
    """Replacement conditioning around any denoiser: at every step the known region of x_t is replaced by a fresh
    draw of q(x_t | known) before the network sees it (Song et al. 2021b, app. I.2; RePaint without resampling).

    Every sampler here updates x elementwise and reads the known region only through the network, so this gives
    the unknown region exactly what replacing the sampler's state would; paste `known` into the result at the end.
    """
    def model_known(x_t, t):
        alpha_bar_t = schedule.alpha_bars.to(x_t.device)[t].to(x_t.dtype).reshape(-1, *[1] * (x_t.ndim - 1))
        known_t = alpha_bar_t.sqrt() * known + (1 - alpha_bar_t).sqrt() * _noise(x_t, generator)
        return model(mask * known_t + (1 - mask) * x_t, t)

    model_known.prediction = getattr(model, "prediction", None)
    return model_known


@torch.no_grad()
def sample_repaint(model, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int | None = None, *,
                   known: torch.Tensor, mask: torch.Tensor, resample: int = 10, prediction: str | None = None,
                   generator: torch.Generator | None = None, callback=None, progress: bool = False,
                   clip_x0: float | None = None) -> torch.Tensor:
    """RePaint, Lugmayr et al. (2022), Algorithm 1 with jump length 1: at each level the known region is replaced
    by a draw of q(x_t | known), one ancestral step is taken, and the result is pushed back to level t with fresh
    noise, `resample` times in all, so the generated region can harmonise with the known one.

    Paper -> code: x_{t-1}^known -> known_prev; x_{t-1}^unknown -> the ancestral step; U -> resample;
    "x_t ~ N(sqrt(1 - beta_{t-1}) x_{t-1}, beta_{t-1} I)" -> the push back with beta = 1 - alpha_bar_t / alpha_bar_prev.
    """
    if not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be a positive integer, got {resample!r}")
    prediction = prediction_of(model, prediction)
    known, mask = check_known_region(known.to(x_T.device), mask.to(x_T.device), x_T.shape)
    known, mask = known.to(x_T.dtype), mask.to(x_T.dtype)
    x = x_T.clone()
    for i, (t, t_prev) in enumerate(_steps(schedule, x_T, steps or schedule.T, progress, "RePaint")):
        alpha_bar_t, alpha_bar_prev = _alpha_bar(schedule, t, x), _alpha_bar(schedule, t_prev, x)
        tries = resample if t_prev >= 0 else 1  # the last step is deterministic: nothing to resample
        for u in range(tries):
            x_prev, x0_hat = ddpm_step(model, schedule, x, t, t_prev, prediction, generator, clip_x0)
            if t_prev >= 0:
                known_prev = alpha_bar_prev.sqrt() * known + (1 - alpha_bar_prev).sqrt() * _noise(x, generator)
            else:
                known_prev = known
            x_prev = mask * known_prev + (1 - mask) * x_prev
            if u < tries - 1:  # back to level t, then try the step again
                beta = 1 - alpha_bar_t / alpha_bar_prev
                x = (1 - beta).sqrt() * x_prev + beta.sqrt() * _noise(x, generator)
        x = x_prev
        if callback is not None:
            callback(i, x, x0_hat)
    return x
