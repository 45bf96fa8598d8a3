"""Which levers of this repo's MNIST recipe pay? Short trainings for the same wall-clock budget, each changing
one lever from the baseline (diffusion_lab.training.TrainConfig's defaults), scored the same way.

Levers (`--variants`; the baseline always runs first):
  min_snr        min-SNR-5 loss weighting (Hang et al. 2023)          weighting="min_snr"
  eps            eps- instead of v-prediction                          prediction="eps"
  linear         linear instead of cosine noise schedule               schedule="linear"
  no_ema         sample with the raw weights (no EMA)                  ema_decay=0
  no_attention   no self-attention at 7x7                              attention=False
  channels_last  channels-last memory format                           channels_last=True
  bf16           bf16 autocast (pays on CPUs with AVX512-BF16 or AMX)  amp="bf16"
  compile        torch.compile (its compile time counts)               compile=True      (not in the default list)
  constant_lr    no cosine decay after warm-up                         lr_decay="constant" (not in the default list)
Each run trains for `--minutes` of wall clock including a short step-time calibration (see
_common.train_for_budget) or, with `--steps N`, for exactly N steps (step-matched: a fast GPU can then replay
the step count that a CPU budget allows, to choose levers cheaply; the CPU budget stays the judge), then draws
`--n-eval` digits with `--sampler` (default deterministic DDIM; `--sample-steps` steps,
guidance 1.0, the same starting noise for every run) and measures classifier-FID against the 10,000 real test
digits and conditional accuracy with the shipped classifier. A lever is worth keeping when it lowers FID (or
raises img/s at equal FID) by more than the spread between seeds (`--seeds`).

Run from the repository root (8 levers x (5 min + about 1 min of sampling) on a 2-core CPU):
    python benchmarks/ablation.py --minutes 5 --n-eval 1000
writes benchmarks/results/ablation.json and .md; chapter 08 shows the table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Judge, base_parser, begin, command_line, fmt, load_average, machine_line,  # noqa: E402
                     markdown_table, real_floor, run_record, sample_images, smoke_line, train_for_budget,
                     write_results)

from diffusion_lab import data, metrics  # noqa: E402
from diffusion_lab.samplers import SAMPLERS  # noqa: E402
from diffusion_lab.training import TrainConfig, train  # noqa: E402

VARIANTS = {
    "baseline": ("TrainConfig defaults", {}),
    "min_snr": ("min-SNR-5 weighting", {"weighting": "min_snr", "min_snr_gamma": 5.0}),
    "eps": ("eps-prediction", {"prediction": "eps"}),
    "linear": ("linear schedule", {"schedule": "linear"}),
    "no_ema": ("no EMA", {"ema_decay": 0.0}),
    "no_attention": ("no attention", {"attention": False}),
    "channels_last": ("channels-last", {"channels_last": True}),
    "bf16": ("bf16 autocast", {"amp": "bf16"}),
    "compile": ("torch.compile", {"compile": True}),
    "constant_lr": ("constant lr after warm-up", {"lr_decay": "constant"}),
    "ema_0.995": ("EMA 0.995 (a shorter memory)", {"ema_decay": 0.995}),
    "lr_4e-3": ("peak lr 4e-3", {"lr": 4e-3}),
    "lr_1e-3": ("peak lr 1e-3", {"lr": 1e-3}),
    "p_uncond_0.05": ("label dropout 0.05", {"p_uncond": 0.05}),
}
DEFAULT_VARIANTS = ["min_snr", "eps", "linear", "no_ema", "no_attention", "channels_last", "bf16"]
HEADLINE = {"minutes": 5.0, "n_eval": 1000}
TITLE = "Ablation: one lever at a time"
HEADLINE_COMMAND = "python benchmarks/ablation.py --minutes 5 --n-eval 1000"


def train_steps(config: TrainConfig, steps: int, images, labels) -> dict:
    """Exactly `steps` steps, no wall-clock budget: the step-matched mode (--steps)."""
    result = train(replace(config, steps=steps), progress=False, images=images, labels=labels)
    return run_record(result, images_seen=result.step * config.batch_size, total_elapsed_s=result.elapsed_s)


def render(result: dict) -> str:
    budget = (f"{fmt(result['steps'])} steps of training each" if result.get("steps") else
              f"{fmt(result['minutes'])} min of training each (calibration included)")
    lines = [f"**Ablation: one lever at a time, {budget}, {result.get('sampler', 'ddim').upper()} "
             f"{result['sample_steps']} steps, guidance 1, {result['n_eval']} samples.**", "",
             machine_line(result["machine"]), ""]
    if result["smoke"]:
        lines += [smoke_line(f"{budget}, n-eval {result['n_eval']}",
                             HEADLINE_COMMAND), ""]
    rows = [[r["variant"], r["lever"], r["seed"], r["steps"], r["images_seen"], round(r["images_per_s"], 1),
             r["classifier_fid"], r["conditional_accuracy"], r["fid_vs_baseline"], r["images_per_s_vs_baseline"]]
            for r in result["rows"]]
    lines += [markdown_table(["variant", "lever", "seed", "steps", "images seen", "train img/s", "classifier-FID ↓",
                              "cond. accuracy ↑", "FID / baseline's", "img/s / baseline's"], rows), ""]
    lines += [f"Baseline: `{result['baseline_summary']}`. Floor: {result['n_eval']} real training digits score "
              f"classifier-FID {fmt(result['floor_fid'])}. Ratios compare with the baseline of the same seed.", "",
              f"Command: `{result['command']}`"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = base_parser(__doc__, "ablation.json")
    p.add_argument("--minutes", type=float, default=HEADLINE["minutes"], help="training wall clock per run")
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=[v for v in VARIANTS if v != "baseline"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--n-eval", type=int, default=HEADLINE["n_eval"])
    p.add_argument("--n-reference", type=int, default=0, help="real test digits for FID (0: all 10,000)")
    p.add_argument("--steps", type=int, default=None,
                   help="train exactly this many steps per run instead of for --minutes (step-matched)")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=None, help="cap every run at this many steps (tests)")
    p.add_argument("--calibrate-steps", type=int, default=10,
                   help="throw-away steps timed first to fit the lr schedule (capped at 5%% of the budget)")
    g = p.add_argument_group("the baseline (defaults: diffusion_lab.training.TrainConfig)")
    g.add_argument("--channels", type=int, nargs=3, default=list(d.channels))
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    done, machine, device = begin(args, render, TITLE, HEADLINE_COMMAND)
    if done is not None:
        return done
    t_start = time.perf_counter()
    images, labels = data.mnist(train=True)
    test_images, _ = data.mnist(train=False)
    judge = Judge(metrics.load_classifier(device, args.classifier),
                  test_images[:args.n_reference] if args.n_reference else test_images)
    base = TrainConfig(channels=tuple(args.channels), batch_size=args.batch_size, device=str(device), log_every=10,
                       ckpt_every=10**9)

    rows = []
    for seed in args.seeds:
        for name in ["baseline", *[v for v in args.variants if v != "baseline"]]:
            lever, overrides = VARIANTS[name]
            config = replace(base, seed=seed, **overrides)
            load = load_average()
            run = (train_steps(config, args.steps, images, labels) if args.steps else
                   train_for_budget(config, args.minutes, images, labels, args.calibrate_steps, args.max_steps))
            s = sample_images(run["denoiser"], args.n_eval, args.sample_steps, sampler=args.sampler, seed=seed)
            rows.append({"variant": name, "lever": lever, "seed": seed, "steps": run["step"],
                         "images_seen": run["images_seen"], "images_per_s": run["images_per_s"],
                         "train_s": run["total_elapsed_s"], **judge.score(s["images"], s["labels"]),
                         "sampling_s_per_image": s["seconds_per_image"],
                         "load_average_start": " / ".join(map(str, load or []))})
            print(rows[-1], flush=True)
    for r in rows:
        b = next(x for x in rows if x["variant"] == "baseline" and x["seed"] == r["seed"])
        r["fid_vs_baseline"] = r["classifier_fid"] / b["classifier_fid"] if b["classifier_fid"] else None
        r["images_per_s_vs_baseline"] = r["images_per_s"] / b["images_per_s"]

    summary = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        fids = [r["classifier_fid"] for r in rows if r["variant"] == name]
        summary[name] = {"fid_mean": statistics.fmean(fids), "fid_spread": max(fids) - min(fids), "seeds": len(fids)}
    result = {"benchmark": "ablation", "command": command_line("ablation.py", argv), "machine": machine,
              "minutes": args.minutes, "n_eval": args.n_eval, "n_reference": judge.n_reference,
              "steps": args.steps, "sampler": args.sampler, "sample_steps": args.sample_steps, "seeds": args.seeds, "max_steps": args.max_steps,
              "smoke": (args.minutes < HEADLINE["minutes"] or args.n_eval < HEADLINE["n_eval"] or bool(args.max_steps)
                        or bool(args.n_reference)),
              "baseline_summary": (f"channels {tuple(base.channels)}, {base.prediction}-prediction, {base.schedule} "
                                   f"schedule, AdamW lr {base.lr:g}, warm-up {base.warmup}, {base.lr_decay} decay, "
                                   f"EMA {base.ema_decay}, batch {base.batch_size}, attention "
                                   f"{'on' if base.attention else 'off'}, amp {base.amp}"),
              "floor_fid": real_floor(judge, args.n_eval), "rows": rows, "summary": summary,
              "load_average_end": load_average(), "total_wall_s": time.perf_counter() - t_start}
    json_path, md_path = write_results(args.out, result, render(result))
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
