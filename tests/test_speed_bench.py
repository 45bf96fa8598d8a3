"""benchmarks/speed.py (chapter 13): the compressions, the real-time rule, a micro run over every row, resuming, and
the committed results being exactly what the script renders."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

import speed  # noqa: E402

from diffusion_lab import distill  # noqa: E402
from diffusion_lab.denoiser import load_denoiser  # noqa: E402
from diffusion_lab.training import TrainConfig, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pruning_zeroes_the_weakest_channels_and_quantising_touches_only_linear_layers():
    teacher = load_denoiser("mnist-cond-small", device="cpu")
    before = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    cut = speed.pruned(teacher, 0.3)
    for module in cut.net.modules():
        if isinstance(module, nn.Conv2d) and module.out_channels > 1:
            zero = (module.weight.flatten(1).abs().sum(1) == 0).sum().item()
            assert zero == round(0.3 * module.out_channels)
    q = speed.quantised(teacher)
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    assert any(isinstance(m, Int8Linear) for m in q.net.modules())
    assert not any(isinstance(m, nn.Linear) for m in q.net.modules())   # every float Linear was replaced
    assert all(torch.equal(v, teacher.net.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert 0 < speed.linear_share(teacher) < 0.5


def test_real_time_needs_both_the_frame_rate_and_the_quality():
    def cell(row, steps, fid, fps):
        return {"row": row, "steps": steps, "nfe": steps, "classifier_fid": fid, "images_per_s_batch1": fps}
    result = {"cells": {"t": cell("teacher, DPM-Solver++(2M)", 20, 100.0, 2.0), "fast-bad": cell("x", 1, 151.0, 99.0),
                        "fast-good": cell("y", 1, 149.0, 31.0), "slow-good": cell("z", 2, 90.0, 29.0)}}
    s = speed.summarise(result)
    assert s["quality_limit"] == pytest.approx(150.0) and s["real_time"] == ["fast-good"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny stand-ins for the four trained models: students (copies of the teacher), a flow model and a v model."""
    root = tmp_path_factory.mktemp("speed")
    torch.set_num_threads(1)
    teacher = load_denoiser("mnist-cond-small", device="cpu")
    students = root / "students.safetensors"
    distill.save_students(students, {n: teacher for n in (2, 1)}, default_steps=1)
    small = dict(steps=2, channels=(8, 16, 16), batch_size=8, device="cpu")
    flow = root / "flow.safetensors"
    train(TrainConfig(prediction="flow", schedule="rectified", **small), checkpoint=flow, progress=False)
    v = root / "v.safetensors"
    train(TrainConfig(**small), checkpoint=v, progress=False)
    return {"students": students, "flow": flow, "v": v}


def test_speed_micro_measures_every_row_and_resumes(tmp_path, models):
    out = tmp_path / "speed.json"
    argv = ["--preset", "smoke", "--threads", "1", "--students", str(models["students"]), "--consistency",
            str(models["v"]), "--flow", str(models["flow"]), "--reflow", str(models["flow"]), "--out", str(out)]
    speed.main(argv)
    result = json.loads(out.read_text())
    rows = {c["row"] for c in result["cells"].values()}
    assert {"teacher, DDIM", "teacher, DDPM", "progressive student", "consistency student", "flow matching, Heun",
            "reflowed flow, Euler"} <= rows and any(r.startswith("DCGAN") for r in rows)
    heun = result["cells"]["flow matching, Heun | 2"]
    assert heun["nfe"] == 2 * (2 * 2 - 1)                       # guided Heun: 3 evaluations of two branches
    assert result["cells"]["progressive student | 2"]["nfe"] == 2   # guidance built in: one branch
    assert set(result["straightness"]) == {"flow", "reflow", "teacher"}
    assert "smoke check, not a result" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".md").read_text().strip() == speed.render(result).strip()
    # a second run keeps every measured cell (timings included) and measures only what is missing
    del result["cells"]["teacher, DDIM | 2"]
    out.write_text(json.dumps(result))
    speed.main(argv)
    again = json.loads(out.read_text())
    for key, c in again["cells"].items():
        if key != "teacher, DDIM | 2":
            assert c["ms_per_image_batch1"] == result["cells"][key]["ms_per_image_batch1"], key
    assert "teacher, DDIM | 2" in again["cells"]


def test_committed_speed_results_are_what_the_script_renders():
    js, md = RESULTS / "speed.json", RESULTS / "speed.md"
    result = json.loads(js.read_text())
    assert md.read_text().strip() == speed.render(result).strip()
    assert result["preset_name"] == "full" and result["summary"]["real_time"] is not None
