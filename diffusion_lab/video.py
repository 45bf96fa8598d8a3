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


# ----------------------------------------------------------------------------------------------------------
# The clip model: the package UNet in its (2+1)-D layout, class-conditioned on the digit that moves
# ----------------------------------------------------------------------------------------------------------

SHAPE = (1, FRAMES, SIZE, SIZE)  # one clip: a channel, 8 frames of 32 x 32
IMAGE_MODEL = "mnist-cond-small"  # the image model whose spatial layers the clip model starts from


def video_denoiser(image_model: str | None = IMAGE_MODEL, channels=(16, 32, 64), frames: int = FRAMES,
                   size: int = SIZE):
    """An untrained clip Denoiser: UNet(dims="2+1d"), labels 0..9, cosine schedule, v-prediction.

    With `image_model` (a shipped class-conditional image Denoiser with the same widths) every spatial layer starts
    from its weights and the temporal convs from zero, so the fresh clip model is that image model run on each frame
    alone (Ho et al. 2022 train such layers jointly; Singer et al. 2022 and Blattmann et al. 2023 start from an image
    model, as here). Its style code is dropped: the null style's constant embedding is folded into a bias."""
    from .denoiser import Denoiser, load_denoiser
    from .schedules import NoiseSchedule
    from .unet import UNet

    net = UNet(in_channels=1, channels=tuple(channels), attention=True, num_classes=10, dims="2+1d")
    if image_model is None:
        return Denoiser(net, "v", NoiseSchedule.from_name("cosine", 1000), (1, frames, size, size), 10)
    image = load_denoiser(image_model, device="cpu")
    weights = dict(image.net.state_dict())
    if image.net.style_embed is not None:  # style=None means the all-zero style row: a constant added to emb
        with torch.no_grad():
            null_style = image.net.style_embed(torch.zeros(1, image.net.style_dim))[0]
        weights["time_embed.3.bias"] = weights["time_embed.3.bias"] + null_style
        weights = {k: v for k, v in weights.items() if not k.startswith("style_embed.")}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if unexpected or any(".temporal" not in k for k in missing):
        raise ValueError(f"{image_model} does not fit UNet{tuple(channels)}: missing {missing[:3]}, extra {unexpected[:3]}")
    return Denoiser(net, image.prediction, image.schedule, (1, frames, size, size), image.num_classes)


def clip_batches(frames: int = FRAMES, size: int = SIZE, train: bool = True):
    """A batch source for `training.fit` that draws fresh one-digit clips every step (no epoch, nothing cached):
    {"x0": (B, 1, F, H, W) in [-1, 1], "labels": (B,)}. One digit per clip: on the 32 x 32 canvas two digits
    overlap in almost every frame (see the chapter)."""
    def draw(generator: torch.Generator, batch_size: int) -> dict:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        s = moving_mnist(batch_size, frames=frames, size=size, digits=1, train=train, seed=seed)
        return {"x0": clips_to_unit_range(s.clips), "labels": s.labels[:, 0]}

    return draw


def train_video(out=None, steps: int = 800, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
                image_model: str | None = IMAGE_MODEL, channels=(16, 32, 64), max_minutes: float = 0.0,
                ckpt_every: int = 50, progress: bool = True, device: str = "cpu"):
    """Fine-tune `video_denoiser` on fresh Moving MNIST clips with `training.fit` (resumable through `out`).
    Returns fit's FitResult; its `.denoiser` holds the EMA weights."""
    from .training import FitConfig, fit

    config = FitConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=50, seed=seed, device=device,
                       ema_decay=0.995, ckpt_every=ckpt_every, log_every=25, max_minutes=max_minutes, p_uncond=0.1)
    torch.manual_seed(seed)
    denoiser = video_denoiser(image_model, channels)
    record = {"data": "video.clip_batches(): moving_mnist(digits=1, train=True), fresh clips every step",
              "image_model": image_model}
    return fit(denoiser, clip_batches(), config, checkpoint=out, progress=progress, record=record)


# ----------------------------------------------------------------------------------------------------------
# Three tasks, one sampler: generation, prediction and interpolation are `sample.generate` with different known frames
# ----------------------------------------------------------------------------------------------------------

def frame_mask(frames: int, known) -> torch.Tensor:
    """(1, 1, F, 1, 1): 1 on the given frames (kept), 0 on the frames to generate."""
    mask = torch.zeros(1, 1, frames, 1, 1)
    mask[:, :, list(known)] = 1
    return mask


