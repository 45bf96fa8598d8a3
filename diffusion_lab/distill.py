"""Chapter 13: from a thousand steps to one. Progressive and consistency distillation, flow matching and reflow.

Every method here trains through `training.fit` (one loop: EMA, checkpoints, exact resume) with its own loss:

- progressive distillation (Salimans & Ho 2022, Algorithm 2): a student learns to take in one DDIM step what its
  teacher takes in two; repeat, halving the steps each round. The first teacher is classifier-free guided, so the
  students sample with the guidance built in (the first stage of Meng et al. 2023, at one fixed guidance weight);
- consistency distillation (Song et al. 2023, Algorithm 2): a student maps any point of the teacher's ODE path
  straight to its end; sampled in one or a few steps by `sample_consistency`;
- flow matching (Lipman et al. 2023; Liu et al. 2023): a denoiser with prediction "flow" on the "rectified"
  schedule, trained by the ordinary training CLI; `reflow_batches` pairs noise with that model's own samples
  for one reflow round, and `straightness` measures how far its paths bend.

A distilled file holds several students, one per step count ("students.<N>.*"); `denoiser.load_denoiser(name,
steps=N)` picks one, and a step count the file lacks is an error.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os

import torch

from . import data
from .checkpoint import load_checkpoint, save_checkpoint
from .conditioning import guided
from .denoiser import FORMAT, Denoiser, load_denoiser
from .samplers import _noise, _steps, predict, prediction_of, sampling_timesteps
from .schedules import NoiseSchedule, flow_time, q_sample, v_target
from .training import FitConfig, fit, tensor_batches
from .utils import append_dims

DISTILLED_KIND = "distilled"


def _grid(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """The sampling grid of `steps` DDIM steps with the clean end appended as -1: (steps + 1,) integer steps."""
    return torch.cat([sampling_timesteps(schedule.T, steps), torch.tensor([-1])])


def _alpha_bars(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar at a batch of integer steps (B,), where -1 means clean data (alpha_bar = 1); shaped like `like`."""
    alpha_bars = torch.cat([schedule.alpha_bars, torch.ones(1, dtype=torch.float64)])  # index -1 -> the 1
    return append_dims(alpha_bars[t.cpu()].to(like.device, like.dtype), like.ndim)


def ddim_jump(model, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              prediction: str) -> torch.Tensor:
    """One deterministic DDIM step per sample, from step t (B,) to t_prev (B,) (-1 = clean): the teacher's move."""
    alpha_bar_t, alpha_bar_prev = _alpha_bars(schedule, t, x_t), _alpha_bars(schedule, t_prev, x_t)
    eps_hat, x0_hat = predict(model, x_t, t.clamp(min=0), alpha_bar_t, prediction)
    return alpha_bar_prev.sqrt() * x0_hat + (1 - alpha_bar_prev).sqrt() * eps_hat


# --- progressive distillation ----------------------------------------------------------------------------------

def progressive_target(schedule: NoiseSchedule, x_t, x_prev, t, t_prev) -> torch.Tensor:
    """The x0 whose single DDIM step from (x_t, t) lands exactly on x_prev at t_prev (Salimans & Ho 2022, Alg. 2):
    x_prev = a' x0 + s' (x_t - a x0) / s  =>  x0 = (x_prev - (s'/s) x_t) / (a' - (s'/s) a), a = sqrt(alpha_bar)."""
    alpha_bar_t, alpha_bar_prev = _alpha_bars(schedule, t, x_t), _alpha_bars(schedule, t_prev, x_t)
    ratio = ((1 - alpha_bar_prev) / (1 - alpha_bar_t)).sqrt()
    return (x_prev - ratio * x_t) / (alpha_bar_prev.sqrt() - ratio * alpha_bar_t.sqrt())


