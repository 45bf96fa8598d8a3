"""The training loop behind every MNIST model in the book, and its command line `python -m diffusion_lab.train`.

One function, `train(config)`, does: data held in memory as uint8 -> random minibatches -> noise (losses.py)
-> UNet -> AdamW with warm-up, gradient clipping, an EMA of the weights (the weights we sample with), AMP on
CUDA, optional torch.compile, checkpoints written atomically every `ckpt_every` steps, and resume from the
last checkpoint after a kill. Under `torchrun` it runs data-parallel (DDP, Li et al. 2020).
Introduced in chapter 00; explained in chapter 08.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import data
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .conditioning import drop_codes, style_code
from .losses import OBJECTIVES, WEIGHTINGS, diffusion_loss
from .schedules import SCHEDULES, NoiseSchedule
from .unet import UNet
from .utils import get_device, seed_everything


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved as JSON inside every checkpoint, so a checkpoint explains itself."""

    # model
    channels: tuple[int, int, int] = (32, 64, 64)
    blocks_per_level: int = 1
    attention: bool = True
    conditional: bool = True          # class labels 0..9 as codes
    style: bool = False               # continuous style code (slant, thickness); chapter 07
    # diffusion
    schedule: str = "cosine"
    T: int = 1000
    objective: str = "v"               # v is well conditioned at the noisiest steps (Salimans & Ho 2022)
    weighting: str = "none"
    min_snr_gamma: float = 5.0
    p_uncond: float = 0.1             # classifier-free-guidance dropout of the whole code
    p_uncond_style: float = 0.1       # extra dropout of the style code alone
    # optimisation
    steps: int = 2000
    batch_size: int = 128             # global batch, split across DDP processes
    lr: float = 2e-3
    warmup: int = 100
    lr_decay: str = "cosine"          # "cosine" to 10% of lr at the end, or "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # machinery
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"                 # "auto" (bf16 on CUDA if supported), "bf16" or "none"
    compile: bool = False
    channels_last: bool = False
    ckpt_every: int = 500
    log_every: int = 50
    max_minutes: float = 0.0          # stop early after this wall-clock budget (0: no limit)
    # style standardisation, measured from the training data when style=True
    style_mean: list = field(default_factory=list)
    style_std: list = field(default_factory=list)

    def validate(self) -> None:
        problems = []
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective {self.objective!r} is not one of {OBJECTIVES}")
        if self.weighting not in WEIGHTINGS:
            problems.append(f"weighting {self.weighting!r} is not one of {WEIGHTINGS}")
        if self.amp not in ("auto", "bf16", "none"):
            problems.append(f"amp {self.amp!r} is not one of auto, bf16, none")
        if self.lr_decay not in ("cosine", "constant"):
            problems.append(f"lr_decay {self.lr_decay!r} is not one of cosine, constant")
        for name in ("steps", "batch_size", "T", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(**d)


def build_model(config: TrainConfig) -> UNet:
    return UNet(in_channels=1, channels=tuple(config.channels), blocks_per_level=config.blocks_per_level,
                attention=config.attention, num_classes=10 if config.conditional else None,
                style_dim=3 if config.style else 0)


def build_schedule(config: TrainConfig) -> NoiseSchedule:
    return NoiseSchedule.from_name(config.schedule, config.T)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to 10% of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_decay == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """ema <- d * ema + (1 - d) * model, with d warmed up as (1 + step) / (10 + step) so that a short
    run's EMA is not dominated by its random initialisation."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - d)  # one launch
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _autocast(config: TrainConfig, device: torch.device):
    use_bf16 = config.amp == "bf16" or (
        config.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


# --- checkpoints -------------------------------------------------------------------------------------------

def checkpoint_tensors(model, ema, optimizer, generator: torch.Generator, losses: list[float]) -> dict:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            tensors[f"optim.{i}.{k}"] = torch.as_tensor(v)
    tensors["rng.data"] = generator.get_state()
    tensors["history.loss"] = torch.tensor(losses, dtype=torch.float32)
    return tensors


def save_training_state(path, config, step, model, ema, optimizer, generator, losses, elapsed) -> str:
    meta = {"train": asdict(config), "step": step, "elapsed_s": round(elapsed, 2), "format": "diffusion_lab/1"}
    return save_checkpoint(path, checkpoint_tensors(model, ema, optimizer, generator, losses), meta)


def _split(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def restore_training_state(path, model, ema, optimizer, generator) -> tuple[int, list[float], float]:
    tensors, meta = load_checkpoint(path)
    model.load_state_dict(_split(tensors, "model."))
    ema.load_state_dict(_split(tensors, "ema."))
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(state)
    generator.set_state(tensors["rng.data"])
    return meta["step"], tensors["history.loss"].tolist(), meta.get("elapsed_s", 0.0)


def load_model(name_or_path, device=None, use_ema: bool = True):
    """Load a trained model for sampling: returns (model in eval mode, NoiseSchedule, TrainConfig).
    Shipped names (e.g. "mnist-cond") are verified against their pinned SHA-256 first."""
    tensors, meta = load_checkpoint(name_or_path)
    if "train" not in meta:
        raise CheckpointError(f"{name_or_path} is not a diffusion_lab training checkpoint (no training config)")
    config = TrainConfig.from_dict(meta["train"])
    model = build_model(config)
    model.load_state_dict(_split(tensors, "ema." if use_ema else "model."))
    device = get_device(None if device in (None, "auto") else device)
    return model.to(device).eval(), build_schedule(config), config


# --- the loop ------------------------------------------------------------------------------------------------

def train(config: TrainConfig, checkpoint: str | os.PathLike | None = None, resume: bool = True,
          progress: bool = True, images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
          callback=None) -> dict:
    """Train a UNet on MNIST (or on `images`/`labels` if given: uint8 (N, 28, 28) and long (N,)).

    Returns {"model", "ema", "schedule", "config", "losses", "step", "elapsed_s", "images_per_s"}.
    If `checkpoint` exists and `resume` is true, training continues from it at the step it reached.
    `callback(step, ema)` runs every `log_every` steps (e.g. to evaluate); returning True stops training.
    """
    config.validate()
    rank, world = _distributed()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must divide evenly over {world} processes")
    device = get_device(None if config.device == "auto" else config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    seed_everything(config.seed)

    if images is None:
        images, labels = data.mnist(train=True)
    images = images.to(device)
    labels = labels.to(device) if labels is not None else None
    style_all = None
    if config.style:
        attributes = data.style_attributes(images)
        if not config.style_mean:
            config.style_mean = attributes.mean(0).tolist()
            config.style_std = attributes.std(0).tolist()
        style_all = style_code(attributes, config.style_mean, config.style_std).to(device)

    schedule = build_schedule(config)
    model = build_model(config).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed + rank)  # each process draws different batches

    step, losses, elapsed_before = 0, [], 0.0
    if checkpoint is not None and resume and Path(checkpoint).exists():
        step, losses, elapsed_before = restore_training_state(checkpoint, model, ema, optimizer, generator)
        if world > 1:  # the file holds rank 0's generator only; give every rank its own stream again
            generator.manual_seed(config.seed + rank + world * step)
        if progress and rank == 0:
            print(f"resuming from {checkpoint} at step {step}")

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        net = torch.compile(net)

    local_batch = config.batch_size // world
    start, images_seen, pending = time.perf_counter(), 0, []
    bar = tqdm(total=config.steps, initial=step, desc="training", disable=not progress or rank != 0,
               dynamic_ncols=True)
    while step < config.steps:
        if config.max_minutes and (time.perf_counter() - start) / 60 >= config.max_minutes:
            break
        idx = torch.randint(0, len(images), (local_batch,), generator=generator).to(device)
        x0 = data.to_unit_range(images[idx])
        if config.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        batch_labels = labels[idx] if config.conditional else None
        batch_style = style_all[idx] if style_all is not None else None
        batch_labels, batch_style = drop_codes(batch_labels, batch_style, 10, config.p_uncond,
                                               config.p_uncond_style if config.style else 0.0, generator)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        with _autocast(config, device):
            loss = diffusion_loss(lambda x_t, t: net(x_t, t, batch_labels, batch_style), schedule, x0,
                                  config.objective, config.weighting, config.min_snr_gamma, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        ema_update(ema, model, step, config.ema_decay)
        step += 1
        images_seen += config.batch_size
        pending.append(loss.detach())
        if step % config.log_every == 0 or step == config.steps:
            losses.extend(torch.stack(pending).tolist())  # one device sync per log interval, not per step
            pending.clear()
            recent = losses[-config.log_every:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr_at(step - 1, config):.1e}")
        bar.update(1)
        if checkpoint is not None and rank == 0 and (step % config.ckpt_every == 0 or step == config.steps):
            losses.extend(torch.stack(pending).tolist() if pending else [])
            pending.clear()
            save_training_state(checkpoint, config, step, model, ema, optimizer, generator, losses,
                                elapsed_before + time.perf_counter() - start)
        if callback is not None and step % config.log_every == 0 and callback(step, ema):
            break
    bar.close()
    losses.extend(torch.stack(pending).tolist() if pending else [])
    wall = time.perf_counter() - start
    if checkpoint is not None and rank == 0 and step % config.ckpt_every:  # stopped early (time budget or callback)
        save_training_state(checkpoint, config, step, model, ema, optimizer, generator, losses, elapsed_before + wall)
    return {"model": model, "ema": ema, "schedule": schedule, "config": config, "losses": losses, "step": step,
            "elapsed_s": elapsed_before + wall, "images_per_s": images_seen / wall if wall > 0 else float("nan")}


# --- command line ------------------------------------------------------------------------------------------

def _parser():
    import argparse

    defaults = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m diffusion_lab.train",
        description="Train a diffusion UNet on MNIST. Writes a safetensors checkpoint (weights, EMA weights, "
                    "optimizer state and this run's config as JSON); re-running the same command resumes it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint file to write (and resume from), e.g. runs/mnist.safetensors")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if --out exists (it is overwritten)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    help_text = {
        "channels": "UNet widths at 28x28, 14x14 and 7x7", "blocks_per_level": "residual blocks per resolution",
        "attention": "self-attention at 7x7 (1 or 0)", "conditional": "condition on the class label (1 or 0)",
        "style": "condition on slant and thickness too (1 or 0)", "schedule": f"noise schedule: {', '.join(SCHEDULES)}",
        "T": "number of diffusion steps", "objective": f"network target: {', '.join(OBJECTIVES)}",
        "weighting": f"loss weighting: {', '.join(WEIGHTINGS)}", "min_snr_gamma": "gamma of min-SNR weighting",
        "p_uncond": "probability of dropping the whole code (classifier-free guidance)",
        "p_uncond_style": "extra probability of dropping only the style code", "steps": "optimizer steps",
        "batch_size": "global batch size", "lr": "peak learning rate (AdamW)", "warmup": "linear warm-up steps",
        "lr_decay": "cosine or constant after warm-up", "weight_decay": "AdamW weight decay",
        "grad_clip": "clip the gradient norm to this", "ema_decay": "EMA decay of the sampled weights",
        "seed": "random seed", "device": "auto (cuda, mps, cpu), or e.g. cpu", "amp": "auto, bf16 or none",
        "compile": "use torch.compile (1 or 0)", "channels_last": "channels-last memory format (1 or 0)",
        "ckpt_every": "write a checkpoint every N steps", "log_every": "average the logged loss over N steps",
        "max_minutes": "stop after this many minutes of training (0: no limit)",
    }
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("style_mean", "style_std"):
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=int, choices=(0, 1), default=int(default), help=help_text[f.name])
        elif isinstance(default, tuple):
            p.add_argument(flag, type=int, nargs=3, default=list(default), help=help_text[f.name])
        else:
            p.add_argument(flag, type=type(default), default=default, help=help_text[f.name])
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    defaults = TrainConfig()
    for name, value in values.items():
        if isinstance(getattr(defaults, name), bool):
            values[name] = bool(value)
    try:
        config = TrainConfig.from_dict(values)
        config.validate()
        result = train(config, checkpoint=args.out, resume=not args.no_resume, progress=not args.quiet)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise SystemExit(f"error: {err}")
    summary = {"out": str(args.out), "step": result["step"], "elapsed_s": round(result["elapsed_s"], 1),
               "images_per_s": round(result["images_per_s"], 1),
               "final_loss": round(sum(result["losses"][-50:]) / max(1, len(result["losses"][-50:])), 5)}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
