"""Provenance: a Tree-Ring watermark (Wen et al. 2023) hidden in the starting noise x_T, and its detection.

Embedding: take the 2-D Fourier transform of the starting noise x_T, overwrite the frequencies on a band of rings
around the centre with a pattern drawn from the secret key (conjugate-symmetric, so x_T stays real), transform back, and sample as usual. Nothing is added to the image itself.
Detection: DDIM-invert the image with the unconditional model (Song et al. 2021, sec. 4.3) to recover an estimate
of x_T, take its Fourier transform, and correlate the ring band with the key's pattern. Without the mark the band
holds independent complex Gaussians of variance sigma^2 (estimated from the band itself), so the correlation

    z = sum_i Re(conj(k_i) y_i) / sqrt(sigma^2 / 2 * sum_i |k_i|^2)

is standard normal and p = P(Z >= z). Tree-Ring itself uses the distance sum |k_i - y_i|^2 and a non-central chi^2;
the correlation is the matched filter of the same model, with a plain Gaussian null. Only one of each pair of
conjugate frequencies is counted, so the terms are independent.

    python -m diffusion_lab.sample --checkpoint mnist-cond --n 100 --out s.npz --watermark 3f9a1c2e
    python -m diffusion_lab.watermark detect --in s.npz --key 3f9a1c2e --out p.json    # {"p_values": [...]}

Introduced in chapter 14 (trust).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from . import data
from .denoiser import load_denoiser
from .samplers import ddim_invert
from .utils import NUM_CLASSES, atomic_write_bytes, run_command

RADII = (6, 14)           # the rings (frequency units from the centre) that carry the key; the lower ones are left
                          # free: they decide the digit's shape, and fixing them costs variety (chapter 14)
DETECT_STEPS = 4          # DDIM inversion steps at detection: on mnist-cond-small few steps recover the band best
                          # (benchmarks/provenance.py measures 2 to 20)
ALPHA = 0.01              # the p-value below which an image counts as marked
KEY_PATTERN = re.compile(r"[0-9a-f]{8,64}")


def parse_key(key) -> str:
    """A watermark key: 8 to 64 hexadecimal digits (at least 32 secret bits), case-insensitive."""
    text = str(key).strip().lower()
    if not KEY_PATTERN.fullmatch(text):
        raise ValueError(f"a watermark key is 8 to 64 hexadecimal digits (0-9, a-f), e.g. 3f9a1c2e; got {key!r}")
    return text


def ring_band(size: tuple[int, int], radii: tuple[int, int] = RADII) -> tuple[torch.Tensor, torch.Tensor]:
    """(ring, half) over the centred spectrum of an H x W image: `ring` the integer ring of every frequency
    (-1 outside the band), `half` a mask keeping one frequency of each conjugate pair in the band."""
    h, w = size
    u = torch.arange(h) - h // 2
    v = torch.arange(w) - w // 2
    uu, vv = torch.meshgrid(u, v, indexing="ij")
    radius = (uu.double() ** 2 + vv.double() ** 2).sqrt().round().long()
    inside = (radius >= radii[0]) & (radius <= radii[1])
    ring = torch.where(inside, radius, torch.full_like(radius, -1))
    half = inside & ((vv > 0) | ((vv == 0) & (uu > 0)))
    return ring, half


def key_pattern(key: str, size: tuple[int, int] = (28, 28), radii: tuple[int, int] = RADII) -> torch.Tensor:
    """The key's centred spectrum (complex, H x W; zero outside the band): an independent complex Gaussian of
    variance H*W (the power white noise has at every frequency) on one frequency of each conjugate pair, and its
    conjugate on the other, so the pattern is the spectrum of a real image. Independent values (Tree-Ring's "Rand"
    pattern) make two keys nearly orthogonal: a wrong key correlates with a mark no more than with noise."""
    seed = int(hashlib.sha256(parse_key(key).encode()).hexdigest()[:15], 16)
    _, half = ring_band(size, radii)
    g = torch.Generator().manual_seed(seed)
    n = int(half.sum())
    values = torch.complex(torch.randn(n, generator=g, dtype=torch.float64),
                           torch.randn(n, generator=g, dtype=torch.float64)) * math.sqrt(size[0] * size[1] / 2)
    pattern = torch.zeros(size, dtype=torch.complex128)
    pattern[half] = values
    # the partner of centred index (i, j) is (h - i, w - j): frequency (-u, -v); the band never reaches Nyquist
    mirrored = torch.roll(torch.flip(pattern, dims=(0, 1)), shifts=(1 - size[0] % 2, 1 - size[1] % 2), dims=(0, 1))
    return pattern + mirrored.conj()


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))


def embed(x_T: torch.Tensor, key: str, radii: tuple[int, int] = RADII) -> torch.Tensor:
    """x_T (N, C, H, W) with the key written into the ring band of every channel's spectrum."""
    size = tuple(x_T.shape[-2:])
    pattern = key_pattern(key, size, radii)
    ring, _ = ring_band(size, radii)
    spectrum = torch.where(ring >= 0, pattern, _spectrum(x_T))
    x = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)))
    return x.real.to(x_T.dtype)     # the pattern is symmetric, so the imaginary part is rounding error


def watermarked_noise(n: int, key: str, shape: tuple, seed: int = 0) -> torch.Tensor:
    """The starting noise `sample.generate` would draw for `seed`, with the key embedded: (n, *shape)."""
    x_T = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    return embed(x_T, key)


