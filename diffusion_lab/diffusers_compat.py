"""Hugging Face diffusers' schedulers, set up to mean exactly what this package's samplers mean (chapter 06).

diffusers implements DDPM, DDIM and DPM-Solver++ independently of `diffusion_lab.samplers`, so running its loop
on one of our denoisers is a second opinion on ours: tests/test_diffusers_parity.py compares the trajectories,
benchmarks/sampling.py the digits. What makes the two mean the same thing:
- `trained_betas` = our betas, and our float64 alpha_bar table in place of diffusers' float32 one (`exact_table`);
- `timestep_spacing="trailing"`: the first step sits at t = T-1, like `samplers.sampling_timesteps`;
- `prediction_type` from the model's own `prediction` (eps -> "epsilon", x0 -> "sample", v -> "v_prediction");
- DDIM: `set_alpha_to_one=True`, so the last step lands on clean data (alpha_bar = 1). With x0_hat clipping,
  `use_clipped_model_output=True` at every step: ours re-derives eps_hat from the clipped x0_hat, and without
  that flag diffusers pairs the clipped x0_hat with the unclipped eps_hat, which is another sampler;
- DPM-Solver++(2M): `algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"`,
  `lower_order_final=True`, `final_sigmas_type="zero"`. It has no x0_hat clipping (only dynamic thresholding);
- DDPM: `variance_type="fixed_small"`, the posterior variance beta_tilde.
One known difference: diffusers' DDIM steps from t to t - T // steps, so it agrees with ours only when steps
divides T. diffusers is optional (the [test] extra): it is imported inside the functions, never by the package.

    run = diffusers_sampler("dpm++2m")                     # the signature of samplers.SAMPLERS
    images = sample.generate(denoiser, labels, sampler=run, steps=20)
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .samplers import prediction_of
from .schedules import NoiseSchedule, check_prediction

# our prediction names -> diffusers' prediction_type
PREDICTION_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
# our samplers that diffusers also implements, by our name
SCHEDULERS = ("ddpm", "ddim", "dpm++2m")


def exact_table(scheduler, schedule: NoiseSchedule):
    """Give a diffusers scheduler our float64 alpha_bar table in place of its float32 one; returns it.

    diffusers stores betas in float32 and forms alpha = 1 - beta there. For the cosine schedule the last beta is
    0.999, so 1 - beta = 0.001 carries a relative error of about 6e-5, which reaches alpha_bar at t = T-1 and,
    through x0_hat = (x_t - sqrt(1 - alpha_bar) eps_hat) / sqrt(alpha_bar), moves the first step by about 5e-4.
    That is storage round-off, not another algorithm, so both sides get the same table."""
    alpha_bars = schedule.alpha_bars.clone()
    scheduler.alphas_cumprod = alpha_bars
    if hasattr(scheduler, "lambda_t"):  # DPM-Solver caches these at construction
        scheduler.alpha_t = alpha_bars.sqrt()
        scheduler.sigma_t = (1 - alpha_bars).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
    return scheduler


def make_scheduler(sampler: str, schedule: NoiseSchedule, prediction: str = "eps", clip_x0: float | None = None,
                   exact: bool = True, **overrides):
    """The diffusers scheduler that runs our `sampler` ("ddpm", "ddim" or "dpm++2m") on `schedule` for a model that
    predicts `prediction`, clipping x0_hat to [-clip_x0, clip_x0] if given. `exact=False` keeps diffusers' own
    float32 alpha_bar table; `overrides` go to the scheduler's constructor (e.g. timestep_spacing="leading")."""
    import diffusers

    common = dict(num_train_timesteps=schedule.T, trained_betas=schedule.betas.numpy(), timestep_spacing="trailing",
                  prediction_type=PREDICTION_TYPE[check_prediction(prediction)], thresholding=False)
    clip = dict(clip_sample=clip_x0 is not None, clip_sample_range=1.0 if clip_x0 is None else clip_x0)
    if sampler == "ddim":
        cls, own = diffusers.DDIMScheduler, dict(clip, set_alpha_to_one=True)
    elif sampler == "ddpm":
        cls, own = diffusers.DDPMScheduler, dict(clip, variance_type="fixed_small")
    elif sampler == "dpm++2m":
        if clip_x0 is not None:
            raise ValueError("diffusers' DPM-Solver++ has no x0_hat clipping (only dynamic thresholding): "
                             "use clip_x0=None")
        cls = diffusers.DPMSolverMultistepScheduler
        own = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
                   final_sigmas_type="zero", use_karras_sigmas=False)
    else:
        raise ValueError(f"no diffusers scheduler for sampler {sampler!r}; choose one of {', '.join(SCHEDULERS)}")
    scheduler = cls(**{**common, **own, **overrides})
    return exact_table(scheduler, schedule) if exact else scheduler


