"""Chapter 10's tiny Stable Diffusion: latent diffusion (Rombach et al. 2022) on MNIST, from prompts.

The pipeline: prompt -> token ids (`text.tokenize`) -> PromptUNet (text encoder + UNet on C x 7 x 7 latents,
trained together through `training.fit`) -> latents drawn by `sample.generate` with classifier-free guidance
(the empty prompt is the null condition; a negative prompt can take its place) -> / scale factor -> the
autoencoder's decoder -> 28 x 28 digits.

    pipe = load_tiny_sd("tiny-sd")
    images = draw(pipe, ["a thick slanted seven"] * 8)          # (8, 1, 28, 28) in [-1, 1]

The command line goes through `python -m diffusion_lab.sample --checkpoint tiny-sd --prompt "..."`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import autoencoder, data, metrics, text
from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from .denoiser import Denoiser, load_denoiser, save_denoiser
from .sample import generate, save_png
from .schedules import NoiseSchedule
from .training import FitConfig, fit
from .utils import atomic_write_bytes, file_sha256, tile

UNET = dict(channels=[48], blocks_per_level=1, attention=True)  # one level: the 7 x 7 latent is the lowest resolution
TEXT = dict(width=48, layers=2)
DEFAULTS = dict(sampler="dpm++2m", steps=20, guidance=2.0)       # the CLI's defaults


@dataclass(frozen=True, eq=False)
class TinySD:
    denoiser: Denoiser              # the PromptUNet on scaled latents
    vae: autoencoder.Autoencoder    # its decoder turns latents into pixels
    scale: float                    # latents are multiplied by this for diffusion (divided before decoding)
    meta: dict                      # the shipped file's record: how it was made


PIXEL_UNET = dict(channels=[32, 48, 48], blocks_per_level=1, attention=True)  # 28 -> 14 -> 7, attention at 7 x 7


def build(latent_channels: int, schedule: str = "cosine", T: int = 1000) -> Denoiser:
    net = text.PromptUNet(unet=dict(in_channels=latent_channels, **UNET), **TEXT)
    return Denoiser(net, "v", NoiseSchedule.from_name(schedule, T), (latent_channels, 7, 7))


def build_pixel(schedule: str = "cosine", T: int = 1000) -> Denoiser:
    """The same text encoder and recipe on 1 x 28 x 28 pixels: the comparison for latent diffusion."""
    net = text.PromptUNet(unet=dict(in_channels=1, **PIXEL_UNET), **TEXT)
    return Denoiser(net, "v", NoiseSchedule.from_name(schedule, T), (1, 28, 28))


def forward_flops(net: nn.Module, shape: tuple) -> int:
    """Floating-point operations of one network evaluation on one sample of `shape` with an 8-word prompt,
    counted by torch's FlopCounterMode on the meta device (no arithmetic is done, so 512 x 512 costs nothing)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        twin = type(net)(**net.config)
        counter = FlopCounterMode(display=False)
        with counter:
            twin(torch.zeros(1, *shape), torch.zeros(1), context=torch.ones(1, text.MAX_WORDS, dtype=torch.long))
    return counter.get_total_flops()


def decoder_flops(vae: autoencoder.Autoencoder, latent_shape: tuple) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        twin = autoencoder.Autoencoder(**vae.config)
        counter = FlopCounterMode(display=False)
        with counter:
            twin.decode(torch.zeros(1, *latent_shape))
    return counter.get_total_flops()


def prompt_batches(x0: torch.Tensor, labels: torch.Tensor, bins: torch.Tensor, held_out=None, transform=None):
    """A batch source for `fit`: rows of x0 (scaled latents, or uint8 images with transform=data.to_unit_range)
    with a fresh random caption for every draw (the captions come from the fit's generator, so a resumed run
    draws the same ones)."""

    held_out = text.HELD_OUT if held_out is None else tuple(tuple(h) for h in held_out)

    def draw(generator: torch.Generator, size: int) -> dict:
        idx = torch.randint(0, len(x0), (size,), generator=generator)
        u = torch.rand(size, 8, generator=generator).tolist()
        captions = [text.caption(int(labels[i]), dict(zip(text.ATTRIBUTES, bins[i].tolist())), u[k], held_out)
                    for k, i in enumerate(idx.tolist())]
        return {"x0": transform(x0[idx]) if transform else x0[idx], "context": text.tokenize(captions)}

    return draw


def training_data(vae: autoencoder.Autoencoder, scale: float):
    """(scaled latents (60000, C, 7, 7), labels, attribute bins (60000, 2)) of the MNIST training digits."""
    images, labels = data.mnist(train=True)
    z = autoencoder.latents(vae, images) * scale
    bins = text.attribute_bins(data.style_attributes(images), labels)
    return z, labels, bins