def p_values(x_T_hat: torch.Tensor, key: str, radii: tuple[int, int] = RADII) -> torch.Tensor:
    """One p-value per recovered noise (N, C, H, W), all channels pooled: small = the key is present."""
    size = tuple(x_T_hat.shape[-2:])
    _, half = ring_band(size, radii)
    k = key_pattern(key, size, radii)[half]                            # (M,)
    y = _spectrum(x_T_hat)[..., half].flatten(1)                       # (N, C*M)
    k = k.repeat(y.shape[1] // len(k))
    sigma2 = (y.abs() ** 2).mean(1)                                    # per image, from the band itself
    z = (k.conj() * y).real.sum(1) / (sigma2 / 2 * (k.abs() ** 2).sum()).sqrt()
    return 0.5 * torch.special.erfc(z / math.sqrt(2))


def unconditional(denoiser):
    """The denoiser as a plain callable (x_t, t) with its null code: detection knows no label."""
    def model(x_t, t):
        labels = torch.full((len(x_t),), NUM_CLASSES, device=x_t.device) if denoiser.num_classes else None
        return denoiser(x_t, t, labels=labels)
    model.prediction = denoiser.prediction
    return model


@torch.no_grad()
def invert(denoiser, images: torch.Tensor, steps: int = DETECT_STEPS, batch_size: int = 500) -> torch.Tensor:
    """DDIM inversion of uint8 images (N, H, W) or floats (N, C, H, W) in [-1, 1]: the estimated x_T."""
    x0 = data.to_unit_range(images) if images.dtype == torch.uint8 else images.float()
    if x0.ndim == 3:
        x0 = x0.unsqueeze(1)
    model, device = unconditional(denoiser), denoiser.device
    return torch.cat([ddim_invert(model, denoiser.schedule, x0[i:i + batch_size].to(device), steps).cpu()
                      for i in range(0, len(x0), batch_size)])


def detect(denoiser, images: torch.Tensor, key: str, steps: int = DETECT_STEPS) -> torch.Tensor:
    """p-values (N,) that `images` carry `key`'s mark: invert, then correlate."""
    key = parse_key(key)
    return p_values(invert(denoiser, images, steps), key)


# --- attacks: what an image may go through between generation and detection ---------------------------------

def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(3 * sigma))
    kernel = torch.exp(-torch.arange(-r, r + 1).double() ** 2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).float()
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, r))
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1), padding=(r, 0))


def attack(images: torch.Tensor, name: str, strength: float, seed: int = 0) -> torch.Tensor:
    """uint8 images (N, H, W) after an attack: "noise" (Gaussian, std `strength` in grey levels 0-255), "blur"
    (Gaussian, std `strength` pixels), "shift" (moved right and down by `strength` whole pixels, zeros enter),
    "crop" (the central (H - 2 strength) square kept and resized back), "quantise" (`strength` grey levels)."""
    x = images.float().unsqueeze(1)
    s = strength
    if name == "noise":
        x = x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    elif name == "blur":
        x = _blur(x, s)
    elif name == "shift":
        k = int(s)
        x = torch.nn.functional.pad(x, (k, 0, k, 0))[..., : x.shape[-2], : x.shape[-1]]
    elif name == "crop":
        k, h = int(s), x.shape[-1]
        x = torch.nn.functional.interpolate(x[..., k:h - k, k:h - k], size=(h, h), mode="bilinear", align_corners=False)
    elif name == "quantise":
        step = 255 / (int(s) - 1)
        x = (x / step).round() * step
    else:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return x.round().clamp(0, 255).to(torch.uint8)[:, 0]


ATTACKS = ("noise", "blur", "shift", "crop", "quantise")


# --- command line -------------------------------------------------------------------------------------------

def detect_command(args) -> dict:
    key = parse_key(args.key)
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    if args.out is not None:
        out = Path(args.out).expanduser()
        if not out.name or out.is_dir() or not out.resolve().parent.is_dir():
            raise ValueError(f"--out must name a file in an existing folder, got {args.out!r}")
    denoiser = load_denoiser(args.checkpoint, device=args.device)
    if len(denoiser.shape) != 3 or denoiser.shape[0] != 1:
        raise ValueError(f"{args.checkpoint} makes samples of shape {denoiser.shape}; detection reads grey images")
    if args.steps > denoiser.schedule.T:
        raise ValueError(f"--steps {args.steps} is more than the model's T={denoiser.schedule.T}")
    images, _ = data.read_images(args.input, denoiser.shape[-2:])
    p = detect(denoiser, images, key, args.steps).tolist()
    if args.out is not None:
        atomic_write_bytes(args.out, (json.dumps({"p_values": p}) + "\n").encode())
    return {"p_values": p, "n": len(p), "alpha": ALPHA, "marked": sum(v < ALPHA for v in p)}


def sample_noise(denoiser, args) -> torch.Tensor | None:
    """The starting noise for `python -m diffusion_lab.sample --watermark KEY` (None without the option)."""
    if args.watermark is None:
        return None
    return watermarked_noise(args.n, parse_key(args.watermark), tuple(denoiser.shape), args.seed)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffusion_lab.watermark",
                                description="Tree-Ring watermarks: detect a key in sampled images.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("detect", help="print one p-value per image (small: the key's mark is present)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--in", dest="input", required=True, help="an .npz with uint8 'images' (N, 28, 28)")
    d.add_argument("--key", required=True, help="the key used at sampling: 8 to 64 hexadecimal digits")
    d.add_argument("--checkpoint", default="mnist-cond", help="the model that made the images (shipped name or path)")
    d.add_argument("--steps", type=int, default=DETECT_STEPS, help="DDIM inversion steps")
    d.add_argument("--out", default=None, help='also write {"p_values": [...]} (input order) as JSON here')
    d.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) or e.g. cpu")
    return p


def main(argv=None) -> int:
    return run_command(detect_command, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