def progressive_loss(teacher, schedule: NoiseSchedule, student_steps: int, guidance: float = 1.0):
    """The loss of one round: the student (a v-predicting network) takes step i of a `student_steps` DDIM grid in
    one evaluation, the teacher the same interval in two (its grid has twice the steps and nests inside)."""
    grid = _grid(schedule, 2 * student_steps)   # teacher levels: student step i runs grid[2i] -> grid[2i + 2]

    def loss(net, x0, codes, generator):
        i = torch.randint(0, student_steps, (len(x0),), generator=generator)
        t, t_mid, t_prev = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        x_t = q_sample(schedule, x0, t.to(x0.device), torch.randn(x0.shape, generator=generator).to(x0))
        with torch.no_grad():
            model = guided(teacher, codes.get("labels"), guidance=guidance)
            x_mid = ddim_jump(model, schedule, x_t, t, t_mid, teacher.prediction)
            x_prev = ddim_jump(model, schedule, x_mid, t_mid, t_prev, teacher.prediction)
            x0_target = progressive_target(schedule, x_t, x_prev, t, t_prev)
            alpha_bar_t = _alpha_bars(schedule, t, x_t)
            eps_target = (x_t - alpha_bar_t.sqrt() * x0_target) / (1 - alpha_bar_t).sqrt()
            target = v_target(x0_target, eps_target, alpha_bar_t)
        return (net(x_t, t.to(x0.device)).float() - target.float()).pow(2).mean()

    return loss


