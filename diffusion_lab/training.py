"""Training: `fit()`, the one loop behind every diffusion model in the book, and `train()`, MNIST on top of it,
with its command line `python -m diffusion_lab.train`.

`fit(denoiser, batches, config)` trains any network on any data shape. The Denoiser says what the network
predicts, with which schedule, on what shape; `batches(generator, size)` returns a dict with "x0" and any codes
("labels", "style", "context"). Per step: a batch -> classifier-free-guidance dropout of the codes -> noise
(losses.py) -> network -> AdamW with warm-up, gradient clipping, an EMA of the weights (the weights we sample
with), bf16 autocast when asked (or on a capable GPU), optional torch.compile. A checkpoint is written atomically
every `ckpt_every` steps and a re-run resumes from it exactly, or refuses to if the configuration changed. A lock
file keeps two processes from training into one file; a NaN or inf stops the run before anything is written.
Under `torchrun` it runs data-parallel (DDP, Li et al. 2020).
Introduced in chapter 00; `fit` is chapter 04's and 05's loop too; explained in chapter 08.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import data
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .conditioning import drop_codes, style_code
from .denoiser import FORMAT, Denoiser
from .losses import WEIGHTINGS, diffusion_loss
from .schedules import OUTPUTS, SCHEDULES, NoiseSchedule
from .unet import UNet
from .utils import IMAGE_SIZE, NUM_CLASSES, USER_ERRORS, get_device, seed_everything


@dataclass(frozen=True)
class FitConfig:
    """How to train (any model, any data). Saved in every training checkpoint."""

    weighting: str = "none"
    min_snr_gamma: float = 5.0
    p_uncond: float = 0.1             # classifier-free-guidance dropout of the whole code
    p_uncond_style: float = 0.1       # extra dropout of the style code alone
    steps: int = 2000
    batch_size: int = 128             # global batch, split across DDP processes
    lr: float = 2e-3
    warmup: int = 100
    lr_decay: str = "cosine"          # "cosine" to 10% of lr at the end, or "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"                 # "auto" (bf16 on CUDA if supported), "bf16" or "none"
    compile: bool = False
    channels_last: bool = False
    ckpt_every: int = 500
    log_every: int = 50
    max_minutes: float = 0.0          # stop early after this wall-clock budget (0: no limit)

    def validate(self) -> None:
        problems = []
        if self.weighting not in WEIGHTINGS:
            problems.append(f"weighting {self.weighting!r} is not one of {WEIGHTINGS}")
        if self.amp not in ("auto", "bf16", "none"):
            problems.append(f"amp {self.amp!r} is not one of auto, bf16, none")
        if self.lr_decay not in ("cosine", "constant"):
            problems.append(f"lr_decay {self.lr_decay!r} is not one of cosine, constant")
        for name in ("steps", "batch_size", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "weight_decay", "max_minutes"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not 0 <= self.p_uncond < 1 or not 0 <= self.p_uncond_style < 1:
            problems.append(f"p_uncond and p_uncond_style must lie in [0, 1), got {self.p_uncond}, {self.p_uncond_style}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be a positive number, got {self.lr}")
        if not (self.grad_clip > 0 and self.min_snr_gamma > 0):
            problems.append(f"grad_clip and min_snr_gamma must be positive, got {self.grad_clip}, {self.min_snr_gamma}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))


# Fields that may change when a run resumes: they change how long and how verbosely it runs, not what it learns.
RESUMABLE = frozenset({"steps", "max_minutes", "ckpt_every", "log_every", "device", "compile"})


def lr_at(step: int, config: FitConfig) -> float:
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


def _autocast(config: FitConfig, device: torch.device):
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


def tensor_batches(x0: torch.Tensor, labels=None, style=None, context=None, transform=None):
    """A batch source over tensors held in memory: rows drawn uniformly with replacement from the fit's generator.
    `transform` maps the drawn rows of x0 to training data (e.g. data.to_unit_range for uint8 images)."""
    n = len(x0)
    for name, codes in (("labels", labels), ("style", style), ("context", context)):
        if codes is not None and len(codes) != n:
            raise ValueError(f"{name} has {len(codes)} rows but x0 has {n}")

    def draw(generator: torch.Generator, size: int) -> dict:
        idx = torch.randint(0, n, (size,), generator=generator).to(x0.device)
        batch = {"x0": transform(x0[idx]) if transform else x0[idx]}
        for name, codes in (("labels", labels), ("style", style), ("context", context)):
            if codes is not None:
                batch[name] = codes[idx.to(codes.device)]
        return batch

    return draw


# --- checkpoints -------------------------------------------------------------------------------------------

class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN or inf; nothing was written after it."""