@torch.no_grad()
def run_scheduler(scheduler, model, x_T: torch.Tensor, steps: int, *, eta: float = 0.0,
                  generator: torch.Generator | None = None, callback=None, progress: bool = False,
                  step_kwargs=None) -> torch.Tensor:
    """diffusers' own sampling loop: `steps` calls of `model(x_t, t)` (any callable, e.g. `conditioning.guided`
    around a Denoiser), each followed by `scheduler.step`. Returns x0.

    `eta` is DDIM's noise (0: deterministic); `generator` draws DDPM's (and DDIM's) fresh noise.
    `callback(step, x_t, x0_hat)` as for our samplers, with x0_hat None where diffusers does not return it
    (DPM-Solver). `step_kwargs(i)` may add keyword arguments to step i (tests replay noise with it).
    The timesteps stay on the CPU, where the scheduler's tables are; only the model sees them on x's device.
    """
    import diffusers

    is_ddim = isinstance(scheduler, diffusers.DDIMScheduler)
    if eta and not is_ddim:
        raise ValueError(f"eta is DDIM's noise level; {type(scheduler).__name__} has none")
    options = {"eta": eta, "use_clipped_model_output": bool(scheduler.config.clip_sample)} if is_ddim else {}
    if generator is not None:
        options["generator"] = generator
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    timesteps = tqdm(scheduler.timesteps, desc=type(scheduler).__name__, disable=not progress, leave=False)
    for i, t in enumerate(timesteps):
        out = model(scheduler.scale_model_input(x, t), t.to(x.device).expand(len(x)))
        step = scheduler.step(out, t, x, **{**options, **(step_kwargs(i) if step_kwargs else {})})
        x = step.prev_sample
        if callback is not None:
            callback(i, x, getattr(step, "pred_original_sample", None))
    return x


def diffusers_sampler(sampler: str, eta: float = 0.0, exact: bool = True, **overrides):
    """Our `sampler` ("ddpm", "ddim" or "dpm++2m") run by diffusers, as a function with the signature of
    `samplers.SAMPLERS`, so `sample.generate(..., sampler=diffusers_sampler("ddim"))` batches, guides and seeds it
    like ours. Each call builds a fresh scheduler: diffusers keeps the step index and solver history inside."""
    if sampler not in SCHEDULERS:
        raise ValueError(f"no diffusers scheduler for sampler {sampler!r}; choose one of {', '.join(SCHEDULERS)}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta is DDIM's noise level; the {sampler} sampler has none")

    def run(model, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int, *, prediction: str | None = None,
            generator: torch.Generator | None = None, callback=None, progress: bool = False,
            clip_x0: float | None = None) -> torch.Tensor:
        scheduler = make_scheduler(sampler, schedule, prediction_of(model, prediction), clip_x0, exact, **overrides)
        return run_scheduler(scheduler, model, x_T, steps, eta=eta, generator=generator, callback=callback,
                             progress=progress)

    run.__name__ = run.__qualname__ = f"diffusers_{sampler}"
    return run
