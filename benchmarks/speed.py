"""Speed (chapter 13): quality against network evaluations, and time per image, for every way to fewer steps.

Rows: the teacher (`mnist-cond-small`, guidance 2) with DDIM, DPM-Solver++(2M) and DDPM; the progressive students
(a file from `python -m diffusion_lab.distill progressive`, guidance built in); a consistency student; a flow-matching model with Euler (= DDIM) and Heun;
the same flow model after one reflow; the teacher with dynamic int8 quantisation of its Linear layers, and with
30% of each convolution's output channels pruned (L2, structured); chapter 01's DCGAN (one step).

For every row and step count: classifier-FID against 10,000 real test digits and conditional accuracy (the
book's classifier) on `--n` samples, labels 0..9 cycling, and the time per image at batch 1 (the mean of
`--batch1` single-image calls after one warm-up) and at batch 256 (one batch). NFE counts network evaluations
per image; a guided step costs two. "Real time" is REAL_TIME_FPS images/s at batch 1 at a classifier-FID within
QUALITY_FACTOR of the teacher's 20-step DPM-Solver++ FID. Also measured: straightness before and after reflow, and
torch.compile of the 4-step student. Results are written after every cell, and a re-run keeps the finished ones.

Headline: python benchmarks/speed.py --threads 2
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (Judge, base_parser, begin, eval_labels, fmt, machine_line, markdown_table,  # noqa: E402
                     real_floor, smoke_line)

from diffusion_lab import data, distill, gan, metrics  # noqa: E402
from diffusion_lab.denoiser import load_denoiser  # noqa: E402
from diffusion_lab.sample import generate  # noqa: E402

HEADLINE = "python benchmarks/speed.py --threads 2"
REAL_TIME_FPS = 30.0       # images per second at batch 1
QUALITY_FACTOR = 1.5       # classifier-FID at most this times the teacher's 20-step DPM-Solver++ FID
PRUNE_AMOUNT = 0.3
PRESETS = {
    "full": dict(n=1000, steps=[1, 2, 4, 8, 20], batch1=8, gan_steps=3000, gan_width=32, straight_n=256,
                 straight_steps=50),
    "smoke": dict(n=20, steps=[1, 2], batch1=2, gan_steps=3, gan_width=8, straight_n=4, straight_steps=4),
}
RUNS = Path("runs/speed")  # where the commands in benchmarks/README.md leave the models that are not shipped


def quantised(denoiser):
    """Dynamic int8 quantisation (torch.ao) of the Linear layers: weights stored in int8, activations quantised
    on the fly. PyTorch's dynamic mode covers Linear (and recurrent) layers only, not convolutions."""
    from torch.ao.quantization import quantize_dynamic

    net = quantize_dynamic(copy.deepcopy(denoiser.net).eval(), {nn.Linear}, dtype=torch.qint8)
    return dataclasses.replace(denoiser, net=net)


def pruned(denoiser, amount: float = PRUNE_AMOUNT):
    """Structured L2 pruning of every convolution's output channels: the weakest `amount` of them set to zero.
    The tensors keep their shape, so dense kernels do the same work: this costs quality and saves no time
    unless the zeroed channels are cut out of the network."""
    from torch.nn.utils import prune

    net = copy.deepcopy(denoiser.net).eval()
    for module in net.modules():
        if isinstance(module, nn.Conv2d) and module.out_channels > 1:
            prune.ln_structured(module, "weight", amount=amount, n=2, dim=0)
            prune.remove(module, "weight")
    return dataclasses.replace(denoiser, net=net)


def linear_share(denoiser) -> float:
    """The fraction of the network's parameters that sit in Linear layers (what dynamic int8 can touch)."""
    total = sum(p.numel() for p in denoiser.net.parameters())
    return sum(p.numel() for m in denoiser.net.modules() if isinstance(m, nn.Linear) for p in m.parameters()) / total


