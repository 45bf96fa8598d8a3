"""Every shipped generative model still draws what it is asked for, at the settings the sample CLI ships with.

The notebooks check quality only outside the smoke profile, so this is the one place where `make test` sees
whether a shipped model learned: 200 samples, read by the book's own classifier, in a few seconds.
"""
from __future__ import annotations

import pytest
import torch

from diffusion_lab import metrics, sample
from diffusion_lab.checkpoint import SHIPPED
from diffusion_lab.denoiser import load_denoiser

GENERATIVE = sorted(name for name, entry in SHIPPED.items() if entry.kind == "diffusion")


@pytest.mark.parametrize("name", GENERATIVE)
def test_shipped_model_draws_the_requested_digits(name):
    torch.set_num_threads(2)
    defaults = sample._parser().parse_args(["--out", "unused.npz"])   # the settings the CLI ships with
    denoiser = load_denoiser(name, device="cpu")
    labels = torch.arange(200) % 10
    images = sample.generate(denoiser, labels, sampler=defaults.sampler, steps=defaults.steps,
                             guidance=defaults.guidance, seed=12345)
    accuracy = metrics.conditional_accuracy(images, labels)
    assert accuracy >= 0.95, f"{name}: the classifier reads the requested digit in only {accuracy:.1%} of 200 samples"
    # and the samples are not one memorised image per class
    same_class = images[labels == 3].flatten(1)
    assert torch.pdist(same_class).min() > 1.0, f"{name}: two samples of one class are nearly identical"


def test_tiny_sd_draws_the_digit_each_prompt_names_and_obeys_an_attribute_word():
    """Chapter 10's text-to-image model at the CLI's settings: 200 plain digit prompts ("a seven", "7", "the digit 7")
    must yield the named digit, and "thick" must draw thicker strokes than "thin" for a digit seen with both."""
    from diffusion_lab import tiny_sd

    torch.set_num_threads(2)
    defaults = sample._parser().parse_args(["--out", "unused.npz"])
    settings = dict(sampler=defaults.sampler, steps=defaults.steps, guidance=defaults.guidance)
    pipe = tiny_sd.load_tiny_sd("tiny-sd")
    accuracy = tiny_sd.prompt_accuracy(pipe, tiny_sd.digit_prompts(200, seed=12345), seed=12345, **settings)
    assert accuracy >= 0.95, f"tiny-sd: the classifier reads the named digit in only {accuracy:.1%} of 200 samples"
    effect = tiny_sd.attribute_effect(pipe, 1, "thickness", n=50, seed=12345, **settings)
    assert effect["effect"] > 0.5 and effect["r"] > 0.3, effect
