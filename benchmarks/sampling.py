"""Sampling cost against quality: time per image and classifier-FID against the number of network evaluations
(NFE) for this repo's samplers and for diffusers' schedulers, all driving the same trained model.

Samplers:
- this repo (diffusion_lab.samplers): `ddim` (eta = 0), `dpm++2m` (DPM-Solver++(2M)), `ddpm` (ancestral, respaced);
- diffusers: `DDIMScheduler` and `DPMSolverMultistepScheduler` (dpmsolver++, order 2), stepping in diffusers' own
  loop, configured by diffusion_lab.diffusers_compat to mean the same thing as ours (tests/test_diffusers_parity.py
  holds it to that): `trained_betas` = our betas with our float64 alpha_bar table, the model's own
  `prediction_type` (our models default to v-prediction: "v_prediction"), `timestep_spacing="trailing"`,
  DDIM with `set_alpha_to_one=True` and, when clipping, `use_clipped_model_output=True`, DPM-Solver with
  `final_sigmas_type="zero"` and `lower_order_final=True`. All five run through the same `sample.generate`.
x0_hat clipping: ours and diffusers' DDIM clip x0_hat to [-`--clip-x0`, `--clip-x0`] (0: no clipping);
diffusers' DPM-Solver offers only dynamic thresholding, so it always runs unclipped. `--clip-x0 0` makes every
pair exactly comparable.
Every sampler starts from the same noise x_T (seed `--seed`) and is asked for digits 0..9 cycling; FID is
measured on the shipped classifier's features against all 10,000 real test digits. NFE counts network calls
per image; with `--guidance` above 1 each call is one batched pass over the conditional and null codes.

Run from the repository root once checkpoints/mnist-cond-small.safetensors exists (about 20-30 min on a 2-core CPU):
    python benchmarks/sampling.py --checkpoint mnist-cond-small --nfe 5 10 20 50 --n-eval 1000
writes benchmarks/results/sampling.json and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Judge, base_parser, begin, command_line, fmt, machine_line, markdown_table,  # noqa: E402
                     real_floor, sample_images, smoke_line, write_results)

from diffusion_lab import data, metrics  # noqa: E402
from diffusion_lab.checkpoint import SHIPPED, load_checkpoint, resolve_checkpoint  # noqa: E402
from diffusion_lab.utils import file_sha256  # noqa: E402
from diffusion_lab.denoiser import load_denoiser  # noqa: E402
from diffusion_lab.diffusers_compat import diffusers_sampler  # noqa: E402

# our samplers by name, and diffusers' loops as functions with the same signature (diffusion_lab.diffusers_compat)
OURS = {"ddim": "ddim", "dpm++2m": "dpm++2m", "ddpm": "ddpm"}
DIFFUSERS = {"diffusers-ddim": diffusers_sampler("ddim"), "diffusers-dpm++2m": diffusers_sampler("dpm++2m")}
UNCLIPPED = {"diffusers-dpm++2m"}  # diffusers' DPM-Solver offers only dynamic thresholding, no x0_hat clipping
HEADLINE = {"n_eval": 1000}
TITLE = "Sampling: classifier-FID and time per image against NFE"
HEADLINE_COMMAND = "python benchmarks/sampling.py --checkpoint mnist-cond-small --nfe 5 10 20 50 --n-eval 1000"


def draw(name: str, denoiser, n: int, nfe: int, guidance: float = 1.0, clip_x0: float | None = 1.0, seed: int = 0,
         batch: int = 500) -> dict:
    """n digits from sampler `name` (ours, or diffusers' loop) through the same sample.generate: same codes,
    guidance, batching and starting noise for every sampler. Returns _common.sample_images' dict."""
    sampler = OURS.get(name) or DIFFUSERS[name]
    return sample_images(denoiser, n, nfe, sampler=sampler, guidance=guidance, seed=seed, batch=batch,
                         clip_x0=None if name in UNCLIPPED else clip_x0)


def model_summary(denoiser, meta: dict) -> str:
    """The model in one line, from its contract and, when the file records it, how it was trained."""
    train = meta.get("record", meta).get("train", {})  # a training run keeps it under "record"
    trained = (f", trained {train['steps']} steps at batch {train['batch_size']}" if "steps" in train else "")
    channels = tuple(getattr(denoiser.net, "config", {}).get("channels", ()))
    return (f"channels {channels}, {denoiser.prediction}-prediction, {denoiser.schedule.name} schedule, "
            f"T = {denoiser.schedule.T}{trained}")


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
    p.add_argument("--checkpoint", default="mnist-cond-small", help="shipped name or path of a diffusion_lab checkpoint")
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
    denoiser = load_denoiser(args.checkpoint, device=device)
    clip = args.clip_x0 or None
    test_images, _ = data.mnist(train=False)
    judge = Judge(metrics.load_classifier(device, args.classifier),
                  test_images[:args.n_reference] if args.n_reference else test_images)

    rows = []
    for name in args.samplers:
        for nfe in args.nfe:
            s = draw(name, denoiser, args.n_eval, nfe, args.guidance, clip, args.seed, args.batch)
            rows.append({"sampler": name, "library": "diffusers" if name in DIFFUSERS else "diffusion_lab", "nfe": nfe,
                         "seconds_per_image": s["seconds_per_image"], **judge.score(s["images"], s["labels"])})
            print(rows[-1], flush=True)

    path = resolve_checkpoint(args.checkpoint)[0]
    result = {"benchmark": "sampling", "command": command_line("sampling.py", argv), "machine": machine,
              "checkpoint": args.checkpoint, "checkpoint_sha256": file_sha256(path),
              "model_summary": model_summary(denoiser, load_checkpoint(args.checkpoint)[1]),
              "T": denoiser.schedule.T, "prediction": denoiser.prediction, "guidance": args.guidance, "clip_x0": clip,
              "n_eval": args.n_eval, "n_reference": judge.n_reference, "batch": args.batch, "seed": args.seed,
              "nfe": args.nfe, "samplers": args.samplers, "floor_fid": real_floor(judge, args.n_eval),
              "smoke": args.n_eval < HEADLINE["n_eval"] or bool(args.n_reference) or args.checkpoint not in SHIPPED,
              "rows": rows}
    result["total_wall_s"] = time.perf_counter() - t_start
    json_path, md_path = write_results(args.out, result, render(result))
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
