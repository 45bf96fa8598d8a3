"""Samplers: determinism, exact inversion for an ideal denoiser, golden values with a fixed dummy model."""
import pytest
import torch

from diffusion_lab.samplers import (ddim_invert, sample_ddim, sample_ddpm, sample_dpm_solver_pp, sampling_timesteps)
from diffusion_lab.losses import optimal_x0
from diffusion_lab.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.from_name("linear", T=1000)


def ideal_denoiser(point, schedule=SCHEDULE):
    """The exact eps-prediction for a dataset with one point: eps = (x_t - sqrt(alpha_bar) c) / sqrt(1 - alpha_bar)."""
    def model(x_t, t):
        ab = schedule.alpha_bars[t].to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1))
        return (x_t - ab.sqrt() * point) / (1 - ab).sqrt()
    model.prediction = "eps"  # a bare callable says what it predicts, as a Denoiser does
    return model


def dummy_model(x_t, t):
    """A fixed, smooth, time-dependent map used for golden values (no randomness, no weights)."""
    return 0.5 * torch.tanh(x_t) + 0.01 * (t.float().view(-1, 1, 1, 1) / 1000) * x_t.flip(-1)


dummy_model.prediction = "eps"


def test_timesteps():
    assert sampling_timesteps(1000, 10).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert sampling_timesteps(10, 10).tolist() == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="only T=1000"):
        sampling_timesteps(1000, 1001)
    with pytest.raises(ValueError):
        sampling_timesteps(1000, 0)


def closed_form_path(point, x_T, t):
    """For a one-point dataset the probability-flow ODE keeps the noise eps0 of x_T fixed, so the exact state at
    level t (t = -1: clean) is sqrt(alpha_bar_t) point + sqrt(1 - alpha_bar_t) eps0."""
    ab_T = SCHEDULE.alpha_bars[-1].float()
    eps0 = (x_T - ab_T.sqrt() * point) / (1 - ab_T).sqrt()
    ab = SCHEDULE.alpha_bars[t].float() if t >= 0 else torch.tensor(1.0)
    return ab.sqrt() * point + (1 - ab).sqrt() * eps0


@pytest.mark.parametrize("sampler", [sample_ddim, sample_dpm_solver_pp])
def test_ode_samplers_follow_the_exact_path_at_every_step(sampler):
    """Checked in the middle of the trajectory, not only at the end (the last step returns x0_hat whatever the
    path was): DDIM is exact when eps_hat is constant along the path, and DPM-Solver++ when x0_hat is."""
    point = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    states = []
    out = sampler(ideal_denoiser(point), SCHEDULE, x_T, steps=25, callback=lambda i, x, x0: states.append(x.clone()))
    ts = sampling_timesteps(SCHEDULE.T, 25).tolist()[1:] + [-1]
    for i in (5, 12, 20):  # the state after step i sits at level ts[i]
        assert torch.allclose(states[i], closed_form_path(point, x_T, ts[i]), atol=1e-4), f"step {i}"
    assert torch.allclose(out, point.expand_as(out), atol=1e-4)


def test_ddpm_marginals_match_the_forward_process_mid_chain():
    """Ancestral sampling with the exact denoiser of a one-point dataset: after each step, the batch's mean and
    variance are those of q(x_t | point), sqrt(alpha_bar_t) point and 1 - alpha_bar_t."""
    point = torch.tensor(0.7).expand(1, 1, 2, 2)
    x_T = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stats = []
    sample_ddpm(ideal_denoiser(point.double()), SCHEDULE, x_T, steps=20, generator=torch.Generator().manual_seed(2),
                callback=lambda i, x, x0: stats.append((x.mean().item(), x.var().item())))
    ts = sampling_timesteps(SCHEDULE.T, 20).tolist()[1:]
    for i in (3, 10, 16):
        ab = SCHEDULE.alpha_bars[ts[i]].item()
        mean, var = stats[i]
        assert mean == pytest.approx(0.7 * ab**0.5, abs=0.03) and var == pytest.approx(1 - ab, abs=0.05), f"step {i}"