def train_tiny_sd(vae: str = "mnist-vae", *, steps: int = 1300, batch_size: int = 128, max_minutes: float = 0.0,
                  held_out=None, checkpoint=None, log=print, progress: bool = False):
    """Train the text encoder and the latent UNet together (resumable through `checkpoint`). Returns fit's result.
    `held_out`: (digit, attribute, end) combinations never captioned (default text.HELD_OUT)."""
    model, scale = autoencoder.load_autoencoder(vae)
    z, labels, bins = training_data(model, scale)
    denoiser = build(model.latent_channels)
    config = FitConfig(steps=steps, batch_size=batch_size, lr=2e-3, warmup=100, p_uncond=0.1, p_uncond_style=0.0,
                       ema_decay=0.999, ckpt_every=100, log_every=100, max_minutes=max_minutes)

    def report(step, _):
        log(f"step {step}/{steps}")

    return fit(denoiser, prompt_batches(z, labels, bins, held_out), config, checkpoint=checkpoint, progress=progress,
               callback=report)


def save_tiny_sd(path, denoiser: Denoiser, vae: str = "mnist-vae", **record) -> str:
    """The shipped file: the PromptUNet (EMA weights) and its contract, plus which autoencoder decodes it (its name,
    SHA-256 and scale factor) and the held-out combinations. Returns the file's SHA-256."""
    vae_path, _ = resolve_checkpoint(vae)
    _, scale = autoencoder.load_autoencoder(vae)
    return save_denoiser(path, denoiser, autoencoder={"name": str(vae), "sha256": file_sha256(vae_path),
                                                      "scale_factor": scale},
                         held_out=[list(h) for h in text.HELD_OUT], **record)


def load_tiny_sd(name_or_path: str = "tiny-sd", device="cpu") -> TinySD:
    denoiser = load_denoiser(name_or_path, device=device)
    _, meta = load_checkpoint(name_or_path)
    if not isinstance(denoiser.net, text.PromptUNet) or "autoencoder" not in meta:
        raise CheckpointError(f"{name_or_path} is not a text-to-image model (it takes no prompts)")
    info = meta["autoencoder"]
    vae_path, _ = resolve_checkpoint(info["name"])
    if file_sha256(vae_path) != info["sha256"]:
        raise CheckpointError(f"{name_or_path} was trained on the autoencoder {info['name']} with SHA-256 "
                              f"{info['sha256'][:12]}..., but that file has changed")
    vae, scale = autoencoder.load_autoencoder(info["name"])
    return TinySD(denoiser, vae.to(denoiser.device), scale, meta)


class NegativePrompt(nn.Module):
    """Wrap a PromptUNet so that the null prompt means the negative prompt: classifier-free guidance then pushes
    away from the negative prompt instead of from "anything"."""

    def __init__(self, net: text.PromptUNet, negative_ids: torch.Tensor):
        super().__init__()
        self.net, self.context_dim = net, net.context_dim
        self.register_buffer("negative_ids", negative_ids, persistent=False)

    def forward(self, x_t, t, labels=None, style=None, context=None):
        if context is not None:
            null = ~context.ne(0).any(1)
            context = torch.where(null[:, None], self.negative_ids.to(context.device).expand_as(context), context)
        return self.net(x_t, t, labels, style, context)


