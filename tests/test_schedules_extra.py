"""Tests for the schedule measurements and plots that chapter 03 adds (fraction_near_noise,
plot_schedules, schedule_strips)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffusion_lab.plotting import plot_schedules, schedule_strips  # noqa: E402
from diffusion_lab.schedules import NoiseSchedule, fraction_near_noise  # noqa: E402


def test_fraction_near_noise_counts_steps_below_the_threshold():
    # alpha_bar = 0.5, 0.25, 0.001, 0.0001 -> SNR = 1, 1/3, ~0.001, ~0.0001: two of four below 0.01
    alpha_bars = torch.tensor([0.5, 0.25, 0.001, 0.0001], dtype=torch.float64)
    alphas = torch.cat([alpha_bars[:1], alpha_bars[1:] / alpha_bars[:-1]])
    schedule = NoiseSchedule(1 - alphas)
    assert fraction_near_noise(schedule) == pytest.approx(0.5)
    assert fraction_near_noise(schedule, max_snr=0.5) == pytest.approx(0.75)
    assert fraction_near_noise(schedule, max_snr=1e-6) == 0.0


def test_linear_spends_far_more_steps_near_noise_than_cosine():
    # Nichol & Dhariwal (2021): the last part of DDPM's linear schedule is almost pure noise.
    linear = fraction_near_noise(NoiseSchedule.from_name("linear", 1000))
    cosine = fraction_near_noise(NoiseSchedule.from_name("cosine", 1000))
    assert 0.30 < linear < 0.35
    assert 0.05 < cosine < 0.08


def test_zero_terminal_snr_step_counts_as_noise():
    s = NoiseSchedule.from_name("cosine", 10, zero_terminal_snr=True)
    assert s.snr[-1] == 0
    assert fraction_near_noise(s) >= 0.1


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_fraction_near_noise_rejects_bad_threshold(bad):
    with pytest.raises(ValueError, match="max_snr"):
        fraction_near_noise(NoiseSchedule.from_name("linear", 100), max_snr=bad)


def test_fraction_near_noise_rejects_non_schedule():
    with pytest.raises(ValueError, match="NoiseSchedule"):
        fraction_near_noise(torch.linspace(0.1, 0.2, 5))


def test_plot_schedules_draws_every_schedule_and_marks_infinite_log_snr():
    schedules = [NoiseSchedule.from_name("linear", 50), NoiseSchedule.from_name("cosine", 50, zero_terminal_snr=True)]
    fig = plot_schedules(schedules)
    ax_alpha_bar, ax_log_snr = fig.axes
    assert len(ax_alpha_bar.lines) == 2
    np.testing.assert_allclose(ax_alpha_bar.lines[0].get_ydata(), schedules[0].alpha_bars.numpy())
    # linear: 50 finite points; cosine+zsnr: 49 finite points plus one marker for -inf; then the SNR=0.01 guide
    lengths = sorted(len(line.get_ydata()) for line in ax_log_snr.lines)
    assert lengths == [1, 2, 49, 50]
    assert all(np.isfinite(line.get_ydata()).all() for line in ax_log_snr.lines)
    plt.close(fig)
    with pytest.raises(ValueError):
        plot_schedules([])


def test_schedule_strips_shape_and_shared_noise():
    schedules = [NoiseSchedule.from_name("linear", 100), NoiseSchedule.from_name("cosine", 100)]
    x0 = torch.zeros(1, 1, 8, 8)
    fig = schedule_strips(schedules, x0, fractions=(0, 0.5, 1), generator=torch.Generator().manual_seed(0))
    assert len(fig.axes) == 6
    # t = 0 keeps the image almost unchanged (alpha_bar_0 close to 1): mid grey for x0 = 0
    first = fig.axes[0].images[0].get_array()
    assert abs(float(np.mean(first)) - 0.5) < 0.05
    # the last column is (almost) pure noise, the same draw in both rows
    a, b = fig.axes[2].images[0].get_array(), fig.axes[5].images[0].get_array()
    np.testing.assert_allclose(a, b, atol=0.02)
    plt.close(fig)


def test_schedule_strips_rejects_bad_input():
    s = [NoiseSchedule.from_name("linear", 100)]
    with pytest.raises(ValueError, match="one image"):
        schedule_strips(s, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="fractions"):
        schedule_strips(s, torch.zeros(1, 8, 8), fractions=(0, 1.5))
    with pytest.raises(ValueError):
        schedule_strips([], torch.zeros(1, 8, 8))
