"""Training throughput of this repo's UNet and of the anchor, against the machine's own measured peaks.

For each model and each lever setting (`--variants`, or one setting from --channels-last / --bf16 / --compile):
- FLOPs of one training step (forward + backward) from torch.utils.flop_counter.FlopCounterMode. It counts
  matrix products, convolutions and attention; normalisation, activations and the optimizer are not counted,
  so the achieved GFLOP/s is a lower bound on the work the machine does.
- the median time of `--reps` timed steps after `--warmup` untimed ones (median: robust to a neighbour's burst
  on a shared machine), hence images/s and achieved GFLOP/s.
The machine's peaks, measured by this script on the spot:
- matmul: an `--matmul-n`-square fp32 matrix product;
- conv: the single heaviest convolution layer found in either model (same shapes, batch and padding), forward
  alone and forward + backward, in every dtype and memory format the variants use. The conv peak is the best
  of those, and each model's GFLOP/s is reported as a fraction of it.

Run from the repository root (a few minutes on a 2-core CPU):
    python benchmarks/throughput.py --variants eager channels_last bf16 bf16+channels_last
writes benchmarks/results/throughput.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (command_line, fmt, machine_line, markdown_table,  # noqa: E402
                     smoke_line, sync, base_parser, begin, model_options, write_results)
from anchor import AnchorNet, anchor_scheduler, train_step  # noqa: E402

from diffusion_lab import data  # noqa: E402
from diffusion_lab.conditioning import drop_codes  # noqa: E402
from diffusion_lab.losses import diffusion_loss  # noqa: E402
from diffusion_lab.training import TrainConfig, build_model, build_schedule, ema_update  # noqa: E402
from diffusion_lab.unet import count_parameters  # noqa: E402

LEVERS = ("channels_last", "bf16", "compile")
HEADLINE = {"batch": 128, "reps": 5}
TITLE = "Training throughput: this repo's UNet vs the anchor, against this machine's measured peaks"
HEADLINE_COMMAND = "python benchmarks/throughput.py --variants eager channels_last bf16 bf16+channels_last"


def parse_variant(name: str) -> frozenset[str]:
    """"eager" -> no levers; "bf16+channels_last" -> both."""
    if name in ("eager", "fp32", "baseline"):
        return frozenset()
    levers = frozenset(name.split("+"))
    unknown = levers - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown lever(s) {sorted(unknown)} in variant {name!r}; levers are {', '.join(LEVERS)}")
    return levers


def variant_name(levers: frozenset[str]) -> str:
    return "+".join(lever for lever in LEVERS if lever in levers) or "eager"


def autocast(device: torch.device, levers) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in levers)


# --- the two training steps -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def first_digits(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `batch` MNIST training digits and labels (a fixed batch: throughput does not depend on it)."""
    images, labels = data.mnist(train=True)
    return images[:batch].clone(), labels[:batch].clone()


