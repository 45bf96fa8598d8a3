"""Chapter 13: progressive and consistency distillation, the flow prediction, Heun, reflow and straightness.

Most checks use an exact denoiser for data that is a single point c: its ODE paths are straight lines, so every
sampler lands on c in any number of steps and every distillation target is known in closed form.
"""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from diffusion_lab import distill, sample
from diffusion_lab.checkpoint import CheckpointError, checkpoint_dir
from diffusion_lab.denoiser import Denoiser, load_denoiser
from diffusion_lab.losses import target, x0_weight
from diffusion_lab.samplers import SAMPLERS, sample_ddim, sample_heun
from diffusion_lab.schedules import (NoiseSchedule, eps_from_flow, flow_time, q_sample, x0_from_flow,
                                     x0_from_v)
from diffusion_lab.training import FitConfig
from diffusion_lab.unet import UNet

COSINE = NoiseSchedule.from_name("cosine", T=1000)
RECTIFIED = NoiseSchedule.from_name("rectified", T=1000)


def point_model(schedule, c, prediction):
    """The exact denoiser when the data is the one point c: x0_hat = c, eps_hat = (x_t - sqrt(a) c) / sqrt(1 - a)."""
    def model(x_t, t, **codes):
        alpha_bar_t = schedule.alpha_bars[t].to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1))
        x0 = c.expand_as(x_t)
        eps = (x_t - alpha_bar_t.sqrt() * x0) / (1 - alpha_bar_t).clamp(min=1e-12).sqrt()
        return target(prediction, x0, eps, alpha_bar_t)
    model.prediction = prediction
    return model


def test_flow_conversions_invert_the_flow_target_and_weight_the_x0_error():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 100, 400, 700, 950, 998])
    alpha_bar_t = RECTIFIED.alpha_bar_at(t, like=x0)
    x_t = q_sample(RECTIFIED, x0, t, eps)
    u = target("flow", x0, eps, alpha_bar_t)
    assert torch.allclose(x0_from_flow(x_t, u, alpha_bar_t), x0, atol=1e-4)
    assert torch.allclose(eps_from_flow(x_t, u, alpha_bar_t), eps, atol=1e-4)
    # the path point is (1 - s) x0 + s eps, and a u error is an x0 error over s
    s, scale = flow_time(alpha_bar_t)
    assert torch.allclose(x_t / scale, (1 - s) * x0 + s * eps, atol=1e-5)
    u_err = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    x0_err = (x0_from_flow(x_t, u + u_err, alpha_bar_t) - x0).pow(2).flatten(1).sum(1)
    snr = RECTIFIED.snr[t]
    assert torch.allclose(u_err.pow(2).flatten(1).sum(1), x0_err * x0_weight("flow", snr), rtol=1e-6)


def test_rectified_schedule_ends_in_pure_noise_with_straight_time():
    alpha_bars = RECTIFIED.alpha_bars
    assert alpha_bars[-1] == 0 and alpha_bars[0] > 0.999
    s, _ = flow_time(alpha_bars[[99, 499, 899]])
    assert torch.allclose(s, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), atol=1e-6)


def test_ddim_is_euler_on_the_straight_path_and_heun_is_second_order():
    """One DDIM step, in flow coordinates, is one Euler step of dx/ds = eps_hat - x0_hat. With a curved (made-up)
    velocity field the two agree to rounding, and Heun is closer than Euler to a 1000-step reference."""
    def curved(x_t, t):  # a smooth, non-linear v-prediction
        return torch.sin(x_t) * (t.float().view(-1, 1) / 1000)
    curved.prediction = "v"
    x_T = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    ddim = sample_ddim(curved, COSINE, x_T, 8)
    x, ts = x_T.clone(), torch.cat([distill._grid(COSINE, 8)])
    for t, t_prev in zip(ts[:-1].tolist(), ts[1:].tolist()):
        a = COSINE.alpha_bars[t].float()
        a_prev = COSINE.alpha_bars[t_prev].float() if t_prev >= 0 else torch.tensor(1.0)
        (s, scale), (s_prev, scale_prev) = flow_time(a), flow_time(a_prev)
        v = curved(x, torch.full((5,), t))
        x0_hat = x0_from_v(x, v, a)
        eps_hat = (x - a.sqrt() * x0_hat) / (1 - a).sqrt()
        x = (x / scale + (s_prev - s) * (eps_hat - x0_hat)) * scale_prev
    assert torch.allclose(ddim, x, atol=1e-5)
    reference = sample_heun(curved, COSINE, x_T, 500)
    err_euler = (sample_ddim(curved, COSINE, x_T, 10) - reference).abs().max()
    err_heun = (sample_heun(curved, COSINE, x_T, 10) - reference).abs().max()
    assert err_heun < 0.5 * err_euler, (err_heun, err_euler)
    assert SAMPLERS["heun"] is sample_heun


