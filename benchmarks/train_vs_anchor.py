"""This repo's MNIST recipe against the anchor (benchmarks/anchor.py) for the same wall-clock budget.

Protocol:
1. MNIST is loaded once, outside both clocks; both recipes draw batches from the same in-memory uint8 tensor.
2. The anchor trains first for `--minutes` of wall clock, then this repo's recipe (diffusion_lab.training.train)
   for the same budget, on the same machine. The load average is recorded before each, so contention shows.
   Our recipe decays its learning rate over a number of steps it must know in advance: it times
   `--calibrate-steps` throw-away steps first (at most 5% of the budget) and fits the step count to the budget
   that is left. That calibration counts against its budget.
3. Both are sampled the same way: diffusion_lab.samplers (`--sampler`: default deterministic DDIM, the headline
   ancestral DDPM, see benchmarks/README.md; `--sample-steps` network evaluations, trailing timesteps, x0_hat
   clipped to [-1, 1]) from the same starting noise x_T (and, for DDPM, the same noise at every step), the
   anchor with its own float32 betas and eps-prediction, ours with its own prediction. The anchor gets no guidance
   (it was trained without label dropout), so ours is compared at guidance 1.0 (plain conditional), and its
   guided numbers follow as extra rows.
4. Scores: classifier-FID of `--n-eval` samples (digits 0..9 cycling) against all 10,000 real test digits, and
   conditional accuracy, both from the shipped classifier (diffusion_lab.metrics). The FID of `--n-eval` real
   training digits is the floor at that sample size.
5. Loss per image seen: training losses are in different units (eps vs v), so both models are also scored on
   one yardstick, the eps-MSE (L_simple) on held-out test digits with fixed (t, eps) draws, at the same numbers
   of images seen — including the anchor's final count. Those probes run inside both clocks and cost both alike.

Run from the repository root (about 2 x 20 min of training plus sampling on a 2-core CPU):
    python benchmarks/train_vs_anchor.py --minutes 20 --seed 0 --n-eval 2000 --amp bf16 --attention 0 --p-uncond 0.05 \
        --sampler ddpm --sample-steps 10
writes benchmarks/results/train_vs_anchor.json and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Judge, base_parser, begin, command_line, fmt, load_average, machine_line,  # noqa: E402
                     markdown_table, model_options, real_floor, sample_images, smoke_line, train_for_budget,
                     write_results)
from anchor import RECIPE, anchor_denoiser, anchor_schedule, save_anchor, train_anchor  # noqa: E402

from diffusion_lab import data, metrics  # noqa: E402
from diffusion_lab.denoiser import save_denoiser  # noqa: E402
from diffusion_lab.samplers import SAMPLERS  # noqa: E402
from diffusion_lab.schedules import eps_from_v, eps_from_x0, q_sample  # noqa: E402
from diffusion_lab.training import TrainConfig  # noqa: E402
from diffusion_lab.unet import count_parameters  # noqa: E402
from diffusion_lab.utils import append_dims, get_device  # noqa: E402

HEADLINE = {"minutes": 20.0, "n_eval": 2000}
TITLE = "This repo's recipe vs the anchor (Hugging Face diffusion-models-class unit 2, on diffusers)"
HEADLINE_COMMAND = ("python benchmarks/train_vs_anchor.py --minutes 20 --seed 0 --n-eval 2000 --amp bf16 --attention 0 "
                    "--p-uncond 0.05 --sampler ddpm --sample-steps 10")
# How each sampler draws, for the result's prose (both models use the same one).
SAMPLER_NOTES = {"ddim": "deterministic, eta 0",
                 "ddpm": "ancestral, posterior variance beta_tilde, fresh noise each step from the seeded generator",
                 "dpm++2m": "deterministic second-order multistep"}


# --- the common yardstick: held-out eps-MSE -----------------------------------------------------------------

class HeldOutProbe:
    """eps-MSE of a denoiser on fixed held-out digits, noise levels and noise (the same draws for every model)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, schedule, device, seed: int = 123, batch: int = 256):
        g = torch.Generator().manual_seed(seed)
        self.x0 = data.to_unit_range(images).to(device)
        self.labels = labels.to(device)
        self.t = torch.randint(0, schedule.T, (len(images),), generator=g).to(device)
        self.eps = torch.randn(self.x0.shape, generator=g).to(device)
        self.x_t = q_sample(schedule, self.x0, self.t, self.eps)
        self.alpha_bar_t = append_dims(schedule.alpha_bars.to(device)[self.t].float(), 4)
        self.batch = batch

    @torch.no_grad()
    def __call__(self, denoiser) -> float:
        """A Denoiser's output, whatever it predicts, becomes eps_hat before the MSE (its network in eval mode)."""
        was_training = denoiser.net.training
        denoiser.net.eval()
        total = 0.0
        for i in range(0, len(self.x0), self.batch):
            s = slice(i, i + self.batch)
            x_t, alpha_bar_t = self.x_t[s], self.alpha_bar_t[s]
            out = denoiser(x_t, self.t[s], labels=self.labels[s]).float()
            total += (as_eps(out, x_t, alpha_bar_t, denoiser.prediction) - self.eps[s]).pow(2).sum().item()
        denoiser.net.train(was_training)
        return total / self.eps.numel()


