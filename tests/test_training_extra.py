"""The training machinery that chapter 08 explains: stop and resume, EMA, the learning-rate schedule,
AMP, channels-last, loading for sampling, and the command line's error path.

Everything runs on a tiny UNet and 64 random "digits", so each test takes a second or two on a CPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffusion_lab.denoiser import load_denoiser
from diffusion_lab.training import TrainConfig, _autocast, build_model, ema_update, lr_at, main, train


def tiny(**overrides) -> TrainConfig:
    values = dict(channels=(8, 16, 16), attention=False, conditional=True, style=True, steps=8, batch_size=8,
                  lr=2e-3, warmup=2, log_every=2, ckpt_every=100, seed=3, device="cpu", amp="none")
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def toy_data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,), generator=g)
    return images, labels


def test_stop_then_resume_reproduces_the_uninterrupted_run(tmp_path, toy_data):
    images, labels = toy_data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order in every run, so the comparison can be exact
    try:
        straight = train(tiny(), checkpoint=tmp_path / "a.safetensors", progress=False, images=images, labels=labels)
        # "kill" the second run half way: the callback stops it at step 4, which writes a checkpoint there
        first = train(tiny(), checkpoint=tmp_path / "b.safetensors", progress=False, images=images, labels=labels,
                      callback=lambda step, ema: step >= 4)
        assert first.step == 4 and len(first.losses) == 4
        _, meta = load_checkpoint(tmp_path / "b.safetensors")
        assert meta["step"] == 4
        resumed = train(tiny(), checkpoint=tmp_path / "b.safetensors", progress=False, images=images, labels=labels)
    finally:
        torch.set_num_threads(threads)
    assert resumed.step == 8 and resumed.resumed_from == 4 and resumed.steps_run == 4
    # the history continues where it stopped, loss for loss: weights, EMA, optimizer moments and the data
    # generator all came back from the checkpoint
    assert resumed.losses == straight.losses
    for a, b in zip(straight.denoiser.net.parameters(), resumed.denoiser.net.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_resume_false_starts_over(tmp_path, toy_data):
    images, labels = toy_data
    path = tmp_path / "c.safetensors"
    train(tiny(steps=2), checkpoint=path, progress=False, images=images, labels=labels)
    again = train(tiny(steps=2), checkpoint=path, resume=False, progress=False, images=images, labels=labels)
    assert again.step == 2 and len(again.losses) == 2 and again.resumed_from is None and again.steps_run == 2
    resumed = train(tiny(steps=3), checkpoint=path, progress=False, images=images, labels=labels)
    assert resumed.resumed_from == 2 and resumed.steps_run == 1  # the same call with resume on does resume


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    config = tiny(steps=1000, warmup=100, lr=1e-3)
    assert lr_at(0, config) == pytest.approx(1e-5)
    assert lr_at(99, config) == pytest.approx(1e-3)
    assert lr_at(100, config) == pytest.approx(1e-3)
    assert lr_at(550, config) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(1000, config) == pytest.approx(1e-4)
    lrs = [lr_at(s, config) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone after warm-up
    assert lr_at(900, tiny(steps=1000, warmup=100, lr=1e-3, lr_decay="constant")) == pytest.approx(1e-3)


def test_ema_decay_warms_up_so_a_short_run_forgets_its_initialisation():
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(0.0)
        for p in model.parameters():
            p.fill_(1.0)
    ema_update(ema, model, step=0, decay=0.999)  # d = min(0.999, 1/10) = 0.1: mostly the model
    assert all(torch.allclose(p, torch.full_like(p, 0.9)) for p in ema.parameters())
    ema_update(ema, model, step=10**6, decay=0.5)  # late in training d is capped at `decay`
    assert all(torch.allclose(p, torch.full_like(p, 0.95)) for p in ema.parameters())


def test_config_is_validated_and_round_trips_through_a_dict():
    with pytest.raises(ValueError, match="schedule"):
        tiny(schedule="nope").validate()
    with pytest.raises(ValueError, match="ema_decay"):
        tiny(ema_decay=1.0).validate()
    with pytest.raises(ValueError, match="steps"):
        tiny(steps=0).validate()
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"stepz": 3})
    config = TrainConfig.from_dict({"channels": [8, 16, 16], "steps": 5})
    assert config.channels == (8, 16, 16) and config.steps == 5


def test_autocast_is_bf16_only_when_asked_or_on_a_capable_gpu():
    cpu = torch.device("cpu")
    assert not _autocast(tiny(amp="none"), cpu)._enabled
    assert not _autocast(tiny(amp="auto"), cpu)._enabled  # auto means bf16 on CUDA only
    assert _autocast(tiny(amp="bf16"), cpu)._enabled


def test_bf16_and_channels_last_train_to_a_finite_loss(toy_data):
    images, labels = toy_data
    result = train(tiny(steps=2, amp="bf16", channels_last=True), progress=False, images=images, labels=labels)
    assert result.step == 2 and all(math.isfinite(l) for l in result.losses)
    assert result.images_per_s > 0


def test_style_statistics_are_measured_and_saved_with_the_model(tmp_path, toy_data):
    images, labels = toy_data
    path = tmp_path / "s.safetensors"
    config = tiny(steps=2)
    result = train(config, checkpoint=path, progress=False, images=images, labels=labels)
    assert config.style_mean == ()  # the caller's config is left alone
    assert len(result.config.style_mean) == 2 and all(s > 0 for s in result.config.style_std)
    denoiser = load_denoiser(path, device="cpu")
    assert denoiser.style_mean == result.config.style_mean and denoiser.schedule.T == config.T
    assert not denoiser.net.training and denoiser.style_dim == 3 and denoiser.prediction == config.prediction
    for a, b in zip(denoiser.net.parameters(), result.denoiser.net.parameters()):
        assert torch.equal(a, b)  # sampling uses the EMA weights by default
    raw = load_denoiser(path, device="cpu", use_ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(raw.net.parameters(), denoiser.net.parameters()))


def test_load_denoiser_refuses_a_file_that_is_not_a_denoiser(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, {"something": "else"})
    with pytest.raises(CheckpointError, match="not a diffusion_lab/2 denoiser checkpoint"):
        load_denoiser(path)
    with pytest.raises(CheckpointError, match="mnist-classifier is a shipped classifier"):
        load_denoiser("mnist-classifier")


def test_build_model_matches_the_config():
    model = build_model(tiny(conditional=False, style=False))
    assert model.num_classes is None and model.style_dim == 0
    model = build_model(tiny())
    assert model.num_classes == 10 and model.style_dim == 3


def test_cli_reports_a_bad_flag_as_an_error_not_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match="error: invalid training config"):
        main(["--out", str(tmp_path / "x.safetensors"), "--schedule", "nope", "--quiet"])
