"""Shared pieces of the benchmark scripts: machine description, the sample-and-score protocol, and writers.

Every number in benchmarks/results/ comes from a script through `write_results`: it writes the JSON and a
markdown rendering of it side by side, so the appendix page (book/benchmarks.md) always shows what a script
measured. Nothing here is typed by hand.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from diffusion_lab import data, metrics
from diffusion_lab.sample import generate
from diffusion_lab.training import TrainConfig, TrainResult, train
from diffusion_lab.utils import get_device

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


# --- the machine -------------------------------------------------------------------------------------------

def _cpuinfo() -> tuple[str, set[str]]:
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name is None:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages. On a shared machine this says how many other processes wanted the
    cores while we measured; a load above the core count means our timings are slowed by contention."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info() -> dict:
    """What the numbers were measured on. Called at the start of a run, so `load_average_start` is the load
    that the measurement met, not the one it caused."""
    name, flags = _cpuinfo()
    try:  # read from the installed metadata: importing diffusers would cost seconds
        diffusers_version = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:  # the anchor needs it; the rest of the report does not
        diffusers_version = None
    cpu_capability = None
    if hasattr(torch.backends, "cpu") and hasattr(torch.backends.cpu, "get_cpu_capability"):
        cpu_capability = torch.backends.cpu.get_cpu_capability()
    return {
        "cpu": name,
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": cpu_capability,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- training for a wall-clock budget ------------------------------------------------------------------------

def run_record(result: TrainResult, **extra) -> dict:
    """A training run as a dict that a benchmark can extend: TrainResult's fields (denoiser, model, losses, step,
    elapsed_s, images_per_s, config, ...) plus `extra`."""
    return {f.name: getattr(result, f.name) for f in fields(result)} | extra


def train_for_budget(config: TrainConfig, minutes: float, images, labels, calibrate_steps: int = 10,
                     max_steps: int | None = None, callback=None) -> dict:
    """diffusion_lab.training.train for `minutes` of wall clock, calibration included.

    The recipe decays its learning rate over `config.steps`, so the step count must be known in advance: time
    `calibrate_steps` throw-away steps (a fresh model, same config; at most 5% of the budget, at least one
    step), fit the step count to the budget left (97% of it, leaving room for the probes a callback may run),
    and stop at the budget in any case (`max_minutes`). Returns `run_record` of the run plus "calibration",
    "images_seen" and "total_elapsed_s"."""
    t0 = time.perf_counter()
    calib = train(replace(config, steps=calibrate_steps, max_minutes=0.05 * minutes), progress=False,
                  images=images, labels=labels)
    calib_s = time.perf_counter() - t0
    per_step = calib_s / calib.step
    left_s = max(minutes * 60 - calib_s, per_step)
    steps = max(1, int(0.97 * left_s / per_step))
    if max_steps:
        steps = min(steps, max_steps)
    result = train(replace(config, steps=steps, max_minutes=left_s / 60), progress=False, images=images,
                   labels=labels, callback=callback)
    return run_record(result, images_seen=result.step * config.batch_size,
                      total_elapsed_s=calib_s + result.elapsed_s,
                      calibration={"steps": calib.step, "seconds": calib_s, "planned_steps": steps})


# --- sampling and scoring ----------------------------------------------------------------------------------

class Judge:
    """Classifier-FID against fixed reference statistics (real MNIST test digits) and conditional accuracy,
    both from the repo's shipped classifier (diffusion_lab.metrics)."""

    def __init__(self, classifier: metrics.MNISTClassifier, reference: torch.Tensor):
        self.classifier = classifier
        self.n_reference = len(reference)
        self.mu, self.sigma = metrics.feature_statistics(metrics.classifier_features(reference, classifier))

    def fid(self, images: torch.Tensor) -> float:
        mu, sigma = metrics.feature_statistics(metrics.classifier_features(images, self.classifier))
        return metrics.frechet_distance(mu, sigma, self.mu, self.sigma)

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        return {"classifier_fid": self.fid(images),
                "conditional_accuracy": metrics.conditional_accuracy(images, labels, self.classifier)}


def eval_labels(n: int) -> torch.Tensor:
    """The digits asked for: 0..9 cycling, so every class gets n/10 samples."""
    return torch.arange(n) % 10


def sample_images(denoiser, n: int, steps: int, sampler="ddim", guidance: float = 1.0, seed: int = 0,
                  batch: int = 500, clip_x0: float | None = 1.0) -> dict:
    """Draw n digits 0..9 cycling from a Denoiser with sample.generate; return {"images": uint8 (n, 28, 28),
    "labels", "seconds", "seconds_per_image"}.

    `sampler` is a name in samplers.SAMPLERS or a function with their signature (diffusion_lab.diffusers_compat
    makes diffusers' loops into one). The starting noise x_T depends only on `seed`, so two models sampled with
    the same seed start from the same x_T, and so do two samplers.
    """
    labels = eval_labels(n)
    start = time.perf_counter()
    x0 = generate(denoiser, labels, sampler=sampler, steps=steps, guidance=guidance, seed=seed, batch_size=batch,
                  clip_x0=clip_x0)  # on the CPU, so the device has finished
    seconds = time.perf_counter() - start
    return {"images": data.from_unit_range(x0)[:, 0], "labels": labels, "seconds": seconds,
            "seconds_per_image": seconds / n}


