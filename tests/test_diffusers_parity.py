"""Our samplers against Hugging Face diffusers' schedulers, on the same denoiser (chapter 06).

The denoiser is the exact (Bayes-optimal) one for a small finite data set: given x_t it returns the
eps_hat of the posterior mean of x0 over the data points. It is a smooth, non-linear function of
(x_t, t) that is cheap and deterministic, so any disagreement in step sizes, coefficients or
timesteps shows up in the trajectories. A second test uses a small UNet with random weights.

How diffusers is configured to mean the same thing as diffusion_lab:
- `trained_betas` = our betas (so alpha_bar agrees up to diffusers' float32 storage);
- `timestep_spacing="trailing"`: the first step sits at t = T-1 (Lin et al. 2024), like `sampling_timesteps`;
- DDIM: `set_alpha_to_one=True` (the last step goes to clean data, alpha_bar = 1), `clip_sample=False`;
- DPM-Solver++: `algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"`,
  `final_sigmas_type="zero"`, `lower_order_final=True`, no thresholding;
- `prediction_type="epsilon"` throughout.

Known difference, not a bug on either side: diffusers' DDIM steps from t to t - T // steps rather than
to the next entry of its own timestep list, so the two agree only when `steps` divides T. Our DDPM and
DPM-Solver++ step to the next listed timestep, as diffusers' DDPM and DPM-Solver schedulers do.
"""
from __future__ import annotations

import pytest
import torch

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler  # a test requirement: never skipped

from diffusion_lab.samplers import sample_ddim, sample_ddpm, sample_dpm_solver_pp, sampling_timesteps  # noqa: E402
from diffusion_lab.schedules import NoiseSchedule, q_posterior, x0_from_eps  # noqa: E402
from diffusion_lab.unet import UNet  # noqa: E402



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


def unet_denoiser(net: UNet):
    return lambda x_t, t: net(x_t.float(), t).to(x_t.dtype)


def make_problem(name: str, shape=(3, 1, 4, 4), dtype=torch.float64, prediction="eps"):
    schedule = NoiseSchedule.from_name(name, T=1000)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(5, *shape[1:], generator=g, dtype=dtype).clamp(-1, 1)
    x_T = torch.randn(shape, generator=g, dtype=dtype)
    return schedule, ExactDenoiser(schedule, data, prediction), x_T


# our name for what the network predicts -> diffusers' prediction_type
PREDICTION_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def recorder():
    trajectory = []
    return trajectory, lambda i, x_t, x0_hat: trajectory.append((x_t.clone(), x0_hat.clone()))


def diffusers_loop(scheduler, model, x_T, steps, step_kwargs=lambda i: {}):
    scheduler.set_timesteps(steps)
    x, xs = x_T.clone(), []
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(model(x, t.expand(len(x))), t, x, **step_kwargs(i))
        x = out.prev_sample
        xs.append((x.clone(), getattr(out, "pred_original_sample", None)))
    return scheduler.timesteps, xs


def assert_same_trajectory(ours, theirs, check_x0=True):
    assert len(ours) == len(theirs)
    for i, ((x, x0_hat), (x_ref, x0_ref)) in enumerate(zip(ours, theirs)):
        err = (x - x_ref.to(x.dtype)).abs().max().item()
        assert err < ATOL, f"step {i}: x differs from diffusers by {err:.2e}"
        if check_x0 and x0_ref is not None:
            err0 = (x0_hat - x0_ref.to(x0_hat.dtype)).abs().max().item()
            assert err0 < ATOL, f"step {i}: x0_hat differs from diffusers by {err0:.2e}"


def common(schedule):
    return dict(num_train_timesteps=schedule.T, trained_betas=schedule.betas.numpy(), timestep_spacing="trailing",
                prediction_type="epsilon")


def exact_table(scheduler, schedule):
    """Give a diffusers scheduler our float64 alpha_bar table in place of its float32 one.

    Diffusers stores betas in float32 and forms alpha = 1 - beta there. For the cosine schedule the last
    beta is 0.999, so 1 - beta = 0.001 carries a relative error of about 6e-5, which reaches alpha_bar at
    t = T-1 and, through x0_hat = (x_t - sqrt(1 - alpha_bar) eps_hat) / sqrt(alpha_bar), moves the first
    step by about 5e-4. That is storage round-off, not a different algorithm, so we hand both sides the
    same table (`test_float32_table_is_the_only_difference` measures the effect)."""
    alpha_bars = schedule.alpha_bars.clone()
    scheduler.alphas_cumprod = alpha_bars
    if hasattr(scheduler, "lambda_t"):  # DPM-Solver caches these at construction
        scheduler.alpha_t = alpha_bars.sqrt()
        scheduler.sigma_t = (1 - alpha_bars).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()
    return scheduler


