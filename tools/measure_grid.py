"""Measure a model with the sample CLI at several sampler settings and write one JSON row per setting: the
measurement a model card quotes (for example checkpoints/mnist-cond-eval.json). A row already in --out for the same
file (SHA-256) and setting is kept, so an interrupted run resumes where it stopped.

    python tools/measure_grid.py --checkpoint mnist-cond --settings ddpm:10:1 dpm++2m:20:2 \\
        --out checkpoints/mnist-cond-eval.json

Each setting is sampler:steps:guidance. Every row is `python -m diffusion_lab.sample ... --evaluate` run in-process,
with the command that reproduces it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from pathlib import Path

from diffusion_lab import sample
from diffusion_lab.checkpoint import resolve_checkpoint
from diffusion_lab.utils import atomic_write_bytes, file_sha256


def parse_setting(text: str) -> tuple[str, int, float]:
    try:
        sampler, steps, guidance = text.split(":")
        return sampler, int(steps), float(guidance)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is sampler:steps:guidance, e.g. ddpm:10:1; got {text!r}") from None


def measure(checkpoint: str, settings, out: Path, n: int = 2000, seed: int = 0, grids: Path | None = None) -> dict:
    path, expected = resolve_checkpoint(checkpoint)
    sha256 = expected or file_sha256(path)
    record = json.loads(out.read_text()) if out.exists() else {}
    rows = record.get("rows", []) if record.get("sha256") == sha256 else []
    for sampler, steps, guidance in settings:
        if any((r["sampler"], r["steps"], r["guidance"]) == (sampler, steps, guidance) for r in rows):
            continue
        argv = ["--checkpoint", checkpoint, "--n", str(n), "--labels", "cycle", "--seed", str(seed),
                "--sampler", sampler, "--steps", str(steps), "--guidance", f"{guidance:g}", "--evaluate"]
        grid = ["--grid", str(grids / f"{Path(checkpoint).stem}_{sampler}_{steps}_{guidance:g}.png")] if grids else []
        with tempfile.TemporaryDirectory() as tmp:  # the samples themselves are not kept
            summary = sample.run(sample._parser().parse_args(argv + ["--out", str(Path(tmp) / "s.npz")] + grid))
        summary = {k: v for k, v in summary.items() if k not in ("out", "grid")}
        rows.append({"sampler": sampler, "steps": steps, "guidance": guidance,
                     "command": "python -m diffusion_lab.sample " + shlex.join(argv[:-1] + ["--out", "s.npz", "--evaluate"]), **summary})
        print(json.dumps(rows[-1]), flush=True)
        record = {"checkpoint": checkpoint, "sha256": sha256, "rows": rows}
        atomic_write_bytes(out, (json.dumps(record, indent=1) + "\n").encode())  # after every row: resumable
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a shipped name or a .safetensors path")
    p.add_argument("--settings", nargs="+", type=parse_setting, required=True, help="sampler:steps:guidance ...")
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write (and resume)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grids", type=Path, default=None, help="also write each setting's first 100 digits as a PNG here")
    args = p.parse_args(argv)
    measure(args.checkpoint, args.settings, args.out, args.n, args.seed, args.grids)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
