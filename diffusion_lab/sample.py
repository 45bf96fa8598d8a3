"""Draw digits from a trained model: `generate` for notebooks, and the command line `python -m diffusion_lab.sample`.

    python -m diffusion_lab.sample --checkpoint mnist-cond --n 2000 --labels cycle --seed 0 \\
        --out samples.npz --grid samples.png --evaluate

uses the model's best measured sampler, step count and guidance (BEST, from its model card) and writes `images`
(uint8, N x 28 x 28) and `labels` (int64, N) to an .npz file, plus `meta` (a JSON string
that records the checkpoint, its SHA-256, the sampler and every setting). `--checkpoint` takes a shipped
name (its SHA-256 is verified before a weight is read) or a path to a training checkpoint.
Introduced in chapter 06 (sampling); the style request (`--slant`, `--thickness`) is chapter 07's.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data, lora, music, video
from .checkpoint import SHIPPED, CheckpointError, load_checkpoint, resolve_checkpoint
from .conditioning import guided, style_code
from .denoiser import load_denoiser
from .samplers import SAMPLERS, check_known_region, sample_ddim, sample_repaint, with_known_region
from .utils import NUM_CLASSES, atomic_write_bytes, file_sha256, run_command, tile


def parse_labels(spec: str, n: int, seed: int = 0) -> torch.Tensor:
    """The class labels of n samples (int64, (n,)) from a --labels string (chapter 06).

    "cycle" -> 0, 1, ..., 9, 0, 1, ...; "random" -> uniform digits drawn with `seed`;
    "7" -> all sevens; "3,5,8" -> 3, 5, 8, 3, 5, 8, ...
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of samples must be a positive integer, got {n!r}")
    spec = str(spec).strip().lower()
    if spec == "cycle":
        return torch.arange(n, dtype=torch.long) % NUM_CLASSES
    if spec == "random":
        return torch.randint(0, NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(seed + 1))
    parts = [p.strip() for p in spec.split(",")]
    if not parts or not all(p.isdigit() and int(p) < NUM_CLASSES for p in parts):
        raise ValueError(f"--labels must be 'cycle', 'random', a digit 0-9 or a comma list such as 3,5,8; got {spec!r}")
    digits = torch.tensor([int(p) for p in parts], dtype=torch.long)
    return digits[torch.arange(n) % len(digits)]


def style_request(denoiser, slant: float | None = None, thickness: float | None = None, n: int = 1,
                  device=None) -> torch.Tensor | None:
    """The style code for a requested slant and stroke thickness (chapter 07), repeated n times, or None.

    An attribute left out is set to the training data's mean (a standardised 0): "average thickness, this slant".
    Codes more than 4 training standard deviations from the mean are refused: the model never saw such digits.
    """
    if slant is None and thickness is None:
        return None
    if not denoiser.style_mean:
        raise ValueError("this checkpoint was trained without style codes; drop --slant/--thickness "
                         "(train with --style 1 to use them)")
    mean, std = list(denoiser.style_mean), list(denoiser.style_std)
    attributes = torch.tensor([[mean[0] if slant is None else slant, mean[1] if thickness is None else thickness]])
    code = style_code(attributes, mean, std)
    z = code[0, :2]
    if (z.abs() > 4).any() or not torch.isfinite(z).all():
        ranges = ", ".join(f"{name} {m - 3 * s:.2f}..{m + 3 * s:.2f}"
                           for name, m, s in zip(data.STYLE_ATTRIBUTES, mean, std))
        raise ValueError(f"style request (slant={slant}, thickness={thickness}) is far outside the training data "
                         f"(about {ranges})")
    return code.expand(n, -1).to(device)