def ddim_scheduler(schedule, **overrides):
    kw = dict(common(schedule), set_alpha_to_one=True, clip_sample=False, thresholding=False)
    return exact_table(DDIMScheduler(**{**kw, **overrides}), schedule)


def dpm_scheduler(schedule, **overrides):
    kw = dict(common(schedule), algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
              lower_order_final=True, final_sigmas_type="zero", thresholding=False, use_karras_sigmas=False)
    return exact_table(DPMSolverMultistepScheduler(**{**kw, **overrides}), schedule)


def ddpm_scheduler(schedule, **overrides):
    kw = dict(common(schedule), clip_sample=False, thresholding=False, variance_type="fixed_small")
    return exact_table(DDPMScheduler(**{**kw, **overrides}), schedule)


def max_gap(a, b) -> float:
    return max((x - y.to(x.dtype)).abs().max().item() for (x, _), (y, _) in zip(a, b))


@pytest.mark.parametrize("steps", [1, 7, 10, 20, 25, 50, 1000])
def test_timesteps_match_diffusers_trailing(steps):
    schedule = NoiseSchedule.from_name("linear", T=1000)
    for make in (ddim_scheduler, dpm_scheduler, ddpm_scheduler):
        scheduler = make(schedule)
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == sampling_timesteps(1000, steps).tolist(), make.__name__


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [5, 10, 20, 50])
def test_ddim_eta0_matches_diffusers(name, steps):
    schedule, model, x_T = make_problem(name)
    ours, callback = recorder()
    x = sample_ddim(model, schedule, x_T, steps=steps, eta=0.0, callback=callback)
    _, theirs = diffusers_loop(ddim_scheduler(schedule), model, x_T, steps, lambda i: {"eta": 0.0})
    assert_same_trajectory(ours, theirs)
    assert torch.isfinite(x).all()
    # The comparison can fail: another timestep spacing (diffusers' "leading") gives another trajectory.
    _, other = diffusers_loop(ddim_scheduler(schedule, timestep_spacing="leading"), model, x_T, steps,
                              lambda i: {"eta": 0.0})
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
    _, theirs = diffusers_loop(ddim_scheduler(schedule), model, x_T, steps,
                               lambda i: {"eta": 1.0, "variance_noise": noises[i]})
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [2, 5, 7, 10, 20, 25])
def test_dpm_solver_pp_2m_matches_diffusers(name, steps):
    schedule, model, x_T = make_problem(name)
    ours, callback = recorder()
    sample_dpm_solver_pp(model, schedule, x_T, steps=steps, callback=callback)
    _, theirs = diffusers_loop(dpm_scheduler(schedule), model, x_T, steps)
    assert_same_trajectory(ours, theirs, check_x0=False)  # diffusers' step does not return x0_hat
    if steps >= 3:
        # The comparison can fail: the first-order solver (DDIM) on the same steps is measurably different,
        # and so is diffusers' other second-order variant ("heun" instead of "midpoint").
        ddim, callback = recorder()
        sample_ddim(model, schedule, x_T, steps=steps, callback=callback)
        assert max_gap(ours, ddim) > 10 * ATOL
        _, heun = diffusers_loop(dpm_scheduler(schedule, solver_type="heun"), model, x_T, steps)
        assert max_gap(ours, heun) > 10 * ATOL


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [10, 100])
def test_ddpm_matches_diffusers_with_the_same_generator(name, steps):
    """Same seed, same noise: both draw float32 N(0, I) from one CPU generator once per step (diffusers
    also draws at the last step, with zero variance, after our last draw)."""
    schedule, model, x_T = make_problem(name, dtype=torch.float32)
    ours, callback = recorder()
    sample_ddpm(model, schedule, x_T, steps=steps, generator=torch.Generator().manual_seed(5), callback=callback)
    g = torch.Generator().manual_seed(5)
    _, theirs = diffusers_loop(ddpm_scheduler(schedule), model, x_T, steps, lambda i: {"generator": g})
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_ddpm_posterior_mean_matches_diffusers_per_step(name):
    """Golden values without noise, on the full T-step chain: from the same x_t, the mean of one DDPM step,
    mu(x_t, x0_hat) from `q_posterior`, equals diffusers' step minus its noise term."""
    schedule, model, _ = make_problem(name)
    scheduler = ddpm_scheduler(schedule)
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
    kind = PREDICTION_TYPE[prediction]
    ours, callback = recorder()
    sample_ddim(model, schedule, x_T, steps=10, prediction=prediction, callback=callback)
    _, theirs = diffusers_loop(ddim_scheduler(schedule, prediction_type=kind), model, x_T, 10, lambda i: {"eta": 0.0})
    assert_same_trajectory(ours, theirs)
    ours, callback = recorder()
    sample_dpm_solver_pp(model, schedule, x_T, steps=10, prediction=prediction, callback=callback)
    _, theirs = diffusers_loop(dpm_scheduler(schedule, prediction_type=kind), model, x_T, 10)
    assert_same_trajectory(ours, theirs, check_x0=False)
    x32 = x_T.float()
    ours, callback = recorder()
    sample_ddpm(model, schedule, x32, steps=10, prediction=prediction, generator=torch.Generator().manual_seed(5),
                callback=callback)
    g = torch.Generator().manual_seed(5)
    _, theirs = diffusers_loop(ddpm_scheduler(schedule, prediction_type=kind), model, x32, 10, lambda i: {"generator": g})
    assert_same_trajectory(ours, theirs)