def rows(p: dict, args) -> list[dict]:
    """What to measure: name, how to load the model, sampler, guidance, step counts, NFE per step."""
    teacher = lambda: load_denoiser(args.teacher, device="cpu")  # noqa: E731
    students = lambda steps: load_denoiser(args.students, device="cpu", steps=steps)  # noqa: E731
    found = lambda path: Path(path).exists()  # noqa: E731
    s, distilled = p["steps"], [n for n in p["steps"] if n in student_steps(args.students)]
    out = [dict(name="teacher, DDIM", load=teacher, sampler="ddim", guidance=2.0, steps=s, nfe=2),
           dict(name="teacher, DPM-Solver++(2M)", load=teacher, sampler="dpm++2m", guidance=2.0, steps=s, nfe=2),
           dict(name="teacher, DDPM", load=teacher, sampler="ddpm", guidance=2.0, steps=s, nfe=2),
           dict(name="progressive student", load=students, sampler="ddim", guidance=1.0, steps=distilled, nfe=1),
           dict(name="teacher int8 (Linear layers), DPM-Solver++(2M)", load=lambda: quantised(teacher()),
                sampler="dpm++2m", guidance=2.0, steps=s, nfe=2),
           dict(name=f"teacher {PRUNE_AMOUNT:.0%} channels pruned, DPM-Solver++(2M)", load=lambda: pruned(teacher()),
                sampler="dpm++2m", guidance=2.0, steps=[n for n in s if n >= 4], nfe=2)]
    if found(args.consistency):
        out.append(dict(name="consistency student", load=lambda: load_denoiser(args.consistency, device="cpu"),
                        sampler=distill.sample_consistency, guidance=1.0, steps=[n for n in s if n <= 8], nfe=1))
    if found(args.flow):
        flow = lambda: load_denoiser(args.flow, device="cpu")  # noqa: E731
        out += [dict(name="flow matching, Euler", load=flow, sampler="ddim", guidance=2.0, steps=s, nfe=2),
                dict(name="flow matching, Heun", load=flow, sampler="heun", guidance=2.0, steps=s, nfe="heun")]
    if found(args.reflow):
        out.append(dict(name="reflowed flow, Euler", load=lambda: load_denoiser(args.reflow, device="cpu"),
                        sampler="ddim", guidance=1.0, steps=s, nfe=1))
    return out


def student_steps(path) -> list[int]:
    from diffusion_lab.checkpoint import load_checkpoint

    return load_checkpoint(path)[1].get("steps", [])


def nfe(row, steps: int) -> int:
    if row["nfe"] == "heun":
        return 2 * (2 * steps - 1)  # guided Heun: 2 * steps - 1 evaluations, each of two branches
    return row["nfe"] * steps


def seconds_per_image(draw, batch: int, repeats: int = 1) -> float:
    draw(batch)  # warm-up: first-call allocations and lazy initialisation are not what we measure
    start = time.perf_counter()
    for _ in range(repeats):
        draw(batch)
    return (time.perf_counter() - start) / (repeats * batch)


def measure(row, model, steps: int, p: dict, judge: Judge) -> dict:
    labels = eval_labels(p["n"])
    options = dict(sampler=row["sampler"], steps=steps, guidance=row["guidance"])
    images = generate(model, labels, seed=0, batch_size=250, **options)
    images = data.from_unit_range(images)[:, 0]
    draw = lambda b: generate(model, labels[:b], seed=1, batch_size=b, **options)  # noqa: E731
    s1 = seconds_per_image(draw, 1, p["batch1"])
    s256 = seconds_per_image(draw, 256 if p["n"] >= 256 else p["n"])
    return {"row": row["name"], "steps": steps, "nfe": nfe(row, steps), **judge.score(images, labels),
            "ms_per_image_batch1": 1000 * s1, "images_per_s_batch1": 1 / s1,
            "ms_per_image_batch256": 1000 * s256, "images_per_s_batch256": 1 / s256}


def gan_cell(p: dict, judge: Judge) -> dict:
    images, _ = data.mnist(train=True)
    result = gan.train_gan(images, steps=p["gan_steps"], batch_size=64, width=p["gan_width"], seed=0, progress=False)
    G = result["generator"]
    x0 = gan.sample_gan(G, p["n"], generator=torch.Generator().manual_seed(0))
    fid = judge.fid(data.from_unit_range(x0)[:, 0])
    draw = lambda b: gan.sample_gan(G, b, generator=torch.Generator().manual_seed(1))  # noqa: E731
    s1, s256 = seconds_per_image(draw, 1, p["batch1"]), seconds_per_image(draw, 256 if p["n"] >= 256 else p["n"])
    return {"row": f"DCGAN (chapter 01, width {p['gan_width']}, {p['gan_steps']} steps)", "steps": 1, "nfe": 1,
            "classifier_fid": fid, "conditional_accuracy": None, "train_s": result["elapsed_s"],
            "ms_per_image_batch1": 1000 * s1, "images_per_s_batch1": 1 / s1,
            "ms_per_image_batch256": 1000 * s256, "images_per_s_batch256": 1 / s256}


