#!/usr/bin/env python3
"""Chapter 11's representation trials: score training runs of the two codes the shipped model did NOT use.

    python tools/chorale_code_trials.py ROLL_RUN.safetensors SEMITONE_RUN.safetensors > trials.md

ROLL_RUN: a UNet(in_channels=224, dims="1d") trained by `fit` on `music.encode` rolls folded to (4 * LEVELS, 64);
SEMITONE_RUN: a UNet(in_channels=4, dims="1d") trained on (pitch - music.CENTRES) / 6 semitones. Both are decoded
here with the code they were trained on, harmonise the first 48 held-out sopranos (seed 0, DPM-Solver++(2M), 20 steps)
and are scored with music.evaluate, like the shipped model. Prints a markdown table.
"""
import sys

import numpy as np
import torch

from diffusion_lab import music
from diffusion_lab.denoiser import load_denoiser
from diffusion_lab.sample import generate


def roll_code(p):
    roll = music.encode(p)
    return torch.from_numpy(roll.reshape(len(p), 4 * music.LEVELS, p.shape[-1]))


def roll_decode(x):
    return music.decode(x.numpy().reshape(len(x), 4, music.LEVELS, x.shape[-1]))


def semitone_code(p):
    return torch.from_numpy(((music.fill_rests(p) - np.array(music.CENTRES)[:, None]) / 6.0).astype(np.float32))


def semitone_decode(x):
    p = np.rint(x.numpy() * 6.0 + np.array(music.CENTRES)[:, None])
    return np.clip(p, music.PITCH_LOW, music.PITCH_HIGH).astype(np.int16)


def main(roll_run, semitone_run):
    torch.set_num_threads(1)
    chorales = music.bach_chorales()
    train = music.windows(music.split(chorales, "train"))
    test = music.windows(music.split(chorales, "test"))[:48]
    ranges = music.voice_ranges(train)
    keys = ("in_key", "range_violations", "crossings_per_100_beats", "parallel_fifths_per_100_beats",
            "parallel_octaves_per_100_beats", "mean_note_length")
    print("| code | run step | " + " | ".join(k.replace("_", " ") for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for name, run, code, decode, clamp in (("piano roll, argmax", roll_run, roll_code, roll_decode, 1.0),
                                           ("MIDI pitch, 6 semitones per unit", semitone_run, semitone_code,
                                            semitone_decode, None)):
        denoiser = load_denoiser(run, device="cpu")
        known = code(test)
        mask = torch.zeros_like(known)
        mask[:, : known.shape[1] // 4] = 1  # the soprano's channels come first in both codes
        x = generate(denoiser, n=len(test), known=known, mask=mask, steps=20, seed=0, clamp=clamp)
        out = decode(x)
        out[:, 0] = test[:, 0]
        stats = music.evaluate(out, test, ranges)
        from safetensors import safe_open
        import json
        step = json.loads(safe_open(run, "pt").metadata()["config"])["step"]
        print(f"| {name} | {step} | " + " | ".join(f"{stats[k]:.3f}" for k in keys) + " |")
    stats = music.evaluate(test, test, ranges)
    print("| (held-out Bach) | | " + " | ".join(f"{stats[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
