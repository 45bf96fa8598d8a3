"""The anchor: the class-conditioned MNIST recipe of the Hugging Face diffusion-models-class (unit 2),
rebuilt on `diffusers` so that this repo's recipe is measured against it on the same machine.

The recipe, as the course states it:
- `UNet2DModel(sample_size=28, in_channels=1 + 4, out_channels=1, layers_per_block=2,
  block_out_channels=(32, 64, 64), down: DownBlock2D, AttnDownBlock2D, AttnDownBlock2D; up mirrored)`;
- the class label goes through `nn.Embedding(10, 4)` and is broadcast over the image as 4 extra input channels;
- `DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")` (the cosine schedule of
  Nichol & Dhariwal 2021), Adam with lr 1e-3, batch 128, MSE between the predicted and the true noise.
  No EMA, no learning-rate schedule, no gradient clipping, no label dropout (so no classifier-free guidance).

One deliberate difference: batches are drawn from MNIST held in memory as one uint8 tensor (uniformly, with
replacement), exactly as diffusion_lab.training does, instead of through a torchvision DataLoader. That removes
the DataLoader's overhead from the anchor's clock, which can only make the anchor look better.

The code below is written for this repository (not copied from the course).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab import data
from diffusion_lab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffusion_lab.denoiser import Denoiser
from diffusion_lab.schedules import NoiseSchedule
from diffusion_lab.training import load_optimizer_tensors, optimizer_tensors
from diffusion_lab.utils import seed_everything

try:
    from diffusers import DDPMScheduler, UNet2DModel
except ImportError as err:  # diffusers is in the [test] extra
    raise ImportError("the anchor needs diffusers: pip install -e '.[test]' (or pip install diffusers)") from err

NUM_CLASSES = 10
CLASS_EMB = 4
RECIPE = {"lr": 1e-3, "batch_size": 128, "optimizer": "Adam", "objective": "eps", "schedule": "squaredcos_cap_v2",
          "T": 1000, "ema": False, "guidance": None}


class AnchorNet(nn.Module):
    """UNet2DModel with the class label as 4 extra input channels: forward(x_t, t, labels) -> eps_hat."""

    def __init__(self):
        super().__init__()
        self.class_emb = nn.Embedding(NUM_CLASSES, CLASS_EMB)
        self.unet = UNet2DModel(
            sample_size=28, in_channels=1 + CLASS_EMB, out_channels=1, layers_per_block=2,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x_t.shape
        code = self.class_emb(labels)[:, :, None, None].expand(B, CLASS_EMB, H, W)  # (B, 4, H, W)
        return self.unet(torch.cat([x_t, code.to(x_t.dtype)], dim=1), t).sample


def anchor_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=RECIPE["T"], beta_schedule=RECIPE["schedule"])


def anchor_schedule(scheduler: DDPMScheduler | None = None) -> NoiseSchedule:
    """The anchor's noise schedule as a diffusion_lab NoiseSchedule (its own float32 betas, held in float64),
    so that diffusion_lab's samplers can drive the anchor with exactly the noise levels it was trained on."""
    return NoiseSchedule((scheduler or anchor_scheduler()).betas.double(), name="anchor-squaredcos_cap_v2")


def anchor_denoiser(model: AnchorNet, schedule: NoiseSchedule | None = None) -> Denoiser:
    """The anchor as a diffusion_lab Denoiser (eps-prediction, its own betas, 1 x 28 x 28), so that
    sample.generate and the held-out probe treat it like ours. It reads labels 0..9 but was trained without a
    null label, so it declares no `num_classes` and cannot be guided (guided() then says so)."""
    return Denoiser(model, RECIPE["objective"], schedule or anchor_schedule(), (1, 28, 28))


def save_anchor(path, model: AnchorNet, step: int) -> str:
    """Write a trained anchor as safetensors (diffusion_lab.checkpoint: atomic, with its SHA-256 returned)."""
    meta = {"anchor": RECIPE, "step": step, "format": "diffusion_lab/anchor/1"}
    return save_checkpoint(path, {f"model.{k}": v for k, v in model.state_dict().items()}, meta)


RUN_FORMAT = "diffusion_lab/anchor-run/1"


