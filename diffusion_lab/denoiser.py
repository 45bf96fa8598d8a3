"""A trained denoiser and its contract: what it predicts, its noise schedule, its data shape and its codes.

A network alone is ambiguous: the same UNet weights mean different images if you read its output as eps, x0
or v, or pair it with another schedule. So a trained model travels as a `Denoiser`, which holds the network
together with everything sampling must not guess, and a checkpoint file stores all of it:

    denoiser = load_denoiser("mnist-cond")         # SHA-256 verified for shipped names
    denoiser.prediction, denoiser.schedule.T, denoiser.shape, denoiser.num_classes   # "v", 1000, (1, 28, 28), 10
    images = sample.generate(denoiser, labels=torch.arange(10))

Checkpoint format 2 (a safetensors file; its JSON config in the metadata):
  shipped (`kind: "diffusion"`): the sampling weights as `net.*`, the schedule's betas as `schedule.betas`;
  training run (`kind: "training-run"`, written by `training.fit`): `model.*`, `ema.*`, `optim.*`, `rng.data`,
  `history.loss` and `schedule.betas`.
Both carry {"net": {"class", "config"}, "prediction", "shape", "codes", "schedule"} in the config.
Introduced in chapter 06 (sampling); chapter 08 writes and reads the files.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn

from .baselines import PlainConvNet
from .checkpoint import SHIPPED, CheckpointError, load_checkpoint, save_checkpoint
from .mlp import ToyMLP
from .schedules import NoiseSchedule, check_prediction
from .text import PromptUNet
from .unet import UNet
from .utils import get_device

FORMAT = "diffusion_lab/2"
# The networks a checkpoint can name, by class name; each is rebuilt with cls(**config).
NETS = {cls.__name__: cls for cls in (UNet, ToyMLP, PlainConvNet, PromptUNet)}


@dataclass(frozen=True, eq=False)
class Denoiser:
    """A network plus its contract. Call it like the network: denoiser(x_t, t, labels=..., style=..., context=...).

    net:         any module mapping (x_t, t, **codes) to an output with x_t's shape
    prediction:  what that output is: "eps", "x0" or "v"
    schedule:    the NoiseSchedule it was trained with (T = schedule.T)
    shape:       one sample's shape, e.g. (1, 28, 28), (4, 64, 32) or (1, 8, 32, 32)
    num_classes: class labels 0..num_classes-1 (num_classes itself is the null label), or None
    style_mean, style_std: the standardisation of a continuous style code (chapter 07), or empty
    steps:       for a distilled student (chapter 13), the one number of DDIM steps it was trained to take
    """

    net: nn.Module
    prediction: str
    schedule: NoiseSchedule
    shape: tuple
    num_classes: int | None = None
    style_mean: tuple = ()
    style_std: tuple = ()
    steps: int | None = None

    def __post_init__(self):
        check_prediction(self.prediction)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not self.shape or min(self.shape) < 1:
            raise ValueError(f"a sample's shape must be non-empty and positive, got {self.shape}")

    def __call__(self, x_t, t, labels=None, style=None, context=None):
        codes = {"labels": labels, "style": style, "context": context}
        return self.net(x_t, t, **{k: v for k, v in codes.items() if v is not None})

    @property
    def style_dim(self) -> int:
        return len(self.style_mean) + 1 if self.style_mean else 0

    @property
    def context_dim(self) -> int:
        return int(getattr(self.net, "context_dim", 0) or 0)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "Denoiser":
        self.net.to(device)
        return self

    def contract(self) -> dict:
        """The JSON-able part: everything but the weights."""
        return {"net": {"class": type(self.net).__name__, "config": net_config(self.net)},
                "prediction": self.prediction, "shape": list(self.shape),
                "codes": {"num_classes": self.num_classes, "style_mean": list(self.style_mean),
                          "style_std": list(self.style_std), "context_dim": self.context_dim},
                "schedule": {"name": self.schedule.name, "T": self.schedule.T}}


def net_config(net: nn.Module) -> dict:
    if type(net).__name__ not in NETS or not isinstance(getattr(net, "config", None), dict):
        raise ValueError(f"cannot save a {type(net).__name__}: checkpoints hold only {', '.join(NETS)}")
    return dict(net.config)


def save_denoiser(path: str | os.PathLike, denoiser: Denoiser, **record) -> str:
    """Write a shipped-style checkpoint: the network's weights and the contract (plus `record`, e.g. how it was
    trained) and nothing else. Returns the file's SHA-256 (pin it in checkpoint.SHIPPED to ship it)."""
    tensors = {f"net.{k}": v for k, v in denoiser.net.state_dict().items()}
    tensors["schedule.betas"] = denoiser.schedule.betas
    return save_checkpoint(path, tensors, {"format": FORMAT, "kind": "diffusion", **denoiser.contract(), **record})


