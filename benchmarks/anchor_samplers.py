"""Is the anchor's score an artefact of the sampler? Train the anchor (the course recipe, benchmarks/anchor.py) for
about what it reaches in the 20-minute headline, then sample the same weights several ways and score each with the
shipped classifier:
- diffusion_lab's samplers at few steps, as train_vs_anchor.py samples both recipes (ancestral DDPM at 10 steps,
  DDIM at 20, DDPM at 100; trailing timesteps, x0_hat clipped to [-1, 1]);
- the course's own loop: diffusers' DDPMScheduler stepping through all 1,000 training steps (slow on a CPU, so
  fewer digits: `--n-course`; too few for a FID, so only its accuracy is reported).
If the few-step samplers were what held the anchor back, the 1,000-step loop would score far better.

`--anchor PATH` scores a model saved by `train_vs_anchor.py --save` instead of training one. `--run PATH` trains
into a checkpoint that the same command resumes, for budgets that outlast one sitting: the course's own 10 epochs
(4,690 steps of 128, about 3.4 h on a 2-core CPU),
    python benchmarks/anchor_samplers.py --steps 4690 --n-eval 2000 --n-course 200 \
        --run runs/anchor-10-epochs.safetensors --out benchmarks/results/anchor_10_epochs.json

Run from the repository root (about 30 min on a 2-core CPU, 20 of them training):
    python benchmarks/anchor_samplers.py --steps 420 --n-eval 500 --n-course 40
writes benchmarks/results/anchor_samplers.json and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Judge, base_parser, begin, command_line, eval_labels, fmt, machine_line,  # noqa: E402
                     markdown_table, real_floor, sample_images, smoke_line, sync, write_results)
from anchor import anchor_denoiser, anchor_scheduler, load_anchor, train_anchor  # noqa: E402

from diffusion_lab import data, metrics  # noqa: E402
from diffusion_lab.diffusers_compat import run_scheduler  # noqa: E402

HEADLINE = {"steps": 420, "n_eval": 500}
FEW_STEPS = (("ddpm", 10), ("ddim", 20), ("ddpm", 100))
TITLE = "The anchor sampled four ways"
HEADLINE_COMMAND = "python benchmarks/anchor_samplers.py --steps 420 --n-eval 500 --n-course 40"


@torch.no_grad()
def course_loop(model, n: int, device, seed: int = 0, steps: int = 1000) -> dict:
    """The course's sampler: diffusers' DDPMScheduler over `steps` steps (the course uses all 1,000 it trained
    with), fresh noise at each: the course's own scheduler as it trained, not one set up to match ours."""
    labels, generator = eval_labels(n), torch.Generator().manual_seed(seed)
    x_T, lab = torch.randn(n, 1, 28, 28, generator=generator).to(device), labels.to(device)
    start = time.perf_counter()
    x = run_scheduler(anchor_scheduler(), lambda x_t, t: model(x_t, t, lab), x_T, steps, generator=generator)
    sync(device)
    seconds = time.perf_counter() - start
    return {"images": data.from_unit_range(x.float()).cpu()[:, 0], "labels": labels, "seconds_per_image": seconds / n}


def render(result: dict) -> str:
    lines = [f"**The anchor sampled four ways: the same weights ({result['anchor_source']}), scored by the shipped "
             f"classifier.**", "", machine_line(result["machine"]), ""]
    if result["smoke"]:
        lines += [smoke_line(f"{result['steps']} training steps, n-eval {result['n_eval']}", HEADLINE_COMMAND), ""]
    rows = [[r["sampler"], r["nfe"], r["n"], r["classifier_fid"], r["conditional_accuracy"], r["seconds_per_image"]]
            for r in result["rows"]]
    lines += [markdown_table(["sampler", "NFE", "digits", "classifier-FID ↓", "cond. accuracy ↑", "s / image"], rows),
              "", f"FID floor (real training digits, n = {result['n_eval']}): {fmt(result['floor_fid'])}. FID is "
              f"against all 10,000 test digits; the 1,000-step row has too few digits for one. diffusion_lab "
              f"samplers: trailing timesteps, x0_hat clipped to [-1, 1], eps-prediction with the anchor's own betas. "
              f"Same starting noise (seed {result['seed']}) for every row.", "", f"Command: `{result['command']}`"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__, "anchor_samplers.json")
    p.add_argument("--steps", type=int, default=HEADLINE["steps"],
                   help="anchor training steps (the 20-minute headline runs reached 406-437)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=HEADLINE["n_eval"], help="digits per few-step sampler")
    p.add_argument("--n-course", type=int, default=40, help="digits for the 1,000-step loop")
    p.add_argument("--course-steps", type=int, default=1000, help="steps of the course's loop (tests: fewer)")
    p.add_argument("--anchor", default=None, metavar="PATH", help="a saved anchor (train_vs_anchor.py --save)")
    p.add_argument("--run", default=None, metavar="PATH",
                   help="train the anchor into this file, checkpointed every 100 steps; the same command resumes it")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    done, machine, device = begin(args, render, TITLE, HEADLINE_COMMAND)
    if done is not None:
        return done
    t_start = time.perf_counter()
    if args.anchor:
        model, schedule = load_anchor(args.anchor, device)
        source, steps = f"loaded from {Path(args.anchor).name}", None
    else:
        trained = train_anchor(steps=args.steps, seed=args.seed, device=device, checkpoint=args.run)
        model, schedule, steps = trained["model"], trained["schedule"], trained["step"]
        source = f"trained {steps} steps, seed {args.seed}"
        print(f"anchor: {steps} steps in {trained['elapsed_s']:.0f} s", flush=True)
    test_images, _ = data.mnist(train=False)
    judge = Judge(metrics.load_classifier(device, args.classifier), test_images)

    denoiser = anchor_denoiser(model, schedule)
    rows = []
    for sampler, nfe in FEW_STEPS:
        s = sample_images(denoiser, args.n_eval, nfe, sampler=sampler, seed=args.seed)
        rows.append({"sampler": f"diffusion_lab {sampler}", "nfe": nfe, "n": args.n_eval,
                     **judge.score(s["images"], s["labels"]), "seconds_per_image": s["seconds_per_image"]})
        print(rows[-1], flush=True)
    s = course_loop(model, args.n_course, device, args.seed, args.course_steps)
    rows.append({"sampler": "course loop (diffusers DDPMScheduler)", "nfe": args.course_steps, "n": args.n_course,
                 "classifier_fid": None,
                 "conditional_accuracy": metrics.conditional_accuracy(s["images"], s["labels"], judge.classifier),
                 "seconds_per_image": s["seconds_per_image"]})
    print(rows[-1], flush=True)
    smoke = (steps is not None and steps < HEADLINE["steps"]) or args.n_eval < HEADLINE["n_eval"] \
        or args.course_steps < 1000
    result = {"benchmark": "anchor_samplers", "command": command_line("anchor_samplers.py", argv), "machine": machine,
              "anchor_source": source, "steps": steps, "seed": args.seed, "n_eval": args.n_eval,
              "n_course": args.n_course, "smoke": smoke, "rows": rows, "floor_fid": real_floor(judge, args.n_eval),
              "total_wall_s": time.perf_counter() - t_start}
    json_path, md_path = write_results(args.out, result, render(result))
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
