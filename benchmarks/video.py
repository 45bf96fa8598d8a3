"""Chapter 12: the clip model against real Moving MNIST clips and a frame-by-frame image model, over seeds; the
cost of clips as the canvas and the frame count grow. Writes benchmarks/results/video.json (the chapter and the
model card `checkpoints/moving-mnist.md` read every number from it).

    python benchmarks/video.py --threads 1                      # ≈ 15 min of one core (3 seeds x 60 clips)
    python benchmarks/video.py --ship runs/moving-mnist-run.safetensors   # write the shipped file from a run

Per seed, 60 held-out clips (6 of each digit; `video.test_clips`) give the labels, the paths and the context:
  real:        the clips themselves, cropped along their true paths;
  generated:   the clip model asked for the same labels (DPM-Solver++(2M), guidance 2), cropped by centroid;
  baseline:    `mnist-cond-small` drawing a fresh digit of the label for every frame, pasted along the real path,
               cropped by centroid like the generated clips;
  prediction:  frames 4-7 generated from frames 0-3 (no label), against copying frame 3;
  interpolation: frames 1-6 generated from frames 0 and 7, against a cross-fade of the two.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffusion_lab import video  # noqa: E402
from diffusion_lab.checkpoint import load_checkpoint  # noqa: E402
from diffusion_lab.denoiser import load_denoiser, save_denoiser  # noqa: E402
from diffusion_lab.sample import generate  # noqa: E402
from diffusion_lab.unet import SpaceTimeResBlock, UNet, count_parameters  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "video.json"
SIZES, FRAME_COUNTS = (28, 64, 256, 512), (16, 32, 64, 128)


def ship(run: str, out: str) -> None:
    """The shipped file: the run's EMA weights and contract, plus how it was trained (from the run's own record)."""
    tensors, meta = load_checkpoint(run)
    denoiser = load_denoiser(run, device="cpu")
    losses = tensors["history.loss"]
    sha = save_denoiser(out, denoiser, training={
        "steps": meta["step"], "elapsed_s": meta["elapsed_s"], "fit": meta["fit"], "record": meta["record"],
        "loss_first_50": round(losses[:50].mean().item(), 5), "loss_last_50": round(losses[-50:].mean().item(), 5),
        "loss_per_25_steps": [round(x, 5) for x in losses[: len(losses) // 25 * 25].reshape(-1, 25).mean(1).tolist()]})
    print(json.dumps({"out": out, "sha256": sha, "bytes": Path(out).stat().st_size, "step": meta["step"]}))


def cost(denoiser) -> dict:
    """Parameters and FLOPs of the clip UNet, its temporal layers' share, and FLOPs per clip as the clip grows."""
    net, frames, size = denoiser.net, denoiser.shape[1], denoiser.shape[-1]
    flat = UNet(**{**net.config, "dims": "2d"})  # the same network without temporal layers, frame by frame
    flat_flops = video.clip_flops(net, frames, size) - _temporal_flops(net, frames, size)
    table = [{"size": s, "frames": f, "flops": video.clip_flops(net, f, s)} for s in SIZES for f in FRAME_COUNTS]
    return {"parameters": count_parameters(net), "parameters_without_temporal": count_parameters(flat),
            "flops_per_clip": video.clip_flops(net, frames, size), "flops_per_clip_without_temporal": flat_flops,
            "frames": frames, "size": size, "table": table}