def checkpoint_tensors(model, ema, optimizer, generator: torch.Generator, losses: list[float], schedule) -> dict:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    tensors.update(optimizer_tensors(optimizer))
    tensors["rng.data"] = generator.get_state()
    tensors["history.loss"] = torch.tensor(losses, dtype=torch.float32)
    tensors["schedule.betas"] = schedule.betas
    return tensors


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's per-parameter state as flat tensors `optim.<param index>.<name>` (safetensors holds no dicts)."""
    return {f"optim.{i}.{k}": torch.as_tensor(v) for i, state in optimizer.state_dict()["state"].items()
            for k, v in state.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict) -> None:
    """The inverse of optimizer_tensors: restore the state from a checkpoint's `optim.*` tensors."""
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(state)


def _run_meta(denoiser: Denoiser, config: FitConfig, record: dict | None) -> dict:
    return {"format": FORMAT, "kind": "training-run", **denoiser.contract(), "fit": asdict(config),
            "record": record or {}}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resume_changes(saved: dict, wanted: dict) -> tuple[list[str], list[str]]:
    """Compare a checkpoint's run config with the requested one: (refused differences, allowed ones), each as
    "field: saved -> wanted". Only the fields in RESUMABLE may change (in the fit config, or in the record)."""
    def compared(meta):  # as JSON, so tuples read back as lists; train()'s record repeats the fit config: left out
        part = {k: meta.get(k) for k in ("net", "prediction", "shape", "codes", "schedule", "fit")}
        part["record"] = {k: v for k, v in (meta.get("record") or {}).items() if k != "train"}
        return _flat(json.loads(json.dumps(part)))

    a, b = compared(saved), compared(wanted)
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            (allowed if key.split(".")[-1] in RESUMABLE and key.startswith(("fit.", "record.")) else refused).append(
                f"{key.split('.', 1)[-1] if key.startswith('fit.') else key}: {a.get(key)} -> {b.get(key)}")
    return refused, allowed


def _save(path, meta, step, elapsed, tensors) -> None:
    try:
        save_checkpoint(path, tensors, {**meta, "step": step, "elapsed_s": round(elapsed, 2)})
    except OSError as err:  # e.g. ENOSPC: the atomic write removed its temporary file; the old checkpoint stands
        raise RuntimeError(f"could not write the checkpoint {path} at step {step} ({err.strerror or err}); the "
                           "previous checkpoint is intact. Free some space and run the same command to resume.") from err


