"""LoRA by hand: low-rank adapters around a network's Linear and Conv2d layers (Hu et al. 2022) (chapter 09).

A frozen layer y = W x gains a trainable low-rank update, y = W x + (alpha / r) B A x, with A (r x in) and
B (out x r). B starts at zero, so the adapted network starts as the base network exactly; only A and B learn.
For a Conv2d, A is a convolution with the layer's kernel, stride and padding down to r channels and B a 1x1
convolution back up (the layout the `peft` library uses; tests/test_lora.py checks equal outputs).

    names = add_lora(denoiser.net, rank=4)            # wraps the layers in place, freezes everything else
    ... fit(denoiser, batches, config) ...            # only lora_A / lora_B receive gradients
    save_lora("style.safetensors", denoiser.net, base="mnist-cond", base_sha256=...)
    styled = with_lora(load_denoiser("mnist-cond"), "style.safetensors", base_sha256=...)  # merged copy

A LoRA file holds only A and B for each wrapped layer, plus the base model's name and SHA-256: loading it onto
any other base is refused, because the update B A means nothing without the W it was trained against.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os

import torch
from torch import nn

from .checkpoint import SHIPPED, CheckpointError, load_checkpoint, save_checkpoint

FORMAT = "diffusion_lab/lora-1"
TARGETS = (nn.Linear, nn.Conv2d)


class LoRALayer(nn.Module):
    """base(x) + scale * B(A(x)) around a frozen nn.Linear or nn.Conv2d; scale = alpha / rank."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None):
        super().__init__()
        if not isinstance(base, TARGETS):
            raise TypeError(f"LoRA wraps nn.Linear or nn.Conv2d, not {type(base).__name__}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        self.base, self.rank = base.requires_grad_(False), rank
        self.scale = (rank if alpha is None else alpha) / rank
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        else:  # A sees what W sees (same kernel, stride, padding); B mixes the r channels back, pixel by pixel
            self.lora_A = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                    base.dilation, bias=False)
            self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # A random, B zero: delta W = 0 at the start
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base.weight), self.lora_B.to(base.weight)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """scale * B A, shaped like base.weight: (out, in) or (out, in, kh, kw)."""
        A, B = self.lora_A.weight, self.lora_B.weight
        if isinstance(self.base, nn.Linear):
            return self.scale * B @ A
        return self.scale * (B[:, :, 0, 0] @ A.flatten(1)).reshape(self.base.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # the update already lives in base.weight
            return self.base(x)
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


def add_lora(net: nn.Module, rank: int, alpha: float | None = None, names: list[str] | None = None) -> list[str]:
    """Wrap `net`'s Linear and Conv2d layers (or only those in `names`) in LoRALayer, in place, and freeze every
    other weight. Returns the wrapped layers' names (as in net.named_modules()). alpha defaults to rank (scale 1)."""
    found = {name: m for name, m in net.named_modules() if isinstance(m, TARGETS) and name}
    if any(isinstance(m, LoRALayer) for m in net.modules()):
        raise ValueError("this network already has LoRA layers; merge or rebuild it before adding more")
    chosen = list(found) if names is None else list(names)
    missing = [n for n in chosen if n not in found]
    if missing or not chosen:
        raise ValueError(f"no Linear/Conv2d layer named {missing}" if missing else "add_lora: no layers to wrap")
    net.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, LoRALayer(found[name], rank, alpha))
    return chosen


def lora_layers(net: nn.Module) -> dict[str, LoRALayer]:
    return {name: m for name, m in net.named_modules() if isinstance(m, LoRALayer)}


def merge(net: nn.Module) -> None:
    """Fold every B A into its base weight: the network then runs at the base network's cost."""
    for layer in lora_layers(net).values():
        layer.merge()


def unmerge(net: nn.Module) -> None:
    """Take the updates out again (up to float rounding): the base weights come back."""
    for layer in lora_layers(net).values():
        layer.unmerge()


def trainable_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def save_lora(path: str | os.PathLike, net: nn.Module, *, base: str, base_sha256: str, **record) -> str:
    """Write only the adapters (A and B of each layer) and the base model's name and SHA-256. Returns the file's
    SHA-256. The layers must not be merged (A and B are what is saved; the base weights stay out of the file)."""
    layers = lora_layers(net)
    if not layers:
        raise ValueError("save_lora: the network has no LoRA layers (call add_lora first)")
    if len(base_sha256) != 64:
        raise ValueError(f"save_lora: base_sha256 must be a SHA-256 hex digest, got {base_sha256!r}")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = layer.lora_A.weight, layer.lora_B.weight
    ranks, scales = {layer.rank for layer in layers.values()}, {layer.scale for layer in layers.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError("save_lora: every layer must share one rank and one alpha")
    rank = ranks.pop()
    config = {"format": FORMAT, "kind": "lora", "base": base, "base_sha256": base_sha256, "rank": rank,
              "alpha": scales.pop() * rank, "layers": list(layers), **record}
    return save_checkpoint(path, tensors, config)


def load_lora(name_or_path: str | os.PathLike, base_sha256: str) -> tuple[dict, dict]:
    """(tensors, config) of a LoRA file (a shipped name is SHA-256 verified), refused unless it was trained on the
    base model whose file has SHA-256 `base_sha256`."""
    kind = SHIPPED[str(name_or_path)].kind if str(name_or_path) in SHIPPED else "lora"
    if kind != "lora":
        raise CheckpointError(f"{name_or_path} is a shipped {kind}, not a LoRA")
    tensors, config = load_checkpoint(name_or_path)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{name_or_path} is not a LoRA file ({FORMAT}); it holds {config.get('kind', 'unknown')!r}")
    if config["base_sha256"] != base_sha256:
        raise CheckpointError(f"the LoRA {name_or_path} was trained on {config['base']} with SHA-256 "
                              f"{config['base_sha256'][:12]}..., but this base model's SHA-256 is {base_sha256[:12]}...: "
                              "a LoRA only works on the exact weights it was trained against")
    return tensors, config


def with_lora(denoiser, lora: str | os.PathLike, base_sha256: str):
    """A copy of `denoiser` with the LoRA file `lora` loaded and merged (the original is untouched). `base_sha256`
    is the SHA-256 of the file `denoiser` came from (checkpoint.SHIPPED[name].sha256 for a shipped model)."""
    tensors, config = load_lora(lora, base_sha256)
    net = copy.deepcopy(denoiser.net)
    try:
        add_lora(net, config["rank"], config["alpha"], names=config["layers"])
        net.load_state_dict({k: v for k, v in net.state_dict().items() if ".lora_" not in k} | tensors)
    except (ValueError, RuntimeError) as err:
        raise CheckpointError(f"the LoRA {lora} does not fit this network (made for another base model?): "
                              f"{' '.join(str(err).split())[:300]}") from None
    merge(net)
    return dataclasses.replace(denoiser, net=net.eval())
