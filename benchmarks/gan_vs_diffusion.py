"""GAN vs diffusion on the same data and budget (chapter 01): classifier-FID against training wall time.

Both models train on the 60,000 MNIST training digits, with the same batch size, on the same device, for the
same budget of training wall time, over several seeds. Every `budget / evals` seconds of training we pause the
clock, draw `n_fid` samples and measure the classifier-FID (diffusion_lab.metrics) against the 10,000 held-out
test digits. The result is one FID-vs-time curve per model and seed, from which chapter 01 reads off the time
each model needs to reach a fixed FID, and its spread over seeds.

- GAN: the DCGAN of diffusion_lab.gan (Radford et al. 2016), trained by `gan.train_gan`; one forward pass
  per sample.
- Diffusion: an unconditional UNet trained by `training.train` with the recipe the book's benchmarks found best
  (v-prediction, cosine schedule, no attention, no EMA: benchmarks/results/ablation.md), sampled with ancestral
  DDPM at 10 steps, the best few-step sampler of benchmarks/results/sampling.md; `sampler_steps` forward passes
  per sample.

Each run makes exactly `evals` evaluations, at budget/evals, 2 budget/evals, ..., budget seconds of training.

Run from the repository root:
    python benchmarks/gan_vs_diffusion.py --preset full --out benchmarks/results/gan_vs_diffusion.json
    python benchmarks/gan_vs_diffusion.py --preset smoke --out /tmp/gvd.json      # seconds, any machine
    # the stored measurement (a 2-core CPU): one single-threaded process per seed, side by side, then merged
    for s in 0 1 2; do python benchmarks/gan_vs_diffusion.py --preset cpu --threads 1 --seeds $s --out /tmp/cpu$s.json & done; wait
    python benchmarks/gan_vs_diffusion.py --merge /tmp/cpu0.json /tmp/cpu1.json /tmp/cpu2.json \
        --out benchmarks/results/gan_vs_diffusion.json --note "Measured on a shared 2-core CPU: ..."
Chapter 01 imports this file to run a small version live, and plots the JSON it writes.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, begin, load_average, machine_info, sync  # noqa: E402

from diffusion_lab import checkpoint, data, gan, metrics  # noqa: E402
from diffusion_lab.sample import generate  # noqa: E402
from diffusion_lab.training import TrainConfig, build_denoiser, train  # noqa: E402
from diffusion_lab.utils import file_sha256  # noqa: E402
from diffusion_lab.unet import count_parameters  # noqa: E402
from diffusion_lab.utils import get_device  # noqa: E402

# Work amounts. smoke/demo/full match the run profiles, and chapter 01 runs them live; `cpu` is the longer
# CPU measurement whose JSON is stored in benchmarks/results. On a CPU the budget is counted in CPU seconds.
MODELS = ("gan", "diffusion")
PRESETS = {
    "smoke": dict(budget_s=1.0, evals=2, seeds=[0, 1, 2], n_fid=200, sampler_steps=5, gan_width=16,
                  unet_channels=[8, 16, 16], batch_size=32, n_hist=100, n_cost=50),
    "demo": dict(budget_s=8.0, evals=3, seeds=[0, 1, 2], n_fid=300, sampler_steps=10, gan_width=32,
                 unet_channels=[16, 32, 32], batch_size=64, n_hist=300, n_cost=200),
    "cpu": dict(budget_s=150.0, evals=5, seeds=[0, 1, 2], n_fid=500, sampler_steps=10, gan_width=32,
                unet_channels=[16, 32, 32], batch_size=64, n_hist=500, n_cost=100),
    "full": dict(budget_s=40.0, evals=10, seeds=[0, 1, 2], n_fid=2000, sampler_steps=10, gan_width=64,
                 unet_channels=[32, 64, 64], batch_size=128, n_hist=1000, n_cost=1000),
}


class FIDJudge:
    """Classifier-FID of generated images against fixed reference statistics (the held-out test digits)."""

    def __init__(self, reference: torch.Tensor, classifier: metrics.MNISTClassifier):
        self.classifier = classifier
        self.mu, self.sigma = metrics.feature_statistics(metrics.classifier_features(reference, classifier))

    def __call__(self, images: torch.Tensor) -> float:
        mu, sigma = metrics.feature_statistics(metrics.classifier_features(images.clamp(-1, 1), self.classifier))
        return metrics.frechet_distance(mu, sigma, self.mu, self.sigma)


def sample_diffusion(denoiser, n: int, sampler_steps: int, seed: int, batch_size: int = 1000) -> torch.Tensor:
    """n unconditional samples (n, 1, 28, 28) in [-1, 1] by ancestral DDPM with `sampler_steps` steps, through
    sample.generate. The generator is seeded, so every evaluation of a run draws from the same noise."""
    return generate(denoiser, n=n, sampler="ddpm", steps=sampler_steps, seed=seed, batch_size=batch_size)


class _Clock:
    """Training time on two clocks, with evaluation time taken out of both.

    wall: seconds on the wall clock; cpu: CPU seconds this process used (on one thread, what an idle core's
    wall clock would show). On a shared machine the wall clock also measures the neighbours, so the CPU presets
    run the budget on the cpu clock; on a GPU the wall clock is the one that matters.
    """

    def __init__(self, kind: str, device):
        if kind not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {kind!r}")
        self.kind, self.device = kind, device
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        self.eval_wall = self.eval_cpu = 0.0

    def read(self) -> tuple[float, float]:
        sync(self.device)
        return (time.perf_counter() - self.wall0 - self.eval_wall, time.process_time() - self.cpu0 - self.eval_cpu)

    def now(self) -> float:
        wall, cpu = self.read()
        return wall if self.kind == "wall" else cpu

    def evaluation(self, measure):
        """Run measure() off the clock; return its result."""
        w, c = time.perf_counter(), time.process_time()
        result = measure()
        sync(self.device)
        self.eval_wall += time.perf_counter() - w
        self.eval_cpu += time.process_time() - c
        return result


def _point(clock: _Clock, step: int, fid: float, wall: float, cpu: float) -> dict:
    return {"time_s": round(wall if clock.kind == "wall" else cpu, 3), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "step": step, "fid": fid}


def gan_fid_curve(images, judge: FIDJudge, budget_s: float, evals: int, n_fid: int, seed: int, device,
                  batch_size: int, width: int, lr_g: float = 2e-4, lr_d: float = 2e-4, z_dim: int = 64,
                  clock: str = "wall") -> dict:
    """Train a DCGAN for `budget_s` seconds of training time; measure FID every budget_s / evals seconds."""
    curve, next_eval = [], budget_s / evals
    timer = _Clock(clock, device)

    def evaluate(step, G, elapsed):
        nonlocal next_eval
        _, cpu = timer.read()
        # train_gan's own wall clock leaves out its set-up; the trigger and the record use the same clock
        if (elapsed if clock == "wall" else cpu) < next_eval:
            return False
        fid = timer.evaluation(lambda: judge(gan.sample_gan(G, n_fid, generator=torch.Generator().manual_seed(10_000 + seed))))
        curve.append(_point(timer, step, fid, elapsed, cpu))
        next_eval += budget_s / evals
        return len(curve) == evals

    run = gan.train_gan(images, steps=10**9, batch_size=batch_size, z_dim=z_dim, width=width, lr_g=lr_g, lr_d=lr_d,
                        seed=seed, device=device, callback=evaluate, callback_every=5, progress=False)
    return {"curve": curve, "steps": run["step"], "ms_per_step": 1000 * run["elapsed_s"] / run["step"],
            "cpu_ms_per_step": 1000 * curve[-1]["cpu_s"] / curve[-1]["step"],
            "d_losses": run["d_losses"], "g_losses": run["g_losses"], "generator": run["generator"],
            "params": count_parameters(run["generator"]) + count_parameters(run["discriminator"]),
            "params_sampler": count_parameters(run["generator"])}


def diffusion_config(seed: int, batch_size: int, channels, device) -> TrainConfig:
    """The diffusion recipe, pinned here so that a change of the package's defaults cannot change the race: the
    best of the book's ablation (v-prediction on a cosine schedule with T = 1000, no attention, and no EMA, which
    lags behind a run this short), unconditional like the GAN, and a constant learning rate after warm-up, since
    the run's length is a time budget."""
    return TrainConfig(channels=tuple(channels), blocks_per_level=1, attention=False, conditional=False, style=False,
                       schedule="cosine", T=1000, prediction="v", weighting="none", steps=10**9,
                       batch_size=batch_size, lr=2e-3, warmup=100, lr_decay="constant", weight_decay=0.0,
                       grad_clip=1.0, ema_decay=0.0, seed=seed, device=str(device), amp="none",
                       ckpt_every=10**9, log_every=5)