def _temporal_flops(net, frames, size) -> int:
    """FLOPs of the temporal convs alone: the clip UNet's count minus the count with them switched off."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        twin = UNet(**net.config)
        for block in twin.modules():
            if isinstance(block, SpaceTimeResBlock):
                block.temporal = torch.nn.Identity()
                block.temporal_norm = torch.nn.Identity()
        counter = FlopCounterMode(display=False)
        with counter:
            twin(torch.zeros(1, net.in_channels, frames, size, size), torch.zeros(1))
    return video.clip_flops(net, frames, size) - counter.get_total_flops()


def one_seed(denoiser, image_model, seed: int, n: int, steps: int, guidance: float, k: int) -> dict:
    held_out, index = video.test_clips(n, seed=seed)
    labels, paths = held_out.labels[:, 0], held_out.trajectories
    F = held_out.clips.shape[1]
    timings = {}

    start = time.perf_counter()
    generated = video.clips_from_unit_range(generate(denoiser, labels, steps=steps, guidance=guidance, seed=seed))
    timings["generate_s_per_clip"] = (time.perf_counter() - start) / n
    baseline = video.frame_by_frame(image_model, labels, paths[:, 0], seed=seed, steps=steps, guidance=guidance)
    start = time.perf_counter()
    predicted = video.complete(denoiser, held_out.clips, range(k), seed=seed, steps=steps)
    timings["predict_s_per_clip"] = (time.perf_counter() - start) / n
    interpolated = video.complete(denoiser, held_out.clips, (0, F - 1), seed=seed, steps=steps)

    future, middle = range(k, F), range(1, F - 1)
    copy_last = held_out.clips[:, k - 1:k].expand(-1, F, -1, -1)
    w = torch.linspace(0, 1, F)[None, :, None, None]
    crossfade = ((1 - w) * held_out.clips[:, :1].float() + w * held_out.clips[:, -1:].float()).round().to(torch.uint8)
    return {
        "seed": seed, "test_index_first": index[:5].tolist(), **{k_: round(v, 4) for k_, v in timings.items()},
        "real": video.evaluate_clips(held_out.clips, labels, paths),
        "real_centroid_tracked": video.evaluate_clips(held_out.clips, labels),
        "generated": video.evaluate_clips(generated, labels),
        "baseline": video.evaluate_clips(baseline, labels),
        "prediction": {"model": video.horizon_errors(predicted, held_out.clips, future),
                       "copy_last": video.horizon_errors(copy_last, held_out.clips, future),
                       "scores": video.evaluate_clips(predicted, labels, paths)},
        "interpolation": {"model": video.horizon_errors(interpolated, held_out.clips, middle),
                          "crossfade": video.horizon_errors(crossfade, held_out.clips, middle),
                          "scores": video.evaluate_clips(interpolated, labels, paths)},
    }


def card(result: dict, sha256: str, size: int) -> str:
    """The model card checkpoints/moving-mnist.md, every number from `result` (this script's JSON)."""
    import numpy as np

    runs, c, t = result["runs"], result["cost"], result["training"]
    mean = lambda f: float(np.mean([f(r) for r in runs]))  # noqa: E731
    sd = lambda f: float(np.std([f(r) for r in runs]))  # noqa: E731
    rows = []
    for kind in ("real", "generated", "baseline"):
        rows.append(f"| {kind} | " + " | ".join(
            f"{mean(lambda r: r[kind][s]) * k:.{d}f} ± {sd(lambda r: r[kind][s]) * k:.{d}f}"
            for s, k, d in (("accuracy", 100, 1), ("consistency", 100, 1), ("stroke_change", 1, 4),
                            ("smoothness_px", 1, 3), ("speed_px", 1, 3)))
            + " |")
    horizon = lambda task, m, key: [float(x) for x in np.mean([r[task][m][key] for r in runs], axis=0)]  # noqa: E731
    fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    return f"""# Model card: `moving-mnist`

A class-conditional diffusion model of 8-frame, 32 x 32 Moving MNIST clips with one digit (chapter 12). Load it with
`diffusion_lab.denoiser.load_denoiser("moving-mnist")` (SHA-256 verified against `checkpoint.SHIPPED`); sample it
with `python -m diffusion_lab.sample --checkpoint moving-mnist --n 32 --labels cycle --seed 0 --out clips.npz`
(add `--context-from test --context-frames 4` to continue held-out clips, `--gif DIR` for animations).
Every number below is written by `python benchmarks/video.py` from `benchmarks/results/video.json`.

## File

| | |
|---|---|
| file | `checkpoints/moving-mnist.safetensors` (checkpoint format 2: `net.*` EMA weights, the schedule's betas, the contract and the training record as JSON; no pickle) |
| size | {size:,} bytes |
| SHA-256 | `{sha256}` |
| made by | `python benchmarks/video.py --ship runs/moving-mnist-run.safetensors` (the run's EMA weights, decay {t["fit"]["ema_decay"]}) |

## Model

`UNet(in_channels=1, channels=(16, 32, 64), attention=True, num_classes=10, dims="2+1d")`: {c["parameters"]:,}
parameters, {c["parameters"] - c["parameters_without_temporal"]:,} of them in the zero-initialised 3x1x1 temporal
convs and their norms. {c["flops_per_clip"] / 1e9:.3f} GFLOPs per network evaluation on one clip
({c["flops_per_clip_without_temporal"] / 1e9:.3f} without the temporal layers; torch's FLOP counter). v-prediction,
cosine schedule, T = 1000, all inherited from `mnist-cond-small`, whose spatial weights it starts from
(`video.video_denoiser`; the null style's embedding folded into a bias).

## Training

| | |
|---|---|
| command | `video.train_video("runs/moving-mnist-run.safetensors", steps=1800, batch_size=16, lr=1e-3, max_minutes=36)` with one torch thread, resumed once (started with steps=1000, raised to 1800 at step 150) |
| data | `video.clip_batches()`: fresh one-digit clips from the 60,000 MNIST training digits every step |
| steps | {t["steps"]:,} of 16 clips (stopped by the time budget); warm-up {t["fit"]["warmup"]}, lr {t["fit"]["lr"]}, cosine decay, label dropout {t["fit"]["p_uncond"]} |
| hardware | 2-core CPU shared with other jobs, one thread |
| wall time | {t["elapsed_s"]:,.0f} s (the checkpoint's `elapsed_s`) |
| loss | {t["loss_first_50"]:.4f} (mean of the first 50 steps) to {t["loss_last_50"]:.4f} (last 50) |

## Evaluation

{result["n"]} held-out clips per seed (`video.test_clips`, MNIST test digits only), seeds {result["seeds"]},
DPM-Solver++(2M) with {result["steps"]} steps, guidance {result["guidance"]} for generation. Mean ± std over seeds.
Frames are classified by `mnist-classifier` on each digit's 28 x 28 crop (real clips: along their true path;
generated and baseline: around the ink's centre). Stroke change (`video.stroke_change`): the mean absolute change
of intensity, in [0, 1], between consecutive crops after the best alignment of up to one pixel (0 for a digit that
keeps its exact strokes). Baseline: `mnist-cond-small` drawing a new digit of the label for every frame, pasted along the
real clip's path.

| clips | per-frame accuracy % | identity consistency % | stroke change | bounce-fit residual px | speed px/frame |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Prediction from the first {result["context_frames"]} frames (no label), per frame ahead:
ink-centre distance (px) model {fmt(horizon("prediction", "model", "centre_px"))}; copy-last
{fmt(horizon("prediction", "copy_last", "centre_px"))}. Pixel MSE model {fmt(horizon("prediction", "model", "mse"))};
copy-last {fmt(horizon("prediction", "copy_last", "mse"))}.

Interpolation from frames 0 and 7, per middle frame: ink-centre distance (px) model
{fmt(horizon("interpolation", "model", "centre_px"))}; cross-fade {fmt(horizon("interpolation", "crossfade", "centre_px"))}.

Sampling time: {mean(lambda r: r["generate_s_per_clip"]):.2f} s per generated clip on one shared CPU core
(20 steps, guided). Benchmark wall time {result["total_wall_s"]:.0f} s per process ({result.get("processes", 1)} processes).

## Limits

One digit per clip on a 32 x 32 canvas with 4 pixels of room, 8 frames; trained for well under an hour of one CPU
core. The metrics depend on the repository's classifier and on a centroid tracker.
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="moving-mnist", help="a shipped name or a .safetensors path")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=60, help="held-out clips per seed")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++(2M) steps")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--context-frames", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--ship", default=None, metavar="RUN", help="write the shipped file from this training run and stop")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="join result files of the same settings run as separate processes (one seed each) into --out")
    p.add_argument("--card", action="store_true", help="write checkpoints/moving-mnist.md from --out and stop")
    p.add_argument("--ship-to", default=str(REPO / "checkpoints" / "moving-mnist.safetensors"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ship:
        ship(args.ship, args.ship_to)
        return 0
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = {**parts[0], "runs": [r for part in parts for r in part["runs"]],
                  "seeds": [s for part in parts for s in part["seeds"]],
                  "total_wall_s": max(part["total_wall_s"] for part in parts), "processes": len(parts)}
        Path(args.out).write_text(json.dumps(merged, indent=1) + "\n")
        return 0
    if args.card:
        from diffusion_lab.utils import file_sha256

        shipped = Path(args.ship_to)
        text = card(json.loads(Path(args.out).read_text()), file_sha256(shipped), shipped.stat().st_size)
        (shipped.parent / "moving-mnist.md").write_text(text)
        return 0
    denoiser = load_denoiser(args.checkpoint, device="cpu")
    image_model = load_denoiser(video.IMAGE_MODEL, device="cpu")
    start = time.perf_counter()
    result = {"checkpoint": str(args.checkpoint), "n": args.n, "seeds": args.seeds, "steps": args.steps,
              "guidance": args.guidance, "context_frames": args.context_frames, "threads": args.threads,
              "torch": torch.__version__, "cost": cost(denoiser), "runs": []}
    tensors, meta = load_checkpoint(args.checkpoint)
    result["training"] = meta.get("training", {"steps": meta.get("step"), "elapsed_s": meta.get("elapsed_s")})
    for seed in args.seeds:
        result["runs"].append(one_seed(denoiser, image_model, seed, args.n, args.steps, args.guidance,
                                       args.context_frames))
        print(f"seed {seed} done after {time.perf_counter() - start:.0f} s", flush=True)
    result["total_wall_s"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"out": args.out, "total_wall_s": result["total_wall_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