def as_eps(out: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor, prediction: str) -> torch.Tensor:
    """A network output of any parameterisation, turned into eps_hat."""
    if prediction == "eps":
        return out
    if prediction == "v":
        return eps_from_v(x_t, out, alpha_bar_t)
    if prediction == "x0":
        return eps_from_x0(x_t, out, alpha_bar_t)
    raise ValueError(f"unknown prediction {prediction!r}")


def probe_points(log_every: int = 10):
    """Steps at which the curve is probed: log_every x 1, 2, 4, 8, ... (a log-spaced loss curve)."""
    def due(step: int) -> bool:
        k = step // log_every
        return step % log_every == 0 and k > 0 and k & (k - 1) == 0
    return due


# --- the two runs -------------------------------------------------------------------------------------------

def run_anchor(args, images, labels, probe: HeldOutProbe, device) -> dict:
    curve, due = [], probe_points()
    schedule = anchor_schedule()

    def callback(step, images_seen, model):
        if due(step):
            curve.append({"step": step, "images_seen": images_seen,
                          "heldout_eps_mse": probe(anchor_denoiser(model, schedule))})
        return False

    load = load_average()
    result = train_anchor(minutes=args.minutes, steps=args.max_steps, batch_size=args.batch_size, seed=args.seed,
                          device=device, images=images, labels=labels, callback=callback, log_every=1)
    final = probe(anchor_denoiser(result["model"], schedule))
    curve.append({"step": result["step"], "images_seen": result["images_seen"], "heldout_eps_mse": final})
    result.update(curve=curve, load_average_start=load, heldout_eps_mse=final, recipe=RECIPE,
                  parameters=count_parameters(result["model"]))
    return result