@pytest.mark.parametrize("prediction,schedule", [("flow", RECTIFIED), ("v", COSINE)])
def test_every_sampler_lands_on_the_point_in_one_step_for_straight_paths(prediction, schedule):
    c = torch.full((1, 1, 2, 2), 0.3)
    model = point_model(schedule, c, prediction)
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    for sampler in (sample_ddim, sample_heun, distill.sample_consistency):
        assert torch.allclose(sampler(model, schedule, x_T, 1), c.expand_as(x_T), atol=1e-4), sampler.__name__
    assert distill.straightness(model, schedule, x_T, steps=20) < 1e-8


def test_straightness_is_positive_when_paths_bend():
    """Two data points: the exact denoiser's paths curve towards one of them, so S > 0."""
    points = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])

    def two_points(x_t, t):
        a = COSINE.alpha_bars[t].float().view(-1, 1)
        d = (x_t[:, None] - a.sqrt()[:, None] * points[None]).pow(2).sum(-1)
        w = torch.softmax(-d / (2 * (1 - a)), dim=1)
        x0 = w @ points
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return target("v", x0, eps, a)
    two_points.prediction = "v"
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    assert distill.straightness(two_points, COSINE, x_T, steps=40) > 1e-3


def test_progressive_target_is_the_x0_whose_ddim_step_lands_on_the_teachers_point():
    g = torch.Generator().manual_seed(4)
    x_t, x_prev = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t, t_prev = torch.tensor([999, 500, 60]), torch.tensor([749, 250, -1])
    x0 = distill.progressive_target(COSINE, x_t, x_prev, t, t_prev)
    a, a_prev = distill._alpha_bars(COSINE, t, x_t), distill._alpha_bars(COSINE, t_prev, x_t)
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    assert torch.allclose(a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, x_prev, atol=1e-4)


def test_progressive_and_consistency_losses_vanish_for_the_exact_student():
    """For point data the teacher's two steps equal one, and every point of a path maps to c: an exact student
    scores (almost) zero, and a wrong one does not."""
    c = torch.full((1, 1, 4, 4), -0.2)
    teacher = point_model(COSINE, c, "v")
    x0 = c.expand(8, 1, 4, 4)
    for make in (lambda: distill.progressive_loss(teacher, COSINE, 4), lambda: distill.consistency_loss(teacher, COSINE, 5)):
        loss = make()
        assert loss(teacher, x0, {}, torch.Generator().manual_seed(5)) < 1e-6
        assert loss(point_model(COSINE, c + 0.5, "v"), x0, {}, torch.Generator().manual_seed(5)) > 1e-2


def test_reflow_batches_keep_each_noise_with_its_own_sample():
    x0 = torch.arange(10.0).view(10, 1, 1, 1)
    x_T = -x0
    labels = torch.arange(10)
    batch = distill.reflow_batches(x_T, x0, labels)(torch.Generator().manual_seed(6), 32)
    assert torch.equal(batch["eps"], -batch["x0"]) and torch.equal(batch["labels"].float(), batch["x0"].flatten())
    with pytest.raises(ValueError, match="pair up"):
        distill.reflow_batches(x_T[:3], x0)


def tiny_teacher():
    torch.manual_seed(0)
    net = UNet(in_channels=1, channels=(8, 8), attention=False, num_classes=10)
    return Denoiser(net.eval(), "v", COSINE, (1, 8, 8), 10)


def tiny_batches(generator, size):
    return {"x0": torch.rand(size, 1, 8, 8, generator=generator) * 2 - 1,
            "labels": torch.randint(0, 10, (size,), generator=generator)}