def diffusion_fid_curve(images, labels, judge: FIDJudge, budget_s: float, evals: int, n_fid: int, seed: int, device,
                        batch_size: int, channels, sampler_steps: int, clock: str = "wall") -> dict:
    """Train the UNet with training.train for `budget_s` seconds of training time, measuring FID along the way.

    The clock is ours, started when train() is called, with evaluations taken out. On the wall clock, the
    set-up before train()'s first step (model build, data to the device) is measured afterwards and subtracted.
    """
    config = diffusion_config(seed, batch_size, channels, device)
    raw, next_eval = [], budget_s / evals
    timer = _Clock(clock, device)

    def evaluate(step, ema):
        nonlocal next_eval
        if timer.now() < next_eval:
            return False
        wall, cpu = timer.read()
        fid = timer.evaluation(lambda: judge(sample_diffusion(ema, n_fid, sampler_steps, 10_000 + seed)))
        raw.append((step, fid, wall, cpu))
        next_eval += budget_s / evals
        return len(raw) == evals

    run = train(config, progress=False, images=images, labels=labels, callback=evaluate)
    # run.elapsed_s is train()'s own loop time (evaluations included); the rest of our wall clock is set-up
    setup = (time.perf_counter() - timer.wall0) - run.elapsed_s
    curve = [_point(timer, step, fid, wall - setup, cpu) for step, fid, wall, cpu in raw]
    train_s = run.elapsed_s - timer.eval_wall
    return {"curve": curve, "steps": run.step, "ms_per_step": 1000 * train_s / run.step,
            "cpu_ms_per_step": 1000 * curve[-1]["cpu_s"] / curve[-1]["step"], "losses": run.losses,
            "ema": run.denoiser, "prediction": config.prediction, "params": count_parameters(run.model),
            "params_sampler": count_parameters(run.denoiser.net), "setup_s": setup}


