"""Plot what train_vs_anchor.py measured while training: the held-out eps-MSE of both recipes against images seen
and against training minutes, one thin line per seed. It is the picture behind the target "no worse loss per image
seen", and it shows where the two recipes cross.

The minutes axis is images seen divided by the run's mean img/s (the runs log images, not clock times).

    python benchmarks/plot_curves.py     # reads the headline results, writes results/train_vs_anchor_curves.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a script that writes files: no display needed
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402

HEADLINE_RUNS = ("train_vs_anchor.json", "train_vs_anchor_seed1.json", "train_vs_anchor_seed2.json")
RECIPES = {"anchor": ("anchor (course recipe)", "tab:gray"), "ours": ("this repo's recipe", "tab:blue")}


def load_runs(paths) -> list[dict]:
    runs = []
    for path in map(Path, paths):
        result = json.loads(path.read_text())
        if result.get("benchmark") != "train_vs_anchor":
            raise SystemExit(f"{path} is not a train_vs_anchor result (benchmark {result.get('benchmark')!r})")
        runs.append(result)
    return runs


def plot(runs: list[dict]) -> plt.Figure:
    fig, (by_images, by_minutes) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for result in runs:
        for side, (label, colour) in RECIPES.items():
            curve = result[side]["curve"]
            seen = [p["images_seen"] for p in curve]
            mse = [p["heldout_eps_mse"] for p in curve]
            minutes = [s / result[side]["images_per_s"] / 60 for s in seen]
            first = result is runs[0]
            by_images.plot(seen, mse, color=colour, lw=1.2, marker=".", label=label if first else None)
            by_minutes.plot(minutes, mse, color=colour, lw=1.2, marker=".")
    by_images.set(xscale="log", yscale="log", xlabel="training images seen", ylabel="held-out ε-MSE (512 test digits)")
    by_minutes.set(xscale="log", xlabel="training minutes (images seen ÷ mean img/s)")
    by_images.legend(frameon=False)
    seeds = ", ".join(str(r["seed"]) for r in runs)
    fig.suptitle(f"Held-out ε-MSE while training, {runs[0]['minutes']:g}-minute budget, seeds {seeds}")
    for ax in (by_images, by_minutes):
        ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=[str(RESULTS / name) for name in HEADLINE_RUNS])
    p.add_argument("--out", default=str(RESULTS / "train_vs_anchor_curves.png"))
    args = p.parse_args(argv)
    fig = plot(load_runs(args.runs))
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out}")
    return Path(args.out)


if __name__ == "__main__":
    main()