def test_progressive_rounds_resume_and_ship_one_file_of_students(tmp_path):
    teacher = tiny_teacher()
    config = FitConfig(steps=3, batch_size=4, lr=1e-3, warmup=1, lr_decay="constant", p_uncond=0.0,
                       p_uncond_style=0.0, ckpt_every=1, log_every=1)
    # a run killed two steps into its first round, then started again, ends where an unbroken run ends
    distill.distill_progressively(teacher, tmp_path / "a", (2,), 2.0, dataclasses.replace(config, steps=2),
                                  tiny_batches, False)
    resumed = distill.distill_progressively(teacher, tmp_path / "a", (2, 1), 2.0, config, tiny_batches, False)
    straight = distill.distill_progressively(teacher, tmp_path / "b", (2, 1), 2.0, config, tiny_batches, False)
    for n in (2, 1):
        assert resumed[n].steps == n
        for p, q in zip(resumed[n].net.parameters(), straight[n].net.parameters()):
            assert torch.equal(p, q)
    # a round never resumes against another teacher
    torch.manual_seed(1)
    other = dataclasses.replace(teacher, net=UNet(in_channels=1, channels=(8, 8), attention=False, num_classes=10))
    with pytest.raises(ValueError, match="teacher"):
        distill.distill_progressively(other, tmp_path / "a", (2, 1), 2.0, config, tiny_batches, False)
    path = tmp_path / "students.safetensors"
    distill.save_students(path, straight, default_steps=1)
    one = load_denoiser(path, steps=1)
    assert one.steps == 1 and one.prediction == "v"
    x = torch.randn(3, 1, 8, 8)
    tt = torch.full((3,), 999)
    assert torch.allclose(one(x, tt, labels=torch.zeros(3, dtype=torch.long)),
                          straight[1].net(x, tt, labels=torch.zeros(3, dtype=torch.long)), atol=2e-2)  # float16
    with pytest.raises(CheckpointError, match="distilled for 1, 2 steps, not 4"):
        load_denoiser(path, steps=4)
    with pytest.raises(CheckpointError, match="not a file of distilled students"):
        load_denoiser(tmp_path / "a" / "round-2.safetensors", steps=2)
    labels = torch.arange(3)
    assert sample.generate(one, labels).shape == (3, 1, 8, 8)  # DDIM at its own step count by default
    for bad in ({"steps": 2}, {"sampler": "dpm++2m"}, {"guidance": 2.0}):
        with pytest.raises(ValueError, match="distilled"):
            sample.generate(one, labels, **bad)
    with pytest.raises(ValueError, match="halve"):
        distill.distill_progressively(teacher, tmp_path / "c", (4, 1), 2.0, config, tiny_batches, False)


def test_sample_cli_draws_from_a_student_and_refuses_other_step_counts(tmp_path, capsys):
    teacher = tiny_teacher()
    students = {n: dataclasses.replace(teacher, steps=n) for n in (4, 2, 1)}
    path = tmp_path / "students.safetensors"
    distill.save_students(path, students, default_steps=4)
    # the UNet is 8 x 8 here; the CLI writes grey-scale images of any size
    assert sample.main(["--checkpoint", str(path), "--n", "3", "--out", str(tmp_path / "s.npz"), "--quiet"]) == 0
    assert '"n": 3' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="distilled for 1, 2, 4 steps, not 3"):
        sample.main(["--checkpoint", str(path), "--n", "3", "--steps", "3", "--out", str(tmp_path / "s.npz")])
    with pytest.raises(SystemExit, match="guidance is built into"):
        sample.main(["--checkpoint", str(path), "--n", "3", "--guidance", "2", "--out", str(tmp_path / "s.npz")])


def test_shipped_students_card_reports_the_committed_measurement():
    """The model card of mnist-distilled quotes the CLI's measurement (checkpoints/mnist-distilled-eval.json) and the
    4-step student meets chapter 13's bar: accuracy >= 98% and classifier-FID within 1.5x the teacher's 20-step FID."""
    measured = json.loads((checkpoint_dir() / "mnist-distilled-eval.json").read_text())
    card = (checkpoint_dir() / "mnist-distilled.md").read_text()
    teacher = json.loads(re.search(r"Raw output: `(\{.*?\})`", (checkpoint_dir() / "mnist-cond-small.md").read_text())[1])
    assert sorted(measured["rows"]) == ["1", "2", "4", "8"]
    for steps, row in measured["rows"].items():
        quoted = {k: row[k] for k in ("n", "classifier_fid", "classifier_fid_real", "n_real", "conditional_accuracy")}
        assert f"{steps} step(s): `{json.dumps(quoted)}`" in card, steps
        assert row["n"] == 2000
    four = measured["rows"]["4"]
    assert four["conditional_accuracy"] >= 0.98
    assert four["classifier_fid"] <= 1.5 * teacher["classifier_fid"]
