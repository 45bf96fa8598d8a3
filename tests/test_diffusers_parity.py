"""Our samplers against Hugging Face diffusers' schedulers, on the same denoiser (chapter 06).

The denoiser is the exact (Bayes-optimal) one for a small finite data set: given x_t it returns the
eps_hat of the posterior mean of x0 over the data points. It is a smooth, non-linear function of
(x_t, t) that is cheap and deterministic, so any disagreement in step sizes, coefficients or
timesteps shows up in the trajectories. A second test uses a small UNet with random weights.

diffusers runs through the package's one adapter, `diffusion_lab.diffusers_compat`, which configures its
schedulers to mean the same thing as ours (its docstring lists the settings) and runs diffusers' own loop;
`sample.generate` can drive it like any of our samplers. The tests here hold that adapter to the trajectories.

Known difference, not a bug on either side: diffusers' DDIM steps from t to t - T // steps rather than
to the next entry of its own timestep list, so the two agree only when `steps` divides T. Our DDPM and
DPM-Solver++ step to the next listed timestep, as diffusers' DDPM and DPM-Solver schedulers do.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffusers  # noqa: F401  (a test dependency: fail loudly if it is missing)

from diffusion_lab.denoiser import Denoiser
from diffusion_lab.diffusers_compat import SCHEDULERS, diffusers_sampler, make_scheduler, run_scheduler
from diffusion_lab.sample import generate
from diffusion_lab.samplers import SAMPLERS, sample_ddim, sample_ddpm, sample_dpm_solver_pp, sampling_timesteps
from diffusion_lab.schedules import NoiseSchedule, q_posterior, x0_from_eps
from diffusion_lab.unet import UNet

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


# With the same alpha_bar table (`exact_table`), DDIM and DDPM agree to the last bit in float64. DPM-Solver
# in diffusers keeps its sigmas and its sample in float32, which leaves gaps of 1e-6 to 4e-5 on this
# denoiser; 1e-4 is above that round-off and far below a convention mismatch (1e-2 and up).
ATOL = 1e-4


class ExactDenoiser:
    """The Bayes-optimal denoiser when the data are the K points `data` (K, *shape): x0_hat = E[x0 | x_t],
    returned as eps_hat (prediction="eps"), x0_hat ("x0") or v_hat ("v")."""

    def __init__(self, schedule: NoiseSchedule, data: torch.Tensor, prediction: str = "eps"):
        self.alpha_bars = schedule.alpha_bars
        self.data = data
        self.prediction = prediction

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar_t = self.alpha_bars[t.long().cpu()].to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1))
        flat = x_t.flatten(1)                                       # (B, D)
        centres = self.data.flatten(1).to(x_t.dtype)                # (K, D)
        a = alpha_bar_t.flatten(1)                                  # (B, 1)
        dist2 = ((flat[:, None, :] - a.sqrt()[:, None] * centres[None]) ** 2).sum(-1)  # (B, K)
        weights = torch.softmax(-dist2 / (2 * (1 - a)), dim=1)     # posterior over the K points
        x0_hat = (weights @ centres).view_as(x_t)
        eps_hat = (x_t - alpha_bar_t.sqrt() * x0_hat) / (1 - alpha_bar_t).sqrt()
        if self.prediction == "x0":
            return x0_hat
        if self.prediction == "v":
            return alpha_bar_t.sqrt() * eps_hat - (1 - alpha_bar_t).sqrt() * x0_hat
        return eps_hat


def random_unet(seed: int = 0) -> UNet:
    """A tiny UNet with every weight random (the default init zeroes the output layer, so it would predict 0)."""
    torch.manual_seed(seed)
    net = UNet(channels=(8, 16, 16), attention=True)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval()


def make_problem(name: str, shape=(3, 1, 4, 4), dtype=torch.float64, prediction="eps"):
    schedule = NoiseSchedule.from_name(name, T=1000)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(5, *shape[1:], generator=g, dtype=dtype).clamp(-1, 1)
    x_T = torch.randn(shape, generator=g, dtype=dtype)
    return schedule, ExactDenoiser(schedule, data, prediction), x_T


def recorder():
    trajectory = []
    return trajectory, lambda i, x_t, x0_hat: trajectory.append(
        (x_t.clone(), None if x0_hat is None else x0_hat.clone()))


def diffusers_run(sampler, schedule, model, x_T, steps, step_kwargs=None, prediction="eps", clip_x0=None,
                  **overrides):
    """diffusers' loop through the package's adapter, recording (x_t, x0_hat or None) after every step."""
    theirs, callback = recorder()
    scheduler = make_scheduler(sampler, schedule, prediction, clip_x0, **overrides)
    run_scheduler(scheduler, model, x_T, steps, callback=callback, step_kwargs=step_kwargs)
    return theirs


def assert_same_trajectory(ours, theirs, check_x0=True):
    assert len(ours) == len(theirs)
    for i, ((x, x0_hat), (x_ref, x0_ref)) in enumerate(zip(ours, theirs)):
        err = (x - x_ref.to(x.dtype)).abs().max().item()
        assert err < ATOL, f"step {i}: x differs from diffusers by {err:.2e}"
        if check_x0 and x0_ref is not None:
            err0 = (x0_hat - x0_ref.to(x0_hat.dtype)).abs().max().item()
            assert err0 < ATOL, f"step {i}: x0_hat differs from diffusers by {err0:.2e}"


def max_gap(a, b) -> float:
    return max((x - y.to(x.dtype)).abs().max().item() for (x, _), (y, _) in zip(a, b))


@pytest.mark.parametrize("steps", [1, 7, 10, 20, 25, 50, 1000])
def test_timesteps_match_diffusers_trailing(steps):
    schedule = NoiseSchedule.from_name("linear", T=1000)
    for sampler in SCHEDULERS:
        scheduler = make_scheduler(sampler, schedule)
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == sampling_timesteps(1000, steps).tolist(), sampler


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [5, 10, 20, 50])
def test_ddim_eta0_matches_diffusers(name, steps):
    schedule, model, x_T = make_problem(name)
    ours, callback = recorder()
    x = sample_ddim(model, schedule, x_T, steps=steps, eta=0.0, callback=callback)
    theirs = diffusers_run("ddim", schedule, model, x_T, steps)
    assert_same_trajectory(ours, theirs)
    assert torch.isfinite(x).all()
    # The comparison can fail: another timestep spacing (diffusers' "leading") gives another trajectory.
    other = diffusers_run("ddim", schedule, model, x_T, steps, timestep_spacing="leading")
    assert max_gap(ours, other) > 10 * ATOL


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_ddim_eta1_matches_diffusers_with_the_same_noise(name):
    steps = 10
    schedule, model, x_T = make_problem(name)
    ours, callback = recorder()
    sample_ddim(model, schedule, x_T, steps=steps, eta=1.0, generator=torch.Generator().manual_seed(3),
                callback=callback)
    # Our sampler draws one float32 normal per step except the last (which adds no noise): replay them.
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(x_T.shape, generator=g, dtype=torch.float32).to(x_T.dtype) for _ in range(steps - 1)]
    noises.append(torch.zeros_like(x_T))
    theirs, callback = recorder()
    run_scheduler(make_scheduler("ddim", schedule), model, x_T, steps, eta=1.0, callback=callback,
                  step_kwargs=lambda i: {"variance_noise": noises[i]})
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [2, 5, 7, 10, 20, 25])
def test_dpm_solver_pp_2m_matches_diffusers(name, steps):
    schedule, model, x_T = make_problem(name)
    ours, callback = recorder()
    sample_dpm_solver_pp(model, schedule, x_T, steps=steps, callback=callback)
    theirs = diffusers_run("dpm++2m", schedule, model, x_T, steps)
    assert all(x0 is None for _, x0 in theirs)  # diffusers' step does not return x0_hat: only x is compared
    assert_same_trajectory(ours, theirs)
    if steps >= 3:
        # The comparison can fail: the first-order solver (DDIM) on the same steps is measurably different,
        # and so is diffusers' other second-order variant ("heun" instead of "midpoint").
        ddim, callback = recorder()
        sample_ddim(model, schedule, x_T, steps=steps, callback=callback)
        assert max_gap(ours, ddim) > 10 * ATOL
        heun = diffusers_run("dpm++2m", schedule, model, x_T, steps, solver_type="heun")
        assert max_gap(ours, heun) > 10 * ATOL


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [10, 100])
def test_ddpm_matches_diffusers_with_the_same_generator(name, steps):
    """Same seed, same noise: both draw float32 N(0, I) from one CPU generator once per step (diffusers
    also draws at the last step, with zero variance, after our last draw)."""
    schedule, model, x_T = make_problem(name, dtype=torch.float32)
    ours, callback = recorder()
    sample_ddpm(model, schedule, x_T, steps=steps, generator=torch.Generator().manual_seed(5), callback=callback)
    theirs, callback = recorder()
    run_scheduler(make_scheduler("ddpm", schedule), model, x_T, steps, generator=torch.Generator().manual_seed(5),
                  callback=callback)
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_ddpm_posterior_mean_matches_diffusers_per_step(name):
    """Golden values without noise, on the full T-step chain: from the same x_t, the mean of one DDPM step,
    mu(x_t, x0_hat) from `q_posterior`, equals diffusers' step minus its noise term."""
    schedule, model, _ = make_problem(name)
    scheduler = make_scheduler("ddpm", schedule)
    scheduler.set_timesteps(schedule.T)
    g = torch.Generator().manual_seed(2)
    worst = 0.0
    for t in [999, 998, 997, 900, 700, 500, 300, 100, 50, 10, 2, 1, 0]:
        x_t = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
        steps = torch.full((2,), t)
        eps_hat = model(x_t, steps)
        x0_hat = x0_from_eps(x_t, eps_hat, schedule.alpha_bars[t])
        mean, variance = q_posterior(schedule, x0_hat, x_t, steps)
        out = scheduler.step(eps_hat, t, x_t, generator=torch.Generator().manual_seed(0))
        # diffusers adds sqrt(variance) * z for t > 0, z drawn in x_t's dtype from the generator we passed
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0), dtype=x_t.dtype)
        noise = variance.sqrt() * z if t > 0 else 0.0
        worst = max(worst, (mean - (out.prev_sample - noise)).abs().max().item())
    assert worst < ATOL, f"posterior means differ by up to {worst:.2e}"


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_other_network_targets_match_diffusers(prediction):
    """A network that predicts v (Salimans & Ho 2022) or x0: same trajectories for all three samplers."""
    schedule, model, x_T = make_problem("cosine", prediction=prediction)
    ours, callback = recorder()
    sample_ddim(model, schedule, x_T, steps=10, callback=callback)
    assert_same_trajectory(ours, diffusers_run("ddim", schedule, model, x_T, 10, prediction=prediction))
    ours, callback = recorder()
    sample_dpm_solver_pp(model, schedule, x_T, steps=10, callback=callback)
    assert_same_trajectory(ours, diffusers_run("dpm++2m", schedule, model, x_T, 10, prediction=prediction))
    x32 = x_T.float()
    ours, callback = recorder()
    sample_ddpm(model, schedule, x32, steps=10, generator=torch.Generator().manual_seed(5), callback=callback)
    theirs, callback = recorder()
    run_scheduler(make_scheduler("ddpm", schedule, prediction), model, x32, 10,
                  generator=torch.Generator().manual_seed(5), callback=callback)
    assert_same_trajectory(ours, theirs)
    # The comparison can fail: reading this network's output as eps gives another trajectory.
    assert max_gap(ours, diffusers_run("ddim", schedule, model, x_T, 10, prediction="eps")) > 10 * ATOL