class RunLock:
    """`<checkpoint>.lock` holds the pid of the process training into the checkpoint. A second process is refused;
    a lock left by a process that no longer runs (killed) is taken over."""

    def __init__(self, checkpoint):
        self.path = Path(f"{checkpoint}.lock")
        self.held = False

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None:
                    raise RuntimeError(f"another process (pid {owner}) is training into {self.path.with_suffix('')}; "
                                       "wait for it to finish, or choose another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self.held = True
            return self
        raise RuntimeError(f"could not take the lock {self.path}")

    def _owner(self) -> int | None:
        """The pid in the lock if that process is alive on this host, else None (a stale lock)."""
        try:
            pid_text, host = self.path.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        if host != socket.gethostname():
            return pid  # cannot tell from here: assume it runs
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def __exit__(self, *exc):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# --- the loop ------------------------------------------------------------------------------------------------

@dataclass
class FitResult:
    denoiser: Denoiser           # the EMA weights in eval mode: what to sample with
    model: torch.nn.Module       # the raw trained network
    losses: list                 # one loss per step, from step 1 (including the steps before a resume)
    step: int                    # the step reached
    resumed_from: int | None     # the checkpoint's step if this run resumed, else None
    steps_run: int               # optimizer steps taken by this call
    elapsed_s: float             # training wall time, including the runs before a resume
    images_per_s: float          # this call's throughput


def fit(denoiser: Denoiser, batches, config: FitConfig, *, checkpoint: str | os.PathLike | None = None,
        resume: bool = True, progress: bool = True, callback=None, record: dict | None = None,
        loss=None) -> FitResult:
    """Train `denoiser.net` to predict `denoiser.prediction` under `denoiser.schedule` on batches of x0 with shape
    (B, *denoiser.shape). `batches(generator, size)` returns {"x0", and optionally "labels", "style", "context"}.

    With `checkpoint`, a training-run file is written every `ckpt_every` steps and at the end; if it exists and
    `resume` is true, training continues from it exactly, and a changed configuration (other than RESUMABLE) is
    refused with the differing fields named. `callback(step, ema_denoiser)` runs every `log_every` steps; returning
    True stops training. `record` (JSON) is saved alongside, e.g. the TrainConfig that built the run.
    A batch may also carry "eps", the noise paired with each x0 (reflow, chapter 13). `loss(net, x0, codes,
    generator)` replaces the diffusion loss when given (distillation, chapter 13): `net(x_t, t)` is the network
    with the batch's codes bound; name the loss in `record`, since the checkpoint cannot store a function.
    """
    config.validate()
    loss_fn = loss
    rank, world = _distributed()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must divide evenly over {world} processes")
    device = get_device(None if config.device == "auto" else config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    seed_everything(config.seed)
    model = denoiser.net.to(device).train()
    channels_last = config.channels_last and len(denoiser.shape) == 3  # a 2-D layout (B, C, H, W) only
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed + rank)  # each process draws different batches
    schedule, num_classes = denoiser.schedule, denoiser.num_classes
    meta = _run_meta(denoiser, config, record) if checkpoint is not None else None  # a checkpoint's JSON config

    lock = RunLock(checkpoint) if checkpoint is not None and rank == 0 else None
    with lock or contextlib.nullcontext():
        step, losses, elapsed_before, resumed_from = 0, [], 0.0, None
        if checkpoint is not None and resume and Path(checkpoint).exists():
            step, elapsed_before = _resume(checkpoint, meta, model, ema, optimizer, generator, losses,
                                           progress and rank == 0)
            resumed_from = step
            if world > 1:  # the file holds rank 0's generator only; give every rank its own stream again
                generator.manual_seed(config.seed + rank + world * step)

        net = model
        if world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if config.compile:
            net = torch.compile(net)

        def save(at_step, seconds):
            _check_finite(nonfinite, pending, checkpoint, step)
            losses.extend(torch.stack(pending).tolist() if pending else [])
            pending.clear()
            _save(checkpoint, meta, at_step, seconds,
                  checkpoint_tensors(model, ema, optimizer, generator, losses, schedule))

        local_batch = config.batch_size // world
        start, images_seen, pending = time.perf_counter(), 0, []
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)   # checked at log and checkpoint steps only
        bar = tqdm(total=config.steps, initial=step, desc="training", disable=not progress or rank != 0,
                   dynamic_ncols=True)
        while step < config.steps:
            if config.max_minutes and (time.perf_counter() - start) / 60 >= config.max_minutes:
                break
            batch = batches(generator, local_batch)
            x0 = batch["x0"].to(device)
            if tuple(x0.shape[1:]) != denoiser.shape:
                raise ValueError(f"the batch source gives x0 of shape {tuple(x0.shape)}; this denoiser takes "
                                 f"(B, {', '.join(map(str, denoiser.shape))})")
            if channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            codes = {k: batch[k].to(device) for k in ("labels", "style", "context") if batch.get(k) is not None}
            if codes:
                dropped = drop_codes(codes.get("labels"), codes.get("style"), num_classes, config.p_uncond,
                                     config.p_uncond_style if "style" in codes else 0.0, generator,
                                     context=codes.get("context"))
                codes = {k: v for k, v in zip(("labels", "style", "context"), dropped) if v is not None}
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            eps = batch["eps"].to(device) if batch.get("eps") is not None else None
            coded_net = functools.partial(net, **codes)
            with _autocast(config, device):
                if loss_fn is None:
                    loss = diffusion_loss(coded_net, schedule, x0, denoiser.prediction, config.weighting,
                                          config.min_snr_gamma, eps=eps, generator=generator)
                else:
                    loss = loss_fn(coded_net, x0, codes, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            nonfinite |= ~torch.isfinite(grad_norm) | ~torch.isfinite(loss.detach())
            optimizer.step()
            ema_update(ema, model, step, config.ema_decay)
            step += 1
            images_seen += config.batch_size
            pending.append(loss.detach())
            if step % config.log_every == 0 or step == config.steps:
                _check_finite(nonfinite, pending, checkpoint, step)
                losses.extend(torch.stack(pending).tolist())  # one device sync per log interval, not per step
                pending.clear()
                recent = losses[-config.log_every:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr_at(step - 1, config):.1e}")
            bar.update(1)
            if checkpoint is not None and rank == 0 and (step % config.ckpt_every == 0 or step == config.steps):
                save(step, elapsed_before + time.perf_counter() - start)
            if callback is not None and step % config.log_every == 0 and callback(step, _ema_denoiser(denoiser, ema)):
                break
        bar.close()
        _check_finite(nonfinite, pending, checkpoint, step)
        losses.extend(torch.stack(pending).tolist() if pending else [])
        pending.clear()
        wall = time.perf_counter() - start
        if checkpoint is not None and rank == 0 and step % config.ckpt_every and step != resumed_from:
            save(step, elapsed_before + wall)  # stopped early (time budget or callback)
    steps_run = step - (resumed_from or 0)
    return FitResult(_ema_denoiser(denoiser, ema), model, losses, step, resumed_from, steps_run,
                     elapsed_before + wall, images_seen / wall if wall > 0 else float("nan"))


def _ema_denoiser(denoiser: Denoiser, ema) -> Denoiser:
    return dataclasses.replace(denoiser, net=ema)


def _check_finite(nonfinite: torch.Tensor, pending: list, checkpoint, step: int) -> None:
    if nonfinite.item() or (pending and not torch.isfinite(torch.stack(pending)).all()):
        kept = f"the last checkpoint in {checkpoint} is untouched" if checkpoint else "nothing was saved"
        raise NonFiniteError(f"the loss or a gradient became NaN or inf by step {step}; training stopped and "
                             f"{kept}. Lower --lr, or check the data for NaNs.")


def _resume(checkpoint, meta, model, ema, optimizer, generator, losses: list, verbose: bool) -> tuple[int, float]:
    """Load a training-run checkpoint into the live objects, after checking that it is the same run.
    Returns (its step, the training seconds it already took)."""
    tensors, saved = load_checkpoint(checkpoint)
    if saved.get("format") != FORMAT or saved.get("kind") != "training-run":
        raise CheckpointError(f"{checkpoint} is not a {FORMAT} training run (format {saved.get('format')!r}); "
                              "pass --no-resume to start over (it is overwritten), or choose another --out")
    refused, allowed = resume_changes(saved, meta)
    if refused:
        raise ValueError(f"cannot resume {checkpoint}: it was trained with a different configuration ("
                         + "; ".join(refused) + "). Pass --no-resume to start over (it is overwritten), "
                         "or choose another --out")
    split = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    model.load_state_dict(split("model."))
    ema.load_state_dict(split("ema."))
    load_optimizer_tensors(optimizer, tensors)
    generator.set_state(tensors["rng.data"])
    losses.extend(tensors["history.loss"].tolist())
    if verbose:
        print(f"resuming from {checkpoint} at step {saved['step']}" + (f" ({'; '.join(allowed)})" if allowed else ""))
    return int(saved["step"]), float(saved.get("elapsed_s", 0.0))


# --- MNIST: train() and its config ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig(FitConfig):
    """An MNIST run: the UNet, the diffusion, and how to fit it. Saved in every checkpoint it writes."""

    channels: tuple = (32, 64, 64)
    blocks_per_level: int = 1
    attention: bool = True
    conditional: bool = True          # class labels 0..9 as codes
    style: bool = False               # continuous style code (slant, thickness); chapter 07
    schedule: str = "cosine"
    T: int = 1000
    prediction: str = "v"             # v is well conditioned at the noisiest steps (Salimans & Ho 2022)
    # style standardisation; measured from the training data by train() when style=True and left empty
    style_mean: tuple = field(default=())
    style_std: tuple = field(default=())

    def validate(self) -> None:
        super().validate()
        problems = []
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.prediction not in OUTPUTS:
            problems.append(f"prediction {self.prediction!r} is not one of {OUTPUTS}")
        if self.T < 1:
            problems.append(f"T must be at least 1, got {self.T}")
        if len(self.channels) < 1 or min(self.channels) < 1 or self.blocks_per_level < 1:
            problems.append(f"channels and blocks_per_level must be positive, got {self.channels}, {self.blocks_per_level}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if "objective" in d:  # the name format-1 checkpoints used for `prediction`
            d["prediction"] = d.pop("objective")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        for key in ("channels", "style_mean", "style_std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def fit_config(self) -> FitConfig:
        return FitConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FitConfig)})


