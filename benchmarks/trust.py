"""Trust (chapter 14): memorisation against training-set size, and training stability of diffusion vs a DCGAN.

Memorisation. The same small unconditional UNet recipe (diffusion_lab.training.train) is trained for the same
number of steps on the first 100, 1,000, 10,000 and 60,000 digits of one fixed shuffle of MNIST's training set.
Each model draws `n_samples` digits (deterministic DDIM). For every sample we find its nearest and second-nearest
training digit (L2 in pixel space, [0, 1] pixels) and the ratio d1 / d2. A copy is a sample whose ratio is below
`copy_ratio`: far closer to one training digit than to any other, in the spirit of Carlini et al. (2023) and
Somepalli et al. (2023). Real held-out test digits, measured against the same training subset, give the rate at
which that rule fires without any copying. The 60,000-digit model's samples are also classified by the repo's
classifier: the class balance of unguided samples.

Stability. Diffusion (the same UNet recipe) and chapter 01's DCGAN (diffusion_lab.gan) train for the same number of
steps at the same batch size, over several seeds at each model's base learning rate, and over a learning-rate
sweep (x1/4 .. x4, one seed). We record the final classifier-FID against held-out test digits, how many classes
the samples cover, loss spikes (a step whose loss exceeds the median of the previous 50 by more than 6 median
absolute deviations) and failures (a non-finite loss, or samples covering fewer than 5 classes: a divergence, a
collapse, or a model that has not learned the digits yet; the record's key is "diverged").

The smallest training sets are also trained for `mem_long_steps`, many more epochs: memorisation is a matter of
fitting the data closely, and these runs show whether it appears when each digit is seen thousands of times.

Every finished run is saved at once into the result JSON, so a killed run resumes where it stopped:

    nohup python benchmarks/trust.py --preset cpu --threads 1 > runs/trust.log 2>&1 &
    python benchmarks/trust.py --preset smoke --out /tmp/trust.json        # seconds: plumbing only
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, begin, fmt, machine_line, markdown_table, smoke_line  # noqa: E402

from diffusion_lab import data, gan, metrics  # noqa: E402
from diffusion_lab.sample import generate  # noqa: E402
from diffusion_lab.training import NonFiniteError, TrainConfig, train  # noqa: E402

PRESETS = {
    "smoke": dict(mem_sizes=[20, 60], mem_steps=3, mem_long_sizes=[20], mem_long_steps=6, n_samples=20,
                  stab_steps=3, seeds=[0, 1], lr_factors=[0.25, 4.0], batch_size=8, channels=[8, 16, 16], gan_width=8, ddim_steps=2, n_fid=50),
    "cpu": dict(mem_sizes=[100, 1000, 10000, 60000], mem_steps=800, mem_long_sizes=[100, 1000], mem_long_steps=6400,
                n_samples=200, stab_steps=1000,
                seeds=[0, 1, 2, 3, 4], lr_factors=[0.25, 0.5, 2.0, 4.0], batch_size=32, channels=[16, 32, 32],
                gan_width=32, ddim_steps=10, n_fid=200),
}
HEADLINE = "python benchmarks/trust.py --preset cpu --threads 1"
COPY_RATIO = 1 / 3          # d1 / d2 below this: a copy of the nearest training digit
BASE_LR = {"diffusion": 2e-3, "gan": 2e-4}
N_GRID = 20                 # samples per size kept (with their nearest training digits) for the chapter's grids


def shuffled_training_set(seed: int = 0):
    """MNIST's 60,000 training digits in one fixed random order; the first N are the N-digit training set."""
    images, labels = data.mnist(train=True)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order], labels[order]


def diffusion_config(p: dict, steps: int, lr: float, seed: int) -> TrainConfig:
    return TrainConfig(channels=tuple(p["channels"]), attention=False, conditional=False, steps=steps,
                       batch_size=p["batch_size"], lr=lr, warmup=min(100, steps), seed=seed, device="cpu",
                       ckpt_every=10**9, log_every=min(50, steps))


