"""The training loop: it learns, resumes exactly after a kill (and says so), and its CLI explains itself."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffusion_lab.checkpoint import load_checkpoint
from diffusion_lab.data import write_idx
from diffusion_lab.denoiser import load_denoiser
from diffusion_lab.training import TrainConfig, lr_at, main, train

TINY = dict(channels=(8, 16, 16), batch_size=8, log_every=2, ckpt_every=3, warmup=2, lr=3e-3)


@pytest.fixture(scope="module")
def digits():
    """64 images drawn from 4 fixed bar templates: structure a tiny model can learn in a few dozen steps."""
    templates = torch.zeros(4, 28, 28, dtype=torch.uint8)
    templates[0, 4:24, 12:16] = 255  # vertical bar
    templates[1, 12:16, 4:24] = 255  # horizontal bar
    templates[2, 6:22, 6:22] = 255   # square
    templates[3].fill_diagonal_(255)
    labels = torch.arange(64) % 4
    return templates[labels], labels


def test_resume_continues_at_the_right_step(tmp_path, digits):
    """Train 5 steps straight; separately, train to step 3, stop, resume to 5: identical weights and losses, and
    the resumed call ran only the last 2 steps."""
    straight = train(TrainConfig(steps=5, style=True, **TINY), tmp_path / "a.safetensors", progress=False,
                     images=digits[0], labels=digits[1])
    first = train(TrainConfig(steps=3, style=True, **TINY), tmp_path / "b.safetensors", progress=False,
                  images=digits[0], labels=digits[1])
    assert first.resumed_from is None and first.steps_run == 3
    resumed = train(TrainConfig(steps=5, style=True, **TINY), tmp_path / "b.safetensors", progress=False,
                    images=digits[0], labels=digits[1])
    assert resumed.resumed_from == 3 and resumed.steps_run == 2 and resumed.step == 5 and len(resumed.losses) == 5
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    for a, b in zip(straight.denoiser.net.parameters(), resumed.denoiser.net.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    denoiser = load_denoiser(tmp_path / "b.safetensors", device="cpu")
    assert denoiser.style_mean and denoiser.schedule.T == 1000 and not denoiser.net.training


def test_loss_falls(digits):
    result = train(TrainConfig(steps=60, conditional=False, **dict(TINY, ckpt_every=100)), progress=False,
                   images=digits[0], labels=digits[1])
    losses = result.losses
    assert sum(losses[-15:]) / 15 < 0.7 * sum(losses[:5]) / 5


def test_lr_schedule():
    config = TrainConfig(steps=100, warmup=10, lr=1.0)
    assert lr_at(0, config) == pytest.approx(0.1) and lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(99, config) == pytest.approx(0.1, abs=0.01)


def test_bad_config():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="quadratic").validate()
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"epochs": 3})
    with pytest.raises(SystemExit, match="error: invalid training config"):
        main(["--out", "/tmp/never.safetensors", "--steps", "0"])


def test_cli_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "diffusion_lab.train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for field in ("--steps", "--schedule", "--prediction", "--ema-decay", "--amp", "--style", "--max-minutes"):
        assert field in out.stdout


@pytest.fixture
def idx_data(tmp_path, digits):
    """The 64 bar digits written as a tiny MNIST in torchvision's raw layout, for the CLI."""
    root = tmp_path / "data" / "MNIST" / "raw"
    root.mkdir(parents=True)
    images = np.repeat(digits[0].numpy(), 4, axis=0)
    labels = np.repeat(digits[1].numpy(), 4, axis=0).astype(np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return {"DIFFUSION_LAB_DATA": str(tmp_path / "data"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def cli(out, steps, extra=()):
    return [sys.executable, "-m", "diffusion_lab.train", "--out", str(out), "--steps", str(steps), "--channels", "8",
            "16", "16", "--batch-size", "4", "--ckpt-every", "5", "--attention", "0", *extra]


def test_killed_run_resumes_bit_for_bit_from_its_last_checkpoint(tmp_path, idx_data):
    """A real SIGKILL in the middle of a CLI run. Re-running the same command says it resumes, runs only the
    remaining steps, and ends with exactly the weights of a run that was never interrupted."""
    steps, out = 150, tmp_path / "run.safetensors"
    proc = subprocess.Popen(cli(out, steps, ["--quiet"]), env=idx_data)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(out)[1]["step"]
    assert 0 < killed_at < steps, "the run finished before it was killed: make it longer"
    assert (tmp_path / "run.safetensors.lock").exists()  # the killed process could not remove its lock
    done = subprocess.run(cli(out, steps), env=idx_data, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {out} at step {killed_at}" in done.stdout  # the stale lock was taken over
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["step"] == steps and summary["resumed_from"] == killed_at
    straight = subprocess.run(cli(tmp_path / "straight.safetensors", steps, ["--quiet"]), env=idx_data,
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    a, _ = load_checkpoint(out)
    b, _ = load_checkpoint(tmp_path / "straight.safetensors")
    for key in ("ema.head.2.weight", "model.stem.weight", "history.loss", "rng.data"):
        assert torch.equal(a[key], b[key]), key
    assert not (tmp_path / "run.safetensors.lock").exists()


def test_resuming_with_another_architecture_or_learning_rate_is_refused_in_one_line(tmp_path, idx_data):
    out = tmp_path / "k.safetensors"
    assert subprocess.run(cli(out, 5, ["--quiet"]), env=idx_data).returncode == 0
    before = out.read_bytes()
    wider = cli(out, 10, ["--quiet"])
    wider[wider.index("--channels") + 1:wider.index("--channels") + 4] = ["16", "32", "32"]
    for argv, field in ((wider, "net.config.channels: [8, 16, 16] -> [16, 32, 32]"),
                        (cli(out, 10, ["--lr", "1e-3", "--quiet"]), "lr: 0.002 -> 0.001")):
        proc = subprocess.run(argv, env=idx_data, capture_output=True, text=True)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and field in lines[0] and "--no-resume" in lines[0], proc.stderr
    assert out.read_bytes() == before  # nothing was mixed into the checkpoint
    more = subprocess.run(cli(out, 10), env=idx_data, capture_output=True, text=True)  # more steps: allowed, stated
    assert more.returncode == 0 and "at step 5 (steps: 5 -> 10)" in more.stdout, more.stderr