def build_model(config: TrainConfig) -> UNet:
    return UNet(in_channels=1, channels=tuple(config.channels), blocks_per_level=config.blocks_per_level,
                attention=config.attention, num_classes=NUM_CLASSES if config.conditional else None,
                style_dim=3 if config.style else 0)


def build_schedule(config: TrainConfig) -> NoiseSchedule:
    return NoiseSchedule.from_name(config.schedule, config.T)


def build_denoiser(config: TrainConfig) -> Denoiser:
    """The untrained MNIST denoiser a TrainConfig describes: a UNet, its schedule and its contract."""
    return Denoiser(build_model(config), config.prediction, build_schedule(config), (1, IMAGE_SIZE, IMAGE_SIZE),
                    NUM_CLASSES if config.conditional else None, tuple(config.style_mean), tuple(config.style_std))


@dataclass
class TrainResult(FitResult):
    config: TrainConfig = None   # the run's config, with the measured style statistics filled in


def train(config: TrainConfig, checkpoint: str | os.PathLike | None = None, resume: bool = True,
          progress: bool = True, images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
          callback=None) -> TrainResult:
    """Train a UNet on MNIST (or on `images`/`labels` if given: uint8 (N, 28, 28) and long (N,)) with `fit`.

    The caller's config is left alone; the returned TrainResult carries the run's own (with the style statistics
    measured from the data when config.style is set). See `fit` for checkpoints, resume and `callback`.
    """
    config.validate()
    if images is None:
        images, labels = data.mnist(train=True)
    device = get_device(None if config.device == "auto" else config.device)
    style_all = None
    if config.style:
        attributes = data.style_attributes(images)
        if not config.style_mean:
            config = dataclasses.replace(config, style_mean=tuple(attributes.mean(0).tolist()),
                                         style_std=tuple(attributes.std(0).tolist()))
        style_all = style_code(attributes, config.style_mean, config.style_std).to(device)
    batches = tensor_batches(images.to(device), labels.to(device) if config.conditional else None, style_all,
                             transform=data.to_unit_range)
    seed_everything(config.seed)  # the initial weights depend on the seed only
    result = fit(build_denoiser(config), batches, config.fit_config(), checkpoint=checkpoint, resume=resume,
                 progress=progress, callback=callback, record={"train": asdict(config)})
    return TrainResult(**{f.name: getattr(result, f.name) for f in dataclasses.fields(FitResult)}, config=config)


