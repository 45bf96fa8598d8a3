"""Teaching the shipped `mnist-cond-small` a new style, typeset digits: full fine-tuning against LoRA (Hu et al. 2022)
at ranks 1, 4 and 16, against fine-tuning steps and against the number of style images (chapter 09).

Data: `data.typeset_digits()` split by font face with `style_score.split_fonts(seed=0)`: the model is fine-tuned
on the training faces only (a stratified subset of `--sizes` images, the same number per digit), and measured
against the held-out faces. Every run starts from the same shipped weights and trains through `training.fit`
(EMA decay 0.99, batch `--batch-size`, labels only; the style code is left null). After `--eval-at` steps the EMA
weights draw `--n-eval` digits (0..9 cycling; DPM-Solver++(2M), `--sample-steps` steps, guidance `--guidance`,
the same noise for every run) and are scored by:
- style: the mean style score P(typeset) (`style_score.train_style_score`, trained here on the same training
  faces, its held-out accuracy recorded);
- class accuracy: the shipped MNIST classifier reads the requested digit (`metrics.conditional_accuracy`);
- classifier-FID against all held-out-face typeset digits (biased upwards at small N: compare rows only).
Reference rows: the base model itself, and `--n-eval` real training-face digits.
Trainable parameters and the bytes of the saved file (a LoRA file holds only A and B) are recorded per method.
With `--ship PATH` the rank-4, all-images run is also saved there as a LoRA file.

    python benchmarks/lora_sweep.py --threads 1 --steps 150 --eval-at 50 150 --n-eval 100 --ship checkpoints/typeset-lora.safetensors

writes benchmarks/results/lora_sweep.json and .md. Finished runs are kept in the JSON's `runs`, so a re-run with
the same settings skips them (each run also resumes from its `fit` checkpoint in runs/lora_sweep/).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, base_parser, begin, command_line, fmt, machine_line, markdown_table, write_results  # noqa: E402

from diffusion_lab import data, lora, metrics, style_score  # noqa: E402
from diffusion_lab.checkpoint import SHIPPED  # noqa: E402
from diffusion_lab.denoiser import load_denoiser, save_denoiser  # noqa: E402
from diffusion_lab.sample import generate  # noqa: E402
from diffusion_lab.training import FitConfig, fit, tensor_batches  # noqa: E402

BASE = "mnist-cond-small"
RUNS = Path("runs/lora_sweep")


def split(seed: int = 0):
    """(train images, train labels, held-out images): typeset digits split by font face."""
    images, labels, fonts = data.typeset_digits()
    train_faces, test_faces = style_score.split_fonts(list(dict.fromkeys(fonts.tolist())), seed=seed)
    held_out = torch.from_numpy(np.isin(fonts, test_faces))
    return images[~held_out], labels[~held_out], images[held_out], train_faces, test_faces


def stratified(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of n images, n // 10 of each digit (all when n >= len), drawn with a seeded permutation."""
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.nonzero(labels == d)[:, 0][torch.randperm(int((labels == d).sum()), generator=g)[: n // 10]]
                      for d in range(10)])


def score(denoiser, args, judge, held_out) -> dict:
    labels = torch.arange(args.n_eval) % 10
    x = generate(denoiser, labels, sampler="dpm++2m", steps=args.sample_steps, guidance=args.guidance, seed=args.seed)
    images = data.from_unit_range(x)[:, 0]
    return {"style": round(style_score.style_score(images, judge).mean().item(), 4),
            "accuracy": round(metrics.conditional_accuracy(images, labels), 4),
            "fid": round(metrics.classifier_fid(images, held_out), 2)}


def run_one(name, method, n_images, args, train_x, train_y, judge, held_out) -> dict:
    denoiser = load_denoiser(BASE, device="cpu")
    if method == "full":
        lr, trainable = args.lr_full, sum(p.numel() for p in denoiser.net.parameters())
    else:
        lora.add_lora(denoiser.net, rank=int(method[1:]))
        lr, trainable = args.lr_lora, lora.trainable_parameters(denoiser.net)
    idx = stratified(train_y, n_images, args.seed)
    batches = tensor_batches(train_x[idx], train_y[idx], transform=data.to_unit_range)
    config = FitConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, warmup=10, ema_decay=0.99,
                       seed=args.seed, device="cpu", ckpt_every=50, log_every=min(args.eval_at))
    curve, eval_at = [], args.eval_at if n_images >= len(train_y) else [args.steps]  # the size sweep: the end only

    def evaluate(step, ema_denoiser):
        if step in eval_at:
            curve.append({"step": step, **score(ema_denoiser, args, judge, held_out)})
            print(name, curve[-1], flush=True)

    RUNS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = fit(denoiser, batches, config, checkpoint=RUNS / f"{name}.safetensors", progress=False, callback=evaluate)
    if not curve or curve[-1]["step"] != result.step:  # resumed past an evaluation point: score the end
        curve.append({"step": result.step, **score(result.denoiser, args, judge, held_out)})
    out = RUNS / f"{name}-final.safetensors"
    if method == "full":
        save_denoiser(out, result.denoiser)
    else:
        lora.save_lora(out, result.denoiser.net, base=BASE, base_sha256=SHIPPED[BASE].sha256)
    run = {"name": name, "method": method, "images": len(idx), "steps": result.step, "lr": lr,
           "trainable_parameters": trainable, "file_bytes": out.stat().st_size, "curve": curve,
           "final_loss": round(float(np.mean(result.losses[-20:])), 5),
           "wall_s": round(time.perf_counter() - start, 1)}
    if args.ship and method == "r4" and n_images >= len(train_y):
        sha = lora.save_lora(args.ship, result.denoiser.net, base=BASE, base_sha256=SHIPPED[BASE].sha256,
                             command=args.command, images=len(idx), steps=result.step, fonts=args.train_faces)
        run["shipped"] = {"path": str(args.ship), "sha256": sha}
    return run


