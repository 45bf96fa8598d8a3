"""Video data: Moving MNIST clips made from the real MNIST digits, and the crops that evaluation tracks (chapter 12).

Moving MNIST (Srivastava et al. 2015, "Unsupervised learning of video representations using LSTMs"): one or two
MNIST digits, each placed at a random spot in a square canvas and given a random direction and a speed from a fixed
range, move in straight lines and bounce off the walls; where two digits overlap, the brighter pixel wins (max).
Clips are made on the fly, vectorised over clips and writing only inked pixels: about as quick as loading MNIST
itself, so nothing is cached.

Everything the chapter's evaluation needs is kept beside the pixels: each digit's label, its index in
`data.mnist(train)`, and its path (top-left corner per frame), so `track_crops` can cut each digit's 28x28 window
out of a real or generated clip.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from .data import from_unit_range, mnist, to_unit_range
from .utils import IMAGE_SIZE

FRAMES = 8    # frames per clip
SIZE = 32     # canvas side in pixels: the digits (28x28) have 4 pixels of room to move
SPEED = (0.5, 1.5)  # pixels per frame, drawn uniformly per digit
MAX_DIGITS = 2


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class MovingDigits:
    """A set of Moving MNIST clips and how they were made. D = MAX_DIGITS slots per clip; a clip with one digit
    leaves slot 1 empty (label and source -1, trajectory and velocity NaN).

    clips:        uint8 (n, F, H, W), 0 = background, 255 = ink.
    counts:       int64 (n,), digits in each clip (1 or 2).
    labels:       int64 (n, D), each digit's class 0..9.
    sources:      int64 (n, D), each digit's index into `data.mnist(train=train)`.
    trajectories: float32 (n, D, F, 2), each digit's top-left corner (row, col) per frame, in pixels; the digit is
                  drawn at `pixel_positions(trajectories)` (rounded), always inside the canvas.
    velocities:   float32 (n, D, F, 2), (row, col) pixels per frame with which each digit leaves each frame.
    train, seed:  which MNIST split the digits came from, and the seed that made the set.
    """

    clips: torch.Tensor
    counts: torch.Tensor
    labels: torch.Tensor
    sources: torch.Tensor
    trajectories: torch.Tensor
    velocities: torch.Tensor
    train: bool
    seed: int

    def __len__(self) -> int:
        return len(self.clips)


def _whole(value, name: str, low: int) -> int:
    """`value` as an int >= low, or one ValueError that names the argument."""
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"moving_mnist: {name} must be a whole number >= {low}, got {value!r}") from None
    if number < low:
        raise ValueError(f"moving_mnist: {name} must be a whole number >= {low}, got {number}")
    return number


def _digit_counts(digits) -> tuple[int, ...]:
    choices = tuple(digits) if isinstance(digits, (tuple, list)) else (digits,)
    try:
        valid = choices and not any(isinstance(d, bool) for d in choices)
        choices = tuple(operator.index(d) for d in choices)
    except TypeError:
        valid = False
    if not valid or any(d not in range(1, MAX_DIGITS + 1) for d in choices):
        raise ValueError(f"moving_mnist: digits must be 1, 2 or a tuple of them such as (1, 2), got {digits!r}")
    return choices


def moving_mnist(n: int, frames: int = FRAMES, size: int = SIZE, digits=(1, 2), train: bool = True, seed: int = 0,
                 speed: tuple[float, float] = SPEED) -> MovingDigits:
    """`n` Moving MNIST clips of `frames` frames on a `size` x `size` canvas (chapter 12).

    digits: how many digits move in each clip, 1, 2, or a tuple to draw from uniformly ((1, 2): about half each).
    train:  True takes the digits from MNIST's 60,000 training images, False only from its 10,000 test images.
    speed:  (lowest, highest) pixels per frame; each digit's speed is uniform in it, its direction uniform on the circle.
    The same arguments give the same clips, and the first k clips do not depend on n: each clip draws its own
    numbers from one row of a seeded generator.
    """
    n, frames, size = _whole(n, "n", 1), _whole(frames, "frames", 1), _whole(size, "size", IMAGE_SIZE)
    seed, choices = _whole(seed, "seed", 0), _digit_counts(digits)
    if not isinstance(train, bool):
        raise ValueError(f"moving_mnist: train must be True (training digits) or False (test digits), got {train!r}")
    try:
        lo, hi = (float(s) for s in speed)
        valid = math.isfinite(hi) and 0 <= lo <= hi
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"moving_mnist: speed must be (lowest, highest) pixels per frame with 0 <= lowest <= "
                         f"highest, got {speed!r}")
    images, classes = mnist(train=train)
    room = size - IMAGE_SIZE  # the top-left corner moves in [0, room] along each axis

    # One row of uniforms per clip: [count, source x2, row x2, col x2, angle x2, speed x2].
    u = torch.rand(n, 11, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    counts = torch.tensor(choices)[(u[:, 0] * len(choices)).long().clamp_max(len(choices) - 1)]  # (n,)
    present = torch.arange(MAX_DIGITS) < counts[:, None]  # (n, D)
    sources = (u[:, 1:3] * len(images)).long().clamp_max(len(images) - 1)  # (n, D)
    p = torch.stack([u[:, 3:5], u[:, 5:7]], dim=-1) * room  # (n, D, 2) start corners (row, col)
    angle = 2 * math.pi * u[:, 7:9]
    v = (lo + (hi - lo) * u[:, 9:11])[..., None] * torch.stack([angle.sin(), angle.cos()], dim=-1)  # (n, D, 2)
    if not room:
        v = torch.zeros_like(v)  # a 28-pixel canvas holds the digit still

    # Bouncing, in closed form: mirror the straight path p + t v at both walls. A coordinate that has crossed
    # an odd number of walls is running backwards, so its velocity is reversed; speed never changes.
    straight = p[:, :, None] + torch.arange(frames, dtype=torch.float64)[:, None] * v[:, :, None]  # (n, D, F, 2)
    walls = torch.floor(straight / max(room, 1))  # walls crossed (row, col); max: no division by a zero room
    backwards = torch.remainder(walls, 2) == 1
    trajectories = torch.where(backwards, (walls + 1) * room - straight, straight - walls * room)
    velocities = torch.where(backwards, -v[:, :, None], v[:, :, None]).expand_as(trajectories)

    trajectories, velocities = trajectories.float(), velocities.float()
    empty = ~present[:, :, None, None]
    clips = _render(images[sources], pixel_positions(trajectories), present, size)
    return MovingDigits(
        clips=clips,
        counts=counts,
        labels=torch.where(present, classes[sources], -1),
        sources=torch.where(present, sources, -1),
        trajectories=trajectories.masked_fill(empty, math.nan),
        velocities=velocities.masked_fill(empty, math.nan),
        train=train,
        seed=seed,
    )


def pixel_positions(trajectories: torch.Tensor) -> torch.Tensor:
    """Where a digit is drawn: its top-left corner rounded to whole pixels, int64 with the same shape."""
    return trajectories.round().long()


def _render(digits: torch.Tensor, corners: torch.Tensor, present: torch.Tensor, size: int) -> torch.Tensor:
    """Paste digits uint8 (n, D, 28, 28) at corners (n, D, F, 2) into blank clips (n, F, size, size), max-combined.

    Only inked pixels are written (about a fifth of an MNIST digit), each with a scatter that keeps the maximum.
    """
    n, _, frames, _ = corners.shape
    clips = torch.zeros(n, frames, size, size, dtype=torch.uint8)
    ink = digits.masked_fill(~present[:, :, None, None], 0)  # an empty slot draws nothing
    clip, slot, y, x = ink.nonzero(as_tuple=True)  # every inked pixel of every digit, (M,) each
    value = ink[clip, slot, y, x]
    digit = clip * corners.shape[1] + slot  # which digit each pixel belongs to, as a row of corners.flatten(0, 1)
    pixel = (clip * frames * size + y) * size + x  # its flat position in clips at frame 0, corner (0, 0)
    shift = (corners[..., 0] * size + corners[..., 1]).flatten(0, 1)  # (n*D, F): each corner as a flat offset
    for f in range(frames):
        index = pixel + f * size * size + shift[:, f].index_select(0, digit)
        clips.view(-1).scatter_reduce_(0, index, value, reduce="amax")
    return clips


def clips_to_unit_range(clips: torch.Tensor) -> torch.Tensor:
    """uint8 clips (n, F, H, W) to float32 (n, 1, F, H, W) in [-1, 1]: the UNet's "2+1d" layout with one channel."""
    if clips.dtype != torch.uint8 or clips.ndim != 4:
        raise ValueError(f"clips_to_unit_range expects uint8 clips (n, F, H, W), got {clips.dtype} "
                         f"{tuple(clips.shape)}")
    return to_unit_range(clips).unsqueeze(1)  # to_unit_range reads (n, F, H, W) as F channels


