"""One prepared GPU session: train the shipped model, time launch-to-99%, measure throughput.

Run on a CUDA machine from the repository root:
    python benchmarks/gpu_run.py --out OUTDIR [--phases ship,speed,throughput]
Each phase writes its JSON into OUTDIR as soon as it ends, so a session cut short keeps what finished.
The shipped model is trained by the training CLI itself (a subprocess), so its model card can quote the exact line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, begin, machine_info, sample_images, sync  # noqa: E402

from diffusion_lab import data, metrics  # noqa: E402
from diffusion_lab.conditioning import style_code  # noqa: E402
from diffusion_lab.denoiser import load_denoiser  # noqa: E402
from diffusion_lab.losses import diffusion_loss  # noqa: E402
from diffusion_lab.training import TrainConfig, build_model, build_schedule, train  # noqa: E402

SHIP_ARGS = ["--style", "1", "--steps", "3500", "--batch-size", "512", "--lr", "2e-3", "--warmup", "200",
             "--ema-decay", "0.9995", "--ckpt-every", "1000", "--amp", "none", "--max-minutes", "3", "--quiet"]


RUN = {"smoke": False, "device": "cuda"}  # --smoke: tiny sizes on any device; the device --device chose


def machine() -> dict:
    return {k: machine_info()[k] for k in ("gpu", "torch", "python", "cpu")}


def DEVICE() -> str:
    return RUN["device"]


def dump(out: Path, name: str, result: dict) -> None:
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(f"== {name}: {json.dumps(result)[:600]}", flush=True)


def evaluate(denoiser, classifier, n: int, guidance: float, steps: int = 20, seed: int = 0, reference=None,
             batch: int = 1000) -> dict:
    """Sample n digits with labels cycling 0..9 and the requested style left null (DPM-Solver++(2M), x0_hat
    clipped to [-1, 1]); score them."""
    s = sample_images(denoiser, n, steps, sampler="dpm++2m", guidance=guidance, seed=seed, batch=batch)
    result = {"n": n, "guidance": guidance, "steps": steps,
              "conditional_accuracy": float(metrics.conditional_accuracy(s["images"], s["labels"], classifier))}
    if reference is not None:
        result["classifier_fid"] = float(metrics.classifier_fid(s["images"], reference, classifier))
    return result


def phase_ship(out: Path, classifier) -> None:
    ckpt = out / "mnist-cond.safetensors"
    cmd = [sys.executable, "-m", "diffusion_lab.train", "--out", str(ckpt), *SHIP_ARGS]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    print(proc.stdout[-2000:], proc.stderr[-2000:], flush=True)
    result = {"command": "python -m diffusion_lab.train --out checkpoints/mnist-cond.safetensors " + " ".join(SHIP_ARGS),
              "returncode": proc.returncode, "wall_s": round(wall, 1), "stdout_tail": proc.stdout[-500:], **machine()}
    if proc.returncode == 0:
        denoiser = load_denoiser(ckpt, device=DEVICE())
        test_images, _ = data.mnist(train=False)
        test_images = test_images[:500] if RUN["smoke"] else test_images  # the FID reference
        train_images, _ = data.mnist(train=True)
        n = 40 if RUN["smoke"] else 2000
        real = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(1))[:n]]
        result["real_2000_train_digits_fid"] = float(metrics.classifier_fid(real, test_images, classifier))
        result["evals"] = [evaluate(denoiser, classifier, n, g, reference=test_images) for g in (1.0, 2.0, 3.0)]
    dump(out, "ship", result)


def phase_speed(out: Path, classifier, compile_: bool, amp: str = "none", budget_s: float = 60) -> None:
    """Launch-to-99%: the clock starts when the shell launches this process (env LAUNCH_T, seconds since the epoch;
    else now), so Python start-up, CUDA initialisation and data loading all count; it pauses while we evaluate."""
    launch = float(os.environ.get("LAUNCH_T", time.time()))
    images, labels = data.mnist(train=True)
    config = TrainConfig(style=False, steps=3000, batch_size=512, lr=3e-3, warmup=100, lr_decay="constant",
                         ema_decay=0.995, amp=amp, compile=compile_, log_every=50, device=DEVICE())
    if RUN["smoke"]:
        config = dataclasses.replace(config, steps=4, log_every=2, batch_size=8, channels=(8, 16, 16), amp="none")
    paused, trace = [0.0], []

    def check(step, ema):
        t_pause = time.time()
        r = evaluate(ema, classifier, 20 if RUN["smoke"] else 1000, 3.0)
        elapsed = t_pause - launch - paused[0]
        trace.append({"step": step, "train_clock_s": round(elapsed, 2), "acc": r["conditional_accuracy"]})
        print(trace[-1], flush=True)
        paused[0] += time.time() - t_pause
        return r["conditional_accuracy"] >= 0.99 or elapsed > budget_s

    train(config, progress=False, images=images, labels=labels, callback=check)
    hit = next((t for t in trace if t["acc"] >= 0.99), None)
    dump(out, f"speed_{amp}_compile{int(compile_)}", {
        "protocol": "clock from process launch (LAUNCH_T) to the end of the training step whose EMA weights first reach "
                    ">= 99% conditional accuracy (1,000 samples, DPM-Solver++(2M) 20 steps, guidance 3, repo "
                    "classifier); evaluation time excluded; checked every 50 steps",
        "config": {k: v for k, v in vars(config).items() if not k.startswith("style_")},
        "reached": hit is not None, "seconds_to_99": hit["train_clock_s"] if hit else None,
        "steps_to_99": hit["step"] if hit else None, "trace": trace, **machine()})


def phase_throughput(out: Path) -> None:
    rows = []
    images, labels = data.mnist(train=True)
    runs = [("none", False, 512), ("bf16", False, 512), ("bf16", True, 512)]
    for amp, compile_, batch in runs[:1] if RUN["smoke"] else runs:
        batch = 8 if RUN["smoke"] else batch
        config = TrainConfig(style=True, batch_size=batch, amp=amp, compile=compile_)
        model = build_model(config).to(DEVICE())
        net = torch.compile(model) if compile_ else model
        schedule = build_schedule(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x0 = data.to_unit_range(images[:batch]).to(DEVICE())
        lab = labels[:batch].to(DEVICE())
        style = style_code(data.style_attributes(images[:batch]).float(), [0.0, 0.0], [1.0, 1.0]).to(DEVICE())

        def step():
            with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                loss = diffusion_loss(lambda x, t: net(x, t, lab, style), schedule, x0, config.prediction)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        for _ in range(5):
            step()
        sync(x0.device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        reps = 2 if RUN["smoke"] else 40
        for _ in range(reps):
            step()
        sync(x0.device)
        dt = (time.perf_counter() - t0) / reps
        rows.append({"amp": amp, "compile": compile_, "batch": batch, "ms_per_step": round(dt * 1e3, 2),
                     "images_per_s": round(batch / dt), "warmup_s": round(warm, 1)})
        print(rows[-1], flush=True)
    dump(out, "throughput", {"rows": rows, **machine()})


def main(argv=None) -> None:
    p = base_parser(__doc__)
    p.add_argument("--out", required=True, help="the folder each phase writes its JSON into")
    p.add_argument("--phases", default="ship,speed,throughput")
    p.add_argument("--smoke", action="store_true", help="a seconds-long dry run on any device, to test the script")
    args = p.parse_args(argv)
    _, _, device = begin(args)  # applies --threads; --device auto is cuda on a GPU machine
    RUN["device"] = str(device)
    if args.smoke:
        RUN["smoke"] = True
        SHIP_ARGS[SHIP_ARGS.index("--steps") + 1] = "3"
        SHIP_ARGS.extend(["--channels", "8", "16", "16", "--batch-size", "16", "--device", str(device), "--amp", "none"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    classifier = metrics.load_classifier(DEVICE(), args.classifier)
    for phase in args.phases.split(","):
        t0 = time.perf_counter()
        try:
            if phase == "ship":
                phase_ship(out, classifier)
            elif phase == "speed":
                phase_speed(out, classifier, compile_=False)
            elif phase == "speed_compile":
                phase_speed(out, classifier, compile_=True)
            elif phase == "speed_bf16":
                phase_speed(out, classifier, compile_=False, amp="bf16")
            elif phase == "speed_bf16_compile":
                phase_speed(out, classifier, compile_=True, amp="bf16")
            elif phase == "throughput":
                phase_throughput(out)
        except Exception as err:  # keep going: the other phases still report
            import traceback
            traceback.print_exc()
            dump(out, f"{phase}_error", {"error": repr(err)})
        print(f"phase {phase} took {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