def save_models(folder: Path, seed: int, anchor: dict, ours: dict) -> dict:
    """Both trained models, so that other samplers can score the same weights later: anchor.load_anchor and
    diffusion_lab.denoiser.load_denoiser read them (and `sampling.py --checkpoint` takes ours)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"anchor": folder / f"anchor-seed{seed}.safetensors", "ours": folder / f"ours-seed{seed}.safetensors"}
    saved = {"anchor": {"path": str(paths["anchor"]),
                        "sha256": save_anchor(paths["anchor"], anchor["model"], anchor["step"])}}
    # the EMA weights we sample with and their contract, as a shipped file holds them
    sha256 = save_denoiser(paths["ours"], ours["denoiser"], train=asdict(ours["config"]), step=ours["step"])
    saved["ours"] = {"path": str(paths["ours"]), "sha256": sha256}
    return saved


def our_config(args) -> TrainConfig:
    return TrainConfig(channels=tuple(args.channels), blocks_per_level=args.blocks_per_level,
                       attention=bool(args.attention), batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       ema_decay=args.ema_decay, p_uncond=args.p_uncond, seed=args.seed, device=str(device_of(args)), log_every=1,
                       ckpt_every=10**9, amp=args.amp, channels_last=bool(args.channels_last))


def device_of(args) -> torch.device:
    return get_device(None if args.device == "auto" else args.device)


def run_ours(args, images, labels, probe: HeldOutProbe, anchor_images_seen: int) -> dict:
    config = our_config(args)
    curve, due, at_anchor = [], probe_points(), {}

    def callback(step, ema):
        seen = step * config.batch_size
        if due(step):
            curve.append({"step": step, "images_seen": seen, "heldout_eps_mse": probe(ema)})
        if not at_anchor and seen >= anchor_images_seen:
            at_anchor.update(step=step, images_seen=seen, heldout_eps_mse=probe(ema))
        return False

    load = load_average()
    result = train_for_budget(config, args.minutes, images, labels, args.calibrate_steps, args.max_steps, callback)
    ema = result["denoiser"]
    final = probe(ema)
    curve.append({"step": result["step"], "images_seen": result["images_seen"], "heldout_eps_mse": final})
    result.update(curve=curve, load_average_start=load, heldout_eps_mse=final, at_anchor_images_seen=at_anchor or None,
                  parameters=count_parameters(ema.net))
    return result


def binned(losses: list[float], width: int = 10) -> list[float]:
    return [round(sum(losses[i:i + width]) / len(losses[i:i + width]), 5) for i in range(0, len(losses), width)]


def final_loss(losses: list[float], last: int = 50) -> float | None:
    tail = losses[-last:]
    return sum(tail) / len(tail) if tail else None


# --- report ---------------------------------------------------------------------------------------------------

def targets(anchor_row: dict, ours_row: dict, anchor: dict, ours: dict) -> list[dict]:
    at = ours.get("at_anchor_images_seen") or {}
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return [
        {"target": "classifier-FID <= 0.5 x anchor's", "unit": "ratio",
         "value": ratio(ours_row["classifier_fid"], anchor_row["classifier_fid"]),
         "met": ours_row["classifier_fid"] <= 0.5 * anchor_row["classifier_fid"]},
        {"target": "conditional accuracy >= 97%", "value": ours_row["conditional_accuracy"], "unit": "fraction",
         "met": ours_row["conditional_accuracy"] >= 0.97},
        {"target": "training img/s >= 3 x anchor's", "value": ratio(ours["images_per_s"], anchor["images_per_s"]),
         "unit": "ratio", "met": ours["images_per_s"] >= 3 * anchor["images_per_s"]},
        {"target": "held-out eps-MSE at the anchor's images seen <= anchor's", "unit": "ours / anchor",
         "value": ratio(at["heldout_eps_mse"], anchor["heldout_eps_mse"]) if at else None,
         "met": bool(at) and at["heldout_eps_mse"] <= anchor["heldout_eps_mse"]},
    ]


def render(result: dict) -> str:
    a, o = result["anchor"], result["ours"]
    s = result["sampling"]
    lines = [f"**This repo's recipe vs the anchor (Hugging Face diffusion-models-class unit 2, on diffusers): "
             f"{fmt(result['minutes'])} min of training each, one after the other.**", "",
             machine_line(result["machine"]), ""]
    if result["smoke"]:
        lines += [smoke_line(f"{fmt(result['minutes'])} min, n-eval {result['n_eval']}",
                             HEADLINE_COMMAND), ""]
    rows = []
    for r in result["rows"]:
        run = a if r["recipe"].startswith("anchor") else o if r["recipe"].startswith("this repo") else None
        rows.append([r["recipe"], r["guidance"], r["classifier_fid"], r["conditional_accuracy"],
                     run and run["step"], run and run["images_seen"], run and round(run["images_per_s"], 1),
                     run and run["final_train_loss"], run and run["heldout_eps_mse"], r.get("seconds_per_image")])
    lines += [markdown_table(["recipe", "guidance", "classifier-FID ↓", "cond. accuracy ↑", "steps", "images seen",
                              "train img/s", "final train loss (own objective)", "held-out eps-MSE",
                              "sampling s/image"], rows), ""]
    at = o.get("at_anchor_images_seen")
    if at:
        lines += [f"Held-out eps-MSE at the same {fmt(at['images_seen'])} images seen (the anchor's total): anchor "
                  f"{fmt(a['heldout_eps_mse'])}, this repo {fmt(at['heldout_eps_mse'])} (step {fmt(at['step'])}).", ""]
    checks = [[t["target"], f"{fmt(t['value'])} ({t['unit']})", t["met"]] for t in result["targets"]]
    # the guided rows against the accuracy target too: guidance is part of this recipe (the anchor has none)
    checks += [[f"conditional accuracy >= 97%, guided (scale {fmt(r['guidance'])})",
                f"{fmt(r['conditional_accuracy'])} (fraction)", r["conditional_accuracy"] >= 0.97]
               for r in result["rows"] if r["recipe"] == "this repo, guided"]
    lines += [markdown_table(["target", "measured", "met"], checks), ""]
    how = s.get("how", SAMPLER_NOTES[s["sampler"]])
    lines += [f"Sampling: diffusion_lab `{s['sampler']}` ({how}), {s['steps']} network evaluations per image for "
              f"both (guided rows: two per step, batched), trailing timesteps, x0_hat clipped to [-1, 1], the same "
              f"starting noise (seed {s['seed']}). FID: {result['n_eval']} samples against "
              f"{fmt(result['n_reference'])} real test digits on the shipped classifier's features.", "",
              f"Anchor: {fmt(a['parameters'])} parameters, batch {result['batch_size']}, Adam lr 1e-3, eps-MSE, "
              f"load average at its start {' / '.join(map(str, a['load_average_start'] or []))}. "
              f"This repo: {fmt(o['parameters'])} parameters, `{result['ours_config_summary']}`, "
              f"calibration {o['calibration']['steps']} step(s) in {fmt(o['calibration']['seconds'])} s (counted in "
              f"its budget), load average at its start {' / '.join(map(str, o['load_average_start'] or []))}.", "",
              f"Command: `{result['command']}`"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = base_parser(__doc__, "train_vs_anchor.json")
    p.add_argument("--minutes", type=float, default=HEADLINE["minutes"], help="training wall clock per recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-eval", type=int, default=HEADLINE["n_eval"], help="samples per row for FID and accuracy")
    p.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    p.add_argument("--sample-steps", type=int, default=20, help="network evaluations per image (NFE)")
    p.add_argument("--guidance-extra", type=float, nargs="*", default=[2.0], help="extra guided rows for ours")
    p.add_argument("--n-reference", type=int, default=0, help="real test digits for FID (0: all 10,000)")
    p.add_argument("--heldout", type=int, default=512, help="held-out test digits for the eps-MSE probe")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="both recipes (the anchor's is 128)")
    p.add_argument("--max-steps", type=int, default=None, help="cap both runs at this many steps (tests)")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="also write both trained models here (anchor-seedN / ours-seedN .safetensors)")
    p.add_argument("--calibrate-steps", type=int, default=10,
                   help="throw-away steps timed first to fit the lr schedule (capped at 5%% of the budget)")
    g = model_options(p, "this repo's recipe")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--warmup", type=int, default=d.warmup)
    g.add_argument("--ema-decay", type=float, default=d.ema_decay)
    g.add_argument("--p-uncond", type=float, default=d.p_uncond, help="label dropout (classifier-free guidance)")
    g.add_argument("--amp", default="none", choices=("none", "bf16", "auto"))
    g.add_argument("--channels-last", type=int, choices=(0, 1), default=0)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.minutes <= 0 and not args.max_steps and not (args.rerender or args.placeholder):
        raise SystemExit("error: --minutes must be positive (or give --max-steps)")
    done, machine, device = begin(args, render, TITLE, HEADLINE_COMMAND)
    if done is not None:
        return done
    t_start = time.perf_counter()
    images, labels = data.mnist(train=True)
    test_images, test_labels = data.mnist(train=False)
    classifier = metrics.load_classifier(device, args.classifier)
    judge = Judge(classifier, test_images[:args.n_reference] if args.n_reference else test_images)
    probe = HeldOutProbe(test_images[:args.heldout], test_labels[:args.heldout],
                         anchor_schedule(), device)

    anchor = run_anchor(args, images, labels, probe, device)
    print(f"anchor: {anchor['step']} steps, {anchor['images_per_s']:.1f} img/s", flush=True)
    ours = run_ours(args, images, labels, probe, anchor["images_seen"])
    print(f"ours: {ours['step']} steps, {ours['images_per_s']:.1f} img/s", flush=True)
    config = ours["config"]
    saved = save_models(Path(args.save), args.seed, anchor, ours) if args.save else None  # before sampling

    def score(name, denoiser, guidance=1.0, shown=None):
        s = sample_images(denoiser, args.n_eval, args.sample_steps, sampler=args.sampler, guidance=guidance,
                          seed=args.seed)
        row = {"recipe": name, "guidance": guidance if shown is None else shown,
               **judge.score(s["images"], s["labels"]), "seconds_per_image": s["seconds_per_image"]}
        print(row, flush=True)
        return row

    rows = [score("anchor", anchor_denoiser(anchor["model"], anchor["schedule"]), shown="none")]  # unguidable
    for g in [1.0, *args.guidance_extra]:
        rows.append(score("this repo" if g == 1.0 else "this repo, guided", ours["denoiser"], g))
    floor = real_floor(judge, args.n_eval)
    rows.append({"recipe": f"real training digits (floor at n={args.n_eval})", "guidance": "–",
                 "classifier_fid": floor, "conditional_accuracy": None})

    keep = ("step", "images_seen", "elapsed_s", "images_per_s", "heldout_eps_mse", "curve", "load_average_start",
            "parameters")
    anchor_out = {k: anchor[k] for k in keep} | {
        "recipe": anchor["recipe"], "final_train_loss": final_loss(anchor["losses"]),
        "loss_per_10_steps": binned(anchor["losses"])}
    ours_out = {k: ours[k] for k in keep} | {
        "config": {k: v for k, v in vars(config).items() if not k.startswith("style_")},
        "final_train_loss": final_loss(ours["losses"]), "loss_per_10_steps": binned(ours["losses"]),
        "at_anchor_images_seen": ours["at_anchor_images_seen"], "calibration": ours["calibration"],
        "total_elapsed_s": ours["total_elapsed_s"]}
    result = {
        "benchmark": "train_vs_anchor", "command": command_line("train_vs_anchor.py", argv), "machine": machine,
        "minutes": args.minutes, "n_eval": args.n_eval, "n_reference": judge.n_reference, "seed": args.seed,
        "batch_size": args.batch_size, "max_steps": args.max_steps,
        "smoke": (args.minutes < HEADLINE["minutes"] or args.n_eval < HEADLINE["n_eval"] or bool(args.max_steps)
                  or bool(args.n_reference)),
        "sampling": {"sampler": args.sampler, "how": SAMPLER_NOTES[args.sampler], "steps": args.sample_steps,
                     "clip_x0": 1.0, "seed": args.seed, "driver": "diffusion_lab.samplers for both models"},
        "ours_config_summary": (f"channels {tuple(config.channels)}, {config.blocks_per_level} block/level, attention "
                                f"{'on' if config.attention else 'off'}, {config.prediction}-prediction, "
                                f"{config.schedule} schedule, AdamW lr {config.lr:g} warm-up {config.warmup} "
                                f"then {config.lr_decay}, EMA {config.ema_decay}, label dropout {config.p_uncond}, "
                                f"amp {config.amp}"),
        "anchor": anchor_out, "ours": ours_out, "rows": rows, "saved": saved,
        "load_average_end": load_average(), "total_wall_s": time.perf_counter() - t_start,
    }
    ours_row = next(r for r in rows if r["recipe"] == "this repo")
    result["targets"] = targets(rows[0], ours_row, anchor_out, ours_out)
    json_path, md_path = write_results(args.out, result, render(result))
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
