"""Editing real digits with a trained diffusion model: SDEdit, inpainting and DDIM inversion (chapter 09).

- `sdedit`: noise an image to the level t0 = strength * T, then denoise it from there (Meng et al. 2022). Low
  strength keeps the picture; high strength keeps little but the class you ask for.
- `inpaint`: keep the pixels where `mask` is 1 and generate the rest, by replacement at every step or by RePaint's
  resampling (Lugmayr et al. 2022); both are `sample.generate(known=, mask=)`.
- `invert` / `regenerate`: run deterministic DDIM backwards to the noise x_T that DDIM maps back to the image
  (Song et al. 2021), then sample from that x_T with the same or another label (3 -> 8, same handwriting).

The command line reads and writes `images` as uint8 N x 28 x 28 (.npz):

    python -m diffusion_lab.edit sdedit --checkpoint mnist-cond-small --lora typeset-lora --in digits.npz \\
        --strength 0.6 --out edited.npz
    python -m diffusion_lab.edit inpaint --in digits.npz --mask left --out filled.npz [--resample 5]
    python -m diffusion_lab.edit invert --in digits.npz --target 8 --out eights.npz
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import data, lora, metrics
from .checkpoint import resolve_checkpoint
from .conditioning import guided
from .denoiser import load_denoiser
from .sample import generate, parse_labels
from .samplers import ddim_invert
from .schedules import NoiseSchedule, q_sample
from .utils import IMAGE_SIZE, atomic_write_bytes, file_sha256, run_command

MASKS = ("left", "right", "top", "bottom", "square")


def strength_step(schedule: NoiseSchedule, strength: float) -> int:
    """The integer step t0 in 0..T-1 that SDEdit noises to: strength 1 is the noisiest step T-1."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    return max(0, math.ceil(strength * schedule.T) - 1)


def truncated(denoiser, t0: int):
    """The same denoiser with its schedule cut after step t0: its first t0+1 alpha_bars are unchanged, so any
    sampler run on it starts at level t0 instead of T-1. This is how SDEdit reuses every sampler as it is."""
    return dataclasses.replace(denoiser, schedule=NoiseSchedule(denoiser.schedule.betas[: t0 + 1],
                                                                name=denoiser.schedule.name))


def sdedit(denoiser, x0: torch.Tensor, labels: torch.Tensor | None, strength: float, *, steps: int = 20,
           sampler: str = "ddim", guidance: float = 1.0, seed: int = 0, callback=None) -> torch.Tensor:
    """SDEdit (Meng et al. 2022, Algorithm 1 with one repeat): x_t0 ~ q(x_t0 | x0) at t0 = strength * T, then
    `steps` sampler steps from t0 to a clean image. x0: float (N, 1, 28, 28) in [-1, 1]; returns the same shape."""
    t0 = strength_step(denoiser.schedule, strength)
    g = torch.Generator().manual_seed(seed)
    x_t0 = q_sample(denoiser.schedule, x0.float(), torch.full((len(x0),), t0), generator=g)
    return generate(truncated(denoiser, t0), labels, n=len(x0), x_T=x_t0, sampler=sampler,
                    steps=min(steps, t0 + 1), guidance=guidance, seed=seed + 1, callback=callback)


