"""Small shared helpers: seeding, device choice, shape broadcasting, run profiles, atomic writes, and the
few constants every module shares (defined here once).

Introduced in chapter 00 (quickstart); every other module may import this one, and it imports none of them.
"""
from __future__ import annotations

import math
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 28      # MNIST's side in pixels
NUM_CLASSES = 10     # the digits 0..9; the label 10 is the null code of classifier-free guidance
PROFILES = ("smoke", "demo", "full")
PROFILE_ENV = "DIFFUSION_LAB_PROFILE"


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded the same way for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def get_device(prefer: str | None = None) -> torch.device:
    """The best available device, cuda -> mps -> cpu, or `prefer` if given (e.g. "cpu")."""
    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton axes so a per-sample value (B,) broadcasts against a batch (B, C, H, W)."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"append_dims: tensor already has {x.ndim} dims, more than the target {ndim}")
    return x.reshape(*x.shape, *([1] * missing))


def profile() -> str:
    """How much work a cell should do: "smoke" (tests), "demo" (CPU default) or "full" (CUDA default).

    Set DIFFUSION_LAB_PROFILE to override. Chapters never hard-code epochs; they ask `by_profile`.
    """
    name = os.environ.get(PROFILE_ENV, "").strip().lower()
    if not name:
        return "full" if torch.cuda.is_available() else "demo"
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r} is not a run profile; choose one of {', '.join(PROFILES)}")
    return name


def by_profile(smoke, demo, full):
    """Pick the value for the current run profile, e.g. `steps = by_profile(smoke=5, demo=800, full=20_000)`."""
    return {"smoke": smoke, "demo": demo, "full": full}[profile()]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a kill (or a second process writing
    the same file) never leaves half a file behind. The file is readable by every user, like a plain write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def tile(images: np.ndarray, ncol: int, pad: int = 2, fill=0.5) -> np.ndarray:
    """Tile N images (N, H, W) into one picture, `ncol` per row, `pad` pixels of `fill` between and around them."""
    n, h, w = images.shape
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad), fill, dtype=images.dtype)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return grid
