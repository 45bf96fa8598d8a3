"""Data-parallel training (chapter 08): two CPU processes under torchrun (gloo) train like one process.

What DDP promises (Li et al. 2020): every process holds the same weights, sees a different part of the
global batch, and the gradients are averaged before each step. So 2 processes with batch B/2 each follow,
in distribution, the same training curve as 1 process with batch B. They do not follow it sample for
sample: `training.train` seeds rank r's batch generator with seed + r, so the data order differs.

The test therefore compares statistics, not bits:
- the 1-process reference is run with several seeds; the spread of its "mean loss over the last K steps"
  across seeds is the run-to-run noise sigma;
- the 2-process run (the global-batch loss is the mean of the two ranks' losses) must land within
  TOLERANCE_SIGMAS * sigma of the reference mean (with a floor, because 3 seeds estimate sigma roughly);
- and the test must be able to fail: the tolerance has to be much smaller than the drop of the loss during
  the run, so a DDP run that did not learn (or learned at the wrong rate) would be caught.
DDP's own invariants are checked exactly: after training both ranks hold identical weights, and they saw
different data.

This file is also the worker that torchrun starts (see `__main__` below). Tiny model, 2,048 digits, about
30 s of CPU on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_lab import data
from diffusion_lab.training import TrainConfig, train

STEPS, LAST_K, BATCH = 60, 20, 32
REFERENCE_SEEDS = (0, 1, 2)
TOLERANCE_SIGMAS = 4.0
# Measured offline for this exact setup: 1 process, seeds 0-7: mean 0.1303, sigma 0.0054 (the early-window mean
# is about 0.71); 2 processes, seed 0: 0.1318. With only 3 seeds the in-test sigma can come out small by
# chance, so the tolerance never drops below this floor (about 3 of the offline sigmas).
TOLERANCE_FLOOR = 0.015
N_IMAGES = 2048
RESUME_AT = 20


def tiny_config(seed: int) -> TrainConfig:
    # every field that the loss level depends on is pinned, so a change of TrainConfig's defaults cannot
    # silently move the numbers that TOLERANCE_FLOOR was measured for
    return TrainConfig(channels=(8, 16, 16), attention=False, conditional=True, style=False, steps=STEPS,
                       batch_size=BATCH, lr=3e-3, warmup=10, lr_decay="cosine", schedule="cosine", T=1000,
                       prediction="eps", weighting="none", p_uncond=0.1, grad_clip=1.0, seed=seed, device="cpu",
                       amp="none", ema_decay=0.99, log_every=10)


def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = data.mnist(train=True)
    return images[:N_IMAGES].clone(), labels[:N_IMAGES].clone()


def worker(data_file: str, out_dir: str, seed: int) -> None:
    """Run by torchrun in each process: train, then write this rank's losses and a weight checksum.

    With seed < 0 it tests resume instead: train to RESUME_AT (rank 0 writes the checkpoint), then resume to STEPS.
    """
    import torch.distributed as dist

    torch.set_num_threads(1)
    saved = torch.load(data_file, weights_only=True)  # tensors only: weights_only refuses any other object
    if seed < 0:
        ckpt = Path(out_dir, "resume.safetensors")
        train(tiny_config(0), checkpoint=ckpt, progress=False, images=saved["images"], labels=saved["labels"],
              callback=lambda step, ema: step >= RESUME_AT)
        dist.barrier()  # rank 0's checkpoint is on disk before any rank resumes from it
        result = train(tiny_config(0), checkpoint=ckpt, progress=False, images=saved["images"], labels=saved["labels"])
        dist.barrier()  # every rank has read it before rank 0 overwrites it at the end
    else:
        result = train(tiny_config(seed), progress=False, images=saved["images"], labels=saved["labels"])
    rank, world = dist.get_rank(), dist.get_world_size()
    flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    report = {"rank": rank, "world": world, "losses": result.losses, "step": result.step,
              "resumed_from": result.resumed_from, "steps_run": result.steps_run,
              "weights_sum": flat.double().sum().item(), "weights_abs_sum": flat.double().abs().sum().item()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def start_torchrun(out_dir: Path, images, labels, seed: int) -> subprocess.Popen:
    """Two gloo processes running `worker` on these digits (seed < 0: the resume test), writing into out_dir."""
    data_file = out_dir / "data.pt"
    torch.save({"images": images, "labels": labels}, data_file)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               __file__, str(data_file), str(out_dir), str(seed)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def last_k_mean(losses) -> float:
    return float(np.mean(losses[-LAST_K:]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    images, labels = tiny_data()
    # start the 2-process run first, so it overlaps with the 1-process references below
    proc = start_torchrun(tmp, images, labels, seed=0)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = [train(tiny_config(seed), progress=False, images=images, labels=labels).losses
                     for seed in REFERENCE_SEEDS]
    finally:
        torch.set_num_threads(threads)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{output[-3000:]}"
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in (0, 1)]
    return reference, ranks


def test_ddp_resume_keeps_ranks_on_different_data(tmp_path):
    proc = start_torchrun(tmp_path, *tiny_data(), seed=-1)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{output[-3000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in ranks] == [STEPS, STEPS]
    # every rank resumed from rank 0's checkpoint and ran only the remaining steps
    assert [(r["resumed_from"], r["steps_run"]) for r in ranks] == [(RESUME_AT, STEPS - RESUME_AT)] * 2
    # the losses after the resume come from each rank's own batches: equal losses would mean equal data
    after = [np.array(r["losses"][RESUME_AT:]) for r in ranks]
    assert len(after[0]) == STEPS - RESUME_AT and not np.allclose(after[0], after[1])
    assert ranks[0]["weights_sum"] == pytest.approx(ranks[1]["weights_sum"], rel=1e-9, abs=1e-9)


def test_ddp_ranks_hold_identical_weights_and_see_different_data(runs):
    _, ranks = runs
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [STEPS, STEPS]
    # gradients are all-reduced, so the weights agree to the last bit (up to float summation order)
    assert ranks[0]["weights_sum"] == pytest.approx(ranks[1]["weights_sum"], rel=1e-9, abs=1e-9)
    assert ranks[0]["weights_abs_sum"] == pytest.approx(ranks[1]["weights_abs_sum"], rel=1e-9)
    # ... but each rank drew its own half of the batch (seed + rank), so their per-step losses differ
    assert not np.allclose(ranks[0]["losses"], ranks[1]["losses"])


def test_ddp_two_processes_match_one_process_at_the_same_global_batch(runs):
    reference, ranks = runs
    ref_means = np.array([last_k_mean(l) for l in reference])
    sigma = ref_means.std(ddof=1)
    tolerance = max(TOLERANCE_SIGMAS * sigma, TOLERANCE_FLOOR)
    global_losses = np.mean([r["losses"] for r in ranks], axis=0)  # loss of the whole global batch, per step
    ddp_mean = last_k_mean(global_losses)
    gap = abs(ddp_mean - ref_means.mean())
    # power: the loss falls by far more than the tolerance during the run, so "did not train" would fail
    early = np.mean([np.mean(l[:LAST_K]) for l in reference])
    assert early - ref_means.mean() > 5 * tolerance, (early, ref_means, tolerance)
    assert gap < tolerance, (
        f"DDP (2 x {BATCH // 2}) mean loss over the last {LAST_K} steps {ddp_mean:.4f} vs 1 process (batch {BATCH}) "
        f"{ref_means.mean():.4f} +- {sigma:.4f} over seeds {REFERENCE_SEEDS}: gap {gap:.4f} > tolerance {tolerance:.4f}")


if __name__ == "__main__":  # the torchrun worker: python -m torch.distributed.run ... test_ddp.py DATA OUT SEED
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
