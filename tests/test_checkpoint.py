"""Checkpoints: round trip, atomic writes, SHA-256 pinning, corrupt and tampered files refused."""
import os

import pytest
import torch

from diffusion_lab import checkpoint
from diffusion_lab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffusion_lab.utils import file_sha256


def test_round_trip(tmp_path):
    path = tmp_path / "a.safetensors"
    tensors = {"w": torch.randn(3, 4), "step": torch.tensor(7)}
    sha = save_checkpoint(path, tensors, {"lr": 0.1, "name": "x"})
    loaded, config = load_checkpoint(path, sha256=sha)
    assert torch.equal(loaded["w"], tensors["w"]) and config == {"lr": 0.1, "name": "x"}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temporary file left behind


def test_tampered_and_corrupt_files_are_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    sha = save_checkpoint(path, {"w": torch.zeros(100)}, {})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip one weight byte: still a valid safetensors file, but not the pinned one
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path, sha256=sha)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="not a file and not a shipped name"):
        load_checkpoint("no-such-model")


def test_shipped_name_is_verified(tmp_path, monkeypatch):
    path = tmp_path / "toy.safetensors"
    sha = save_checkpoint(path, {"w": torch.ones(2)}, {"k": 1})
    monkeypatch.setenv(checkpoint.CHECKPOINT_ENV, str(tmp_path))
    monkeypatch.setitem(checkpoint.SHIPPED, "toy", checkpoint.Shipped(sha, "diffusion"))
    assert load_checkpoint("toy")[1] == {"k": 1}
    monkeypatch.setitem(checkpoint.SHIPPED, "toy", checkpoint.Shipped("0" * 64, "diffusion"))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint("toy")


def test_every_shipped_checkpoint_matches_its_pin():
    for name, (sha, kind) in checkpoint.SHIPPED.items():
        path = checkpoint.checkpoint_dir() / f"{name}.safetensors"
        assert kind in ("diffusion", "classifier", "denoisers", "lora", "chorales", "autoencoder", "text-to-image",
                        "video", "distilled"), \
            f"{name}: unknown kind {kind!r}"
        assert path.stat().st_size <= 8_000_000, f"{path} is over the 8 MB a shipped file may take"
        assert file_sha256(path) == sha, f"{path} does not match SHIPPED[{name!r}]"
        card = checkpoint.checkpoint_dir() / f"{name}.md"
        assert card.exists(), f"{name} has no model card"
        assert sha in card.read_text(), f"the model card of {name} does not name the file's SHA-256"
