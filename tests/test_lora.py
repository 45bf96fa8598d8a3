"""The hand-written LoRA (diffusion_lab.lora) against the `peft` library's LoRA on the same layers: equal
outputs for equal weights, merged and unmerged; and the LoRA file's refusals (another base, another network)."""
from __future__ import annotations

import copy
import dataclasses

import peft  # a test dependency (the [test] extra): fail loudly if missing
import pytest
import torch

from diffusion_lab import lora
from diffusion_lab.checkpoint import CheckpointError
from diffusion_lab.denoiser import Denoiser
from diffusion_lab.schedules import NoiseSchedule
from diffusion_lab.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")
SHA_A, SHA_B = "a" * 64, "b" * 64


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(channels=(8, 16, 16), num_classes=10, attention=True).eval()
    with torch.no_grad():  # the zero-initialised output convolutions would hide half the layers from the test
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def inputs(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.arange(n)


def with_both(rank: int = 3, alpha: float = 6.0):
    """The same UNet adapted twice: by lora.add_lora and by peft, with identical, non-zero A and B."""
    ours, theirs = tiny_unet(), tiny_unet()
    names = lora.add_lora(ours, rank, alpha)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0)
    theirs = peft.inject_adapter_in_model(config, theirs)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in names:
            mine, other = ours.get_submodule(name), theirs.get_submodule(name)
            mine.lora_B.weight.copy_(0.1 * torch.randn(mine.lora_B.weight.shape, generator=g))
            other.lora_A["default"].weight.copy_(mine.lora_A.weight)
            other.lora_B["default"].weight.copy_(mine.lora_B.weight)
    return ours, theirs, names


def test_lora_matches_peft_on_every_linear_and_conv2d_layer():
    ours, theirs, names = with_both()
    assert len(names) > 20 and any("qkv" in n for n in names)  # convolutions, linears and attention all wrapped
    x, t, labels = inputs()
    with torch.no_grad():
        base = tiny_unet()(x, t, labels)
        mine, other = ours(x, t, labels), theirs(x, t, labels)
    assert (mine - base).abs().max() > 1e-2  # the adapters change the output...
    torch.testing.assert_close(mine, other, atol=1e-5, rtol=1e-4)  # ... exactly as peft's do
    trainable_peft = sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
    assert lora.trainable_parameters(ours) == trainable_peft


def test_merge_matches_peft_and_unmerge_restores_the_base():
    ours, theirs, names = with_both(rank=2, alpha=5.0)
    x, t, labels = inputs()
    lora.merge(ours)
    for name in names:
        theirs.get_submodule(name).merge()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, labels), theirs(x, t, labels), atol=1e-5, rtol=1e-4)
    lora.unmerge(ours)
    base = tiny_unet()
    for name in names:
        torch.testing.assert_close(ours.get_submodule(name).base.weight, base.get_submodule(name).weight,
                                   atol=1e-6, rtol=0)


def test_fresh_lora_is_the_base_and_only_adapters_train():
    net, base = tiny_unet(), tiny_unet()
    lora.add_lora(net, rank=4)
    x, t, labels = inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, labels), base(x, t, labels))  # B = 0 at the start
    assert all(("lora_" in n) == p.requires_grad for n, p in net.named_parameters())
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(net, rank=4)
    with pytest.raises(ValueError, match="no Linear/Conv2d layer named"):
        lora.add_lora(tiny_unet(), rank=2, names=["nowhere"])


def test_save_load_refuses_another_base(tmp_path):
    net = tiny_unet()
    lora.add_lora(net, rank=2)
    with torch.no_grad():
        for layer in lora.lora_layers(net).values():
            layer.lora_B.weight.normal_(0, 0.1)
    path = tmp_path / "style.safetensors"
    lora.save_lora(path, net, base="tiny", base_sha256=SHA_A)
    denoiser = Denoiser(tiny_unet(), "v", NoiseSchedule.from_name("cosine", T=50), (1, 28, 28), 10)
    styled = lora.with_lora(denoiser, path, base_sha256=SHA_A)
    x, t, labels = inputs()
    with torch.no_grad():
        torch.testing.assert_close(styled(x, t, labels), net(x, t, labels), atol=1e-5, rtol=1e-4)
        assert not torch.equal(denoiser(x, t, labels), styled(x, t, labels))  # the original is untouched
    with pytest.raises(CheckpointError, match="SHA-256"):
        lora.with_lora(denoiser, path, base_sha256=SHA_B)
    other = dataclasses.replace(denoiser, net=UNet(channels=(8, 16, 32), num_classes=10))
    with pytest.raises(CheckpointError, match="does not fit this network"):
        lora.with_lora(other, path, base_sha256=SHA_A)
    merged = copy.deepcopy(net)
    assert lora.save_lora(tmp_path / "again.safetensors", merged, base="tiny", base_sha256=SHA_A)
