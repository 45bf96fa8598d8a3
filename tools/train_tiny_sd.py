"""Make chapter 10's two shipped models on one CPU thread, resumably (re-run the same command after a kill).

    python tools/train_tiny_sd.py vae    # sweep C, train the autoencoder -> checkpoints/mnist-vae.safetensors
    python tools/train_tiny_sd.py sd     # latent diffusion + text encoder -> checkpoints/tiny-sd.safetensors
    python tools/train_tiny_sd.py card   # measure the numbers the model cards quote (prints JSON)

Training runs live in runs/ (resumable); the shipped files hold only what sampling needs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusion_lab import autoencoder, data  # noqa: E402

SWEEP_C = (2, 4, 8)
SWEEP_STEPS, VAE_STEPS, VAE_BATCH = 250, 1200, 64


def log(message: str) -> None:
    print(message, flush=True)


def stage_vae(out: Path) -> None:
    images, _ = data.mnist(train=True)
    test_images, test_labels = data.mnist(train=False)
    held = slice(0, 2000)  # the first 2,000 test digits judge the sweep
    sweep = []
    for c in SWEEP_C:
        model = autoencoder.Autoencoder(c)
        autoencoder.train_autoencoder(model, images, steps=SWEEP_STEPS, batch_size=VAE_BATCH,
                                      checkpoint=ROOT / f"runs/vae-sweep-C{c}.safetensors", log=log)
        sweep.append({"latent_channels": c, **autoencoder.evaluate(model, test_images[held], test_labels[held])})
        log(json.dumps(sweep[-1]))
    best = max(s["classifier_accuracy"] for s in sweep)
    chosen = min(s["latent_channels"] for s in sweep if s["classifier_accuracy"] >= best - 0.01)
    log(f"chosen C = {chosen}")
    model = autoencoder.Autoencoder(chosen)
    record = autoencoder.train_autoencoder(model, images, steps=VAE_STEPS, batch_size=VAE_BATCH,
                                           checkpoint=ROOT / "runs/vae.safetensors", log=log)
    z = autoencoder.latents(model, images[:10_000])
    scale = autoencoder.scale_factor(z)
    quality = autoencoder.evaluate(model, test_images, test_labels)
    sha = autoencoder.save_autoencoder(out, model, scale, training=record, sweep=sweep,
                                       sweep_rule="smallest C within 1 point of the best sweep accuracy",
                                       test=quality, command="python tools/train_tiny_sd.py vae")
    log(json.dumps({"scale_factor": scale, **quality, "sha256": sha}))


def stage_sd(out: Path, vae: str, minutes: float) -> None:
    from diffusion_lab import tiny_sd

    result = tiny_sd.train_tiny_sd(vae, checkpoint=ROOT / "runs/tiny-sd.safetensors", max_minutes=minutes, log=log)
    training = {"steps": result.step, "batch_size": 128, "train_seconds": round(result.elapsed_s, 1),
                "final_loss": sum(result.losses[-100:]) / len(result.losses[-100:])}
    sha = tiny_sd.save_tiny_sd(out, result.denoiser, vae, training=training,
                               command="python tools/train_tiny_sd.py sd")
    log(json.dumps({"sha256": sha}))


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("vae", "sd", "card"))
    p.add_argument("--vae", default="mnist-vae", help="the autoencoder the latent model is trained on")
    p.add_argument("--minutes", type=float, default=0.0, help="stop the latent model's training after this many "
                   "wall-clock minutes (0: run all its steps); a re-run resumes")
    p.add_argument("--out", default=None, help="where the shipped file goes (default: checkpoints/<name>)")
    args = p.parse_args()
    start = time.perf_counter()
    if args.stage == "vae":
        stage_vae(Path(args.out or ROOT / "checkpoints/mnist-vae.safetensors"))
    elif args.stage == "sd":
        stage_sd(Path(args.out or ROOT / "checkpoints/tiny-sd.safetensors"), args.vae, args.minutes)
    else:
        from diffusion_lab import text

        print(json.dumps(text.model_card_numbers(), indent=1))
    log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