# --- command line ------------------------------------------------------------------------------------------

HELP = {
    "channels": "UNet widths, one per resolution (28x28, 14x14, 7x7, ...)", "blocks_per_level": "residual blocks per resolution",
    "attention": "self-attention at the lowest resolution (1 or 0)", "conditional": "condition on the class label (1 or 0)",
    "style": "condition on slant and thickness too (1 or 0)", "schedule": f"noise schedule: {', '.join(SCHEDULES)}",
    "T": "number of diffusion steps", "prediction": f"what the network predicts: {', '.join(OUTPUTS)}",
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
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("style_mean", "style_std"):
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=int, choices=(0, 1), default=int(default), help=HELP[f.name])
        elif isinstance(default, tuple):
            p.add_argument(flag, type=int, nargs="+", default=list(default), help=HELP[f.name])
        else:
            p.add_argument(flag, type=type(default), default=default, help=HELP[f.name])
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
        if not str(args.out).endswith(".safetensors"):
            raise ValueError(f"--out must name a .safetensors file, got {args.out!r}")
        result = train(config, checkpoint=args.out, resume=not args.no_resume, progress=not args.quiet)
    except USER_ERRORS as err:
        raise SystemExit(f"error: {err}")
    recent = result.losses[-50:]
    summary = {"out": str(args.out), "step": result.step, "resumed_from": result.resumed_from,
               "elapsed_s": round(result.elapsed_s, 1), "images_per_s": round(result.images_per_s, 1),
               "final_loss": round(sum(recent) / max(1, len(recent)), 5)}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