def test_ode_solvers_agree_mid_trajectory_on_a_three_point_dataset():
    """A multi-point exact denoiser (the posterior mean E[x0 | x_t] of three points): DDIM (first order) and
    DPM-Solver++ (second order) solve the same ODE, so with many steps their states agree at every shared level,
    and both end on one of the points."""
    data = torch.tensor([[1.0, -1.0, 0.5, 0.0], [-1.0, 1.0, 0.0, 0.5], [0.5, 0.5, -1.0, -1.0]]).view(3, 1, 2, 2)

    def model(x_t, t):
        return optimal_x0(x_t, SCHEDULE.alpha_bars[t].to(x_t.dtype), data.to(x_t.dtype))

    x_T = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    paths = {}
    for name, sampler in (("ddim", sample_ddim), ("dpm", sample_dpm_solver_pp)):
        paths[name] = []
        out = sampler(model, SCHEDULE, x_T, steps=200, prediction="x0",
                      callback=lambda i, x, x0, p=paths[name]: p.append(x.clone()))
        nearest = (out.flatten(1)[:, None] - data.flatten(1)[None].double()).norm(dim=-1).min(dim=1).values
        assert (nearest < 1e-3).all(), f"{name} did not end on a data point"
    for i in (50, 100, 150):
        assert (paths["ddim"][i] - paths["dpm"][i]).abs().max() < 0.02, f"step {i}"


def test_ddim_eta0_is_deterministic_and_inverts():
    point = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    model = ideal_denoiser(point)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    a = sample_ddim(model, SCHEDULE, x_T, steps=30)
    b = sample_ddim(model, SCHEDULE, x_T, steps=30)
    assert torch.equal(a, b)
    z = ddim_invert(model, SCHEDULE, point.expand(2, -1, -1, -1), steps=30)
    assert torch.allclose(sample_ddim(model, SCHEDULE, z, steps=30), point.expand(2, -1, -1, -1), atol=1e-4)


def test_ddim_eta1_equals_ddpm_on_the_same_steps():
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    a = sample_ddim(dummy_model, SCHEDULE, x_T, steps=20, eta=1.0, generator=torch.Generator().manual_seed(6))
    b = sample_ddpm(dummy_model, SCHEDULE, x_T, steps=20, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(a, b, atol=1e-5)


def test_callback_sees_every_step():
    seen = []
    x_T = torch.randn(1, 1, 4, 4)
    sample_dpm_solver_pp(dummy_model, SCHEDULE, x_T, steps=7, callback=lambda i, x, x0: seen.append((i, x.shape)))
    assert [i for i, _ in seen] == list(range(7))


# Golden values: full loops with the fixed dummy model on a fixed x_T. They pin the numerics; a change in any
# sampler's algebra moves them. Recompute only for an intended change, and say why in the commit.
GOLDEN = {
    "ddim": (sample_ddim, dict(steps=10)),
    "ddim_eta05": (sample_ddim, dict(steps=10, eta=0.5)),
    "dpm++2m": (sample_dpm_solver_pp, dict(steps=10)),
    "ddpm": (sample_ddpm, dict(steps=10)),
}


def _golden_run(name):
    sampler, kwargs = GOLDEN[name]
    x_T = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(123), dtype=torch.float32)
    if sampler is not sample_dpm_solver_pp:
        kwargs = dict(kwargs, generator=torch.Generator().manual_seed(7))
    out = sampler(dummy_model, SCHEDULE, x_T.double(), **kwargs)
    return [round(v, 6) for v in out.flatten()[:6].tolist()], round(out.sum().item(), 6)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_values(name):
    import json
    from pathlib import Path

    golden = json.loads((Path(__file__).parent / "golden_samplers.json").read_text())
    first, total = _golden_run(name)
    assert first == pytest.approx(golden[name]["first"], abs=1e-5)
    assert total == pytest.approx(golden[name]["sum"], abs=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(dummy_model, SCHEDULE, torch.zeros(1, 1, 2, 2), steps=3, eta=-1)
    with pytest.raises(ValueError, match="contradicts"):
        sample_ddim(dummy_model, SCHEDULE, torch.zeros(1, 1, 2, 2), steps=3, prediction="v")
    with pytest.raises(ValueError, match="unknown prediction"):
        sample_ddim(lambda x, t: x, SCHEDULE, torch.zeros(1, 1, 2, 2), steps=3, prediction="score")
    with pytest.raises(ValueError, match="does not say what it predicts"):
        sample_ddpm(lambda x, t: x, SCHEDULE, torch.zeros(1, 1, 2, 2), steps=3)
    with pytest.raises(ValueError, match="cannot take"):
        sample_dpm_solver_pp(dummy_model, SCHEDULE, torch.zeros(1, 1, 2, 2), steps=2000)
