"""Chapter 12: the clip model against real Moving MNIST clips and a frame-by-frame image model, over seeds; the
cost of clips as the canvas and the frame count grow. Writes benchmarks/results/video.json (the chapter and the
model card `checkpoints/moving-mnist.md` read every number from it).

    python benchmarks/video.py --threads 1                      # ≈ 15 min of one core (3 seeds x 60 clips)
    python benchmarks/video.py --ship runs/moving-mnist-run.safetensors   # write the shipped file from a run

Per seed, 60 held-out clips (6 of each digit; `video.test_clips`) give the labels, the paths and the context:
  real:        the clips themselves, cropped along their true paths;
  generated:   the clip model asked for the same labels (DPM-Solver++(2M), guidance 2), cropped by centroid;
  baseline:    `mnist-cond` drawing a fresh digit of the label for every frame, pasted along the real path,
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
        "loss_first_50": round(losses[:50].mean().item(), 5), "loss_last_50": round(losses[-50:].mean().item(), 5)})
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
    p.add_argument("--ship-to", default=str(REPO / "checkpoints" / "moving-mnist.safetensors"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ship:
        ship(args.ship, args.ship_to)
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