def nearest_two(samples: torch.Tensor, train_images: torch.Tensor, chunk: int = 10_000):
    """For each sample (uint8 (n, 28, 28)): the L2 distances to its nearest and second-nearest training digit
    (pixels in [0, 1]) and the nearest one's index."""
    x = samples.reshape(len(samples), -1).double() / 255
    best = torch.full((len(x), 2), math.inf, dtype=torch.float64)
    best_idx = torch.zeros((len(x), 2), dtype=torch.long)
    for start in range(0, len(train_images), chunk):
        y = train_images[start:start + chunk].reshape(-1, 784).double() / 255
        d2 = (x * x).sum(1, keepdim=True) - 2 * x @ y.T + (y * y).sum(1)
        values, idx = torch.cat([best, d2.clamp(min=0).sqrt()], 1), torch.cat([best_idx, idx_range(start, y, x)], 1)
        order = values.argsort(1)[:, :2]
        best, best_idx = values.gather(1, order), idx.gather(1, order)
    return best[:, 0], best[:, 1], best_idx[:, 0]


def idx_range(start: int, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.arange(start, start + len(y)).expand(len(x), -1)


def copy_stats(samples: torch.Tensor, train_images: torch.Tensor) -> dict:
    d1, d2, idx = nearest_two(samples, train_images)
    ratio = d1 / d2.clamp(min=1e-12)
    return {"d1": d1.tolist(), "ratio": ratio.tolist(), "nearest": idx.tolist(),
            "copy_fraction": (ratio < COPY_RATIO).double().mean().item(),
            "median_d1": d1.median().item(), "median_ratio": ratio.median().item()}


def memorisation_run(p: dict, size: int, steps: int, images, labels, test_images, classifier) -> tuple[dict, dict]:
    config = diffusion_config(p, steps, BASE_LR["diffusion"], seed=0)
    result = train(config, progress=False, images=images[:size], labels=labels[:size])
    x0 = generate(result.denoiser, n=p["n_samples"], sampler="ddim", steps=p["ddim_steps"], seed=1, clip_x0=1.0)
    samples = data.from_unit_range(x0)[:, 0]
    stats = copy_stats(samples, images[:size])
    real = copy_stats(test_images[: p["n_samples"]], images[:size])  # real unseen digits: no copying at all
    counts = torch.bincount(metrics.predict(samples, classifier), minlength=10)
    record = {"size": size, "steps": result.step, "epochs": result.step * config.batch_size / size,
              "train_seconds": result.elapsed_s, "final_loss": float(np.mean(result.losses[-50:])),
              "copy_fraction": stats["copy_fraction"], "median_d1": stats["median_d1"],
              "median_ratio": stats["median_ratio"], "real_copy_fraction": real["copy_fraction"],
              "real_median_d1": real["median_d1"], "real_median_ratio": real["median_ratio"],
              "ratios": [round(r, 4) for r in stats["ratio"]], "real_ratios": [round(r, 4) for r in real["ratio"]],
              "class_counts": counts.tolist(),
              "train_class_counts": torch.bincount(labels[:size], minlength=10).tolist()}
    grid = {"samples": samples[:N_GRID].numpy(), "nearest": images[:size][torch.tensor(stats["nearest"][:N_GRID])].numpy()}
    return record, grid


def spikes(losses: list[float], window: int = 50, k: float = 6.0) -> int:
    """Steps whose loss exceeds the median of the previous `window` steps by more than k median absolute
    deviations: sudden jumps, robust to the ordinary noise of a stochastic loss."""
    x = np.asarray(losses, dtype=np.float64)
    count = 0
    for i in range(window, len(x)):
        past = x[i - window:i]
        med = np.median(past)
        mad = np.median(np.abs(past - med)) + 1e-12
        count += bool(x[i] > med + k * mad) or not np.isfinite(x[i])
    return count


def stability_run(p: dict, model: str, seed: int, factor: float, images, judge, classifier) -> dict:
    lr = BASE_LR[model] * factor
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed + 100)
    try:
        if model == "diffusion":
            result = train(diffusion_config(p, p["stab_steps"], lr, seed), progress=False, images=images,
                           labels=torch.zeros(len(images), dtype=torch.long))
            losses = result.losses
            x0 = generate(result.denoiser, n=p["n_fid"], sampler="ddim", steps=p["ddim_steps"], seed=seed + 100,
                          clip_x0=1.0)
        else:
            result = gan.train_gan(images, steps=p["stab_steps"], batch_size=p["batch_size"], width=p["gan_width"],
                                   lr_g=lr, lr_d=lr, seed=seed, device="cpu", progress=False)
            losses = result["g_losses"]
            x0 = gan.sample_gan(result["generator"], p["n_fid"], generator=generator)
        nonfinite = not all(math.isfinite(v) for v in losses)
    except NonFiniteError:
        return {"model": model, "seed": seed, "lr_factor": factor, "lr": lr, "diverged": True, "nonfinite": True,
                "fid": None, "classes_covered": 0, "spikes": None, "seconds": time.perf_counter() - start}
    covered = int((torch.bincount(metrics.predict(x0.clamp(-1, 1), classifier), minlength=10)
                   >= 0.02 * p["n_fid"]).sum())
    fid = judge(x0.clamp(-1, 1)) if not nonfinite else None
    return {"model": model, "seed": seed, "lr_factor": factor, "lr": lr, "fid": fid, "classes_covered": covered,
            "spikes": spikes(losses), "nonfinite": nonfinite, "diverged": nonfinite or covered < 5,
            "final_loss": float(np.mean(losses[-50:])), "seconds": time.perf_counter() - start}