def test_clip_x0_matches_diffusers_clip_sample():
    """clip_x0=1 clamps x0_hat and re-derives eps_hat from it: diffusers' clip_sample=True with, for DDIM,
    use_clipped_model_output=True (the adapter sets it). The denoiser here is deliberately off (it overshoots x0
    by 3x) so that the clamp is active at many steps."""
    schedule, exact, x_T = make_problem("linear")

    def model(x_t, t):  # eps of an x0_hat three times too large
        alpha_bar_t = schedule.alpha_bars[t.long()].to(x_t.dtype).view(-1, 1, 1, 1)
        x0_hat = 3 * x0_from_eps(x_t, exact(x_t, t), alpha_bar_t)
        return (x_t - alpha_bar_t.sqrt() * x0_hat) / (1 - alpha_bar_t).sqrt()

    ours, callback = recorder()
    sample_ddim(model, schedule, x_T, steps=10, clip_x0=1.0, prediction="eps", callback=callback)
    assert_same_trajectory(ours, diffusers_run("ddim", schedule, model, x_T, 10, clip_x0=1.0))
    assert max(x0.abs().max().item() for _, x0 in ours) <= 1.0
    unclipped, callback = recorder()
    sample_ddim(model, schedule, x_T, steps=10, prediction="eps", callback=callback)
    assert max_gap(ours, unclipped) > 10 * ATOL  # the clamp did something
    # and diffusers' default pairing (clipped x0_hat, unclipped eps_hat) is another sampler
    paired, callback = recorder()
    run_scheduler(make_scheduler("ddim", schedule, clip_x0=1.0), model, x_T, 10, callback=callback,
                  step_kwargs=lambda i: {"use_clipped_model_output": False})
    assert max_gap(ours, paired) > 10 * ATOL
    x32 = x_T.float()
    ours, callback = recorder()
    sample_ddpm(model, schedule, x32, steps=10, clip_x0=1.0, prediction="eps",
                generator=torch.Generator().manual_seed(5), callback=callback)
    theirs, callback = recorder()
    run_scheduler(make_scheduler("ddpm", schedule, clip_x0=1.0), model, x32, 10,
                  generator=torch.Generator().manual_seed(5), callback=callback)
    assert_same_trajectory(ours, theirs)


