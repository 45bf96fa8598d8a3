"""Small shared helpers: seeding, device choice, shape broadcasting, run profiles, atomic writes, and the
few constants every module shares (defined here once).

Introduced in chapter 00 (quickstart); every other module may import this one, and it imports none of them.
"""
from __future__ import annotations

import hashlib
import json
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


def glue(name: str, value, display: bool = True) -> None:
    """Hand a computed value to the prose: myst-nb's `glue` in the book build (the text reads it with {glue:text}),
    and outside it (Colab, plain Jupyter, where myst-nb is not installed) a printed `name: value` line instead."""
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        print(f"{name}: {value}")
        return
    myst_glue(name, value, display=display)


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


# ----------------------------------------------------------------------------------------------------------
# Caches that verify themselves: a file with a pinned size and SHA-256, rebuilt from its source when wrong
# ----------------------------------------------------------------------------------------------------------


class CacheError(FileNotFoundError):
    """A cached data file is missing or damaged and cannot be rebuilt here. The message names the file and the fix."""


_HASHED: dict[tuple, str] = {}  # (path, size, mtime, ctime, inode) -> SHA-256: each file is hashed once per process


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, remembered while the file is unchanged (same size, mtime, ctime and inode).

    ctime is in the key because nothing can set it back: editing a file in place and restoring its mtime
    still changes ctime, so a remembered hash never hides a change.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def cache_problem(path: str | os.PathLike, size: int, sha256: str) -> str | None:
    """None if `path` holds exactly the pinned bytes; otherwise what is wrong, in words. Size first: it is free."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    actual = path.stat().st_size
    if actual != size:
        return f"damaged ({actual:,} bytes, expected {size:,}: cut off or overwritten?)"
    if file_sha256(path) != sha256:
        return f"damaged (its SHA-256 differs from the pinned {sha256[:12]}...)"
    return None


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where a cache's sidecar lives: beside it, with .json appended (chorales.npz -> chorales.npz.json)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_pinned(path: str | os.PathLike, data: bytes, **record) -> dict:
    """Write a cache whose bytes cannot be pinned in code (they depend on a library's version): `data` to `path`,
    then a sidecar recording its size and SHA-256 (plus `record`), each atomically. The sidecar goes last, so a
    kill between the two leaves one that does not match, and the next `read_pinned` asks for a rebuild."""
    pins = {"file": Path(path).name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), **record}
    atomic_write_bytes(path, data)
    atomic_write_bytes(sidecar_path(path), (json.dumps(pins, indent=1) + "\n").encode())
    return pins


def read_pinned(path: str | os.PathLike) -> dict | None:
    """The sidecar's record when `path` holds exactly the bytes it pins; None when either file is missing,
    unreadable, cut off or changed (then rebuild the cache)."""
    try:
        pins = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(pins, dict) and isinstance(pins.get("bytes"), int) and isinstance(pins.get("sha256"), str)):
        return None
    return pins if cache_problem(path, pins["bytes"], pins["sha256"]) is None else None


def verified_cache(path: str | os.PathLike, size: int, sha256: str, build=None, fix: str = "") -> Path:
    """Return `path` once it holds the pinned bytes (size, then SHA-256); rebuild it first if it is missing or damaged.

    `build()` writes the file again from its source, atomically (with `atomic_write_bytes`), or raises CacheError
    saying why no source is at hand; pass build=None when there is none. The rebuilt file is checked like the
    old one. When it cannot be made right, CacheError names the file, what is wrong with it, and `fix`
    (one line: how to get the data).
    """
    path = Path(path)
    problem = cache_problem(path, size, sha256)
    if problem is None:
        return path
    reason = "no source to rebuild it from is at hand"
    if build is not None:
        try:
            build()
        except CacheError as err:
            reason = f"it cannot be rebuilt: {err}"
        else:
            rebuilt = cache_problem(path, size, sha256)
            if rebuilt is None:
                return path
            reason = f"rebuilding it from its source gave a file that is {rebuilt}"
    raise CacheError(f"{path} is {problem}, and {reason}. {fix}".strip())


# The errors a command line reports as one line "error: ..." instead of a traceback: a bad argument or file
# (ValueError, which CheckpointError is), an impossible request (RuntimeError), a missing file or a full disk
# (OSError). Anything else is a bug, and keeps its traceback.
USER_ERRORS = (ValueError, RuntimeError, OSError)


def run_command(run, args) -> int:
    """The body of a command line's main(): run(args) returns a JSON-able summary, printed on one line."""
    try:
        summary = run(args)
    except USER_ERRORS as err:
        raise SystemExit(f"error: {err}")
    print(json.dumps(summary))
    return 0

