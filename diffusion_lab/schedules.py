"""Noise schedules and the forward process q(x_t | x0).

Notation (book/notation.md): beta_t is the variance added at step t; alpha = 1 - beta;
alpha_bar = cumprod(alpha); snr = alpha_bar / (1 - alpha_bar); sigmas = sqrt((1 - alpha_bar) / alpha_bar),
the noise level of the equivalent variance-exploding process x_t / sqrt(alpha_bar) = x0 + sigma * eps.
The integer step t runs over 0..T-1; continuous time in [0, 1] is called `time`.
Introduced in chapter 02 (forward process) and chapter 03 (schedules).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .utils import append_dims

SCHEDULES = ("linear", "cosine", "sigmoid", "rectified")
# What a denoiser outputs: the noise eps, the clean data x0, or the velocity v (Salimans & Ho 2022). The one
# definition of the word `prediction` in the package; the conversions between them are at the bottom.
PREDICTIONS = ("eps", "x0", "v")
# Chapter 13 adds the rectified-flow velocity u = eps - x0 (Liu et al. 2023; Lipman et al. 2023).
FLOW = "flow"
OUTPUTS = PREDICTIONS + (FLOW,)   # everything a denoiser may output; chapter 04 compares PREDICTIONS only


def check_prediction(prediction) -> str:
    if prediction not in OUTPUTS:
        raise ValueError(f"unknown prediction {prediction!r}; a denoiser predicts one of {', '.join(OUTPUTS)}")
    return prediction


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"the number of diffusion steps T must be a positive integer, got {T!r}")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's schedule (Ho et al. 2020): betas rise linearly. The defaults assume T=1000; for another T
    they are rescaled by 1000/T so the total noise added stays the same (Nichol & Dhariwal 2021), and clipped
    at 0.999 so that a very short chain (T < 50) still has valid betas."""
    _check_T(T)
    scale = 1000 / T
    return torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64).clamp(max=0.999)