def test_float32_table_is_the_only_difference():
    """With diffusers' own float32 alpha_bar table the cosine trajectories differ only by round-off
    (well under 1e-2, while a convention error is larger); the exact table removes even that."""
    schedule, model, x_T = make_problem("cosine")
    ours, callback = recorder()
    sample_dpm_solver_pp(model, schedule, x_T, steps=10, callback=callback)
    gap = max_gap(ours, diffusers_run("dpm++2m", schedule, model, x_T, 10, exact=False))
    assert 1e-6 < gap < 1e-2
    assert max_gap(ours, diffusers_run("dpm++2m", schedule, model, x_T, 10)) < gap / 10


def test_random_unet_matches_diffusers_in_float32():
    """The same comparison with the real network type, in float32 as the chapter runs it."""
    schedule = NoiseSchedule.from_name("linear", T=1000)
    model = Denoiser(random_unet(), "eps", schedule, (1, 28, 28))
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    steps = 8
    for sampler in ("dpm++2m", "ddim"):
        ours, callback = recorder()
        SAMPLERS[sampler](model, schedule, x_T, steps, callback=callback)
        theirs = diffusers_run(sampler, schedule, model, x_T, steps)
        scale = max(x.abs().max().item() for x, _ in ours)
        assert max_gap(ours, theirs) < ATOL * max(1.0, scale), sampler


