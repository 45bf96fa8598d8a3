"""Sampling cost against quality: time per image and classifier-FID against the number of network evaluations
(NFE) for this repo's samplers and for diffusers' schedulers, all driving the same trained model.

Samplers:
- this repo (diffusion_lab.samplers): `ddim` (eta = 0), `dpm++2m` (DPM-Solver++(2M)), `ddpm` (ancestral, respaced);
- diffusers: `DDIMScheduler` and `DPMSolverMultistepScheduler` (dpmsolver++, order 2), configured to mean the
  same thing as ours (see tests/test_diffusers_parity.py): `trained_betas` = our betas, the model's own
  `prediction_type` (our models default to v-prediction: "v_prediction"), `timestep_spacing="trailing"`,
  DDIM with `set_alpha_to_one=True` and `use_clipped_model_output=True`, DPM-Solver with
  `final_sigmas_type="zero"` and `lower_order_final=True`.
x0_hat clipping: ours and diffusers' DDIM clip x0_hat to [-`--clip-x0`, `--clip-x0`] (0: no clipping);
diffusers' DPM-Solver offers only dynamic thresholding, so it always runs unclipped. `--clip-x0 0` makes every
pair exactly comparable.
Every sampler starts from the same noise x_T (seed `--seed`) and is asked for digits 0..9 cycling; FID is
measured on the shipped classifier's features against all 10,000 real test digits. NFE counts network calls
per image; with `--guidance` above 1 each call is one batched pass over the conditional and null codes.

Run from the repository root once checkpoints/mnist-cond.safetensors exists (about 20-30 min on a 2-core CPU):
    python benchmarks/sampling.py --checkpoint mnist-cond --nfe 5 10 20 50 --n-eval 1000
writes benchmarks/results/sampling.json and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Judge, command_line, eval_labels, fmt, machine_line, markdown_table, real_floor, sample_images, smoke_line, sync,
                     base_parser, begin, write_results)

from diffusion_lab import data, metrics  # noqa: E402
from diffusion_lab.checkpoint import resolve_checkpoint, sha256_of  # noqa: E402
from diffusion_lab.conditioning import guided  # noqa: E402
from diffusion_lab.training import load_model  # noqa: E402

OURS = {"ddim": "ddim", "dpm++2m": "dpm++2m", "ddpm": "ddpm"}
DIFFUSERS = ("diffusers-ddim", "diffusers-dpm++2m")
PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
HEADLINE = {"n_eval": 1000}
TITLE = "Sampling: classifier-FID and time per image against NFE"
HEADLINE_COMMAND = "python benchmarks/sampling.py --checkpoint mnist-cond --nfe 5 10 20 50 --n-eval 1000"


def diffusers_scheduler(name: str, schedule, prediction: str, clip_x0: float | None):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=schedule.T, trained_betas=schedule.betas.numpy(),
                  prediction_type=PREDICTION_TYPE[prediction], timestep_spacing="trailing")
    if name == "diffusers-ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True, steps_offset=0, clip_sample=clip_x0 is not None,
                             clip_sample_range=clip_x0 or 1.0)
    if name == "diffusers-dpm++2m":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
                                           thresholding=False)
    raise ValueError(f"unknown diffusers sampler {name!r}; choose one of {', '.join(DIFFUSERS)}")


def step_options(name: str) -> dict:
    # Ours re-derives eps_hat from the clipped x0_hat (as Ho et al.'s code does). diffusers' DDIM does so only when
    # asked; by default it pairs the clipped x0_hat with the unclipped eps_hat, which is a different sampler.
    return {"use_clipped_model_output": True} if name == "diffusers-ddim" else {}


@torch.no_grad()
def sample_diffusers(name, denoiser_for, schedule, n, steps, prediction, device, seed=0, batch=500, clip_x0=1.0):
    """Like _common.sample_images, with a diffusers scheduler doing the stepping (a fresh one per batch: diffusers
    schedulers keep their step index and solver history inside)."""
    labels = eval_labels(n)
    generator = torch.Generator().manual_seed(seed)
    images, start = [], time.perf_counter()
    for i in range(0, n, batch):
        lab = labels[i:i + batch].to(device)
        x = torch.randn(len(lab), 1, 28, 28, generator=generator).to(device)
        scheduler = diffusers_scheduler(name, schedule, prediction, clip_x0)
        scheduler.set_timesteps(steps, device=device)
        x = x * scheduler.init_noise_sigma
        model = denoiser_for(lab)
        for t in scheduler.timesteps:
            out = model(x, t.expand(len(x)))
            x = scheduler.step(out, t, x, **step_options(name)).prev_sample
        images.append(data.from_unit_range(x.float()).cpu()[:, 0])
    sync(device)
    seconds = time.perf_counter() - start
    return {"images": torch.cat(images), "labels": labels, "seconds": seconds, "seconds_per_image": seconds / n}


def pivot(rows, key, samplers, nfes, scale=1.0):
    table = []
    for s in samplers:
        by_nfe = {r["nfe"]: r[key] for r in rows if r["sampler"] == s}
        table.append([s] + [None if by_nfe.get(k) is None else by_nfe[k] * scale for k in nfes])
    return table


def render(result: dict) -> str:
    rows, nfes, samplers = result["rows"], result["nfe"], result["samplers"]
    head = ["sampler"] + [f"NFE {k}" for k in nfes]
    lines = [f"**Sampling: classifier-FID and time per image against NFE, model `{result['checkpoint']}`, guidance "
             f"{fmt(result['guidance'])}, {result['n_eval']} samples per cell.**", "",
             machine_line(result["machine"]), ""]
    if result["smoke"]:
        lines += [smoke_line(f"n-eval {result['n_eval']}, checkpoint {result['checkpoint']}",
                             HEADLINE_COMMAND), ""]
    table = lambda key, scale=1.0: markdown_table(head, pivot(rows, key, samplers, nfes, scale))  # noqa: E731
    lines += [f"Classifier-FID ↓ (floor: real training digits at the same n = {fmt(result['floor_fid'])})", "",
              table("classifier_fid"), "", "Conditional accuracy ↑", "", table("conditional_accuracy"), "",
              f"Milliseconds per image (batch {result['batch']})", "", table("seconds_per_image", 1e3), "",
              f"Model: {result['model_summary']}. Same starting noise for every sampler; x0_hat clipping "
              f"{fmt(result['clip_x0']) if result['clip_x0'] else 'off'} for ours and diffusers' DDIM (both re-derive "
              f"eps_hat from the clipped x0_hat; diffusers with use_clipped_model_output=True), none for "
              f"diffusers' DPM-Solver. diffusers' DDIM steps from t to t - T/NFE, so it matches ours only when NFE "
              f"divides T = {result['T']}.", "", f"Command: `{result['command']}`"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__, "sampling.json")
    p.add_argument("--checkpoint", default="mnist-cond", help="shipped name or path of a diffusion_lab checkpoint")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--samplers", nargs="+", default=[*OURS, *DIFFUSERS], choices=[*OURS, *DIFFUSERS])
    p.add_argument("--n-eval", type=int, default=HEADLINE["n_eval"])
    p.add_argument("--n-reference", type=int, default=0, help="real test digits for FID (0: all 10,000)")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--clip-x0", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    done, machine, device = begin(args, render, TITLE, HEADLINE_COMMAND)
    if done is not None:
        return done
    t_start = time.perf_counter()
    model, schedule, config = load_model(args.checkpoint, device=device)
    clip = args.clip_x0 or None
    test_images, _ = data.mnist(train=False)
    judge = Judge(metrics.load_classifier(device, args.classifier),
                  test_images[:args.n_reference] if args.n_reference else test_images)

    def denoiser_for(lab):
        return guided(model, lab, None, scale=args.guidance, num_classes=10)

    rows = []
    for name in args.samplers:
        for nfe in args.nfe:
            if name in OURS:
                s = sample_images(denoiser_for, schedule, args.n_eval, nfe, config.objective, device,
                                  sampler=OURS[name], seed=args.seed, batch=args.batch, clip_x0=clip)
            else:
                s = sample_diffusers(name, denoiser_for, schedule, args.n_eval, nfe, config.objective, device,
                                     seed=args.seed, batch=args.batch, clip_x0=clip)
            rows.append({"sampler": name, "library": "diffusers" if name in DIFFUSERS else "diffusion_lab", "nfe": nfe,
                         "seconds_per_image": s["seconds_per_image"], **judge.score(s["images"], s["labels"])})
            print(rows[-1], flush=True)

    path = resolve_checkpoint(args.checkpoint)[0]
    result = {"benchmark": "sampling", "command": command_line("sampling.py", argv), "machine": machine,
              "checkpoint": args.checkpoint, "checkpoint_sha256": sha256_of(path),
              "model_summary": (f"channels {tuple(config.channels)}, {config.objective}-prediction, {config.schedule} "
                                f"schedule, T = {config.T}, trained {config.steps} steps at batch {config.batch_size}"),
              "T": config.T, "prediction": config.objective, "guidance": args.guidance, "clip_x0": clip,
              "n_eval": args.n_eval, "n_reference": judge.n_reference, "batch": args.batch, "seed": args.seed,
              "nfe": args.nfe, "samplers": args.samplers, "floor_fid": real_floor(judge, args.n_eval),
              "smoke": args.n_eval < HEADLINE["n_eval"] or bool(args.n_reference) or args.checkpoint != "mnist-cond",
              "rows": rows}
    result["total_wall_s"] = time.perf_counter() - t_start
    json_path, md_path = write_results(args.out, result, render(result))
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
