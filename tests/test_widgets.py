"""Tests for the ipywidgets explorers (diffusion_lab/widgets.py): the drawing functions and the wiring."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffusion_lab import widgets  # noqa: E402
from diffusion_lab.schedules import NoiseSchedule  # noqa: E402

SCHEDULE = NoiseSchedule.from_name("linear", 100)
X0 = torch.linspace(-1, 1, 2 * 8 * 8).reshape(2, 1, 8, 8)


def test_forward_process_frame_shows_clean_image_at_t0_and_noise_at_the_end():
    eps = torch.randn_like(X0, generator=None)
    fig = widgets.forward_process_frame(SCHEDULE, X0, 0, eps)
    assert "t = 0" in fig.axes[0].get_title()
    plt.close(fig)
    fig = widgets.forward_process_frame(SCHEDULE, X0, 99, eps)
    assert "t = 99" in fig.axes[0].get_title()
    plt.close(fig)


@pytest.mark.parametrize("t", [-1, 100])
def test_forward_process_frame_rejects_out_of_range_t(t):
    with pytest.raises(ValueError, match="t must lie"):
        widgets.forward_process_frame(SCHEDULE, X0, t)


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="x0 must be"):
        widgets.forward_process_frame(SCHEDULE, torch.zeros(2, 3, 8, 8), 0)
    with pytest.raises(ValueError, match="uint8"):
        widgets.forward_process_frame(SCHEDULE, torch.zeros(2, 8, 8, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="NoiseSchedule"):
        widgets.forward_process_frame(SCHEDULE.betas, X0, 0)


def test_schedule_frame_with_and_without_images():
    schedules = [SCHEDULE, NoiseSchedule.from_name("cosine", 50)]
    fig = widgets.schedule_frame(schedules, 0.5)
    assert len(fig.axes) == 2
    plt.close(fig)
    fig = widgets.schedule_frame(schedules, 1.0, X0)
    assert len(fig.axes) == 4
    plt.close(fig)
    with pytest.raises(ValueError, match="fraction"):
        widgets.schedule_frame(schedules, 1.5)


def test_sequence_frame_checks_index_and_captions():
    frames = [X0, -X0]
    fig = widgets.sequence_frame(frames, 1, captions=["a", "b"])
    assert fig.axes[0].get_title() == "b"
    plt.close(fig)
    with pytest.raises(ValueError, match="index"):
        widgets.sequence_frame(frames, 2)
    with pytest.raises(ValueError, match="captions"):
        widgets.sequence_frame(frames, 0, captions=["a"])


def test_explorers_build_and_react_to_the_slider():
    import ipywidgets  # noqa: F401  (a test requirement: when missing this fails, it does not skip)
    box = widgets.forward_process_explorer(SCHEDULE, X0, generator=torch.Generator().manual_seed(0))
    slider, output = box.children
    assert slider.max == SCHEDULE.T - 1
    slider.value = 99  # triggers a redraw; must not raise
    box = widgets.schedule_explorer([SCHEDULE, NoiseSchedule.from_name("cosine", 100)], X0[:1])
    box.children[0].value = 0.9
    box = widgets.image_sequence_explorer([X0, -X0], captions=["a", "b"])
    box.children[0].value = 1
    with pytest.raises(ValueError, match="eps"):
        widgets.forward_process_explorer(SCHEDULE, X0, eps=torch.zeros(1, 1, 8, 8))
    plt.close("all")


def test_realtime_frame_draws_one_digit_per_seed_and_reports_its_rate():
    from diffusion_lab.denoiser import Denoiser
    from diffusion_lab.unet import UNet

    torch.manual_seed(0)
    student = Denoiser(UNet(in_channels=1, channels=(8, 8), attention=False, num_classes=10).eval(), "v", SCHEDULE,
                       (1, 28, 28), 10, steps=1)
    fig, rate = widgets.realtime_frame(student, digit=3, seed=5, n=3)
    assert rate > 0 and "1-step student" in fig.axes[0].get_title() and "seeds 5..7" in fig.axes[0].get_title()
    plt.close(fig)
