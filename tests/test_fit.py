"""fit(), the one training core: any model and shape, and its guarantees: a lock per checkpoint, a stop on NaN or inf
that writes nothing, and a full disk that loses no completed checkpoint."""
from __future__ import annotations

import errno
import os

import pytest
import torch

from diffusion_lab import utils
from diffusion_lab.denoiser import Denoiser
from diffusion_lab.mlp import ToyMLP
from diffusion_lab.schedules import NoiseSchedule
from diffusion_lab.training import FitConfig, NonFiniteError, RunLock, fit, tensor_batches
from diffusion_lab.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")
SCHEDULE = NoiseSchedule.from_name("cosine", T=50)
QUICK = dict(steps=6, batch_size=8, warmup=1, log_every=2, ckpt_every=2, device="cpu", amp="none")


def toy(seed=0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(ToyMLP(dim=2, hidden=16, layers=1, num_classes=3), "eps", SCHEDULE, (2,), num_classes=3)


def toy_batches(nan_after: int | None = None):
    points = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(64) % 3
    draw = tensor_batches(points, labels)
    calls = []

    def batches(generator, size):
        calls.append(1)
        batch = draw(generator, size)
        if nan_after is not None and len(calls) > nan_after:
            batch["x0"] = batch["x0"] * float("nan")
        return batch

    return batches


def test_fit_trains_a_point_model_and_a_1d_unet():
    result = fit(toy(), toy_batches(), FitConfig(**QUICK), progress=False)
    assert result.step == 6 and result.steps_run == 6 and result.resumed_from is None and len(result.losses) == 6
    assert result.denoiser.prediction == "eps" and not result.denoiser.net.training
    net = UNet(in_channels=4, channels=(8, 16), attention=False, dims="1d")
    rolls = torch.randn(16, 4, 32, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    result = fit(Denoiser(net, "v", SCHEDULE, (4, 32)), tensor_batches(rolls), FitConfig(**QUICK), progress=False)
    assert result.step == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    with pytest.raises(ValueError, match=r"this denoiser takes \(B, 4, 16\)"):
        fit(Denoiser(net, "v", SCHEDULE, (4, 16)), tensor_batches(rolls), FitConfig(**QUICK), progress=False)


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    path = tmp_path / "run.safetensors"
    with RunLock(path):
        with pytest.raises(RuntimeError, match=rf"another process \(pid {os.getpid()}\) is training into"):
            fit(toy(), toy_batches(), FitConfig(**QUICK), checkpoint=path, progress=False)
    assert not path.exists() and not (tmp_path / "run.safetensors.lock").exists()
    # a lock left by a process that is gone (pid 2**22 + 1 is above Linux's pid limit) does not block a new run
    (tmp_path / "run.safetensors.lock").write_text(f"{2**22 + 1} {__import__('socket').gethostname()}\n")
    result = fit(toy(), toy_batches(), FitConfig(**QUICK), checkpoint=path, progress=False)
    assert result.step == 6 and path.exists() and not (tmp_path / "run.safetensors.lock").exists()


def test_a_nan_stops_training_and_the_last_good_checkpoint_stays_untouched(tmp_path):
    from diffusion_lab.checkpoint import load_checkpoint

    path = tmp_path / "run.safetensors"
    # from scratch: a NaN enters at step 6; checkpoints were written at steps 2 and 4
    with pytest.raises(NonFiniteError, match="NaN or inf by step 6; training stopped and the last checkpoint"):
        fit(toy(), toy_batches(nan_after=5), FitConfig(**dict(QUICK, steps=12)), checkpoint=path, progress=False)
    tensors, meta = load_checkpoint(path)
    assert meta["step"] == 4 and all(torch.isfinite(v.float()).all() for v in tensors.values())
    # resumed: the NaN enters at the first new step, and the file is not touched at all
    good = path.read_bytes()
    with pytest.raises(NonFiniteError, match="by step 6"):
        fit(toy(), toy_batches(nan_after=0), FitConfig(**dict(QUICK, steps=12)), checkpoint=path, progress=False)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]  # no temporary file, no lock


def test_a_full_disk_loses_no_completed_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.safetensors"
    fit(toy(), toy_batches(), FitConfig(**dict(QUICK, steps=2)), checkpoint=path, progress=False)
    good = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.os, "fsync", no_space)  # the atomic write fails after writing, before the rename
    with pytest.raises(RuntimeError, match="could not write the checkpoint .* at step 4 .No space left on device.; "
                                           "the previous checkpoint is intact"):
        fit(toy(), toy_batches(), FitConfig(**QUICK), checkpoint=path, progress=False)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]
