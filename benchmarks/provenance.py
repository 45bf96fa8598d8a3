"""Provenance (chapter 14): how well a Tree-Ring watermark is found, clean and under attacks, and how well a small
classifier tells the shipped model's digits from real ones.

Watermark. The shipped `mnist-cond-small` draws `n` digits (0..9 cycling) from starting noise that carries the key's mark
(diffusion_lab.watermark) and `n` from plain noise, with the sampling command's defaults (DPM-Solver++(2M), 20
steps, guidance 2). Both sets then go through each attack (none, Gaussian noise, blur, a shift, a crop, grey-level
quantisation) and through detection (DDIM inversion with the null label, then the key's p-value). We record every
p-value, the false-positive rate at alpha = 1% on the unmarked images, the detection rate at alpha = 1%, the
detection rate at the threshold that keeps the measured false-positive rate <= 1%, and the ROC's area. The wrong
key is tried on the marked images. The marked digits' conditional accuracy and classifier-FID are compared with the
unmarked ones'.

Real vs generated. A small CNN learns to tell `n_detector` generated digits (unmarked) from as many real test
digits, on 80% of each; its accuracy on the other 20% is a two-sample test (a classifier two-sample test, Lopez-Paz
& Oquab 2017): 50% means it cannot tell them apart.

    nohup python benchmarks/provenance.py --preset cpu --threads 1 > runs/provenance.log 2>&1 &
    python benchmarks/provenance.py --preset smoke --out /tmp/provenance.json        # plumbing only
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, begin, fmt, machine_line, markdown_table, smoke_line, write_results  # noqa: E402

from diffusion_lab import data, metrics, watermark  # noqa: E402
from diffusion_lab.denoiser import load_denoiser  # noqa: E402
from diffusion_lab.sample import generate  # noqa: E402

PRESETS = {
    "smoke": dict(n=10, detect_steps=2, sample_steps=2, n_detector=20, detector_steps=5, step_sweep=[1, 2]),
    "cpu": dict(n=200, detect_steps=4, sample_steps=20, n_detector=600, detector_steps=400, step_sweep=[2, 4, 10, 20]),
}
HEADLINE = "python benchmarks/provenance.py --preset cpu --threads 1"
KEY, WRONG_KEY = "3f9a1c2e5b7d", "0c4e8a2f6d1b"
ATTACKS = {"none": None, "noise": ("noise", 10.0), "blur": ("blur", 0.8), "shift": ("shift", 1), "crop": ("crop", 2),
           "quantise": ("quantise", 4)}
ATTACK_WORDS = {"none": "none", "noise": "Gaussian noise, std 10 grey levels", "blur": "Gaussian blur, std 0.8 px",
                "shift": "shift by 1 px right and down", "crop": "crop 2 px each side, resized back",
                "quantise": "4 grey levels"}


def roc(p_marked: np.ndarray, p_clean: np.ndarray) -> dict:
    """Detection at alpha = 1%, at the threshold whose measured false-positive rate is <= 1%, and the ROC's area
    (the probability that a marked image gets a smaller p-value than an unmarked one; ties count half)."""
    alpha = watermark.ALPHA
    fpr = float((p_clean < alpha).mean())
    allowed = int(math.floor(0.01 * len(p_clean)))          # unmarked images allowed below the threshold
    threshold = np.sort(p_clean)[allowed] if allowed < len(p_clean) else 1.0
    less = (p_marked[:, None] < p_clean[None, :]).mean() + 0.5 * (p_marked[:, None] == p_clean[None, :]).mean()
    fprs, tprs = [0.0], [0.0]
    for t in np.sort(np.concatenate([p_marked, p_clean])):
        fprs.append(float((p_clean <= t).mean()))
        tprs.append(float((p_marked <= t).mean()))
    return {"fpr_at_alpha": fpr, "tpr_at_alpha": float((p_marked < alpha).mean()),
            "tpr_at_fpr_1pct": float((p_marked < threshold).mean()), "auc": float(less),
            "roc_fpr": fprs[:: max(1, len(fprs) // 100)], "roc_tpr": tprs[:: max(1, len(tprs) // 100)]}


class RealOrFake(nn.Module):
    """A deliberately small CNN: two conv layers and a linear read-out, about 20k weights."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(32 * 7 * 7, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