def cosine_alpha_bar(time: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """alpha_bar(time) = cos^2(pi/2 * (time + s) / (1 + s)), normalised so alpha_bar(0) = 1 (Nichol & Dhariwal 2021)."""
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(time) / f(torch.zeros_like(time))


def sigmoid_alpha_bar(time: torch.Tensor, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """A sigmoid-shaped alpha_bar(time) (Chen 2023, "On the importance of noise scheduling")."""
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    return (v_end - torch.sigmoid((time * (end - start) + start) / tau)) / (v_end - v_start)


def rectified_alpha_bar(time: torch.Tensor) -> torch.Tensor:
    """The straight path x = (1 - time) x0 + time eps of rectified flow (Liu et al. 2023), written as a
    variance-preserving schedule: dividing x by sqrt((1 - time)^2 + time^2) gives sqrt(alpha_bar) x0 +
    sqrt(1 - alpha_bar) eps with alpha_bar = (1 - time)^2 / ((1 - time)^2 + time^2). It reaches pure noise
    (alpha_bar = 0) at time = 1. Chapter 13."""
    return (1 - time) ** 2 / ((1 - time) ** 2 + time**2)


def betas_from_alpha_bar_fn(alpha_bar_fn, T: int, max_beta: float = 0.999) -> torch.Tensor:
    """Discretise a continuous alpha_bar(time) into T betas: beta_t = 1 - alpha_bar(t+1/T) / alpha_bar(t/T).
    Clipped at `max_beta` so the last step does not divide by zero (Nichol & Dhariwal 2021)."""
    _check_T(T)
    time = torch.linspace(0, 1, T + 1, dtype=torch.float64)
    alpha_bar = alpha_bar_fn(time)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    return betas_from_alpha_bar_fn(lambda u: cosine_alpha_bar(u, s), T)


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    return betas_from_alpha_bar_fn(lambda u: sigmoid_alpha_bar(u, start, end, tau), T)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so its last value is exactly 0 while its first is unchanged
    (Lin et al. 2024, Algorithm 1): the final step then really is pure noise. The last beta becomes 1."""
    sqrt_alpha_bars = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_alpha_bars[0].clone(), sqrt_alpha_bars[-1].clone()
    sqrt_alpha_bars = (sqrt_alpha_bars - last) * first / (first - last)
    alpha_bars = sqrt_alpha_bars**2
    alphas = torch.cat([alpha_bars[:1], alpha_bars[1:] / alpha_bars[:-1]])
    return 1 - alphas


def make_betas(name: str, T: int = 1000, zero_terminal_snr: bool = False) -> torch.Tensor:
    """Betas for a named schedule: "linear", "cosine", "sigmoid" or "rectified" (chapter 13; its last beta is 1)."""
    makers = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas,
              "rectified": lambda T: betas_from_alpha_bar_fn(rectified_alpha_bar, T, max_beta=1.0)}
    if name not in makers:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    betas = makers[name](T)
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete schedule of T steps, held in float64. Everything else is derived from `betas`.

    >>> s = NoiseSchedule.from_name("cosine", T=1000)
    >>> x_t = q_sample(s, x0, t, eps)
    """

    betas: torch.Tensor
    name: str = "custom"

    def __post_init__(self):
        betas = torch.as_tensor(self.betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all():
            raise ValueError("betas contain NaN or inf")
        # beta_T = 1 is allowed only at the last step: that is a zero-terminal-SNR schedule.
        inner, last = betas[:-1], betas[-1]
        if (inner <= 0).any() or (inner >= 1).any() or last <= 0 or last > 1:
            bad = betas[(betas <= 0) | (betas >= 1)]
            raise ValueError(
                f"every beta must lie in (0, 1) (only the last may equal 1, for zero terminal SNR); "
                f"got {bad[:3].tolist()}"
            )
        object.__setattr__(self, "betas", betas)

    @classmethod
    def from_name(cls, name: str, T: int = 1000, zero_terminal_snr: bool = False) -> "NoiseSchedule":
        label = f"{name}+zsnr" if zero_terminal_snr else name
        return cls(make_betas(name, T, zero_terminal_snr), name=label)

    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1 - self.betas

    @property
    def alpha_bars(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, 0)

    @property
    def snr(self) -> torch.Tensor:
        alpha_bars = self.alpha_bars
        return alpha_bars / (1 - alpha_bars)

    @property
    def log_snr(self) -> torch.Tensor:
        return self.snr.log()

    @property
    def sigmas(self) -> torch.Tensor:
        alpha_bars = self.alpha_bars
        return ((1 - alpha_bars) / alpha_bars).sqrt()

    def alpha_bar_at(self, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """alpha_bar_t gathered for a batch of integer steps t (B,), as float32 on t's device by default."""
        t = check_steps(self, t)
        alpha_bar_t = self.alpha_bars.to(t.device)[t]
        if like is not None:
            alpha_bar_t = append_dims(alpha_bar_t.to(like.dtype), like.ndim)
        return alpha_bar_t.float() if like is None else alpha_bar_t


def check_steps(schedule: NoiseSchedule, t) -> torch.Tensor:
    """Validate integer steps t against 0..T-1 and return them as a long tensor."""
    t = torch.as_tensor(t)
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError("t must hold integer steps 0..T-1; continuous time in [0, 1] is a different quantity")
    t = t.long()
    if t.numel() and (t.min() < 0 or t.max() >= schedule.T):
        raise ValueError(f"t must lie in 0..{schedule.T - 1}, got values from {t.min().item()} to {t.max().item()}")
    return t


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t, eps: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) in one shot (DDPM eq. 4)."""
    t = check_steps(schedule, t).to(x0.device)
    if t.ndim != 1 or len(t) != len(x0):
        raise ValueError(f"t must be one step per sample, shape ({len(x0)},), got {tuple(t.shape)}")
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    elif eps.shape != x0.shape:
        raise ValueError(f"eps has shape {tuple(eps.shape)} but x0 has {tuple(x0.shape)}")
    alpha_bar_t = schedule.alpha_bar_at(t, like=x0)
    return alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x0) (DDPM eqs. 6-7). At t = 0 the variance is 0."""
    t = check_steps(schedule, t).to(x_t.device)
    alpha_bars = schedule.alpha_bars.to(x_t.device)
    alpha_bar_t = alpha_bars[t]
    alpha_bar_prev = torch.where(t > 0, alpha_bars[(t - 1).clamp(min=0)], torch.ones_like(alpha_bar_t))
    beta_t = schedule.betas.to(x_t.device)[t]
    coef_x0 = alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t)
    coef_xt = (1 - beta_t).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    variance = beta_t * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    shape = lambda a: append_dims(a.to(x_t.dtype), x_t.ndim)  # noqa: E731
    return shape(coef_x0) * x0 + shape(coef_xt) * x_t, shape(variance)


# Conversions between what a network predicts. All take alpha_bar_t already broadcast to x_t's shape.
def x0_from_eps(x_t, eps_hat, alpha_bar_t):
    return (x_t - (1 - alpha_bar_t).sqrt() * eps_hat) / alpha_bar_t.sqrt()


def eps_from_x0(x_t, x0_hat, alpha_bar_t):
    return (x_t - alpha_bar_t.sqrt() * x0_hat) / (1 - alpha_bar_t).sqrt()


def v_target(x0, eps, alpha_bar_t):
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)."""
    return alpha_bar_t.sqrt() * eps - (1 - alpha_bar_t).sqrt() * x0


def eps_from_v(x_t, v_hat, alpha_bar_t):
    return (1 - alpha_bar_t).sqrt() * x_t + alpha_bar_t.sqrt() * v_hat


def x0_from_v(x_t, v_hat, alpha_bar_t):
    return alpha_bar_t.sqrt() * x_t - (1 - alpha_bar_t).sqrt() * v_hat


def flow_time(alpha_bar_t):
    """Where a VP point sits on the straight path: x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps is
    (sqrt(alpha_bar) + sqrt(1 - alpha_bar)) times the rectified-flow point (1 - s) x0 + s eps, with
    s = sqrt(1 - alpha_bar) / (sqrt(alpha_bar) + sqrt(1 - alpha_bar)). Returns (s, that scale)."""
    a, b = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    return b / (a + b), a + b


def x0_from_flow(x_t, u_hat, alpha_bar_t):
    """x0 from a rectified-flow velocity u = eps - x0: on the straight path x_s = (1 - s) x0 + s eps,
    x0 = x_s - s u (chapter 13)."""
    s, scale = flow_time(alpha_bar_t)
    return x_t / scale - s * u_hat


def eps_from_flow(x_t, u_hat, alpha_bar_t):
    s, scale = flow_time(alpha_bar_t)
    return x_t / scale + (1 - s) * u_hat


def fraction_near_noise(schedule: NoiseSchedule, max_snr: float = 0.01) -> float:
    """The fraction of the T steps whose SNR lies below `max_snr`: how much of a schedule is spent where
    x_t is (almost) pure noise. The default 0.01 means the signal's amplitude sqrt(alpha_bar) is under a
    tenth of the noise's sqrt(1 - alpha_bar). Introduced in chapter 03."""
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"expected a NoiseSchedule, got {type(schedule).__name__}")
    if not max_snr > 0:
        raise ValueError(f"max_snr must be positive, got {max_snr!r}")
    return (schedule.snr < max_snr).double().mean().item()