def real_floor(judge: Judge, n: int, seed: int = 1) -> float:
    """Classifier-FID of n real *training* digits against the reference: the best a model can score at this n
    (the estimate is biased upwards for small n, so a model's FID is read against this floor)."""
    train_images, _ = data.mnist(train=True)
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:n]
    return judge.fid(train_images[pick])


# --- writing results ---------------------------------------------------------------------------------------

def command_line(script: str, argv) -> str:
    args = list(argv) if argv is not None else sys.argv[1:]
    return " ".join(["python", f"benchmarks/{script}", *args])


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(machine: dict) -> str:
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['usable_cores']} usable cores)"
    return (f"Measured {machine['date']} on {where}, torch {machine['torch']} with {machine['torch_threads']} "
            f"threads, diffusers {machine.get('diffusers') or '–'}; load average at start "
            f"{' / '.join(map(str, machine.get('load_average_start') or []))} (1 / 5 / 15 min).")


def smoke_line(budget: str, headline: str) -> str:
    """The line every result file carries when it was run below its headline budget."""
    return (f"> **budget: {budget} — smoke check, not a result.** The headline run is `{headline}`; "
            "see benchmarks/README.md.")


def write_results(out: str | os.PathLike, result: dict, markdown: str) -> tuple[Path, Path]:
    """Write result as JSON at `out` and the markdown beside it (same name, .md). Returns both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown.rstrip() + "\n")
    return out, md


def write_placeholder(out: str | os.PathLike, title: str, headline: str) -> Path:
    """Write only the markdown, saying the benchmark has not been run here yet (so the appendix page still
    builds). No JSON is written: readers of the JSON (chapter 08) then say plainly that there is no result."""
    out = Path(out)
    if out.exists():
        raise SystemExit(f"error: {out} already holds results; a placeholder would hide them (delete it first)")
    md = out.with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(f"**{title}**\n\n> **Not yet measured on this machine.** Run `{headline}` from the repository "
                  "root (see benchmarks/README.md); it replaces this note with its results.\n")
    return md


def rerender(out: str | os.PathLike, render) -> Path:
    """Rewrite the markdown from the JSON already at `out` (after a change to how results are presented)."""
    out = Path(out)
    md = out.with_suffix(".md")
    md.write_text(render(json.loads(out.read_text())).rstrip() + "\n")
    return md


# --- the command line every script shares ------------------------------------------------------------------

def base_parser(doc: str, out_name: str | None = None) -> argparse.ArgumentParser:
    """The options every benchmark has: device, threads, classifier. With `out_name` (the result's default file in
    benchmarks/results, for a script that renders its JSON as markdown) also --out with that default, --rerender
    and --placeholder; without it the script adds its own --out."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if out_name:
        p.add_argument("--out", default=str(RESULTS / out_name))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--classifier", default=metrics.CLASSIFIER_NAME)
    if out_name:
        p.add_argument("--rerender", action="store_true", help="only rewrite the markdown from the JSON at --out")
        p.add_argument("--placeholder", action="store_true",
                       help="write only a 'not yet measured on this machine' markdown note and exit")
    return p


def model_options(p: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The UNet's shape options, defaulting to the package's TrainConfig."""
    d = TrainConfig()
    g = p.add_argument_group(f"{title} (defaults: diffusion_lab.training.TrainConfig)")
    g.add_argument("--channels", type=int, nargs=3, default=list(d.channels))
    g.add_argument("--blocks-per-level", type=int, default=d.blocks_per_level)
    g.add_argument("--attention", type=int, choices=(0, 1), default=int(d.attention))
    return g


def begin(args, render=None, title: str = "",
          headline: str = "") -> tuple[dict | None, dict | None, torch.device | None]:
    """Start a benchmark: (done, machine, device). With --rerender or --placeholder, `done` says what was written
    and the script returns it. Otherwise --threads is applied, and the machine (its load average now, before any
    work) and the device are returned. `render`, `title` and `headline` serve --rerender and --placeholder, which
    only a script with a markdown rendering has (see base_parser)."""
    if getattr(args, "rerender", False):
        return {"markdown": str(rerender(args.out, render))}, None, None
    if getattr(args, "placeholder", False):
        return {"placeholder": str(write_placeholder(args.out, title, headline))}, None, None
    if args.threads:
        torch.set_num_threads(args.threads)
    return None, machine_info(), get_device(None if args.device == "auto" else args.device)