def time_to_target(curve: list[dict], target: float) -> float | None:
    """Training seconds at the first evaluation whose FID is at or below `target` (None if never)."""
    return next((p["time_s"] for p in curve if p["fid"] <= target), None)


def sampling_cost(cfg: dict, device, z_dim: int = 64) -> dict:
    """Wall time to draw cfg["n_cost"] samples: GAN one generator pass, diffusion sampler_steps UNet passes.

    The cost depends on the architecture only, not on the weights, so freshly built networks are timed
    (after a warm-up); this also lets a run of either model alone report both costs.
    """
    n, steps = cfg["n_cost"], cfg["sampler_steps"]
    G = gan.Generator(z_dim, cfg["gan_width"]).to(device)
    unet = build_denoiser(diffusion_config(0, cfg["batch_size"], cfg["unet_channels"], device)).to(device)
    unet.net.eval()
    timings = {}
    for name, draw in (("gan", lambda: gan.sample_gan(G, n, generator=torch.Generator().manual_seed(0))),
                       ("diffusion", lambda: sample_diffusion(unet, n, steps, 0))):
        draw()  # warm-up
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        draw()
        sync(device)
        timings[name] = (time.perf_counter() - t0, time.process_time() - c0)
    return {"n": n, "gan_s": timings["gan"][0], "diffusion_s": timings["diffusion"][0],
            "gan_cpu_s": timings["gan"][1], "diffusion_cpu_s": timings["diffusion"][1],
            "gan_forward_passes": 1, "diffusion_forward_passes": steps}


