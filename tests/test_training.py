"""The training loop: it learns, resumes exactly after a kill, and its CLI explains itself."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffusion_lab.training import TrainConfig, load_model, lr_at, main, train

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
    """Train 5 steps straight; separately, train to step 3, stop, resume to 5: identical weights and losses."""
    straight = train(TrainConfig(steps=5, style=True, **TINY), tmp_path / "a.safetensors", progress=False,
                     images=digits[0], labels=digits[1])
    train(TrainConfig(steps=3, style=True, **TINY), tmp_path / "b.safetensors", progress=False,
          images=digits[0], labels=digits[1])
    resumed = train(TrainConfig(steps=5, style=True, **TINY), tmp_path / "b.safetensors", progress=False,
                    images=digits[0], labels=digits[1])
    assert resumed["step"] == 5 and len(resumed["losses"]) == 5
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5)
    for a, b in zip(straight["ema"].parameters(), resumed["ema"].parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    model, schedule, config = load_model(tmp_path / "b.safetensors", device="cpu")
    assert config.style and config.style_mean and schedule.T == 1000 and not model.training


def test_loss_falls(digits):
    result = train(TrainConfig(steps=60, conditional=False, **dict(TINY, ckpt_every=100)), progress=False,
                   images=digits[0], labels=digits[1])
    losses = result["losses"]
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
    for field in ("--steps", "--schedule", "--objective", "--ema-decay", "--amp", "--style", "--max-minutes"):
        assert field in out.stdout


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, digits):
    """A real SIGKILL in the middle of a CLI run; re-running the same command continues from the checkpoint."""
    import numpy as np

    root = tmp_path / "data" / "MNIST" / "raw"
    root.mkdir(parents=True)
    from diffusion_lab.data import write_idx

    images = np.repeat(digits[0].numpy(), 4, axis=0)
    labels = np.repeat(digits[1].numpy(), 4, axis=0).astype(np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    out = tmp_path / "run.safetensors"
    cmd = [sys.executable, "-m", "diffusion_lab.train", "--out", str(out), "--steps", "400", "--channels", "8", "16",
           "16", "--batch-size", "4", "--ckpt-every", "5", "--quiet"]
    env = {"DIFFUSION_LAB_DATA": str(tmp_path / "data"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from diffusion_lab.checkpoint import load_checkpoint

    killed_at = load_checkpoint(out)[1]["step"]
    assert 0 < killed_at < 400
    done = subprocess.run(cmd[:6] + [str(killed_at + 5)] + cmd[7:], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["step"] == killed_at + 5