def complete(denoiser, clips: torch.Tensor, known, seed: int = 0, steps: int = 20, sampler: str = "dpm++2m",
             batch_size: int = 64) -> torch.Tensor:
    """Generate the frames of uint8 clips (n, F, H, W) that are not in `known` (frame indices), keeping the known
    ones exactly: prediction is known = range(k), interpolation is known = (0, F - 1). No label is given (the null
    code): the model reads which digit it is from the given frames. Returns uint8 (n, F, H, W)."""
    from .sample import generate

    mask = frame_mask(clips.shape[1], known)
    x0 = generate(denoiser, n=len(clips), known=clips_to_unit_range(clips), mask=mask, steps=steps,
                  sampler=sampler, seed=seed, batch_size=batch_size)
    return clips_from_unit_range(x0)


def frame_by_frame(image_denoiser, labels: torch.Tensor, trajectories: torch.Tensor, size: int = SIZE,
                   seed: int = 0, steps: int = 20, guidance: float = 2.0) -> torch.Tensor:
    """The frame-independent baseline: an image model draws a new 28 x 28 digit of the clip's label for every frame,
    pasted at the corners of `trajectories` (n, F, 2) (real paths, so it moves exactly as Moving MNIST does).
    Returns uint8 (n, F, size, size)."""
    from .sample import generate

    n, frames = trajectories.shape[:2]
    images = generate(image_denoiser, labels.repeat_interleave(frames), steps=steps, guidance=guidance, seed=seed)
    digits = from_unit_range(images)[:, 0].reshape(n, frames, IMAGE_SIZE, IMAGE_SIZE)
    clips = torch.zeros(n, frames, size, size, dtype=torch.uint8)
    for (i, f), (r, c) in zip(torch.cartesian_prod(torch.arange(n), torch.arange(frames)).tolist(),
                              pixel_positions(trajectories).flatten(0, 1).tolist()):
        clips[i, f, r:r + IMAGE_SIZE, c:c + IMAGE_SIZE] = digits[i, f]
    return clips


# ----------------------------------------------------------------------------------------------------------
# Evaluation: which digit each frame shows, whether it stays the same digit, whether it moves like a ball
# ----------------------------------------------------------------------------------------------------------

def centroid_tracks(clips: torch.Tensor) -> torch.Tensor:
    """Paths for clips without one (generated): the 28 x 28 window centred on each frame's ink, kept inside the
    canvas; (n, 1, F, 2) top-left corners for `track_crops`. MNIST centres each digit's mass in its window."""
    room = clips.shape[-1] - IMAGE_SIZE
    centre = centroid_path(clips).nan_to_num(clips.shape[-1] / 2)  # a blank frame: the middle
    return (centre - IMAGE_SIZE / 2).clamp(0, room)[:, None]


def frame_classes(clips: torch.Tensor, trajectories: torch.Tensor | None = None, classifier=None) -> torch.Tensor:
    """The repository classifier's digit for each frame of one-digit clips: int64 (n, F). The frame is cropped at
    the digit's path (slot 0 of `trajectories` (n, D, F, 2)), or, without one, by `centroid_tracks`."""
    from . import metrics

    paths = centroid_tracks(clips) if trajectories is None else trajectories[:, :1]
    crops = track_crops(clips, paths)[:, 0]  # (n, F, 28, 28)
    return metrics.predict(crops.flatten(0, 1), classifier).reshape(crops.shape[:2])


def bounce_residual(path: torch.Tensor, room: float = SIZE - IMAGE_SIZE, speeds=torch.linspace(-2, 2, 81),
                    starts=None) -> torch.Tensor:
    """How far a path (n, F, 2) is from motion at constant velocity with bounces: per clip, the RMS distance in
    pixels (over frames and both axes) to the best fit c + fold(p + v t), fold bouncing between 0 and `room`.
    Grid search over start p and velocity v per axis; the offset c (where in its window the ink's centre sits) is
    solved exactly (the mean). Real Moving MNIST scores a little above 0: positions are rounded to whole pixels."""
    starts = torch.linspace(0, room, 41) if starts is None else starts
    t = torch.arange(path.shape[1], dtype=torch.float32)
    straight = starts[:, None, None] + speeds[None, :, None] * t  # (P, V, F)
    period = 2 * room
    folded = room - (torch.remainder(straight, period) - room).abs()  # triangle wave between 0 and room
    candidates = folded.flatten(0, 1)  # (P*V, F)
    x = path.transpose(1, 2).nan_to_num(0)  # (n, 2, F)
    r = x[:, :, None, :] - candidates  # (n, 2, P*V, F)
    sse = (r - r.mean(-1, keepdim=True)).square().sum(-1)  # (n, 2, P*V): c solved as the mean
    return (sse.amin(-1).sum(-1) / (2 * path.shape[1])).sqrt()  # (n,)


