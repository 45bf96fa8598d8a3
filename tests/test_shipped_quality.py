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


LORAS = sorted(name for name, entry in SHIPPED.items() if entry.kind == "lora")


@pytest.mark.parametrize("name", LORAS)
def test_shipped_lora_draws_the_requested_digits_in_its_style(name):
    """A style LoRA on its base model: the requested class (>= 95%), and the samples moved to the typeset style."""
    from diffusion_lab import lora, style_score

    torch.set_num_threads(2)
    defaults = sample._parser().parse_args(["--out", "unused.npz"])
    base = load_denoiser("mnist-cond", device="cpu")
    styled = lora.with_lora(base, name, base_sha256=SHIPPED["mnist-cond"].sha256)
    labels = torch.arange(200) % 10
    images = sample.generate(styled, labels, sampler=defaults.sampler, steps=defaults.steps,
                             guidance=defaults.guidance, seed=12345)
    accuracy = metrics.conditional_accuracy(images, labels)
    assert accuracy >= 0.95, f"{name}: the classifier reads the requested digit in only {accuracy:.1%} of 200 samples"
    judge, _ = style_score.train_style_score(steps=300, seed=0)
    typeset = style_score.style_score(images, judge).mean().item()
    handwritten = style_score.style_score(sample.generate(base, labels[:50], steps=10, guidance=2.0), judge).mean().item()
    assert typeset > 0.7 and typeset > handwritten + 0.4, f"{name}: style score {typeset:.2f} (base {handwritten:.2f})"