class FIDJudge:
    def __init__(self, reference, classifier):
        self.classifier = classifier
        self.mu, self.sigma = metrics.feature_statistics(metrics.classifier_features(reference, classifier))

    def __call__(self, images) -> float:
        mu, sigma = metrics.feature_statistics(metrics.classifier_features(images, self.classifier))
        return metrics.frechet_distance(mu, sigma, self.mu, self.sigma)


MEM_FIELDS = ("mem_sizes", "mem_steps", "n_samples", "batch_size", "channels", "ddim_steps")
STAB_FIELDS = ("stab_steps", "batch_size", "channels", "gan_width", "ddim_steps", "n_fid")  # per run: more seeds or
                                                                                          # rates add runs


def plan(p: dict) -> list[tuple]:
    """Every run, in order: the smallest training set, then per model the seeds at x1 and the learning-rate
    sweep, then the larger training sets (each costs as much as the smallest: the same number of steps)."""
    runs = [("mem", p["mem_sizes"][0])]
    runs += [("stab", model, seed, 1.0) for model in ("diffusion", "gan") for seed in p["seeds"]]
    runs += [("stab", model, p["seeds"][0], f) for model in ("diffusion", "gan") for f in p["lr_factors"]]
    runs += [("mem", size) for size in p["mem_sizes"][1:]]
    return runs + [("memlong", size) for size in p["mem_long_sizes"]]


def key(run: tuple) -> str:
    return "-".join(str(r) for r in run)


def summarise(result: dict) -> dict:
    summary = {}
    for model in ("diffusion", "gan"):
        base = [r for r in result["stability"].values() if r["model"] == model and r["lr_factor"] == 1.0]
        sweep = [r for r in result["stability"].values() if r["model"] == model]
        fids = [r["fid"] for r in base if r["fid"] is not None]
        summary[model] = {
            "seeds": len(base), "fid_mean": float(np.mean(fids)) if fids else None,
            "fid_std": float(np.std(fids, ddof=1)) if len(fids) > 1 else None,
            "fid_min": min(fids) if fids else None, "fid_max": max(fids) if fids else None,
            "spikes_mean": float(np.mean([r["spikes"] for r in base if r["spikes"] is not None])) if base else None,
            "diverged_seeds": sum(r["diverged"] for r in base),
            "diverged_sweep": sum(r["diverged"] for r in sweep), "sweep_runs": len(sweep)}
    return summary