@torch.no_grad()
def decode(pipe: TinySD, latents: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Scaled latents (N, C, 7, 7) -> images (N, 1, 28, 28) in [-1, 1]."""
    z = latents.to(next(pipe.vae.parameters()).device) / pipe.scale
    return torch.cat([pipe.vae.decode(z[i : i + batch_size]) for i in range(0, len(z), batch_size)]).clamp(-1, 1).cpu()


def draw(pipe: TinySD, prompts: list[str], negative: str | None = None, *, guidance: float = DEFAULTS["guidance"],
         steps: int = DEFAULTS["steps"], sampler: str = DEFAULTS["sampler"], seed: int = 0, batch_size: int = 500,
         return_latents: bool = False, **options):
    """Digits for `prompts` (one image each): (N, 1, 28, 28) in [-1, 1] (and the latents if asked)."""
    ids = text.tokenize(prompts)
    denoiser = pipe.denoiser
    if negative:
        negative_ids = text.tokenize(negative)
        if not ids.ne(0).any(1).all():
            raise ValueError("a negative prompt needs a non-empty prompt to push towards")
        denoiser = dataclasses.replace(denoiser, net=NegativePrompt(denoiser.net, negative_ids[0]))
    z = generate(denoiser, context=ids, sampler=sampler, steps=steps, guidance=guidance, seed=seed,
                 batch_size=batch_size, clamp=None, **options)
    images = decode(pipe, z)
    return (images, z) if return_latents else images


@torch.no_grad()
def attention_maps(pipe: TinySD, prompt: str, t: int = 500, seed: int = 0, x_t: torch.Tensor | None = None):
    """How much each word's token is attended to by each latent position, averaged over heads and the UNet's
    cross-attention layers: (words, 7, 7), for one noisy latent at step t. Returns (words, maps)."""
    from .unet import CrossAttention

    net = pipe.denoiser.net
    ids = text.tokenize(prompt)
    n_words = int(ids.ne(0).sum())
    maps = []

    def hook(module, inputs, _):
        x, context = inputs
        B, C, H, W = x.shape
        d = C // module.heads
        q = module.q(module.norm(x)).reshape(B, module.heads, d, H * W).transpose(-1, -2)   # (B, heads, N, d)
        k = module.kv(context)[..., :C].reshape(B, -1, module.heads, d).transpose(1, 2)    # (B, heads, L, d)
        weights = (q @ k.transpose(-1, -2) / d ** 0.5).softmax(-1)                          # (B, heads, N, L)
        maps.append(weights.mean(1)[0].T.reshape(-1, H, W))                                  # (L, H, W)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, CrossAttention)]
    try:
        if x_t is None:
            x_t = torch.randn(1, *pipe.denoiser.shape, generator=torch.Generator().manual_seed(seed))
        net(x_t, torch.tensor([t]), context=ids)
    finally:
        for h in handles:
            h.remove()
    return text.words(prompt), torch.stack(maps).mean(0)[:n_words]


# --- measurements ----------------------------------------------------------------------------------------

def digit_prompts(n: int, seed: int = 0) -> list[str]:
    """n plain digit prompts in the CLI's style ("a seven", "7", "the digit 3"), digits cycling 0..9."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 8, generator=g).tolist()
    return [text.caption(d % 10, {"slant": 0, "thickness": 0}, u[d]) for d in range(n)]


def prompt_accuracy(pipe: TinySD, prompts: list[str], seed: int = 0, **options) -> float:
    """How often the repository classifier reads the digit each prompt names."""
    labels = torch.tensor([text.named_digit(p) for p in prompts])
    if (labels < 0).any():
        raise ValueError("every prompt must name exactly one digit")
    return metrics.conditional_accuracy(draw(pipe, prompts, seed=seed, **options), labels)


def attribute_effect(pipe: TinySD, digit: int, attribute: str, n: int = 100, seed: int = 0, **options) -> dict:
    """Draw n digits for each end of one attribute ("thin seven" / "thick seven") and measure the attribute.
    effect = (mean for the high word - mean for the low word) / the real digits' std of that attribute;
    r = correlation of the requested end (+1 / -1) with the measured value; accuracy over both prompts."""
    low, high = (words[0] for words in text.ATTRIBUTE_WORDS[attribute])
    number = text.DIGIT_WORDS[digit][0]
    article = lambda word: "an" if word in text.AN_WORDS else "a"  # noqa: E731
    prompts = [f"{article(low)} {low} {number}"] * n + [f"{article(high)} {high} {number}"] * n
    images = draw(pipe, prompts, seed=seed, **options)
    measured = data.style_attributes(images)[:, text.ATTRIBUTES.index(attribute)]
    real_images, real_labels = data.mnist(train=False)
    real = data.style_attributes(real_images[real_labels == digit])[:, text.ATTRIBUTES.index(attribute)]
    requested = torch.tensor([-1.0] * n + [1.0] * n)
    r = torch.corrcoef(torch.stack([requested, measured]))[0, 1].item()
    effect = ((measured[n:].mean() - measured[:n].mean()) / real.std()).item()
    accuracy = metrics.conditional_accuracy(images, torch.full((2 * n,), digit))
    return {"digit": digit, "attribute": attribute, "prompts": [prompts[0], prompts[-1]], "effect": effect, "r": r,
            "accuracy": accuracy, "held_out": (digit, attribute, 1) in text.HELD_OUT}


def compositional(pipe: TinySD, n: int = 100, seed: int = 0, **options) -> list[dict]:
    """attribute_effect for every digit and both attributes: the held-out pairs against the seen ones."""
    return [attribute_effect(pipe, d, a, n, seed, **options) for a in text.ATTRIBUTES for d in range(10)]


# --- the command line (python -m diffusion_lab.sample --checkpoint tiny-sd --prompt ...) ---------------------

def read_prompts(args) -> list[str]:
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("a text-to-image model draws from prompts: pass exactly one of --prompt TEXT or --prompts FILE")
    if args.prompt is not None:
        return [args.prompt] * args.n
    path = Path(args.prompts)
    if not path.is_file():
        raise ValueError(f"--prompts file {args.prompts} does not exist")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"--prompts file {args.prompts} is not UTF-8 text") from None
    if not lines:
        raise ValueError(f"--prompts file {args.prompts} holds no prompt (one prompt per line)")
    return [lines[i % len(lines)] for i in range(args.n)]