def _save_run(path, model, optimizer, generator, losses, step, elapsed, run) -> None:
    """A resumable anchor run: weights, Adam's state, the batch generator and the losses so far (atomic write)."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(optimizer_tensors(optimizer))
    tensors["rng.data"] = generator.get_state()
    tensors["history.loss"] = torch.tensor(losses, dtype=torch.float32)
    save_checkpoint(path, tensors, {"format": RUN_FORMAT, **run, "step": step, "elapsed_s": round(elapsed, 2)})


def _resume_run(path, model, optimizer, generator, losses, run) -> tuple[int, float]:
    """Load a run written by _save_run into the live objects; a run of another recipe, seed or batch is refused."""
    tensors, meta = load_checkpoint(path)
    if meta.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{path} is not an anchor training run (format {meta.get('format')!r})")
    saved = {k: meta.get(k) for k in run}
    if saved != run:
        raise ValueError(f"cannot resume {path}: it is a run of {saved}, not {run}; choose another file")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    load_optimizer_tensors(optimizer, tensors)
    generator.set_state(tensors["rng.data"])
    losses.extend(tensors["history.loss"].tolist())
    return int(meta["step"]), float(meta["elapsed_s"])


def load_anchor(path, device: torch.device | str = "cpu") -> tuple[AnchorNet, NoiseSchedule]:
    """A saved anchor, in eval mode, and its noise schedule: ready for diffusion_lab's samplers (eps-prediction)."""
    tensors, meta = load_checkpoint(path)
    if meta.get("format") != "diffusion_lab/anchor/1":
        raise CheckpointError(f"{path} is not an anchor checkpoint (format {meta.get('format')!r})")
    model = AnchorNet()
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()})
    return model.to(device).eval(), anchor_schedule()


def train_step(model: AnchorNet, scheduler: DDPMScheduler, optimizer, x0: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """One step of the anchor recipe: noise a batch at uniform random t, predict the noise, MSE, Adam."""
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(x0.device)
    x_t = scheduler.add_noise(x0, eps, t)
    loss = F.mse_loss(model(x_t, t, labels), eps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_anchor(minutes: float = 0.0, steps: int | None = None, batch_size: int = RECIPE["batch_size"],
                 seed: int = 0, device: torch.device | str = "cpu", images: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, callback=None, log_every: int = 10,
                 channels_last: bool = False, checkpoint=None, ckpt_every: int = 100) -> dict:
    """Train the anchor for `minutes` of wall clock (checked before every step, as diffusion_lab.training does)
    and/or at most `steps` steps. `callback(step, images_seen, model)` runs every `log_every` steps; returning
    True stops training. Returns {"model", "schedule", "losses", "step", "images_seen", "elapsed_s",
    "images_per_s"} — the same keys as diffusion_lab.training.train where they mean the same thing.

    With `checkpoint` (a path), the run is written there every `ckpt_every` steps and at the end, and a run found
    there is continued exactly where it stopped (its steps and seconds count towards the budget): a run of hours
    can be stopped and resumed."""
    if not minutes and not steps:
        raise ValueError("give the anchor a budget: minutes > 0 and/or steps > 0")
    device = torch.device(device)
    seed_everything(seed)
    if images is None:
        images, labels = data.mnist(train=True)
    images, labels = images.to(device), labels.to(device)
    model = AnchorNet().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    scheduler = anchor_scheduler()
    optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    generator = torch.Generator().manual_seed(seed)
    model.train()
    step, losses, pending, before = 0, [], [], 0.0
    run = {"anchor": RECIPE, "seed": seed, "batch_size": batch_size}
    if checkpoint is not None and Path(checkpoint).exists():
        step, before = _resume_run(checkpoint, model, optimizer, generator, losses, run)
    images_seen, start = step * batch_size, time.perf_counter()
    elapsed = lambda: before + time.perf_counter() - start  # noqa: E731
    while steps is None or step < steps:
        if minutes and elapsed() / 60 >= minutes:
            break
        idx = torch.randint(0, len(images), (batch_size,), generator=generator).to(device)
        x0 = data.to_unit_range(images[idx])
        if channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        pending.append(train_step(model, scheduler, optimizer, x0, labels[idx], generator))
        step += 1
        images_seen += batch_size
        if step % log_every == 0:
            losses.extend(torch.stack(pending).tolist())
            pending.clear()
            if callback is not None and callback(step, images_seen, model):
                break
        if checkpoint is not None and step % ckpt_every == 0:
            losses.extend(torch.stack(pending).tolist() if pending else [])
            pending.clear()
            _save_run(checkpoint, model, optimizer, generator, losses, step, elapsed(), run)
    losses.extend(torch.stack(pending).tolist() if pending else [])
    wall = elapsed()
    if checkpoint is not None and step % ckpt_every:
        _save_run(checkpoint, model, optimizer, generator, losses, step, wall, run)
    model.eval()
    return {"model": model, "schedule": anchor_schedule(scheduler), "losses": losses, "step": step,
            "images_seen": images_seen, "elapsed_s": wall, "images_per_s": images_seen / wall if wall else float("nan")}