def real_vs_generated(generated: torch.Tensor, real: torch.Tensor, steps: int, seed: int = 0) -> dict:
    """Train RealOrFake on 80% of each set, report accuracy on the other 20% with a 95% binomial interval."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = data.to_unit_range(torch.cat([generated, real]))
    y = torch.cat([torch.ones(len(generated)), torch.zeros(len(real))])
    order = torch.randperm(len(x), generator=g)
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    model = RealOrFake()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, cut, (64,), generator=g)
        loss = nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        correct = ((model(x[cut:]) > 0).float() == y[cut:]).float()
        train_acc = ((model(x[:cut]) > 0).float() == y[:cut]).float().mean().item()
    acc, n = correct.mean().item(), len(correct)
    half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / n)
    return {"test_accuracy": acc, "ci95": [acc - half, acc + half], "n_test": n, "train_accuracy": train_acc,
            "n_generated": len(generated), "n_real": len(real), "steps": steps}


def render(result: dict) -> str:
    p = result["preset"]
    lines = ["**Provenance: Tree-Ring watermark and a real-vs-generated detector**", "",
             machine_line(result["machine"]), ""]
    if result["preset_name"] != "cpu":
        lines += [smoke_line(f"preset {result['preset_name']}", HEADLINE), ""]
    lines += [f"Command: `{result['command']}`. Total wall time {fmt(result['total_wall_s'])} s. "
              f"{p['n']} marked and {p['n']} unmarked digits from `{result['checkpoint']}` (DPM-Solver++(2M), {p['sample_steps']} "
              f"steps, guidance 2); detection by {p['detect_steps']}-step DDIM inversion with the null label; "
              f"alpha = {watermark.ALPHA}.", ""]
    rows = [[name, ATTACK_WORDS[name], r["fpr_at_alpha"], r["tpr_at_alpha"], r["tpr_at_fpr_1pct"], r["auc"]]
            for name, r in result["attacks"].items()]
    lines += [markdown_table(["attack", "what", "false positives at alpha", "detected at alpha",
                              "detected at measured FPR <= 1%", "ROC area"], rows), ""]
    w = result["wrong_key"]
    q = result["quality"]
    lines += [f"Wrong key on the marked digits: {fmt(w['flagged_at_alpha'])} flagged at alpha. "
              f"Quality, marked vs unmarked: conditional accuracy {fmt(q['marked']['conditional_accuracy'])} vs "
              f"{fmt(q['clean']['conditional_accuracy'])}; classifier-FID {fmt(q['marked']['classifier_fid'])} vs "
              f"{fmt(q['clean']['classifier_fid'])} (against {q['n_reference']} test digits).", ""]
    lines += ["Inversion steps at detection (no attack): " + "; ".join(
        f"{k} steps: detected {fmt(v['tpr_at_alpha'])}, false positives {fmt(v['fpr_at_alpha'])}"
        for k, v in result["step_sweep"].items()) + ".", ""]
    d = result["detector"]
    lines += [f"Real vs generated: a small CNN trained on {fmt(int(0.8 * (d['n_generated'] + d['n_real'])))} digits "
              f"tells the held-out {d['n_test']} apart with accuracy {fmt(d['test_accuracy'])} "
              f"(95% interval {fmt(d['ci95'][0])}–{fmt(d['ci95'][1])}; training accuracy {fmt(d['train_accuracy'])})."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = base_parser(__doc__, "provenance.json")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--checkpoint", default="mnist-cond-small")
    args = parser.parse_args(argv)
    done, machine, _ = begin(args, render, "Provenance: Tree-Ring watermark", HEADLINE)
    if done:
        return done
    p = PRESETS[args.preset]
    start = time.perf_counter()
    denoiser = load_denoiser(args.checkpoint, device="cpu")
    n = p["n"]
    labels = torch.arange(n) % 10
    options = dict(sampler="dpm++2m", steps=p["sample_steps"], guidance=2.0)
    x_T = watermark.watermarked_noise(n, KEY, denoiser.shape, seed=1)
    marked = data.from_unit_range(generate(denoiser, labels, x_T=x_T, **options))[:, 0]
    n_clean = max(n, p["n_detector"])
    clean_labels = torch.arange(n_clean) % 10
    clean_all = data.from_unit_range(generate(denoiser, clean_labels, seed=2, **options))[:, 0]
    clean = clean_all[:n]
    print(f"sampled at {time.perf_counter() - start:.0f} s", flush=True)

    classifier = metrics.load_classifier("cpu", args.classifier)
    test_images, _ = data.mnist(train=False)
    reference = test_images[-2000:]
    quality = {"n_reference": len(reference)}
    for name, images in (("marked", marked), ("clean", clean)):
        quality[name] = {"conditional_accuracy": metrics.conditional_accuracy(images, labels, classifier),
                         "classifier_fid": metrics.classifier_fid(images, reference, classifier)}

    attacks, p_values = {}, {}
    for name, spec in ATTACKS.items():
        m, c = (marked, clean) if spec is None else (watermark.attack(marked, *spec, seed=3),
                                                     watermark.attack(clean, *spec, seed=4))
        pm = watermark.detect(denoiser, m, KEY, p["detect_steps"]).numpy()
        pc = watermark.detect(denoiser, c, KEY, p["detect_steps"]).numpy()
        attacks[name] = roc(pm, pc)
        p_values[name] = {"marked": pm.tolist(), "clean": pc.tolist()}
        print(f"{name}: {attacks[name]['tpr_at_alpha']:.3f} detected at {time.perf_counter() - start:.0f} s", flush=True)
    wrong = watermark.detect(denoiser, marked, WRONG_KEY, p["detect_steps"]).numpy()
    step_sweep = {}
    for steps in p["step_sweep"]:   # how many inversion steps detection should take
        pm = watermark.detect(denoiser, marked, KEY, steps).numpy()
        pc = watermark.detect(denoiser, clean, KEY, steps).numpy()
        step_sweep[str(steps)] = {"tpr_at_alpha": float((pm < watermark.ALPHA).mean()),
                                  "fpr_at_alpha": float((pc < watermark.ALPHA).mean())}
    detector = real_vs_generated(clean_all[: p["n_detector"]], test_images[: p["n_detector"]], p["detector_steps"])
    result = {"preset_name": args.preset, "preset": p, "machine": machine, "checkpoint": args.checkpoint,
              "command": f"python benchmarks/provenance.py {' '.join(argv if argv is not None else sys.argv[1:])}",
              "radii": list(watermark.RADII), "attacks": attacks, "p_values": p_values,
              "wrong_key": {"flagged_at_alpha": float((wrong < watermark.ALPHA).mean()), "p_values": wrong.tolist()},
              "quality": quality, "detector": detector, "step_sweep": step_sweep, "total_wall_s": time.perf_counter() - start}
    write_results(args.out, result, render(result))
    return result


if __name__ == "__main__":
    main()