def render(result: dict) -> str:
    s = result["settings"]
    lines = [f"**Teaching {BASE} typeset digits: full fine-tuning against LoRA**", "",
             machine_line(result["machine"]), "", f"`{result['command']}`", "",
             f"Style score held-out accuracy {fmt(result['style_score_accuracy'])}; "
             f"{s['n_eval']} samples per point, DPM-Solver++(2M) {s['sample_steps']} steps, guidance {s['guidance']}; "
             f"total wall time {result.get('total_wall_s', '?')} s.", ""]
    ref = result["reference"]
    rows = [[f"base {BASE}", "-", "-", 0, "-", ref["base"]["style"], ref["base"]["accuracy"], ref["base"]["fid"]],
            ["real training-face digits", "-", "-", "-", "-", ref["real"]["style"], ref["real"]["accuracy"],
             ref["real"]["fid"]]]
    for run in result["runs"]:
        for point in run["curve"]:
            rows.append([run["method"], run["images"], point["step"], run["trainable_parameters"], run["file_bytes"],
                         point["style"], point["accuracy"], point["fid"]])
    lines.append(markdown_table(["method", "images", "step", "trainable", "file bytes", "style score", "accuracy",
                                 "classifier-FID"], rows))
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = base_parser(__doc__, "lora_sweep.json")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps per run")
    p.add_argument("--eval-at", type=int, nargs="+", default=[50, 150], help="steps at which to score (the size sweep: the last only)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-full", type=float, default=5e-4)
    p.add_argument("--lr-lora", type=float, default=3e-3)
    p.add_argument("--methods", nargs="+", default=["r4", "full", "r1", "r16"])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="image counts for r4 (besides all)")
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--style-steps", type=int, default=1000, help="training steps of the style score")
    p.add_argument("--ship", default=None, help="also save the rank-4, all-images LoRA here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    done, machine, _ = begin(args, render, "LoRA sweep", "python benchmarks/lora_sweep.py")
    if done:
        return done
    args.command = command_line("lora_sweep.py", argv if argv is not None else sys.argv[1:])
    args.eval_at = sorted(set(args.eval_at) | {args.steps})
    start = time.perf_counter()
    train_x, train_y, held_out, args.train_faces, test_faces = split(args.seed)
    judge, judge_accuracy = style_score.train_style_score(steps=args.style_steps, seed=args.seed)  # same face split
    settings = {k: getattr(args, k) for k in ("steps", "eval_at", "batch_size", "lr_full", "lr_lora", "n_eval",
                                              "sample_steps", "guidance", "style_steps", "seed")}
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    keep = previous.get("settings") == settings
    result = {"machine": machine, "command": args.command, "settings": settings,
              "train_faces": args.train_faces, "held_out_faces": test_faces, "n_held_out": len(held_out),
              "n_train": len(train_y), "style_score_accuracy": round(judge_accuracy, 4),
              "reference": previous.get("reference") if keep else None,
              "runs": previous.get("runs", []) if keep else []}
    if result["reference"] is None:
        real = train_x[stratified(train_y, args.n_eval, args.seed + 1)]
        real_labels = train_y[stratified(train_y, args.n_eval, args.seed + 1)]
        result["reference"] = {
            "base": score(load_denoiser(BASE, device="cpu"), args, judge, held_out),
            "real": {"style": round(style_score.style_score(real, judge).mean().item(), 4),
                     "accuracy": round(metrics.conditional_accuracy(real, real_labels), 4),
                     "fid": round(metrics.classifier_fid(real, held_out), 2)}}
        write_results(out, result, render(result))
    plan = [(m, len(train_y)) for m in args.methods] + [("r4", n) for n in args.sizes]
    for method, n_images in plan:
        name = f"{method}-n{n_images}"
        if any(r["name"] == name for r in result["runs"]):
            continue
        result["runs"].append(run_one(name, method, n_images, args, train_x, train_y, judge, held_out))
        result["total_wall_s"] = round(time.perf_counter() - start + previous.get("total_wall_s", 0) * keep, 1)
        write_results(out, result, render(result))
    return result


if __name__ == "__main__":
    main()