def clips_from_unit_range(x: torch.Tensor) -> torch.Tensor:
    """float clips (n, 1, F, H, W) in [-1, 1] (e.g. samples) back to uint8 (n, F, H, W); values outside are clamped."""
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"clips_from_unit_range expects float clips (n, 1, F, H, W), got {tuple(x.shape)}")
    return from_unit_range(x[:, 0])


def track_crops(clips: torch.Tensor, trajectories: torch.Tensor) -> torch.Tensor:
    """Each digit's 28x28 window in each frame: uint8 (n, D, F, 28, 28) from clips (n, F, H, W) and
    trajectories (n, D, F, 2) (top-left corners, as in MovingDigits). An empty slot (NaN) gives a blank crop.

    Give the real trajectories to crop generated clips made with the same paths (prediction, interpolation), or
    paths found in the generated clips themselves.
    """
    if clips.dtype != torch.uint8 or clips.ndim != 4:
        raise ValueError(f"track_crops expects uint8 clips (n, F, H, W), got {clips.dtype} {tuple(clips.shape)}")
    n, frames, height, width = clips.shape
    if trajectories.ndim != 4 or trajectories.shape[0] != n or trajectories.shape[2:] != (frames, 2):
        raise ValueError(f"track_crops expects trajectories (n, D, F, 2) = ({n}, D, {frames}, 2) for clips "
                         f"{tuple(clips.shape)}, got {tuple(trajectories.shape)}")
    empty = trajectories.isnan().any(-1)  # (n, D, F)
    corners = pixel_positions(trajectories.nan_to_num(0.0))
    if (corners < 0).any() or (corners[..., 0] > height - IMAGE_SIZE).any() or (corners[..., 1] > width - IMAGE_SIZE).any():
        raise ValueError(f"track_crops: a 28x28 window at these corners would leave the {height}x{width} canvas")
    offset = torch.arange(IMAGE_SIZE)
    clip = torch.arange(n)[:, None, None, None, None]
    frame = torch.arange(frames)[None, None, :, None, None]
    rows = (corners[..., 0, None] + offset)[..., :, None]  # (n, D, F, 28, 1)
    cols = (corners[..., 1, None] + offset)[..., None, :]  # (n, D, F, 1, 28)
    crops = clips[clip, frame, rows, cols]  # (n, D, F, 28, 28)
    return crops.masked_fill(empty[..., None, None], 0)


def centroid_path(clips: torch.Tensor) -> torch.Tensor:
    """The ink's centre of mass (row, col) per frame, float32 (..., 2) from uint8 frames (..., H, W); NaN for a
    blank frame. Works on whole clips (n, F, H, W) and on tracked crops (n, D, F, 28, 28)."""
    if clips.dtype != torch.uint8 or clips.ndim < 2:
        raise ValueError(f"centroid_path expects uint8 frames (..., H, W), got {clips.dtype} {tuple(clips.shape)}")
    ink = clips.float()
    mass = ink.sum(dim=(-2, -1))
    rows = (ink.sum(-1) * torch.arange(clips.shape[-2])).sum(-1) / mass
    cols = (ink.sum(-2) * torch.arange(clips.shape[-1])).sum(-1) / mass
    return torch.stack([rows, cols], dim=-1)  # 0 / 0 = NaN for a blank frame