def render(result: dict) -> str:
    p = result["preset"]
    lines = ["**Trust: memorisation and stability**", "", machine_line(result["machine"]), ""]
    if result["preset_name"] != "cpu":
        lines += [smoke_line(f"preset {result['preset_name']}", HEADLINE), ""]
    lines += [f"Command: `{result['command']}`. Total wall time {fmt(result.get('total_wall_s'))} s; "
              f"{len(result['memorisation']) + len(result['stability'])} of {result['planned_runs']} runs done.", "",
              f"Memorisation: an unconditional UNet {tuple(p['channels'])} trained {p['mem_steps']} steps of "
              f"{p['batch_size']} digits on each training-set size, and {p['mem_long_steps']} steps on the "
              f"smallest ({', '.join(f'{n:,}' for n in p['mem_long_sizes'])}); {p['n_samples']} DDIM-{p['ddim_steps']} samples. "
              f"A copy: nearest / second-nearest training distance < {COPY_RATIO:.3f}.", ""]
    rows = [[r["size"], r["steps"], round(r["epochs"], 1), r["final_loss"], r["copy_fraction"], r["real_copy_fraction"],
             r["median_d1"], r["real_median_d1"], r["median_ratio"]] for r in result["memorisation"].values()]
    lines += [markdown_table(["training digits", "steps", "epochs", "final loss", "copies (samples)", "copies (real test)",
                              "median d1 (samples)", "median d1 (real test)", "median d1/d2"], rows), ""]
    lines += [f"Stability: {p['stab_steps']} steps of {p['batch_size']} for both models; diffusion base lr "
              f"{BASE_LR['diffusion']:g}, GAN base lr {BASE_LR['gan']:g}; classifier-FID of {p['n_fid']} samples "
              "against test digits.", ""]
    rows = [[r["model"], r["seed"], r["lr_factor"], r["fid"], r["classes_covered"], r["spikes"], r["diverged"],
             r["seconds"]] for r in result["stability"].values()]
    lines += [markdown_table(["model", "seed", "lr factor", "FID", "classes covered", "loss spikes", "failed",
                              "seconds"], rows), ""]
    if result.get("summary"):
        rows = [[m, s["seeds"], s["fid_mean"], s["fid_std"], s["fid_min"], s["fid_max"], s["spikes_mean"],
                 s["diverged_seeds"], f"{s['diverged_sweep']} / {s['sweep_runs']}"] for m, s in result["summary"].items()]
        lines += [markdown_table(["model", "seeds", "FID mean", "FID std", "FID min", "FID max", "spikes (mean)",
                                  "failed seeds", "failed (all runs)"], rows)]
    return "\n".join(lines)


def save(out: Path, result: dict, grids: dict) -> None:
    from _common import write_results

    result["summary"] = summarise(result)
    write_results(out, result, render(result))
    if grids:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **grids)
        out.with_name(out.stem + "_grids.npz").write_bytes(buffer.getvalue())


def main(argv=None) -> dict:
    parser = base_parser(__doc__, "trust.json")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    args = parser.parse_args(argv)
    done, machine, _ = begin(args, render, "Trust: memorisation and stability", HEADLINE)
    if done:
        return done
    p, out = PRESETS[args.preset], Path(args.out)
    result = {"preset_name": args.preset, "preset": p, "machine": machine, "memorisation": {}, "stability": {},
              "command": f"python benchmarks/trust.py {' '.join(argv if argv is not None else sys.argv[1:])}"}
    grids = {}
    if out.exists():  # resume: keep the finished runs of the same preset
        old = json.loads(out.read_text())
        same = lambda fields: all(old.get("preset", {}).get(f) == p[f] for f in fields)  # noqa: E731
        if same(MEM_FIELDS) or same(STAB_FIELDS):
            planned = {key(run) for run in plan(p)}
            long_steps = lambda k, r: not k.startswith("memlong") or r["steps"] == p["mem_long_steps"]  # noqa: E731
            result.update(memorisation={k: r for k, r in old["memorisation"].items() if k in planned and long_steps(k, r)}
                          if same(MEM_FIELDS) else {},
                          stability={k: v for k, v in old["stability"].items() if k in planned}
                          if same(STAB_FIELDS) else {},
                          machine=old["machine"], elapsed_before=old.get("total_wall_s", 0.0))
            grid_file = out.with_name(out.stem + "_grids.npz")
            if grid_file.exists():
                grids = dict(np.load(grid_file))
            print(f"resuming: {len(old['memorisation']) + len(old['stability'])} runs already done", flush=True)
    runs = plan(p)
    result["planned_runs"] = len(runs)
    start = time.perf_counter() - result.pop("elapsed_before", 0.0)
    images, labels = shuffled_training_set()
    test_images, _ = data.mnist(train=False)
    classifier = metrics.load_classifier("cpu", args.classifier)
    judge = FIDJudge(test_images[:2000], classifier)
    for run in runs:
        name = key(run)
        if name in result["memorisation"] or name in result["stability"]:
            continue
        if run[0] in ("mem", "memlong"):
            steps = p["mem_steps"] if run[0] == "mem" else p["mem_long_steps"]
            record, grid = memorisation_run(p, run[1], steps, images, labels, test_images, classifier)
            result["memorisation"][name] = record
            grids.update({f"{name}-{k}": v for k, v in grid.items()})
        else:
            result["stability"][name] = stability_run(p, *run[1:], images, judge, classifier)
        result["total_wall_s"] = time.perf_counter() - start
        save(out, result, grids)
        print(f"{name} done at {result['total_wall_s']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