def fingerprint(net: torch.nn.Module) -> str:
    """SHA-256 of a network's weights, to tell one teacher from another."""
    digest = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        digest.update(name.encode() + value.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


def mnist_batches(device=None):
    """Real MNIST training digits in [-1, 1] with their labels, as a `fit` batch source."""
    images, labels = data.mnist(train=True)
    return tensor_batches(images.to(device), labels.to(device), transform=data.to_unit_range)


def distill_progressively(teacher: Denoiser, run_dir: str | os.PathLike, rounds=(8, 4, 2, 1), guidance: float = 2.0,
                          config: FitConfig | None = None, batches=None, progress: bool = True) -> dict[int, Denoiser]:
    """Progressive distillation from a guided teacher: round N trains a student for N steps against a teacher
    at 2N (the guided teacher in the first round, the previous student after). Each round is its own `fit` run in
    run_dir/round-<N>.safetensors, so a killed run resumes inside the round it was in. Returns {N: student}."""
    rounds = tuple(int(n) for n in rounds)
    if not rounds or any(b != a // 2 or a % 2 for a, b in zip(rounds, rounds[1:])) or rounds[-1] < 1:
        raise ValueError(f"rounds must halve each time, like (8, 4, 2, 1); got {rounds}")
    if teacher.prediction != "v":
        raise ValueError(f"the students predict v; start from a v-prediction teacher, not {teacher.prediction!r}")
    config = config or FitConfig(steps=1000, batch_size=64, lr=2e-4, warmup=20, ema_decay=0.995, p_uncond=0.0,
                                 p_uncond_style=0.0, ckpt_every=100)
    if config.p_uncond:
        raise ValueError("students are distilled with the labels always on (guidance is built in): p_uncond=0")
    batches = batches or mnist_batches(teacher.device)
    os.makedirs(run_dir, exist_ok=True)
    students, current, weight = {}, teacher, guidance
    for n in rounds:
        student = dataclasses.replace(current, net=copy.deepcopy(current.net).train().requires_grad_(True))
        # the teacher's fingerprint goes into the run's record: a round resumes only against the same teacher
        result = fit(student, batches, config, checkpoint=os.path.join(run_dir, f"round-{n}.safetensors"),
                     progress=progress, loss=progressive_loss(current, teacher.schedule, n, weight),
                     record={"distill": {"method": "progressive", "student_steps": n, "guidance": weight,
                                         "teacher": fingerprint(current.net)}})
        students[n] = dataclasses.replace(result.denoiser, steps=n)
        current, weight = result.denoiser, 1.0  # the next teacher: this student, guidance already inside
    return students


# --- consistency distillation ----------------------------------------------------------------------------------

def consistency_loss(teacher, schedule: NoiseSchedule, grid_steps: int = 20, guidance: float = 1.0):
    """Consistency distillation (Song et al. 2023, Algorithm 2) on the `grid_steps` DDIM grid: the student's x0_hat
    at a point must equal its own x0_hat one teacher step later on the same ODE path. The target network is the
    student itself without gradient (mu = 0, as Song & Dhariwal 2023 recommend); at the clean end it is the point."""
    if getattr(teacher, "prediction", "v") != "v":
        raise ValueError(f"the consistency student reads x0_hat from a v-prediction; the teacher predicts "
                         f"{teacher.prediction!r}")
    grid = _grid(schedule, grid_steps)

    def x0_of(net, x_t, t):  # f_theta: the v-prediction's x0_hat, which is x_t itself as alpha_bar -> 1
        alpha_bar_t = _alpha_bars(schedule, t, x_t)
        return alpha_bar_t.sqrt() * x_t - (1 - alpha_bar_t).sqrt() * net(x_t, t.to(x_t.device)).float()

    def loss(net, x0, codes, generator):
        i = torch.randint(0, grid_steps, (len(x0),), generator=generator)
        t, t_next = grid[i], grid[i + 1]
        x_t = q_sample(schedule, x0, t.to(x0.device), torch.randn(x0.shape, generator=generator).to(x0))
        with torch.no_grad():
            model = guided(teacher, codes.get("labels"), guidance=guidance)
            x_next = ddim_jump(model, schedule, x_t, t, t_next, teacher.prediction)
            clean = (t_next < 0).to(x0.device)
            target = x0_of(net, x_next, t_next.clamp(min=0))
            target = torch.where(append_dims(clean, x0.ndim), x_next, target)
        return (x0_of(net, x_t, t) - target).pow(2).mean()

    return loss


@torch.no_grad()
def sample_consistency(model, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 1, *,
                       prediction: str | None = None, generator: torch.Generator | None = None, callback=None,
                       progress: bool = False, clip_x0: float | None = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): jump to x0_hat, re-noise it to the next
    level of the `steps` grid with fresh noise, jump again. Paper -> code: f_theta -> predict's x0_hat;
    tau_n -> the grid's levels. Same signature as samplers.SAMPLERS."""
    prediction = prediction_of(model, prediction)
    x, x0_hat = x_T.clone(), None
    for i, (t, t_prev) in enumerate(_steps(schedule, x_T, steps, progress, "consistency")):
        alpha_bar_t = schedule.alpha_bars[t].to(x)
        _, x0_hat = predict(model, x, t, alpha_bar_t, prediction, clip_x0)
        if t_prev >= 0:
            alpha_bar_prev = schedule.alpha_bars[t_prev].to(x)
            x = alpha_bar_prev.sqrt() * x0_hat + (1 - alpha_bar_prev).sqrt() * _noise(x, generator)
        else:
            x = x0_hat
        if callback is not None:
            callback(i, x, x0_hat)
    return x


# --- flow matching: reflow and straightness --------------------------------------------------------------------

def reflow_batches(x_T: torch.Tensor, x0: torch.Tensor, labels: torch.Tensor | None = None):
    """A `fit` batch source over fixed (noise, sample) pairs: training on it with prediction "flow" is one reflow
    round (Liu et al. 2023, sec. 2.3): the straight line from x_T to the model's own x0 becomes the target path."""
    if x_T.shape != x0.shape or (labels is not None and len(labels) != len(x0)):
        raise ValueError(f"noise {tuple(x_T.shape)}, samples {tuple(x0.shape)} and labels must pair up one to one")

    def draw(generator, size):
        idx = torch.randint(0, len(x0), (size,), generator=generator)
        return {"x0": x0[idx], "eps": x_T[idx], "labels": None if labels is None else labels[idx]}

    return draw


@torch.no_grad()
def straightness(model, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 50,
                 prediction: str | None = None) -> float:
    """Liu et al. (2023), eq. (8): S = integral over s of E ||(z_1 - z_0) - u(z_s, s)||^2 along the model's own ODE
    path from noise z_1 to data z_0, by `steps` Euler (= DDIM) steps in flow coordinates; the mean over pixels.
    Zero means every path is a straight line, which one Euler step follows exactly."""
    prediction = prediction_of(model, prediction)
    x, slopes, widths = x_T.clone(), [], []
    for t, t_prev in _steps(schedule, x_T, steps, False, "straightness"):
        alpha_bar_t = schedule.alpha_bars[t].to(x)
        alpha_bar_prev = schedule.alpha_bars[t_prev].to(x) if t_prev >= 0 else torch.ones((), dtype=x.dtype)
        (s, scale), (s_prev, scale_prev) = flow_time(alpha_bar_t), flow_time(alpha_bar_prev)
        eps_hat, x0_hat = predict(model, x, t, alpha_bar_t, prediction)
        slopes.append(eps_hat - x0_hat)
        widths.append(float(s - s_prev))
        x = (x / scale + (s_prev - s) * slopes[-1]) * scale_prev
    z_1 = x_T / flow_time(schedule.alpha_bars[-1].to(x))[1]
    displacement = z_1 - x   # z_1 - z_0: noise minus data, the direction of u
    total = sum(w * (displacement - u).pow(2).mean().item() for w, u in zip(widths, slopes))
    return total / sum(widths)


# --- a file of students ----------------------------------------------------------------------------------------

def save_students(path: str | os.PathLike, students: dict[int, Denoiser], **record) -> str:
    """Write several distilled students of one architecture into one shipped file, weights in float16 (they are
    sampled in float32; halving them keeps three students under the book's 8 MB per file). Returns the SHA-256."""
    if not students:
        raise ValueError("no students to save")
    first = next(iter(students.values()))
    tensors = {f"students.{n}.{k}": v.detach().to(torch.float16) if v.is_floating_point() else v
               for n, student in students.items() for k, v in student.net.state_dict().items()}
    tensors["schedule.betas"] = first.schedule.betas
    contract = dataclasses.replace(first, steps=None).contract()
    return save_checkpoint(path, tensors, {"format": FORMAT, "kind": DISTILLED_KIND, **contract,
                                           "steps": sorted(students), **record})


def load_student(name_or_path: str | os.PathLike, steps: int, device=None) -> Denoiser:
    """The student of a distilled file for exactly `steps` steps (an error names the step counts it has)."""
    return load_denoiser(name_or_path, device=device, steps=steps)


# --- command line ----------------------------------------------------------------------------------------------

def make_reflow_pairs(flow: Denoiser, n: int, guidance: float, steps: int, seed: int = 0, progress: bool = True):
    """n (noise, sample) pairs from a flow model with Heun's method, labels cycling 0..9: the data of one reflow."""
    from tqdm.auto import tqdm

    from .sample import generate

    labels = torch.arange(n) % 10
    x_T = torch.randn(n, *flow.shape, generator=torch.Generator().manual_seed(seed))
    with tqdm(total=n, desc="reflow pairs", disable=not progress) as bar:
        x0 = generate(flow, labels, x_T=x_T, sampler="heun", steps=steps, guidance=guidance, bar=bar)
    return x_T, x0, labels


def _check_args(args) -> None:
    """Refuse what would fail only after minutes of training."""
    import math
    from pathlib import Path

    problems = []
    out = Path(args.out).expanduser()
    if out.suffix != ".safetensors" or out.is_dir():
        problems.append(f"--out must name a .safetensors file, got {args.out!r}")
    elif not out.resolve().parent.is_dir():
        problems.append(f"the folder of --out does not exist: {out.resolve().parent}")
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        problems.append(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.command == "progressive" and args.default_steps not in args.rounds:
        problems.append(f"--default-steps {args.default_steps} is not one of --rounds {args.rounds}")
    if args.command == "consistency" and not 1 <= args.grid:
        problems.append(f"--grid must be at least 1, got {args.grid}")
    if args.command == "reflow" and (args.pairs < 1 or args.pair_steps < 1):
        problems.append(f"--pairs and --pair-steps must be at least 1, got {args.pairs}, {args.pair_steps}")
    if problems:
        raise ValueError("; ".join(problems))


def _run(args) -> dict:
    import time

    _check_args(args)
    config = FitConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       ema_decay=args.ema_decay, p_uncond=0.0, p_uncond_style=0.0, ckpt_every=args.ckpt_every,
                       seed=args.seed)
    config.validate()
    start = time.perf_counter()
    if args.command == "progressive":
        teacher = load_denoiser(args.teacher, device="cpu")
        students = distill_progressively(teacher, args.run_dir, tuple(args.rounds), args.guidance, config,
                                         progress=not args.quiet)
        seconds = sum(load_checkpoint(os.path.join(args.run_dir, f"round-{n}.safetensors"))[1]["elapsed_s"]
                      for n in students)
        sha = save_students(args.out, students, default_steps=args.default_steps, teacher=str(args.teacher),
                            elapsed_s=round(seconds, 1),
                            distill={"method": "progressive", "guidance": args.guidance, "rounds": args.rounds,
                                     "steps_per_round": args.steps, "batch_size": args.batch_size, "lr": args.lr})
        return {"out": args.out, "sha256": sha, "steps": sorted(students), "seconds": round(time.perf_counter() - start)}
    if args.command == "consistency":
        teacher = load_denoiser(args.teacher, device="cpu")
        student = dataclasses.replace(teacher, net=copy.deepcopy(teacher.net).train().requires_grad_(True))
        result = fit(student, mnist_batches(), config, checkpoint=args.out, progress=not args.quiet,
                     loss=consistency_loss(teacher, teacher.schedule, args.grid, args.guidance),
                     record={"distill": {"method": "consistency", "grid": args.grid, "guidance": args.guidance,
                                         "teacher": fingerprint(teacher.net)}})
        return {"out": args.out, "step": result.step, "seconds": round(result.elapsed_s)}
    # reflow: pairs from the flow model (the same pairs again on a resume: they depend only on it and the seed)
    flow = load_denoiser(args.flow, device="cpu")
    if flow.prediction != "flow":
        raise ValueError(f"reflow retrains a flow model (prediction 'flow'); {args.flow} predicts {flow.prediction!r}")
    x_T, x0, labels = make_reflow_pairs(flow, args.pairs, args.guidance, args.pair_steps, args.seed, not args.quiet)
    student = dataclasses.replace(flow, net=copy.deepcopy(flow.net).train().requires_grad_(True))
    result = fit(student, reflow_batches(x_T, x0, labels), config, checkpoint=args.out, progress=not args.quiet,
                 record={"distill": {"method": "reflow", "flow": fingerprint(flow.net), "pairs": args.pairs,
                                     "pair_steps": args.pair_steps, "guidance": args.guidance}})
    return {"out": args.out, "step": result.step, "seconds": round(result.elapsed_s)}


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m diffusion_lab.distill",
                                description="Fewer sampling steps (chapter 13): progressive distillation, "
                                            "consistency distillation, or one reflow of a flow model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    commands = {"progressive": "students for 8, 4, 2, 1 steps from a guided teacher, saved in one file",
                "consistency": "a consistency model distilled from a guided teacher (a training-run file)",
                "reflow": "one reflow round of a flow model (prediction flow) on its own (noise, sample) pairs"}
    for name, text in commands.items():
        c = sub.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        c.add_argument("--out", required=True, help="the .safetensors file to write")
        c.add_argument("--steps", type=int, default=600, help="optimizer steps (per round for progressive)")
        c.add_argument("--batch-size", type=int, default=64, help="batch size")
        c.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
        c.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
        c.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay of the sampled weights")
        c.add_argument("--ckpt-every", type=int, default=100, help="write a resumable checkpoint every N steps")
        c.add_argument("--guidance", type=float, default=2.0, help="the teacher's classifier-free guidance")
        c.add_argument("--seed", type=int, default=0, help="random seed")
        c.add_argument("--quiet", action="store_true", help="no progress bars")
        if name in ("progressive", "consistency"):
            c.add_argument("--teacher", default="mnist-cond", help="a v-prediction denoiser (shipped name or path)")
        if name == "progressive":
            c.add_argument("--run-dir", default="runs/distill", help="one resumable training file per round")
            c.add_argument("--rounds", type=int, nargs="+", default=[8, 4, 2, 1], help="student step counts")
            c.add_argument("--default-steps", type=int, default=4, help="the sample CLI's default step count")
        if name == "consistency":
            c.add_argument("--grid", type=int, default=20, help="DDIM steps of the teacher's grid")
        if name == "reflow":
            c.add_argument("--flow", required=True, help="a flow model (prediction flow), e.g. a training run")
            c.add_argument("--pairs", type=int, default=4096, help="(noise, sample) pairs to draw")
            c.add_argument("--pair-steps", type=int, default=20, help="Heun steps per pair")
    return p


def main(argv=None) -> int:
    from .utils import run_command

    return run_command(_run, _parser().parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