def denoiser_from(tensors: dict, meta: dict, prefix: str, device=None) -> Denoiser:
    """Rebuild a Denoiser from a format-2 file's tensors and config; `prefix` picks the weights ("net." or "ema.")."""
    try:
        cls = NETS[meta["net"]["class"]]
        net = cls(**meta["net"]["config"])
        weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        net.load_state_dict(weights)
        schedule = NoiseSchedule(tensors["schedule.betas"], name=meta["schedule"]["name"])
        codes = meta["codes"]
        denoiser = Denoiser(net.eval(), meta["prediction"], schedule, tuple(meta["shape"]), codes["num_classes"],
                            tuple(codes.get("style_mean", ())), tuple(codes.get("style_std", ())))
    except (KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"the checkpoint's weights or config do not describe a {FORMAT} denoiser: "
                              f"{str(err).splitlines()[0]}") from err
    if denoiser.schedule.T != meta["schedule"]["T"]:
        raise CheckpointError(f"the checkpoint's schedule has {denoiser.schedule.T} steps, its config says "
                              f"{meta['schedule']['T']}")
    return denoiser.to(get_device(None if device in (None, "auto") else device))


def load_denoiser(name_or_path: str | os.PathLike, device=None, use_ema: bool = True,
                  steps: int | None = None) -> Denoiser:
    """Load a trained denoiser for sampling: a shipped name (SHA-256 verified, e.g. "mnist-cond") or a path to a
    shipped file or a training run's checkpoint (its EMA weights unless use_ema=False). A file of distilled
    students (chapter 13) needs `steps`, the step count of the student to load."""
    kind = SHIPPED[str(name_or_path)].kind if str(name_or_path) in SHIPPED else None
    if kind not in (None, "diffusion", "chorales", "text-to-image", "video", "distilled"):  # 10, 11, 12, 13
        raise CheckpointError(f"{name_or_path} is a shipped {kind}, not a generative model: it cannot be sampled")
    tensors, meta = load_checkpoint(name_or_path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{name_or_path} is not a {FORMAT} denoiser checkpoint (format "
                              f"{meta.get('format', 'unknown')!r}, kind {meta.get('kind', meta.get('model', 'unknown'))!r})")
    if meta.get("kind") == "distilled":
        have = meta.get("steps", [])
        if steps not in have:
            raise CheckpointError(f"{name_or_path} holds students distilled for {', '.join(map(str, have))} steps, "
                                  f"not {steps}: ask for one of those")
        return dataclasses.replace(denoiser_from(tensors, meta, f"students.{steps}.", device), steps=steps)
    if steps is not None:
        raise CheckpointError(f"{name_or_path} is not a file of distilled students: leave out steps={steps}")
    if meta.get("kind") == "diffusion":
        return denoiser_from(tensors, meta, "net.", device)
    if meta.get("kind") == "training-run":
        return denoiser_from(tensors, meta, "ema." if use_ema else "model.", device)
    raise CheckpointError(f"{name_or_path} holds a {meta.get('kind')!r}, not a denoiser: it cannot be sampled")