# DDPM in one batch: diffusers also draws a (zero-variance) normal at the last step, so a second batch would
# start further along the shared noise stream than ours does.
@pytest.mark.parametrize("sampler, guidance, clip_x0, batch_size",
                         [("ddim", 2.0, 1.0, 3), ("dpm++2m", 2.0, None, 3), ("ddpm", 2.0, 1.0, 5)])
def test_generate_runs_diffusers_loop_like_ours(sampler, guidance, clip_x0, batch_size):
    """`diffusers_sampler` has the samplers' signature, so sample.generate batches, guides and seeds it exactly
    as it does ours: a class-conditional v-model, guided, gives the same images both ways."""
    schedule = NoiseSchedule.from_name("cosine", T=1000)
    torch.manual_seed(0)
    net = UNet(channels=(8, 16, 16), num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    denoiser = Denoiser(net.eval(), "v", schedule, (1, 28, 28), num_classes=10)
    labels = torch.tensor([3, 1, 4, 1, 5])
    options = dict(steps=10, guidance=guidance, clip_x0=clip_x0, batch_size=batch_size, seed=4)
    ours = generate(denoiser, labels, sampler=sampler, **options)
    theirs = generate(denoiser, labels, sampler=diffusers_sampler(sampler), **options)
    gap = (ours - theirs).abs().max().item()
    assert gap < ATOL, f"{sampler}: generate() through diffusers differs from ours by {gap:.2e}"
    # The comparison can fail: the unguided model draws other images.
    other = generate(denoiser, labels, sampler=diffusers_sampler(sampler), **{**options, "guidance": 0.0})
    assert (ours - other).abs().max().item() > 100 * ATOL


def test_adapter_refuses_what_diffusers_cannot_mean():
    schedule = NoiseSchedule.from_name("cosine", T=1000)
    with pytest.raises(ValueError, match="no diffusers scheduler for sampler 'heun'"):
        diffusers_sampler("heun")
    with pytest.raises(ValueError, match="no x0_hat clipping"):
        make_scheduler("dpm++2m", schedule, clip_x0=1.0)
    with pytest.raises(ValueError, match="eta is DDIM's noise level"):
        diffusers_sampler("dpm++2m", eta=1.0)
    with pytest.raises(ValueError, match="prediction"):
        make_scheduler("ddim", schedule, prediction="score")
    # a bare callable must say what it predicts, as for our samplers
    with pytest.raises(ValueError, match="does not say what it predicts"):
        diffusers_sampler("ddim")(lambda x_t, t: x_t, schedule, torch.zeros(1, 1, 4, 4), 2)


def test_the_package_never_imports_diffusers():
    """diffusers is a test extra: importing the adapter (and the package) must not load it."""
    code = ("import sys, diffusion_lab, diffusion_lab.diffusers_compat, diffusion_lab.sample; "
            "assert 'diffusers' not in sys.modules, 'diffusers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