def compile_cell(args, p: dict) -> dict:
    """torch.compile of the 4-step student's network (the whole sampling loop is 4 calls of it): the time to
    compile, and the time per image after, at batch 1 and 256, against eager mode."""
    steps = 4 if 4 in student_steps(args.students) else min(student_steps(args.students))
    student = load_denoiser(args.students, device="cpu", steps=steps)
    labels = eval_labels(256 if p["n"] >= 256 else p["n"])
    out = {"model": f"progressive student, {steps} steps"}
    for mode in ("eager", "compiled"):
        model = student
        if mode == "compiled":
            try:
                model = dataclasses.replace(student, net=torch.compile(student.net))
                start = time.perf_counter()
                generate(model, labels[:1], seed=1, batch_size=1)
                generate(model, labels, seed=1, batch_size=len(labels))
                out["compile_s"] = time.perf_counter() - start
            except Exception as err:  # a missing C++ compiler, an unsupported platform: report, do not fail
                out["compile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                break
        draw = lambda b: generate(model, labels[:b], seed=1, batch_size=b)  # noqa: E731
        out[f"{mode}_ms_batch1"] = 1000 * seconds_per_image(draw, 1, p["batch1"])
        out[f"{mode}_ms_batch256"] = 1000 * seconds_per_image(draw, len(labels))
    return out


def straightness_cell(args, p: dict) -> dict:
    """Straightness (Liu et al. 2023) of the flow model's paths (guidance 2) and of the reflowed model's (guidance
    built in), on the same noise and labels 0..9 cycling."""
    from diffusion_lab.conditioning import guided

    x_T = torch.randn(p["straight_n"], 1, 28, 28, generator=torch.Generator().manual_seed(7))
    labels = eval_labels(p["straight_n"])
    out = {}
    for name, path, guidance in (("flow", args.flow, 2.0), ("reflow", args.reflow, 1.0), ("teacher", args.teacher, 2.0)):
        if name != "teacher" and not Path(path).exists():
            continue
        model = load_denoiser(path, device="cpu")
        out[name] = distill.straightness(guided(model, labels, guidance=guidance), model.schedule, x_T,
                                         p["straight_steps"])
    return out


def run_records(args) -> dict:
    """How each model was made: its training step, seconds and record (the command's settings), from its file."""
    from diffusion_lab.checkpoint import load_checkpoint

    out = {}
    for name, path in (("students", args.students), ("consistency", args.consistency), ("flow", args.flow),
                       ("reflow", args.reflow)):
        if name == "students" or Path(path).exists():
            meta = load_checkpoint(path)[1]
            out[name] = {k: meta.get(k) for k in ("step", "elapsed_s", "record", "distill", "steps", "train")}
    return out


def summarise(result: dict) -> dict:
    cells = result["cells"]
    ref = next((c for c in cells.values() if c["row"] == "teacher, DPM-Solver++(2M)" and c["steps"] == 20), None)
    if ref is None:
        return {}
    limit = QUALITY_FACTOR * ref["classifier_fid"]
    real_time = sorted((k for k, c in cells.items() if c["images_per_s_batch1"] >= REAL_TIME_FPS
                        and c["classifier_fid"] <= limit), key=lambda k: cells[k]["nfe"])
    return {"teacher_fid_20": ref["classifier_fid"], "quality_limit": limit, "real_time_fps": REAL_TIME_FPS,
            "real_time": real_time}


def render(result: dict) -> str:
    lines = [f"**Speed: quality against network evaluations (NFE), {result['preset']['n']} samples per cell, "
             f"time per image at batch 1 and 256.**", ""]
    if result.get("preset_name") == "smoke":
        lines += [smoke_line("smoke", HEADLINE), ""]
    lines += [machine_line(result["machine"]), ""]
    table = [[c["row"], c["steps"], c["nfe"], c["classifier_fid"], c["conditional_accuracy"],
              c["ms_per_image_batch1"], c["images_per_s_batch1"], c["ms_per_image_batch256"]]
             for c in result["cells"].values()]
    lines.append(markdown_table(["model, sampler", "steps", "NFE", "classifier-FID ↓", "cond. accuracy ↑",
                                 "ms/image, batch 1", "images/s, batch 1", "ms/image, batch 256"], table))
    s = result.get("summary") or {}
    if s:
        lines += ["", f"Floor: {result['preset']['n']} real training digits score classifier-FID "
                      f"{fmt(result['floor_fid'])}. Real time here: at least {fmt(s['real_time_fps'])} images/s at batch 1 "
                      f"and classifier-FID at most {QUALITY_FACTOR} x the teacher's 20-step DPM-Solver++ FID "
                      f"({fmt(s['teacher_fid_20'])}), so at most {fmt(s['quality_limit'])}. Cells that meet it: "
                      + (", ".join(f"{result['cells'][k]['row']} at {result['cells'][k]['steps']} step(s)"
                                   for k in s["real_time"]) or "none") + "."]
    if result.get("straightness"):
        lines += ["", "Straightness (Liu et al. 2023; 0 = straight paths): "
                  + ", ".join(f"{k} {fmt(v)}" for k, v in result["straightness"].items()) + "."]
    if result.get("compile"):
        c = result["compile"]
        lines += ["", f"torch.compile ({c['model']}): " + (c.get("compile_error") or
                  f"compiling took {fmt(c['compile_s'])} s; ms/image eager {fmt(c['eager_ms_batch1'])} -> compiled "
                  f"{fmt(c['compiled_ms_batch1'])} at batch 1, {fmt(c['eager_ms_batch256'])} -> "
                  f"{fmt(c['compiled_ms_batch256'])} at batch 256.")]
    if result.get("linear_share") is not None:
        lines += ["", f"Dynamic int8 reaches only Linear layers: {result['linear_share']:.1%} of the teacher's "
                      "parameters."]
    lines += ["", f"Command: `{result['command']}`"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = base_parser(__doc__, "speed.json")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--teacher", default="mnist-cond-small")
    parser.add_argument("--students", default="mnist-distilled")  # the shipped students
    parser.add_argument("--consistency", default=str(RUNS / "consistency.safetensors"))
    parser.add_argument("--flow", default=str(RUNS / "mnist-flow.safetensors"))
    parser.add_argument("--reflow", default=str(RUNS / "mnist-reflow.safetensors"))
    args = parser.parse_args(argv)
    done, machine, _ = begin(args, render, "Speed", HEADLINE)
    if done:
        return done
    p, out = PRESETS[args.preset], Path(args.out)
    command = f"python benchmarks/speed.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    result = {"preset_name": args.preset, "preset": p, "machine": machine, "command": command, "cells": {}}
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("preset") == p:
            result["cells"] = old["cells"]
            print(f"resuming: {len(old['cells'])} cells already measured", flush=True)
    test_images, _ = data.mnist(train=False)
    judge = Judge(metrics.load_classifier("cpu", args.classifier), test_images)
    result["floor_fid"] = real_floor(judge, p["n"])
    save = lambda: out.write_text(json.dumps(result, indent=1) + "\n")  # noqa: E731
    for row in rows(p, args):
        model = None if row["name"] == "progressive student" else row["load"]()
        for steps in row["steps"]:
            key = f"{row['name']} | {steps}"
            if key in result["cells"]:
                continue
            print(f"{key} ...", flush=True)
            result["cells"][key] = measure(row, model or row["load"](steps), steps, p, judge)
            save()
    gan_key = "DCGAN | 1"
    if gan_key not in result["cells"]:
        result["cells"][gan_key] = gan_cell(p, judge)
    result["runs"] = run_records(args)
    result["linear_share"] = linear_share(load_denoiser(args.teacher, device="cpu"))
    result["straightness"] = straightness_cell(args, p)
    result["compile"] = compile_cell(args, p) if args.preset == "full" else None
    result["summary"] = summarise(result)
    save()
    out.with_suffix(".md").write_text(render(result).rstrip() + "\n")
    return {"out": str(out), "cells": len(result["cells"])}


if __name__ == "__main__":
    print(json.dumps(main()))