def stroke_change(clips: torch.Tensor, trajectories: torch.Tensor | None = None, shift: int = 1) -> torch.Tensor:
    """How much the digit of one-digit clips uint8 (n, F, H, W) changes shape from frame to frame: per clip, the mean
    absolute difference (intensities in [0, 1]) between consecutive 28 x 28 crops, each pair aligned by its best
    shift of up to `shift` pixels each way (which absorbs the rounding of positions). A digit moved rigidly scores 0;
    a new handwriting in every frame scores high, even when every frame shows the same class. Crops as in
    `frame_classes`."""
    paths = centroid_tracks(clips) if trajectories is None else trajectories[:, :1]
    crops = track_crops(clips, paths)[:, 0].float() / 255  # (n, F, 28, 28)
    before = torch.nn.functional.pad(crops[:, :-1], (shift,) * 4)
    after, k = crops[:, 1:], 2 * shift + 1
    diffs = torch.stack([(before[..., r:r + IMAGE_SIZE, c:c + IMAGE_SIZE] - after).abs().mean(dim=(-2, -1))
                         for r in range(k) for c in range(k)])  # (k*k, n, F-1)
    return diffs.amin(0).mean(-1)


def evaluate_clips(clips: torch.Tensor, labels: torch.Tensor, trajectories: torch.Tensor | None = None,
                   classifier=None) -> dict:
    """The chapter's scores for one-digit clips uint8 (n, F, H, W) meant to show `labels` (n,):
    accuracy:      share of frames classified as the label;
    consistency:   share of frames classified as the clip's own majority class (right or wrong, the same digit);
    stroke_change: `stroke_change`, averaged over clips (0: the same strokes in every frame);
    smoothness:    `bounce_residual` of the ink's centre, pixels, averaged over clips (lower is smoother);
    speed:         how far the ink's centre moves per frame, pixels (a clip that stands still is perfectly "smooth").
    Also the accuracy of each frame position, averaged over clips."""
    pred = frame_classes(clips, trajectories, classifier)  # (n, F)
    majority = pred.mode(dim=1).values
    path = centroid_path(clips)
    residual = bounce_residual(path, clips.shape[-1] - IMAGE_SIZE)
    return {"accuracy": (pred == labels[:, None]).float().mean().item(),
            "consistency": (pred == majority[:, None]).float().mean().item(),
            "stroke_change": stroke_change(clips, trajectories).mean().item(),
            "smoothness_px": residual.nanmean().item(),
            "speed_px": (path[:, 1:] - path[:, :-1]).norm(dim=-1).nanmean().item(),
            "frame_accuracy": (pred == labels[:, None]).float().mean(0).tolist()}


def horizon_errors(generated: torch.Tensor, truth: torch.Tensor, frames) -> dict:
    """Per generated frame: mean squared pixel error (intensities in [0, 1]) and the distance in pixels between the
    ink's centre in the generated and the true frame; `frames` are the indices scored."""
    frames = list(frames)
    g, x = generated[:, frames].float() / 255, truth[:, frames].float() / 255
    dist = (centroid_path(generated[:, frames]) - centroid_path(truth[:, frames])).norm(dim=-1)  # (n, k)
    return {"mse": (g - x).square().mean(dim=(0, 2, 3)).tolist(), "centre_px": dist.nanmean(0).tolist()}


# ----------------------------------------------------------------------------------------------------------
# Cost: what a clip costs as the canvas and the frame count grow
# ----------------------------------------------------------------------------------------------------------

