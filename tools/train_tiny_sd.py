"""Make chapter 10's two shipped models on one CPU thread, resumably (re-run the same command after a kill).

    python tools/train_tiny_sd.py vae    # sweep C, train the autoencoder -> checkpoints/mnist-vae.safetensors
    python tools/train_tiny_sd.py sd     # latent diffusion + text encoder -> checkpoints/tiny-sd.safetensors
    python tools/train_tiny_sd.py compare  # latent vs pixel diffusion at equal CPU time -> checkpoints/tiny-sd-vs-pixels.json
    python tools/train_tiny_sd.py card   # measure the numbers the model cards quote -> checkpoints/tiny-sd-measured.json

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
PARTS = ["vae", "cli", "guidance", "compositional"]  # what `card` measures
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


def stage_sd(out: Path, vae: str, minutes: float, steps: int) -> None:
    from diffusion_lab import tiny_sd

    result = tiny_sd.train_tiny_sd(vae, steps=steps, checkpoint=ROOT / "runs/tiny-sd.safetensors", max_minutes=minutes,
                                   log=log)
    training = {"steps": result.step, "batch_size": 128, "resumed_from": result.resumed_from, "train_seconds": round(result.elapsed_s, 1),
                "final_loss": sum(result.losses[-100:]) / len(result.losses[-100:])}
    sha = tiny_sd.save_tiny_sd(out, result.denoiser, vae, training=training,
                               command="python tools/train_tiny_sd.py sd")
    log(json.dumps({"sha256": sha}))


def stage_compare(out: Path, cpu_minutes: float, n_eval: int) -> None:
    """Latent against pixel diffusion, the same text encoder and recipe, each trained for the same CPU time of one
    thread; then n_eval digit prompts each (10 DPM-Solver++ steps, guidance 2): accuracy and classifier-FID."""
    from diffusion_lab import metrics, text, tiny_sd
    from diffusion_lab.sample import generate
    from diffusion_lab.training import FitConfig, fit

    vae, scale = autoencoder.load_autoencoder("mnist-vae")
    z, labels, bins = tiny_sd.training_data(vae, scale)
    images, _ = data.mnist(train=True)
    test_images, _ = data.mnist(train=False)
    prompts = tiny_sd.digit_prompts(n_eval, seed=1)
    named = torch.tensor([text.named_digit(p) for p in prompts])
    real = test_images[:n_eval]
    result = {"cpu_minutes": cpu_minutes, "n_eval": n_eval, "sampler": "dpm++2m", "steps": 10, "guidance": 2.0,
              "fid_real_floor": metrics.classifier_fid(images[-n_eval:], real),
              "command": f"python tools/train_tiny_sd.py compare --cpu-minutes {cpu_minutes} --n-eval {n_eval}"}
    sources = {"latent": (tiny_sd.build(vae.latent_channels), tiny_sd.prompt_batches(z, labels, bins)),
               "pixel": (tiny_sd.build_pixel(), tiny_sd.prompt_batches(images, labels, bins,
                                                                      transform=data.to_unit_range))}
    for kind, (denoiser, batches) in sources.items():
        start = time.process_time()
        config = FitConfig(steps=100_000, batch_size=128, lr=2e-3, warmup=100, lr_decay="constant", p_uncond=0.1,
                           p_uncond_style=0.0, ckpt_every=100_000, log_every=10)
        fitted = fit(denoiser, batches, config, progress=False,
                     callback=lambda step, _: time.process_time() - start >= cpu_minutes * 60)
        train_cpu = time.process_time() - start
        model = fitted.denoiser
        with torch.no_grad():
            ids = text.tokenize(prompts[:100])
            x, t = torch.randn(len(ids), *model.shape), torch.full((len(ids),), 500)
            model(x, t, context=ids)
            t0 = time.process_time()
            for _ in range(3):
                model(x, t, context=ids)
            ms = (time.process_time() - t0) / 3 / len(ids) * 1000
        t0 = time.process_time()
        if kind == "latent":
            samples = tiny_sd.draw(tiny_sd.TinySD(model, vae, scale, {}), prompts, steps=10, guidance=2.0)
        else:
            samples = generate(model, context=text.tokenize(prompts), steps=10, guidance=2.0)
        result[kind] = {"optimizer_steps": fitted.step, "train_cpu_s": round(train_cpu, 1),
                        "ms_per_evaluation_cpu": round(ms, 3), "sample_cpu_s": round(time.process_time() - t0, 1),
                        "gflop_per_evaluation": tiny_sd.forward_flops(model.net, model.shape) / 1e9,
                        "accuracy": metrics.conditional_accuracy(samples, named),
                        "classifier_fid": metrics.classifier_fid(samples, real),
                        "parameters": sum(p.numel() for p in model.net.parameters())}
        log(json.dumps({kind: result[kind]}))
    out.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("vae", "sd", "compare", "card"))
    p.add_argument("--cpu-minutes", type=float, default=3.0, help="compare: CPU minutes of training for each model")
    p.add_argument("--n-eval", type=int, default=300, help="compare: prompts drawn from each model")
    p.add_argument("--n-compositional", type=int, default=60, help="card: samples per end of each attribute pair")
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS, help="card: which measurements to (re)make")
    p.add_argument("--vae", default="mnist-vae", help="the autoencoder the latent model is trained on")
    p.add_argument("--minutes", type=float, default=50.0, help="stop the latent model's training after this many "
                   "wall-clock minutes (0: run all its steps); a re-run resumes")
    p.add_argument("--steps", type=int, default=1300, help="sd: optimizer steps of 128 latents (the cosine decay's length)")
    p.add_argument("--out", default=None, help="where the shipped file goes (default: checkpoints/<name>)")
    args = p.parse_args()
    start = time.perf_counter()
    if args.stage == "vae":
        stage_vae(Path(args.out or ROOT / "checkpoints/mnist-vae.safetensors"))
    elif args.stage == "sd":
        stage_sd(Path(args.out or ROOT / "checkpoints/tiny-sd.safetensors"), args.vae, args.minutes, args.steps)
    elif args.stage == "compare":
        stage_compare(Path(args.out or ROOT / "checkpoints/tiny-sd-vs-pixels.json"), args.cpu_minutes, args.n_eval)
    else:
        from diffusion_lab import tiny_sd

        out = Path(args.out) if args.out else ROOT / "checkpoints/tiny-sd-measured.json"
        numbers = tiny_sd.model_card_numbers(args.parts, n_compositional=args.n_compositional)
        if args.parts != PARTS and out.exists():  # measuring some parts: keep the others' numbers
            old = json.loads(out.read_text())
            numbers = {k: {**old.get(k, {}), **v} for k, v in numbers.items()}
        out.write_text(json.dumps(numbers, indent=1) + "\n")
        print(json.dumps(numbers, indent=1))
    log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