@torch.no_grad()
def generate(denoiser, labels: torch.Tensor | None = None, style: torch.Tensor | None = None, *, n: int | None = None,
             context: torch.Tensor | None = None, sampler=None, steps: int | None = None, guidance: float = 1.0,
             eta: float = 0.0, x_T: torch.Tensor | None = None, seed: int = 0, batch_size: int = 500,
             clip_x0: float | None = None, clamp: float | None = 1.0, known: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, resample: int = 1, callback=None, bar=None) -> torch.Tensor:
    """Sample N items of `denoiser.shape` from any Denoiser: float (N, *shape) on the CPU (chapter 06).

    What the model predicts, its schedule and its data shape come from the Denoiser itself (nothing is guessed).
    Codes: `labels` (N,), `style` (N, S+1), `context` (N, L, D); with none of them pass `n`. Classifier-free
    guidance with weight `guidance` (1 = plain conditional) goes through `conditioning.guided`.
    `sampler` is a name in samplers.SAMPLERS or any function with their signature; `eta` > 0 is DDIM's noise.
    By default, DPM-Solver++(2M) in 20 steps; a distilled student (chapter 13) takes DDIM in its own step count,
    with its guidance built in, and refuses any other sampler, step count or guidance.
    Starting noise: `x_T` (N, *shape), or drawn from one CPU generator seeded with `seed` before batching, so a
    deterministic sampler gives sample i the same result whatever the batch size. Stochastic samplers draw their
    per-step noise from a second generator, in batch order.
    Known regions (inpainting, harmonisation, video prediction): `known` (broadcast to (N, *shape)) is kept where
    `mask` is 1 and generated where it is 0; the known values come back exactly. resample=1 replaces the known
    region at every step (any sampler); resample=r > 1 runs RePaint's resampling (Lugmayr et al. 2022; ddpm only).
    `clip_x0` clamps each x0_hat (see `samplers.predict`); `clamp` clamps the result to [-clamp, clamp], the data
    range of every pixel-space model here (None for data without a fixed range, such as latents).
    `bar` is anything with .update(k) (a tqdm bar); `callback(step, x_t, x0_hat)` sees the first batch only.
    """
    sampler, steps = student_settings(denoiser, sampler, steps, guidance)
    run_sampler = _sampler(sampler, eta)
    shape = tuple(denoiser.shape)
    sizes = {len(c) for c in (labels, style, context, x_T) if c is not None} | ({n} if n is not None else set())
    if len(sizes) != 1:
        raise ValueError(f"generate(): give n or codes (and x_T) of one common length; got n={n}, "
                         + ", ".join(f"{name} {None if c is None else len(c)}" for name, c in
                                     (("labels", labels), ("style", style), ("context", context), ("x_T", x_T))))
    n = sizes.pop()
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of samples must be a positive integer, got {n!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
    if not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be a positive integer, got {resample!r}")
    if resample > 1 and (known is None or sampler != "ddpm"):
        raise ValueError("RePaint resampling (resample > 1) needs known=/mask= and sampler='ddpm'")
    if (known is None) != (mask is None):
        raise ValueError("known= and mask= go together: the values to keep, and where (1) to keep them")
    if x_T is None:
        x_T = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    elif tuple(x_T.shape[1:]) != shape:
        raise ValueError(f"x_T must have shape (N, {', '.join(map(str, shape))}), got {tuple(x_T.shape)}")
    if known is not None:
        known, mask = check_known_region(known, mask, (n, *shape))
    device = denoiser.device
    noise_generator = torch.Generator().manual_seed(seed + 2)
    out = []
    for start in range(0, n, batch_size):
        batch = slice(start, min(n, start + batch_size))
        on_device = lambda c: None if c is None else c[batch].to(device)  # noqa: E731
        model = guided(denoiser, on_device(labels), on_device(style), guidance, context=on_device(context))
        options = dict(generator=noise_generator, clip_x0=clip_x0, callback=callback if start == 0 else None)
        if known is None:
            x0 = run_sampler(model, denoiser.schedule, x_T[batch].to(device), steps, **options)
        elif resample > 1:
            x0 = sample_repaint(model, denoiser.schedule, x_T[batch].to(device), steps, known=on_device(known),
                                mask=on_device(mask), resample=resample, **options)
        else:
            model = with_known_region(model, denoiser.schedule, on_device(known), on_device(mask), noise_generator)
            x0 = run_sampler(model, denoiser.schedule, x_T[batch].to(device), steps, **options)
        if known is not None:  # the known region comes back exactly
            x0 = torch.where(on_device(mask).bool(), on_device(known).to(x0.dtype), x0)
        x0 = x0.float().cpu()
        out.append(x0.clamp(-clamp, clamp) if clamp is not None else x0)
        if bar is not None:
            bar.update(batch.stop - batch.start)
    return torch.cat(out)


def student_settings(denoiser, sampler, steps, guidance) -> tuple:
    """The sampler and step count to use: generate()'s general DEFAULTS (the command line's per-model best is BEST),
    or a distilled student's own."""
    own = getattr(denoiser, "steps", None)
    if own is None:
        return sampler or DEFAULTS["sampler"], DEFAULTS["steps"] if steps is None else steps
    if steps not in (None, own) or sampler not in (None, "ddim"):
        raise ValueError(f"this student was distilled to take exactly {own} DDIM steps; it cannot sample with "
                         f"{steps or own} steps of {sampler or 'ddim'} (load the student for that step count)")
    if guidance != 1.0:
        raise ValueError(f"guidance is built into this distilled student; sample it with guidance 1, not {guidance}")
    return "ddim", own


def _sampler(sampler, eta: float):
    """A sampler function from a name in SAMPLERS (binding DDIM's eta) or a function with their signature."""
    if not 0 <= eta < float("inf"):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if callable(sampler):
        if eta:
            raise ValueError("eta applies to the named 'ddim' sampler; bind it into your own sampler instead")
        return sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta is DDIM's noise level; the {sampler} sampler has none")
    return functools.partial(sample_ddim, eta=eta) if eta else SAMPLERS[sampler]


def save_png(path, grid: np.ndarray) -> None:
    from PIL import Image  # pillow comes with matplotlib

    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def evaluate(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
    """Conditional accuracy, and classifier-FID against N real test digits next to that of N real training digits
    against the same test digits (the FID a perfect model would get at this N)."""
    from . import metrics

    n = len(images)
    test_images, _ = data.mnist(train=False)
    train_images, _ = data.mnist(train=True)
    if n < 2:
        raise ValueError("--evaluate needs at least 2 samples for FID")
    g = torch.Generator().manual_seed(seed + 3)
    test = test_images[torch.randperm(len(test_images), generator=g)[: min(n, len(test_images))]]
    train = train_images[torch.randperm(len(train_images), generator=g)[:n]]
    result = {"classifier_fid": metrics.classifier_fid(images, test),
              "classifier_fid_real": metrics.classifier_fid(train, test), "n_real": len(test)}
    if labels is not None and (labels >= 0).all():
        result["conditional_accuracy"] = metrics.conditional_accuracy(images, labels)
    return result


# --- command line --------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    shipped = ", ".join(sorted(name for name, entry in SHIPPED.items() if entry.kind in ("diffusion", "distilled"))) or "none yet"
    p = argparse.ArgumentParser(
        prog="python -m diffusion_lab.sample",
        description="Draw digits from a trained diffusion model and save them as an .npz of uint8 images "
                    "(N, 28, 28) and int64 labels (N,).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="mnist-cond",
                   help=f"a shipped generative model (SHA-256 verified; shipped: {shipped}) or a .safetensors path")
    p.add_argument("--n", type=int, default=100, help="number of images")
    p.add_argument("--labels", default="cycle",
                   help="cycle (0..9 repeated), random, a digit, a comma list like 3,5,8, or none (unconditional model)")
    best = "; ".join(f"{name}: {v['sampler']}, {v['steps']} steps, guidance {v['guidance']:g}" for name, v in BEST.items())
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                   help=f"sampling algorithm. --sampler, --steps and --guidance default to a shipped model's best "
                        f"measured setting ({best}), to ddim at the file's default student for distilled students, "
                        f"and to {DEFAULTS['sampler']} otherwise")
    p.add_argument("--steps", type=int, default=None, help=f"sampler steps (otherwise: {DEFAULTS['steps']})")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale: 1 = plain conditional, 0 = unconditional, >1 = stronger "
                        f"(otherwise: {DEFAULTS['guidance']:g}; always 1 for a distilled student, whose guidance is built in)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 = deterministic, 1 = DDPM-like")
    p.add_argument("--clip-x0", type=float, default=None,
                   help="clamp the predicted clean image to [-C, C] at every step (default: no clamp)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the starting noise (and random labels)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--grid", default=None, help="also write the first --grid-n images as a PNG grid here")
    p.add_argument("--grid-n", type=int, default=100, help="how many images the grid shows (10 per row)")
    p.add_argument("--batch-size", type=int, default=500, help="images per network batch")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) or e.g. cpu, cuda:0")
    p.add_argument("--slant", type=float, default=None, help="style request: slant (shear; 0 = upright, >0 leans right)")
    p.add_argument("--thickness", type=float, default=None, help="style request: stroke width in pixels")
    # text-to-image (chapter 10, diffusion_lab.tiny_sd): prompts instead of --labels
    p.add_argument("--prompt", default=None, help="text-to-image models (tiny-sd): one prompt for all --n images, "
                   "e.g. 'a thick slanted seven'")
    p.add_argument("--prompts", default=None, help="text-to-image models: a text file, one prompt per line (cycled)")
    p.add_argument("--negative-prompt", default=None, help="text-to-image models: guidance pushes away from this")
    p.add_argument("--evaluate", action="store_true",
                   help="print conditional accuracy and classifier-FID vs real test digits at the same N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # editing (chapter 09): a LoRA style adapter merged into the base model
    p.add_argument("--lora", default=None,
                   help="a LoRA (shipped name such as typeset-lora, or a path) trained on exactly this --checkpoint")
    # music (chapter 11): a chorale model writes `rolls` int16 (N, 4, steps) of MIDI pitches, -1 = rest, S A T B
    p.add_argument("--soprano-from", choices=["test"], default=None,
                   help="chorale models: harmonise held-out Bach sopranos (alto, tenor, bass generated)")
    p.add_argument("--midi", default=None, help="chorale models: also write one MIDI file per sample into this folder")
    p.add_argument("--wav", default=None, help="chorale models: also write one WAV file per sample into this folder")
    p.add_argument("--candidates", type=int, default=None,
                   help="chorale models: rule-guided sampling, keeping the best of this many candidates at each "
                        "ancestral step (default 8; 1 = the model alone, with --sampler)")
    # video (chapter 12): a clip model writes `clips` uint8 (N, F, H, W)
    p.add_argument("--context-from", choices=["test"], default=None,
                   help="clip models: continue held-out Moving MNIST clips from their first --context-frames frames")
    p.add_argument("--context-frames", type=int, default=None,
                   help="clip models: how many frames of each held-out clip are given (default 4)")
    p.add_argument("--gif", default=None, help="clip models: also write one GIF per clip into this folder")
    # provenance (chapter 14): a Tree-Ring watermark in the starting noise
    p.add_argument("--watermark", default=None, metavar="KEY",
                   help="embed a Tree-Ring mark with this key (8-64 hex digits); find it with "
                        "python -m diffusion_lab.watermark detect")
    return p


DEFAULTS = {"sampler": "dpm++2m", "steps": 20, "guidance": 2.0}   # a model without a measured best setting
# A shipped model's best measured setting: the best row of its model card's measurement (checkpoints/<name>-eval.json;
# tests/test_shipped_quality.py holds the two to each other)
BEST = {"mnist-cond": {"sampler": "dpm++2m", "steps": 20, "guidance": 2.0}}


def fill_defaults(args) -> str | None:
    """Fill --sampler, --steps and --guidance left out: the best measured setting of a shipped model (BEST), the
    general DEFAULTS for any other, or, for a file of distilled students (chapter 13), DDIM at the file's default
    step count with guidance 1. Returns the checkpoint's kind (None if the file cannot be read; loading it then
    says why)."""
    defaults = dict(BEST.get(str(args.checkpoint), DEFAULTS))
    try:
        _, config = load_checkpoint(args.checkpoint)
    except CheckpointError:
        config = {}  # load_denoiser reports the problem with the file
    if config.get("kind") == "distilled":
        defaults = {"sampler": "ddim", "steps": config.get("default_steps", min(config.get("steps", [1]))),
                    "guidance": 1.0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return config.get("kind")


def _check_args(args) -> None:
    problems = []
    if args.n < 1:
        problems.append(f"--n must be at least 1, got {args.n}")
    if args.steps < 1:
        problems.append(f"--steps must be at least 1, got {args.steps}")
    if args.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.grid_n < 1:
        problems.append(f"--grid-n must be at least 1, got {args.grid_n}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        problems.append(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.eta < 0 or not math.isfinite(args.eta):
        problems.append(f"--eta must be >= 0, got {args.eta}")
    if args.clip_x0 is not None and not (args.clip_x0 > 0 and math.isfinite(args.clip_x0)):
        problems.append(f"--clip-x0 must be a positive number, got {args.clip_x0}")
    if args.eta > 0 and args.sampler != "ddim":
        problems.append("--eta applies to --sampler ddim only")
    if args.grid is not None and not args.grid.lower().endswith(".png"):
        problems.append(f"--grid must name a .png file, got {args.grid!r}")
    out = Path(args.out).expanduser()
    if not out.name or out.is_dir():
        problems.append(f"--out must name a file to write, got the folder {args.out!r}")
    elif not out.resolve().parent.is_dir():
        problems.append(f"the folder of --out does not exist: {out.resolve().parent}")
    if args.evaluate and args.n < 2:
        problems.append("--evaluate needs --n of at least 2 (FID compares two sets of samples)")
    if problems:
        raise ValueError("; ".join(problems))


def run(args) -> dict:
    distilled = fill_defaults(args) == "distilled"
    _check_args(args)
    path, expected_sha = resolve_checkpoint(args.checkpoint)
    denoiser = load_denoiser(args.checkpoint, device=args.device, steps=args.steps if distilled else None)
    if args.lora:  # chapter 09: refused unless the LoRA was trained on this very file (its SHA-256)
        denoiser = lora.with_lora(denoiser, args.lora, base_sha256=expected_sha or file_sha256(path))
    if video.is_clip_model(denoiser) or args.context_from or args.context_frames is not None or args.gif is not None:
        return video.sample_command(denoiser, args, path, expected_sha)  # chapter 12: clips of frames
    if args.watermark is not None and (music.is_chorale_model(denoiser) or denoiser.context_dim):
        raise ValueError(f"--watermark marks the starting noise of the digit models; {args.checkpoint} is not one")
    if music.is_chorale_model(denoiser) or args.soprano_from or {args.midi, args.wav, args.candidates} != {None}:
        return music.sample_command(denoiser, args, path, expected_sha)  # chapter 11: rolls of four voices
    if denoiser.context_dim or {args.prompt, args.prompts, args.negative_prompt} != {None}:  # chapter 10: prompts
        from . import tiny_sd
        return tiny_sd.sample_command(denoiser, args)
    if len(denoiser.shape) != 3 or denoiser.shape[0] != 1:
        raise ValueError(f"this command writes grey-scale images (1, H, W); {args.checkpoint} makes samples of shape "
                         f"{denoiser.shape}: sample it with diffusion_lab.sample.generate")
    if args.steps > denoiser.schedule.T:
        raise ValueError(f"--steps {args.steps} is more than the model's T={denoiser.schedule.T} diffusion steps")
    if args.labels.strip().lower() == "none":
        if denoiser.num_classes:
            raise ValueError("--labels none is for unconditional checkpoints; this one is class-conditional")
        labels = None
    elif not denoiser.num_classes:
        raise ValueError("this checkpoint is unconditional: use --labels none")
    else:
        labels = parse_labels(args.labels, args.n, args.seed)
    style = style_request(denoiser, args.slant, args.thickness, args.n)

    from .watermark import sample_noise  # chapter 14: the key's mark in x_T, or None
    x_T = sample_noise(denoiser, args)
    bar = tqdm(total=args.n, desc=f"{args.sampler} x{args.steps}", unit="img", disable=args.quiet, dynamic_ncols=True)
    start = time.perf_counter()
    images = generate(denoiser, labels, style, n=args.n, sampler=args.sampler, steps=args.steps,
                      guidance=args.guidance, eta=args.eta, seed=args.seed, batch_size=args.batch_size,
                      clip_x0=args.clip_x0, bar=bar, x_T=x_T)
    seconds = time.perf_counter() - start
    bar.close()
    images_uint8 = data.from_unit_range(images)[:, 0]                         # (N, H, W) uint8
    labels_out = labels if labels is not None else torch.full((args.n,), -1, dtype=torch.long)

    meta = {"checkpoint": str(args.checkpoint), "file": str(path),
            "sha256": expected_sha or file_sha256(path), "sha256_verified": expected_sha is not None,
            "sampler": args.sampler, "steps": args.steps, "guidance": args.guidance, "eta": args.eta,
            "clip_x0": args.clip_x0, "lora": args.lora,
            "seed": args.seed, "n": args.n, "labels": args.labels, "slant": args.slant, "thickness": args.thickness,
            "prediction": denoiser.prediction, "schedule": denoiser.schedule.name, "T": denoiser.schedule.T,
            "device": str(denoiser.device), "seconds": round(seconds, 3),
            "ms_per_image": round(1000 * seconds / args.n, 3), "watermarked": x_T is not None}
    buffer = io.BytesIO()
    np.savez(buffer, images=images_uint8.numpy(), labels=labels_out.numpy().astype(np.int64),
             meta=np.array(json.dumps(meta)))
    atomic_write_bytes(args.out, buffer.getvalue())
    summary = {"out": str(args.out), "n": args.n, "seconds": meta["seconds"], "ms_per_image": meta["ms_per_image"]}
    if args.grid:
        save_png(args.grid, tile(images_uint8[: args.grid_n].numpy(), ncol=10, fill=128))
        summary["grid"] = str(args.grid)
    if args.evaluate:
        summary.update({k: round(v, 5) if isinstance(v, float) else v
                        for k, v in evaluate(images_uint8, labels, args.seed).items()})
    return summary


def main(argv=None) -> int:
    return run_command(run, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