def _thin(values, points: int = 400) -> list[float]:
    """Block means of a long per-step series, so the JSON stays small (a plot needs a few hundred points)."""
    v = np.asarray(values, dtype=float)
    if len(v) <= points:
        return [round(float(x), 5) for x in v]
    edges = np.linspace(0, len(v), points + 1).astype(int)
    return [round(float(v[a:b].mean()), 5) for a, b in zip(edges[:-1], edges[1:])]


def _uint8_list(images: torch.Tensor) -> list:
    return data.from_unit_range(images[:, 0]).tolist()


def compare(preset: str = "demo", device=None, classifier=None, progress: bool = True, **overrides) -> dict:
    """Run the whole comparison at one preset's sizes (keyword overrides win) and return a JSON-able dict."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    device = get_device(None if device in (None, "auto") else device)
    cfg = {**PRESETS[preset], "clock": "wall" if device.type == "cuda" else "cpu", **overrides}
    classifier = classifier if classifier is not None else metrics.load_classifier(device)
    train_images, train_labels = data.mnist(train=True)
    test_images, _ = data.mnist(train=False)
    judge = FIDJudge(test_images, classifier)
    rng = torch.Generator().manual_seed(1234)
    floor = judge(data.to_unit_range(train_images[torch.randperm(len(train_images), generator=rng)[:cfg["n_fid"]]]))
    say = print if progress else (lambda *a, **k: None)
    machine = machine_info()  # its load average: the one the race met, before it ran
    say(f"[{preset}] device {device}; real-vs-real floor FID at n={cfg['n_fid']}: {floor:.3f}")

    models = cfg.setdefault("models", list(MODELS))
    if not models or set(models) - set(MODELS):
        raise ValueError(f"models must be a non-empty subset of {MODELS}, got {models}")
    # warm-up: the first steps on a device pay one-off costs (kernel selection, allocator) that no run should carry
    if "gan" in models:
        gan.train_gan(train_images, steps=3, batch_size=cfg["batch_size"], width=cfg["gan_width"], device=device,
                      progress=False)
    if "diffusion" in models:
        train(dataclasses.replace(diffusion_config(0, cfg["batch_size"], cfg["unet_channels"], device), steps=3),
              progress=False, images=train_images, labels=train_labels)

    runs = {name: [] for name in models}
    for seed in cfg["seeds"]:
        for name in models:
            t0 = time.perf_counter()
            if name == "gan":
                run = gan_fid_curve(train_images, judge, cfg["budget_s"], cfg["evals"], cfg["n_fid"], seed, device,
                                    cfg["batch_size"], cfg["gan_width"], clock=cfg["clock"])
                samples = gan.sample_gan(run["generator"], cfg["n_hist"], generator=torch.Generator().manual_seed(7))
                extra = {"d_losses": _thin(run["d_losses"]), "g_losses": _thin(run["g_losses"])}
            else:
                run = diffusion_fid_curve(train_images, train_labels, judge, cfg["budget_s"], cfg["evals"], cfg["n_fid"],
                                          seed, device, cfg["batch_size"], cfg["unet_channels"], cfg["sampler_steps"],
                                          clock=cfg["clock"])
                samples = sample_diffusion(run["ema"], cfg["n_hist"], cfg["sampler_steps"], 7)
                extra = {"losses": _thin(run["losses"]), "setup_s": run["setup_s"], "objective": run["prediction"]}
            say(f"  {name} seed {seed}: {run['steps']} steps, {run['ms_per_step']:.1f} ms/step, "
                f"FID {[round(p['fid'], 2) for p in run['curve']]} ({time.perf_counter() - t0:.0f} s)")
            entry = {"seed": seed, "curve": run["curve"], "steps": run["steps"], "ms_per_step": run["ms_per_step"],
                     "cpu_ms_per_step": run["cpu_ms_per_step"], "params": run["params"],
                     "params_sampler": run["params_sampler"],
                     "class_histogram": metrics.class_histogram(samples, classifier).tolist(), **extra}
            if seed == cfg["seeds"][0]:
                entry["samples"] = _uint8_list(samples[:24])
            runs[name].append(entry)

    cost = sampling_cost(cfg, device)
    return {
        "what": "classifier-FID vs training time (the config's clock), DCGAN vs unconditional diffusion (DDPM), "
                "same data, batch size and device",
        "script": "benchmarks/gan_vs_diffusion.py",
        "preset": preset,
        "config": cfg,
        "machine": {"device": str(device), "name": machine["gpu"] if device.type == "cuda" else machine["cpu"],
                    **{k: machine[k] for k in ("cpu_count", "torch_threads", "torch", "python")},
                    "load_average_before": machine["load_average_start"], "load_average_after": load_average()},
        "date": datetime.date.today().isoformat(),
        "floor_fid": floor,
        "runs": runs,
        "sampling_cost": cost,
    }


def merge(parts: list[dict], note: str | None = None) -> dict:
    """One result from several runs of the same preset: e.g. one process per seed, or per model.

    Each part contributes the runs of the models its config lists; a model may come from several parts
    (different seeds) but the same (model, seed) may appear only once.
    """
    def setting(part):
        return {k: v for k, v in part["config"].items() if k not in ("seeds", "models")}

    first = parts[0]
    for part in parts[1:]:
        if setting(part) != setting(first) or part.get("classifier_sha256") != first.get("classifier_sha256"):
            raise ValueError("can only merge results of the same preset, config and classifier")
    runs: dict[str, list] = {}
    for part in parts:
        for name in part["config"].get("models", MODELS):
            runs.setdefault(name, []).extend(part["runs"][name])
    for name, rs in runs.items():
        seeds = [r["seed"] for r in rs]
        if len(seeds) != len(set(seeds)):
            raise ValueError(f"{name}: seed appears in more than one part: {sorted(seeds)}")
        rs.sort(key=lambda r: r["seed"])
    merged = {**first, "runs": {name: runs[name] for name in MODELS if name in runs}}
    merged["config"] = {**first["config"], "seeds": sorted({r["seed"] for rs in runs.values() for r in rs}),
                        "models": [name for name in MODELS if name in runs]}
    merged["parts"] = [{"command": p.get("command"), "models": p["config"].get("models", list(MODELS)),
                        "seeds": p["config"]["seeds"], "total_wall_s": p.get("total_wall_s"), "date": p.get("date"),
                        "machine": p["machine"]} for p in parts]
    merged["total_wall_s"] = max(p.get("total_wall_s", 0) for p in parts)  # the parts ran side by side
    if note:
        merged["note"] = note
    return merged


def main(argv=None) -> None:
    p = base_parser(__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--out", required=True, help="where to write the JSON results")
    p.add_argument("--budget-s", type=float, help="training seconds per run (overrides the preset)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to run (overrides the preset), e.g. one per process")
    p.add_argument("--models", nargs="+", choices=MODELS, help="train only these models (overrides the preset)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge these result files (one per seed) into --out")
    p.add_argument("--note", help="with --merge: a note stored in the merged file")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        result = merge([json.loads(Path(f).read_text()) for f in args.merge], args.note)
        out.write_text(json.dumps(result, separators=(",", ":")))
        print(f"merged {len(args.merge)} files into {out}")
        return
    _, _, device = begin(args)  # applies --threads
    overrides = {"budget_s": args.budget_s} if args.budget_s else {}
    if args.seeds:
        overrides["seeds"] = args.seeds
    if args.models:
        overrides["models"] = args.models
    t0 = time.perf_counter()
    result = compare(args.preset, device, metrics.load_classifier(device, args.classifier), **overrides)
    result["total_wall_s"] = round(time.perf_counter() - t0, 1)
    result["classifier_sha256"] = file_sha256(checkpoint.resolve_checkpoint(args.classifier)[0])
    result["command"] = "python benchmarks/gan_vs_diffusion.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.write_text(json.dumps(result, separators=(",", ":")))
    print(f"wrote {out} in {result['total_wall_s']} s")


if __name__ == "__main__":
    main()
