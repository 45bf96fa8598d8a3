"""Editing (diffusion_lab.edit): SDEdit's noise level and truncated schedule, inpainting keeps the known pixels,
DDIM inversion reconstructs, and the CLI reads and writes uint8 images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion_lab import data, edit
from diffusion_lab.denoiser import load_denoiser

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_denoiser("mnist-cond-small", device="cpu")


@pytest.fixture(scope="module")
def digits():
    images, labels = data.mnist(train=False)
    return data.to_unit_range(images[:4]), labels[:4]


def test_strength_step_and_truncated_schedule(model):
    s = model.schedule
    assert edit.strength_step(s, 1.0) == s.T - 1 and edit.strength_step(s, 0.5) == s.T // 2 - 1
    assert edit.strength_step(s, 1e-9) == 0
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
            edit.strength_step(s, bad)
    cut = edit.truncated(model, 299)
    assert cut.schedule.T == 300 and torch.equal(cut.schedule.alpha_bars, s.alpha_bars[:300])
    assert cut.net is model.net and model.schedule.T == s.T


def test_sdedit_low_strength_keeps_the_image_high_strength_does_not(model, digits):
    x0, labels = digits
    low = edit.sdedit(model, x0, labels, 0.02, steps=2)
    high = edit.sdedit(model, x0, labels, 1.0, steps=5)
    assert (low - x0).abs().mean() < 0.05 < (high - x0).abs().mean()


def test_inpaint_keeps_known_pixels_exactly(model, digits):
    x0, labels = digits
    mask = edit.half_mask("left")
    for resample in (1, 2):
        out = edit.inpaint(model, x0, mask, labels, resample=resample, steps=4)
        assert torch.equal(out[..., :14], x0[..., :14]) and not torch.equal(out[..., 14:], x0[..., 14:])
    square = edit.half_mask("square")
    assert square.sum() == 28 * 28 - 144
    with pytest.raises(ValueError, match="unknown mask"):
        edit.half_mask("diagonal")


def test_inversion_reconstructs_and_guidance_hurts_it(model, digits):
    x0, labels = digits
    errors = {}
    for guidance in (1.0, 4.0):
        x_T = edit.invert(model, x0, labels, steps=20, guidance=guidance)
        back = edit.regenerate(model, x_T, labels, steps=20, guidance=guidance)
        errors[guidance] = (back - x0).abs().mean().item()
    assert errors[1.0] < 0.05 and errors[4.0] > 1.3 * errors[1.0]  # measured: about 0.03 against 0.05


def test_cli_writes_uint8_images_and_reads_labels_from_the_classifier(tmp_path):
    images, _ = data.mnist(train=False)
    np.savez(tmp_path / "in.npz", images=images[:3].numpy())   # no labels: the classifier reads them
    out = tmp_path / "out.npz"
    assert edit.main(["invert", "--in", str(tmp_path / "in.npz"), "--target", "8", "--steps", "3",
                      "--out", str(out)]) == 0
    with np.load(out) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (3, 28, 28)
        assert f["labels"].tolist() == [8, 8, 8] and f["x_T"].shape == (3, 28, 28)
        assert json.loads(str(f["meta"]))["command"] == "invert"