def ours_stepper(config: TrainConfig, batch: int, device, levers):
    """One step of diffusion_lab.training's loop (loss, backward, clip, AdamW, EMA); returns (model, step())."""
    images, labels = first_digits(batch)
    model = build_model(config).to(device)
    if "channels_last" in levers:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    net = torch.compile(model) if "compile" in levers else model
    schedule = build_schedule(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(0)
    x0 = data.to_unit_range(images[:batch]).to(device)
    if "channels_last" in levers:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    lab = labels[:batch].to(device)

    count = [0]  # steps taken, for the EMA warm-up

    def step():
        batch_labels, _ = drop_codes(lab, None, 10, config.p_uncond, 0.0, generator)
        with autocast(device, levers):
            loss = diffusion_loss(lambda x_t, t: net(x_t, t, batch_labels), schedule, x0, config.prediction,
                                  config.weighting, config.min_snr_gamma, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        ema_update(ema, model, count[0], config.ema_decay)
        count[0] += 1

    return model, step


def anchor_stepper(batch: int, device, levers):
    images, labels = first_digits(batch)
    model = AnchorNet().to(device)
    if "channels_last" in levers:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if "compile" in levers else model
    scheduler = anchor_scheduler()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    x0 = data.to_unit_range(images[:batch]).to(device)
    if "channels_last" in levers:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    lab = labels[:batch].to(device)

    def step():
        with autocast(device, levers):
            train_step(net, scheduler, optimizer, x0, lab, generator)

    return model, step


def count_flops(step) -> tuple[int, int]:
    """FLOPs of one step: (all counted, convolutions forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    conv = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    return counter.get_total_flops(), conv


def time_steps(step, device, warmup: int, reps: int) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, warm_s


# --- where a step's time goes ----------------------------------------------------------------------------------

PARTS = ("convolution forward", "convolution backward", "normalisation and activations", "everything else")
NORM_AND_ACTIVATION = ("group_norm", "layer_norm", "batch_norm", "silu", "gelu", "relu", "sigmoid")


def part_of(op_name: str) -> str:
    """The part of the step an operator belongs to, from its profiler name (forward and backward alike, except
    for convolutions)."""
    name = op_name.lower()
    if "conv" in name:
        return PARTS[1] if "backward" in name else PARTS[0]
    if any(k in name for k in NORM_AND_ACTIVATION):
        return PARTS[2]
    return PARTS[3]  # casts, copies, adds, concatenation, embeddings, loss, optimizer, EMA, compiled kernels


def time_breakdown(step, reps: int, conv_flops: int) -> dict:
    """Profile `reps` steps (CPU only: self time of each operator) and split it into PARTS. `convs alone` is the
    step's convolution FLOPs over the time its convolution operators took: the rate the step would reach if
    everything else were free. The profiler adds a little overhead, so its milliseconds exceed the timed ones."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step()
    seconds = dict.fromkeys(PARTS, 0.0)
    for event in prof.key_averages():
        seconds[part_of(event.key)] += event.self_cpu_time_total / 1e6
    total = sum(seconds.values())
    conv_s = (seconds[PARTS[0]] + seconds[PARTS[1]]) / reps
    return {"shares": {k: v / total for k, v in seconds.items()}, "profiled_ms_per_step": total / reps * 1e3,
            "conv_ms_per_step": conv_s * 1e3, "conv_gflop_per_step": conv_flops / 1e9,
            "conv_alone_gflops": conv_flops / conv_s / 1e9}


# --- the machine's peaks ------------------------------------------------------------------------------------

def best_time(fn, device, reps: int, min_s: float = 0.5) -> float:
    """Best time of `fn` over `reps` runs (after one warm-up), repeating each run until it lasts min_s."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                break
        best = min(best, elapsed / n)
    return best


def matmul_peak(n: int, device, dtype=torch.float32, reps: int = 3, min_s: float = 0.5) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = best_time(lambda: a @ b, device, reps, min_s)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": seconds, "gflops": 2 * n**3 / seconds / 1e9}


def heaviest_conv(models_and_inputs) -> dict:
    """Run each model forward once and return the conv layer with the most FLOPs, with its input shape."""
    found = []

    def hook(module, inputs, output):
        x = inputs[0]
        k = module.kernel_size[0] * module.kernel_size[1]
        flops = 2 * output.numel() * module.in_channels // module.groups * k
        found.append({"flops": flops, "in_shape": list(x.shape), "out_channels": module.out_channels,
                      "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                      "padding": list(module.padding), "groups": module.groups})

    for model, run in models_and_inputs:
        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            run()
        for h in handles:
            h.remove()
    return max(found, key=lambda c: c["flops"])


def conv_peak(spec: dict, device, dtype=torch.float32, channels_last: bool = False, reps: int = 3,
              min_s: float = 0.5) -> dict:
    conv = nn.Conv2d(spec["in_shape"][1], spec["out_channels"], spec["kernel_size"], spec["stride"], spec["padding"],
                     groups=spec["groups"]).to(device=device, dtype=dtype)
    x = torch.randn(spec["in_shape"], device=device, dtype=dtype)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def fwd():
        with torch.no_grad():
            conv(x)

    def fwd_bwd():
        conv(x).sum().backward()

    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    flops_fb = counter.get_total_flops()
    t_f, t_fb = best_time(fwd, device, reps, min_s), best_time(fwd_bwd, device, reps, min_s)
    return {"dtype": str(dtype).replace("torch.", ""), "channels_last": channels_last,
            "forward_gflops": spec["flops"] / t_f / 1e9, "forward_backward_gflops": flops_fb / t_fb / 1e9}


# --- report ---------------------------------------------------------------------------------------------------

def render(result: dict) -> str:
    peaks = result["peaks"]
    conv = peaks["conv_spec"]
    lines = [f"**Training throughput at batch {result['batch']}: this repo's UNet vs the anchor, against this "
             f"machine's measured peaks.**", "", machine_line(result["machine"]), ""]
    if result["smoke"]:
        lines += [smoke_line(f"batch {result['batch']}, {result['reps']} timed step(s)",
                             HEADLINE_COMMAND), ""]
    rows = [[r["model"], r["variant"], r["gflop_per_step"], round(r["ms_per_step"], 1), round(r["images_per_s"], 1),
             r["achieved_gflops"], r["fraction_of_conv_peak"], r["fraction_of_matmul_peak"]] for r in result["rows"]]
    lines += [markdown_table(["model", "levers", "GFLOP / step", "ms / step (median)", "img/s", "achieved GFLOP/s",
                              "fraction of conv peak", "fraction of matmul peak"], rows), ""]
    checks = [[t["variant"], t["speedup_same_levers"], t["speedup_vs_anchor_eager"], t["speedup_met"],
               t["fraction_of_conv_peak"], t["fraction_met"]] for t in result["targets"]]
    lines += [markdown_table(["levers (this repo)", "img/s ÷ anchor's, same levers", "img/s ÷ anchor's eager fp32",
                              "target ≥ 3 × anchor's eager", "fraction of conv peak", "target ≥ 0.6"],
                             checks), ""]
    profiled = [r for r in result["rows"] if "breakdown" in r]
    if profiled:
        parts = [[r["model"], r["variant"], *(r["breakdown"]["shares"][k] for k in PARTS),
                  r["breakdown"]["conv_alone_gflops"], r["breakdown"]["conv_alone_fraction_of_conv_peak"]]
                 for r in profiled]
        lines += [f"Where the step's time goes (share of torch.profiler's self CPU time over {result['reps']} "
                  f"profiled steps). *Convs alone* divides the step's convolution FLOPs by the time its "
                  f"convolution operators took: the fraction of the conv peak the step would reach if everything "
                  f"else were free. Under torch.compile the kernels it generates, normalisation included, count as "
                  f"everything else.", "",
                  markdown_table(["model", "levers", *PARTS, "convs alone: GFLOP/s", "convs alone ÷ conv peak"],
                                 parts), ""]
    peak_rows = [[f"matmul {m['n']}x{m['n']}", m["dtype"], "–", m["gflops"], "–"] for m in peaks["matmul"]]
    peak_rows += [["heaviest conv", c["dtype"], c["channels_last"], c["forward_gflops"], c["forward_backward_gflops"]]
                  for c in peaks["conv"]]
    lines += [markdown_table(["peak probe", "dtype", "channels-last", "GFLOP/s (forward)",
                              "GFLOP/s (forward + backward)"], peak_rows), ""]
    conv_peaks = ", ".join(f"{fmt(v)} GFLOP/s in {k}" for k, v in peaks["conv_peak_gflops"].items())
    lines += [f"Conv peak: {conv_peaks}; the best of the rows above in that dtype, for the heaviest "
              f"convolution in either model: input {tuple(conv['in_shape'])}, {conv['out_channels']} output channels, "
              f"kernel {tuple(conv['kernel_size'])}, {fmt(conv['flops'] / 1e9)} GFLOP forward. FLOPs are counted by "
              f"torch.utils.flop_counter (matmul, conv, attention only), so the fractions are lower bounds; each "
              f"row is compared with the peaks of its own dtype (bf16 rows with the bf16 peaks). "
              f"Parameters: this repo {fmt(result['parameters']['ours'])}, anchor "
              f"{fmt(result['parameters']['anchor'])}; "
              f"bf16 hardware: avx512_bf16 {fmt(result['machine']['avx512_bf16'])}, amx_bf16 "
              f"{fmt(result['machine']['amx_bf16'])}, torch CPU capability {result['machine']['cpu_capability']}.", "",
              f"Command: `{result['command']}`"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__, "throughput.json")
    p.add_argument("--batch", type=int, default=HEADLINE["batch"])
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile: more)")
    p.add_argument("--reps", type=int, default=HEADLINE["reps"], help="timed steps")
    p.add_argument("--variants", nargs="*", default=None,
                   help=f"lever settings to measure, e.g. eager channels_last bf16+channels_last compile "
                        f"(levers: {', '.join(LEVERS)}); default: one setting from the three flags below")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (on CPUs, pays with AVX512-BF16 or AMX)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (slow to warm up)")
    p.add_argument("--breakdown", action="store_true",
                   help="also profile each step (CPU only) and report where its time goes")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--peak-reps", type=int, default=3)
    p.add_argument("--peak-min-s", type=float, default=0.5, help="each peak timing repeats until this long")
    model_options(p, "this repo's model")
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    done, machine, device = begin(args, render, TITLE, HEADLINE_COMMAND)
    if done is not None:
        return done
    if args.breakdown and device.type != "cpu":
        raise SystemExit("--breakdown splits CPU time by operator; on a GPU use torch.profiler with CUDA activity")
    t_start = time.perf_counter()
    if args.variants:
        variants = [parse_variant(v) for v in args.variants]
    else:
        variants = [frozenset(k for k in LEVERS if getattr(args, k))]
    config = TrainConfig(channels=tuple(args.channels), blocks_per_level=args.blocks_per_level,
                         attention=bool(args.attention))

    # the peaks first, on a machine not yet warmed by the models
    ours_model, _ = ours_stepper(config, args.batch, device, frozenset())
    anchor_model, _ = anchor_stepper(args.batch, device, frozenset())
    x = torch.randn(args.batch, 1, 28, 28, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    lab = torch.randint(0, 10, (args.batch,), device=device)
    spec = heaviest_conv([(ours_model, lambda: ours_model(x, t, lab)), (anchor_model, lambda: anchor_model(x, t, lab))])
    use_bf16 = any("bf16" in v for v in variants)
    dtypes = [torch.float32] + ([torch.bfloat16] if use_bf16 else [])
    matmul = [matmul_peak(args.matmul_n, device, dt, args.peak_reps, args.peak_min_s) for dt in dtypes]
    # both memory formats always: the peak is the machine's best, whichever variants are asked for
    conv = [conv_peak(spec, device, dt, cl, args.peak_reps, args.peak_min_s) for dt in dtypes for cl in (False, True)]
    # each row is compared with the peaks of its own dtype (the best memory format, forward or forward+backward)
    conv_peaks = {m["dtype"]: max(max(c["forward_gflops"], c["forward_backward_gflops"])
                                  for c in conv if c["dtype"] == m["dtype"]) for m in matmul}
    matmul_peaks = {m["dtype"]: m["gflops"] for m in matmul}
    print(f"peaks: matmul {matmul_peaks} GFLOP/s, conv {conv_peaks} GFLOP/s", flush=True)

    rows = []
    for levers in variants:
        for name, make in (("this repo", lambda lv: ours_stepper(config, args.batch, device, lv)),
                           ("anchor", lambda lv: anchor_stepper(args.batch, device, lv))):
            flops, conv_flops = count_flops(make(levers - {"compile"})[1])  # eager: the same arithmetic, countable
            _, step = make(levers)
            times, warm_s = time_steps(step, device, args.warmup, args.reps)
            median = statistics.median(times)
            row = {"model": name, "variant": variant_name(levers), "batch": args.batch, "gflop_per_step": flops / 1e9,
                   "ms_per_step": median * 1e3, "ms_per_step_mean": statistics.fmean(times) * 1e3,
                   "step_times_s": times, "warmup_s": warm_s, "images_per_s": args.batch / median,
                   "achieved_gflops": flops / median / 1e9}
            row["dtype"] = "bfloat16" if "bf16" in levers else "float32"
            row["fraction_of_conv_peak"] = row["achieved_gflops"] / conv_peaks[row["dtype"]]
            row["fraction_of_matmul_peak"] = row["achieved_gflops"] / matmul_peaks[row["dtype"]]
            if args.breakdown:
                row["breakdown"] = time_breakdown(step, args.reps, conv_flops)
                row["breakdown"]["conv_alone_fraction_of_conv_peak"] = (row["breakdown"]["conv_alone_gflops"]
                                                                        / conv_peaks[row["dtype"]])
            rows.append(row)
            print({k: v for k, v in row.items() if k != "step_times_s"}, flush=True)
    # the anchor's recipe is eager fp32: the target compares our step, with whatever levers, against it
    anchor_eager = next((r for r in rows if r["variant"] == "eager" and r["model"] == "anchor"), None)
    speedups, targets = {}, []
    for levers in variants:
        v = variant_name(levers)
        ours_r = next(r for r in rows if r["variant"] == v and r["model"] == "this repo")
        anchor_r = next(r for r in rows if r["variant"] == v and r["model"] == "anchor")
        speedups[v] = {"ours_over_anchor_images_per_s": ours_r["images_per_s"] / anchor_r["images_per_s"],
                       "ours_over_anchor_eager_images_per_s":
                           ours_r["images_per_s"] / anchor_eager["images_per_s"] if anchor_eager else None}
        vs_recipe = speedups[v]["ours_over_anchor_eager_images_per_s"]
        targets.append({"variant": v, "fraction_of_conv_peak": ours_r["fraction_of_conv_peak"],
                        "fraction_met": ours_r["fraction_of_conv_peak"] >= 0.6,
                        "speedup_same_levers": speedups[v]["ours_over_anchor_images_per_s"],
                        "speedup_vs_anchor_eager": vs_recipe,
                        "speedup_met": vs_recipe >= 3 if vs_recipe is not None else None})
    result = {"benchmark": "throughput", "command": command_line("throughput.py", argv), "machine": machine,
              "batch": args.batch, "warmup": args.warmup, "reps": args.reps,
              "smoke": args.batch < HEADLINE["batch"] or args.reps < HEADLINE["reps"],
              "our_config": {"channels": list(config.channels), "blocks_per_level": config.blocks_per_level,
                             "attention": config.attention, "objective": config.prediction},
              "parameters": {"ours": count_parameters(ours_model), "anchor": count_parameters(anchor_model)},
              "peaks": {"matmul": matmul, "conv_spec": spec, "conv": conv, "conv_peak_gflops": conv_peaks,
                        "matmul_peak_gflops": matmul_peaks},
              "rows": rows, "speedups": speedups, "targets": targets}
    result["total_wall_s"] = time.perf_counter() - t_start
    json_path, md_path = write_results(args.out, result, render(result))
    print(f"wrote {json_path} and {md_path}")
    return result


if __name__ == "__main__":
    main()
