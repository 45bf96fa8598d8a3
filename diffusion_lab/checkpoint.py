"""Checkpoint files: safetensors weights + a JSON config, written atomically, verified by SHA-256.

Never pickles: a safetensors file holds only tensors and a string->string metadata map, so loading one
cannot run code. Shipped checkpoints live in `checkpoints/` at the repository root; their hashes are
pinned in `SHIPPED` below, so a corrupt or tampered file is refused before a single weight is read.
Introduced in chapter 08 (training); used by the metrics classifier from chapter 01 on.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

from .utils import atomic_write_bytes



class Shipped(NamedTuple):
    sha256: str   # of checkpoints/<name>.safetensors
    kind: str     # "diffusion" (sampled by diffusion_lab.sample), "classifier", "denoisers" (chapter 05's set),
                  # "lora" (chapter 09: merged into its base with --lora), "chorales" (chapter 11: sampled by
                  # diffusion_lab.sample, writing `rolls`), "autoencoder" and "text-to-image" (chapter 10: --prompt),
                  # "video" (chapter 12: sampled by diffusion_lab.sample, writing `clips`), "distilled" (chapter 13:
                  # students for several step counts in one file; diffusion_lab.sample --steps picks one)


# name -> (SHA-256, kind). Updated only by a retraining (or conversion) whose model card says so.
SHIPPED: dict[str, Shipped] = {
    "mnist-classifier": Shipped("1e438f92dc9de1f4643ee20a4909c98ef1201ab9b09d9f3137c2f7e8385a16db", "classifier"),
    "mnist-cond": Shipped("5fd976135e67f8d9c80cad19af24e9234109df85905b763536ef73c3f16030f0", "diffusion"),
    # the book's first, briefly trained model: the base that typeset-lora, moving-mnist and mnist-distilled were made from
    "mnist-cond-small": Shipped("d244664377cbaed1ade1ef569d540ebf65a51d3707fd452b32f5110faaf77734", "diffusion"),
    "ch05-denoisers": Shipped("06ec96a2ba99cb2efe0c6a58ed99e3a01fe4ef0757ec9a35ca26e310b9978e73", "denoisers"),
    # chapter 09: a LoRA adapter for mnist-cond-small (diffusion_lab.lora; loaded with --lora, never on its own)
    "typeset-lora": Shipped("a3f2571bd517549f0de24e405833f0d8b9bc4feb3d8f6d54ad7a7ae8396e0179", "lora"),
    "bach-chorales": Shipped("761d222ea8f88b8ba0a2a9b20965bee7ef662092ef34fe99c93e3a1ae3bcf44f", "chorales"),  # chapter 11
    "tiny-sd": Shipped("4ad52447b589f78cb5224dd52b4a66d2d3dc09486a4583270059b48d69b179d0", "text-to-image"),
    "mnist-vae": Shipped("0ffdc2e76fac113702cf677bb0d658b894beeb959e5495c23eaff6dcae780839", "autoencoder"),
    "moving-mnist": Shipped("7ab379f571e00958d2a74098dd84d2743397fce9f55253775db7ebf43743006c", "video"),  # chapter 12
    # chapter 13: progressive students of mnist-cond-small for 8, 4, 2 and 1 steps (--steps picks one)
    "mnist-distilled": Shipped("743aac24e5d91bb8602fb015c73f7b3521227c275fcd7a73ce5a08f95b154a41", "distilled"),
}

CHECKPOINT_ENV = "DIFFUSION_LAB_CHECKPOINTS"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, tampered with, or not what the caller expected."""


def checkpoint_dir() -> Path:
    """Where shipped checkpoints live: $DIFFUSION_LAB_CHECKPOINTS, else <repo>/checkpoints."""
    env = os.environ.get(CHECKPOINT_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "checkpoints"


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> str:
    """Save `tensors` with `config` (JSON) as metadata, atomically. Returns the file's SHA-256."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = st_save_bytes(tensors, metadata={"config": json.dumps(config, sort_keys=True)})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def resolve_checkpoint(name_or_path: str | os.PathLike) -> tuple[Path, str | None]:
    """Map a shipped name (e.g. "mnist-cond") or a path to (file, expected SHA-256 or None)."""
    text = str(name_or_path)
    if text in SHIPPED:
        return checkpoint_dir() / f"{text}.safetensors", SHIPPED[text].sha256
    path = Path(text)
    if path.suffix != ".safetensors" and not path.exists():
        shipped = ", ".join(sorted(SHIPPED)) or "none yet"
        raise CheckpointError(f"no checkpoint {text!r}: not a file and not a shipped name (shipped: {shipped})")
    return path, None


def load_checkpoint(name_or_path: str | os.PathLike, sha256: str | None = None) -> tuple[dict, dict]:
    """Load (tensors, config). Shipped names are verified against their pinned SHA-256 before parsing;
    pass `sha256` to verify any other file the same way."""
    path, expected = resolve_checkpoint(name_or_path)
    expected = sha256 or expected
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    data = path.read_bytes()
    if expected is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise CheckpointError(
                f"checkpoint {path} failed its SHA-256 check (expected {expected[:12]}..., got {actual[:12]}...): "
                "the file is corrupt or was modified. Restore it with `git checkout -- checkpoints/`."
            )
    try:
        tensors = st_load_bytes(data)
        config = json.loads(_header(data).get("__metadata__", {}).get("config", "{}"))
    except (SafetensorError, json.JSONDecodeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} is not a valid safetensors file: {err}") from err
    return tensors, config


def _header(data: bytes) -> dict:
    """The safetensors JSON header: an 8-byte little-endian length, then that many bytes of JSON."""
    if len(data) < 8:
        raise ValueError("file too short")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header length runs past the end of the file")
    return json.loads(data[8 : 8 + n])