def half_mask(kind: str, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A (1, 1, size, size) 0/1 mask, 1 = known: keep the left/right/top/bottom half, or all but a centre square."""
    mask = torch.zeros(1, 1, size, size)
    h = size // 2
    if kind == "left":
        mask[..., :, :h] = 1
    elif kind == "right":
        mask[..., :, h:] = 1
    elif kind == "top":
        mask[..., :h, :] = 1
    elif kind == "bottom":
        mask[..., h:, :] = 1
    elif kind == "square":
        mask[:] = 1
        mask[..., h - 6 : h + 6, h - 6 : h + 6] = 0  # a 12 x 12 hole over the digit's middle
    else:
        raise ValueError(f"unknown mask {kind!r}; choose one of {', '.join(MASKS)} or an .npz with a `mask` array")
    return mask


def inpaint(denoiser, x0: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None, *, resample: int = 1,
            steps: int = 50, guidance: float = 1.0, seed: int = 0, callback=None) -> torch.Tensor:
    """Keep x0 where mask is 1 and generate the rest. resample=1: replacement at every step (DDIM);
    resample=r > 1: RePaint with r tries per level (ancestral DDPM steps)."""
    return generate(denoiser, labels, n=len(x0), known=x0.float(), mask=mask, resample=resample,
                    sampler="ddpm" if resample > 1 else "ddim", steps=steps, guidance=guidance, seed=seed,
                    callback=callback)


def invert(denoiser, x0: torch.Tensor, labels: torch.Tensor | None, *, steps: int = 50, guidance: float = 1.0,
           callback=None) -> torch.Tensor:
    """The x_T from which deterministic DDIM (`steps` steps, this guidance) draws x0 again, approximately."""
    model = guided(denoiser, None if labels is None else labels.to(denoiser.device), guidance=guidance)
    return ddim_invert(model, denoiser.schedule, x0.float().to(denoiser.device), steps, callback=callback).cpu()


def regenerate(denoiser, x_T: torch.Tensor, labels: torch.Tensor | None, *, steps: int = 50,
               guidance: float = 1.0, callback=None) -> torch.Tensor:
    """Deterministic DDIM from x_T: with the inverting labels a reconstruction, with others an edit."""
    return generate(denoiser, labels, n=len(x_T), x_T=x_T, sampler="ddim", steps=steps, guidance=guidance,
                    callback=callback)


# --- command line --------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffusion_lab.edit",
        description="Edit digits with a diffusion model: sdedit (noise to a strength, denoise), inpaint (fill the "
                    "unknown part of each image) or invert (DDIM inversion, then regenerate with --target labels). "
                    "Reads and writes `images`, uint8 (N, 28, 28), in .npz files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", choices=("sdedit", "inpaint", "invert"), help="what to do")
    p.add_argument("--checkpoint", default="mnist-cond", help="a shipped diffusion model or a .safetensors path")
    p.add_argument("--lora", default=None, help="a LoRA (shipped name or path) made for exactly this base model")
    p.add_argument("--in", dest="inp", required=True, help="an .npz with `images` uint8 (N, 28, 28) (and `labels`)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--labels", default="auto",
                   help="the class of each input: auto (the file's `labels`, else the MNIST classifier's reading), "
                        "or as in diffusion_lab.sample: a digit, a comma list, cycle")
    p.add_argument("--strength", type=float, default=0.5, help="sdedit: noise level t0/T in (0, 1]")
    p.add_argument("--mask", default="left",
                   help=f"inpaint: the known part, one of {', '.join(MASKS)}, or an .npz with `mask` (N or 1, 28, 28), "
                        "1 = keep")
    p.add_argument("--resample", type=int, default=1, help="inpaint: 1 = replacement (DDIM), r > 1 = RePaint, r tries")
    p.add_argument("--target", default=None, help="invert: the labels to regenerate with (default: the input's: "
                                                  "a reconstruction)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) or e.g. cpu")
    return p


def _labels(spec: str, file_labels, images: torch.Tensor, seed: int) -> torch.Tensor:
    n = len(images)
    if spec.strip().lower() != "auto":
        return parse_labels(spec, n, seed)
    if file_labels is not None:
        if file_labels.shape != (n,) or not np.issubdtype(file_labels.dtype, np.integer) or \
                (file_labels.min() < 0 or file_labels.max() > 9):
            raise ValueError(f"--in `labels` must be N = {n} digits 0-9; give --labels instead")
        return torch.from_numpy(file_labels.astype(np.int64))
    return metrics.predict(images)


def _mask(spec: str, n: int) -> torch.Tensor:
    if spec in MASKS:
        return half_mask(spec)
    if not spec.endswith(".npz"):
        raise ValueError(f"--mask must be one of {', '.join(MASKS)} or an .npz file, got {spec!r}")
    try:
        with np.load(spec, allow_pickle=False) as f:
            mask = f["mask"]
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot read the mask file {spec}: {type(err).__name__}: {err}") from None
    if mask.ndim != 3 or mask.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(mask) not in (1, n):
        raise ValueError(f"the mask has shape {mask.shape}, which does not match the images ({n}, {IMAGE_SIZE}, "
                         f"{IMAGE_SIZE}): give (N, 28, 28) or (1, 28, 28)")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("the mask must hold only 0 (generate) and 1 (keep)")
    return torch.from_numpy(mask.astype(np.float32))[:, None]


def _check_args(args) -> None:
    problems = []
    if not 0 < args.strength <= 1:  # also refuses nan
        problems.append(f"--strength must lie in (0, 1], got {args.strength}")
    if args.steps < 1:
        problems.append(f"--steps must be at least 1, got {args.steps}")
    if args.resample < 1:
        problems.append(f"--resample must be at least 1, got {args.resample}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        problems.append(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if not 0 <= args.seed < 2**63:
        problems.append(f"--seed must lie in 0 .. 2**63-1, got {args.seed}")
    out = Path(args.out).expanduser()
    if not out.name or out.is_dir() or out.suffix != ".npz":
        problems.append(f"--out must name an .npz file to write, got {args.out!r}")
    elif not out.resolve().parent.is_dir():
        problems.append(f"the folder of --out does not exist: {out.resolve().parent}")
    if problems:
        raise ValueError("; ".join(problems))


def load_model(checkpoint: str, lora_file: str | None, device="auto"):
    """The base denoiser, with the LoRA merged in if one is given (refused unless made for this exact base file)."""
    path, expected_sha = resolve_checkpoint(checkpoint)
    denoiser = load_denoiser(checkpoint, device=device)
    if tuple(denoiser.shape) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{checkpoint} makes samples of shape {denoiser.shape}; these commands edit (1, 28, 28) digits")
    sha = expected_sha or file_sha256(path)
    if lora_file:
        denoiser = lora.with_lora(denoiser, lora_file, base_sha256=sha)
    return denoiser, sha


def run(args) -> dict:
    _check_args(args)
    images, file_labels = data.read_images(args.inp)
    denoiser, sha = load_model(args.checkpoint, args.lora, args.device)
    if not denoiser.num_classes:
        raise ValueError(f"{args.checkpoint} is unconditional; these commands need a class-conditional model")
    if args.steps > denoiser.schedule.T:
        raise ValueError(f"--steps {args.steps} is more than the model's T={denoiser.schedule.T}")
    labels = _labels(args.labels, file_labels, images, args.seed)
    x0 = data.to_unit_range(images)
    start = time.perf_counter()
    extra = {}
    if args.command == "sdedit":
        out = sdedit(denoiser, x0, labels, args.strength, steps=args.steps, guidance=args.guidance, seed=args.seed)
    elif args.command == "inpaint":
        mask = _mask(args.mask, len(images))
        out = inpaint(denoiser, x0, mask, labels, resample=args.resample, steps=args.steps, guidance=args.guidance,
                      seed=args.seed)
        extra["mask"] = mask.expand(len(images), -1, -1, -1)[:, 0].numpy().astype(np.uint8)
    else:
        x_T = invert(denoiser, x0, labels, steps=args.steps, guidance=args.guidance)
        target = labels if args.target is None else parse_labels(args.target, len(images), args.seed)
        out = regenerate(denoiser, x_T, target, steps=args.steps, guidance=args.guidance)
        extra["x_T"], extra["source_labels"], labels = x_T[:, 0].numpy(), labels.numpy(), target
    seconds = time.perf_counter() - start
    edited = data.from_unit_range(out)[:, 0]
    meta = {"command": args.command, "checkpoint": str(args.checkpoint), "sha256": sha, "lora": args.lora,
            "strength": args.strength if args.command == "sdedit" else None, "steps": args.steps,
            "guidance": args.guidance, "seed": args.seed, "n": len(images), "seconds": round(seconds, 3)}
    buffer = io.BytesIO()
    np.savez(buffer, images=edited.numpy(), labels=labels.numpy().astype(np.int64), meta=np.array(json.dumps(meta)),
             **extra)
    atomic_write_bytes(args.out, buffer.getvalue())
    return {"out": str(args.out), "command": args.command, "n": len(images), "seconds": meta["seconds"]}


def main(argv=None) -> int:
    return run_command(run, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