def sample_command(denoiser: Denoiser, args) -> dict:
    """`python -m diffusion_lab.sample` for a text-to-image checkpoint: writes images (N, 28, 28) uint8, prompts,
    labels (the digit each prompt names, or -1) and meta to --out."""
    if not isinstance(denoiser.net, text.PromptUNet):
        raise ValueError(f"{args.checkpoint} takes no prompts; --prompt, --prompts and --negative-prompt are for "
                         "text-to-image checkpoints such as tiny-sd")
    if args.slant is not None or args.thickness is not None:
        raise ValueError("a text-to-image model takes its style from the prompt (e.g. 'a thick slanted seven'), "
                         "not --slant/--thickness")
    if args.steps > denoiser.schedule.T:
        raise ValueError(f"--steps {args.steps} is more than the model's T={denoiser.schedule.T} diffusion steps")
    prompts = read_prompts(args)
    text.tokenize(prompts + ([args.negative_prompt] if args.negative_prompt else []))  # vocabulary errors first
    pipe = load_tiny_sd(args.checkpoint, device=args.device)
    start = time.perf_counter()
    images = draw(pipe, prompts, args.negative_prompt, guidance=args.guidance, steps=args.steps, sampler=args.sampler,
                  seed=args.seed, batch_size=args.batch_size, eta=args.eta, clip_x0=args.clip_x0)
    seconds = time.perf_counter() - start
    images_uint8 = data.from_unit_range(images)[:, 0]
    labels = torch.tensor([text.named_digit(p) for p in prompts])
    path, sha = resolve_checkpoint(args.checkpoint)
    meta = {"checkpoint": str(args.checkpoint), "sha256": sha or file_sha256(path), "sampler": args.sampler,
            "steps": args.steps, "guidance": args.guidance, "negative_prompt": args.negative_prompt,
            "seed": args.seed, "n": args.n, "autoencoder": pipe.meta["autoencoder"], "seconds": round(seconds, 3)}
    buffer = io.BytesIO()
    np.savez(buffer, images=images_uint8.numpy(), prompts=np.array(prompts), labels=labels.numpy(),
             meta=np.array(json.dumps(meta)))
    atomic_write_bytes(args.out, buffer.getvalue())
    summary = {"out": str(args.out), "n": args.n, "seconds": meta["seconds"]}
    if args.grid:
        save_png(args.grid, tile(images_uint8[: args.grid_n].numpy(), ncol=10, fill=128))
        summary["grid"] = str(args.grid)
    if args.evaluate:
        named = labels >= 0
        if named.any():
            summary["conditional_accuracy"] = round(metrics.conditional_accuracy(images[named], labels[named]), 5)
    return summary


# --- the model cards' numbers (python tools/train_tiny_sd.py card) -------------------------------------------

def model_card_numbers(parts=("vae", "cli", "guidance", "compositional"), n_compositional: int = 60,
                       guidances=(1.0, 2.0, 3.0, 5.0)) -> dict:
    """The numbers the two model cards quote, measured with the shipped files: {"mnist-vae": ..., "tiny-sd": ...}
    holding the requested parts (the parts are independent, so they can run as separate processes)."""
    import contextlib
    import tempfile

    from . import sample as sample_cli

    out = {"mnist-vae": {}, "tiny-sd": {}}
    if "vae" in parts:
        vae, scale = autoencoder.load_autoencoder("mnist-vae")
        test_images, test_labels = data.mnist(train=False)
        out["mnist-vae"] = {**autoencoder.evaluate(vae, test_images, test_labels), "scale_factor": scale,
                            "classifier_accuracy_real": metrics.conditional_accuracy(test_images, test_labels)}
    prompts_file = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny-sd-prompts.txt"
    if "cli" in parts:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()) as printed:
            sample_cli.main(["--checkpoint", "tiny-sd", "--prompts", str(prompts_file), "--n", "500", "--seed", "0",
                             "--out", str(Path(tmp) / "s.npz"), "--evaluate", "--quiet"])
        out["tiny-sd"]["cli_accuracy_500"] = json.loads(printed.getvalue().strip().splitlines()[-1])[
            "conditional_accuracy"]
        out["tiny-sd"]["cli_defaults"] = DEFAULTS
    pipe = load_tiny_sd("tiny-sd")
    if "guidance" in parts:
        lines = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        prompts = [lines[i % len(lines)] for i in range(500)]
        out["tiny-sd"]["accuracy_by_guidance_500"] = {str(g): prompt_accuracy(pipe, prompts, seed=1, guidance=g)
                                                      for g in guidances}
    if "compositional" in parts:
        out["tiny-sd"]["compositional"] = compositional(pipe, n_compositional)
    return out