def clip_flops(net, frames: int, size: int) -> int:
    """Floating-point operations (2 per multiply-add) of one evaluation of a UNet like `net` on one clip of
    `frames` frames of size x size, counted by torch's FlopCounterMode on the meta device (no arithmetic is done)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .unet import UNet

    with torch.device("meta"):
        twin = UNet(**net.config)
        counter = FlopCounterMode(display=False)
        with counter:
            twin(torch.zeros(1, net.in_channels, frames, size, size), torch.zeros(1))
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------------------
# The command line: python -m diffusion_lab.sample --checkpoint moving-mnist ... (sample.run dispatches here)
# ----------------------------------------------------------------------------------------------------------

TEST_CLIPS = 10_000  # the held-out clips: moving_mnist(TEST_CLIPS, digits=1, train=False, seed=0), MNIST test digits


def is_clip_model(denoiser) -> bool:
    return len(denoiser.shape) == 4


def test_clips(n: int, seed: int = 0, frames: int = FRAMES, size: int = SIZE) -> tuple[MovingDigits, torch.Tensor]:
    """n held-out one-digit clips drawn without repeats (then cycling) in a seeded order: (the clips, their indices
    into moving_mnist(TEST_CLIPS, digits=1, train=False, seed=0))."""
    order = torch.randperm(TEST_CLIPS, generator=torch.Generator().manual_seed(seed))
    index = order[torch.arange(n) % TEST_CLIPS]
    s = moving_mnist(TEST_CLIPS, frames=frames, size=size, digits=1, train=False, seed=0)
    picked = MovingDigits(s.clips[index], s.counts[index], s.labels[index], s.sources[index], s.trajectories[index],
                          s.velocities[index], train=False, seed=0)
    return picked, index


def gif_bytes(clip: torch.Tensor, scale: int = 4, ms_per_frame: int = 150) -> bytes:
    """One uint8 clip (F, H, W) as a looping grey-scale GIF, each pixel drawn as scale x scale."""
    import io

    from PIL import Image

    frames = [Image.fromarray(f.numpy()).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
              for f in clip]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    return buffer.getvalue()


def sample_command(denoiser, args, checkpoint_file, sha256: str | None) -> dict:
    """`python -m diffusion_lab.sample` for a clip model: write `clips` uint8 (N, F, H, W) and `labels` (N,); with
    --context-from test the first --context-frames frames are held-out clips' own (prediction) and the file also
    holds `context_index` into the test clips (see `test_clips`) and `context_frames`. --gif writes one GIF per clip."""
    import io
    import json
    import time
    from pathlib import Path

    import numpy as np

    from .sample import generate, parse_labels
    from .utils import atomic_write_bytes

    if not is_clip_model(denoiser):
        raise ValueError(f"--context-from, --context-frames and --gif need a clip model (samples of shape (C, F, H, W)); "
                         f"{args.checkpoint} makes {tuple(denoiser.shape)}")
    unused = [flag for flag, value in (("--grid", args.grid), ("--slant", args.slant), ("--thickness", args.thickness),
                                       ("--evaluate", args.evaluate or None), ("--lora", args.lora),
                                       ("--watermark", args.watermark), ("--soprano-from", args.soprano_from),
                                       ("--midi", args.midi), ("--wav", args.wav), ("--candidates", args.candidates),
                                       ("--prompt", args.prompt),
                                       ("--prompts", args.prompts), ("--negative-prompt", args.negative_prompt))
              if value is not None]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not for clip models; {args.checkpoint} is one")
    if args.steps > denoiser.schedule.T:
        raise ValueError(f"--steps {args.steps} is more than the model's T={denoiser.schedule.T} diffusion steps")
    frames = denoiser.shape[1]
    k = args.context_frames
    if args.context_from is None and k is not None:
        raise ValueError("--context-frames needs --context-from test (the frames it continues)")
    if args.context_from is not None:
        k = 4 if k is None else k
        if not 1 <= k < frames:
            raise ValueError(f"--context-frames must be between 1 and {frames - 1} (the model's clips have "
                             f"{frames} frames), got {k}")
        if args.labels.strip().lower() != "cycle":
            raise ValueError("--labels: with --context-from the digit is the held-out clip's own, so leave --labels out")
    if args.gif is not None and (not str(args.gif).strip() or Path(args.gif).expanduser().is_file()):
        raise ValueError(f"--gif must name a folder, got {args.gif!r}")
    start = time.perf_counter()
    index = None
    if args.context_from == "test":
        held_out, index = test_clips(args.n, args.seed, frames, denoiser.shape[-1])
        labels = held_out.labels[:, 0]
        clips = complete(denoiser, held_out.clips, range(k), seed=args.seed, steps=args.steps, sampler=args.sampler,
                         batch_size=args.batch_size)
    else:
        labels = parse_labels(args.labels, args.n, args.seed)
        clips = clips_from_unit_range(generate(denoiser, labels, n=args.n, sampler=args.sampler, steps=args.steps,
                                               guidance=args.guidance, seed=args.seed, batch_size=args.batch_size))
    seconds = time.perf_counter() - start
    meta = {"checkpoint": str(args.checkpoint), "file": str(checkpoint_file), "sha256": sha256,
            "sha256_verified": sha256 is not None, "sampler": args.sampler, "steps": args.steps, "seed": args.seed,
            "guidance": None if index is not None else args.guidance, "n": args.n, "labels": args.labels,
            "context_from": args.context_from, "context_frames": k if index is not None else 0,
            "seconds": round(seconds, 3)}
    arrays = {"clips": clips.numpy(), "labels": labels.numpy().astype(np.int64), "meta": np.array(json.dumps(meta))}
    if index is not None:
        arrays["context_index"] = index.numpy().astype(np.int64)
        arrays["context_frames"] = np.array(k, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(args.out, buffer.getvalue())
    summary = {"out": str(args.out), "n": args.n, "seconds": meta["seconds"]}
    if args.gif is not None:
        folder = Path(args.gif).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        for i, clip in enumerate(clips):
            atomic_write_bytes(folder / f"clip-{i:04d}.gif", gif_bytes(clip))
        summary["gif"] = str(args.gif)
    return summary