def test_clip_x0_matches_diffusers_clip_sample():
    """clip_x0=1 clamps x0_hat and re-derives eps_hat from it: diffusers' clip_sample=True with, for DDIM,
    use_clipped_model_output=True. The denoiser here is deliberately off (it overshoots x0 by 3x) so that
    the clamp is active at many steps."""
    schedule, exact, x_T = make_problem("linear")

    def model(x_t, t):  # eps of an x0_hat three times too large
        alpha_bar_t = schedule.alpha_bars[t.long()].to(x_t.dtype).view(-1, 1, 1, 1)
        x0_hat = 3 * x0_from_eps(x_t, exact(x_t, t), alpha_bar_t)
        return (x_t - alpha_bar_t.sqrt() * x0_hat) / (1 - alpha_bar_t).sqrt()

    ours, callback = recorder()
    sample_ddim(model, schedule, x_T, steps=10, clip_x0=1.0, callback=callback)
    _, theirs = diffusers_loop(ddim_scheduler(schedule, clip_sample=True, clip_sample_range=1.0), model, x_T, 10,
                               lambda i: {"eta": 0.0, "use_clipped_model_output": True})
    assert_same_trajectory(ours, theirs)
    assert max(x0.abs().max().item() for _, x0 in ours) <= 1.0
    unclipped, callback = recorder()
    sample_ddim(model, schedule, x_T, steps=10, callback=callback)
    assert max_gap(ours, unclipped) > 10 * ATOL  # the clamp did something
    x32 = x_T.float()
    ours, callback = recorder()
    sample_ddpm(model, schedule, x32, steps=10, clip_x0=1.0, generator=torch.Generator().manual_seed(5),
                callback=callback)
    g = torch.Generator().manual_seed(5)
    _, theirs = diffusers_loop(ddpm_scheduler(schedule, clip_sample=True, clip_sample_range=1.0), model, x32, 10,
                               lambda i: {"generator": g})
    assert_same_trajectory(ours, theirs)


def test_float32_table_is_the_only_difference():
    """With diffusers' own float32 alpha_bar table the cosine trajectories differ only by round-off
    (well under 1e-2, while a convention error is larger); the exact table removes even that."""
    schedule, model, x_T = make_problem("cosine")
    ours, callback = recorder()
    sample_dpm_solver_pp(model, schedule, x_T, steps=10, callback=callback)
    plain = DPMSolverMultistepScheduler(**common(schedule), algorithm_type="dpmsolver++", solver_order=2,
                                        final_sigmas_type="zero")
    _, theirs = diffusers_loop(plain, model, x_T, 10)
    gap = max_gap(ours, theirs)
    assert 1e-6 < gap < 1e-2
    _, exact = diffusers_loop(dpm_scheduler(schedule), model, x_T, 10)
    assert max_gap(ours, exact) < gap / 10


def test_random_unet_matches_diffusers_in_float32():
    """The same comparison with the real network type, in float32 as the chapter runs it."""
    net = random_unet()
    model = unet_denoiser(net)
    schedule = NoiseSchedule.from_name("linear", T=1000)
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    steps = 8
    ours, callback = recorder()
    sample_dpm_solver_pp(model, schedule, x_T, steps=steps, callback=callback)
    _, theirs = diffusers_loop(dpm_scheduler(schedule), model, x_T, steps)
    scale = max(x.abs().max().item() for x, _ in ours)
    assert max_gap(ours, theirs) < ATOL * max(1.0, scale)
    ours, callback = recorder()
    sample_ddim(model, schedule, x_T, steps=steps, callback=callback)
    _, theirs = diffusers_loop(ddim_scheduler(schedule), model, x_T, steps, lambda i: {"eta": 0.0})
    scale = max(x.abs().max().item() for x, _ in ours)
    assert max_gap(ours, theirs) < ATOL * max(1.0, scale)
