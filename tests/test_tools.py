"""The two tools that turn a training run into a shipped model: tools/convert_checkpoint.py (training run -> shipped
file, EMA weights bit for bit) and tools/measure_grid.py (the sample CLI's measurement a model card quotes)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from diffusion_lab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from diffusion_lab.denoiser import load_denoiser
from diffusion_lab.training import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import convert_checkpoint  # noqa: E402
import measure_grid  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


@pytest.fixture(scope="module")
def run_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run") / "run.safetensors"
    torch.set_num_threads(1)
    config = TrainConfig(steps=3, channels=(8, 16, 16), attention=False, batch_size=8, T=50, ema_decay=0.5, device="cpu")
    train(config, checkpoint=path, progress=False)
    return path


def test_convert_keeps_the_ema_weights_bit_for_bit_and_the_training_record(run_file, tmp_path):
    shipped = tmp_path / "shipped.safetensors"
    convert_checkpoint.convert(str(run_file), str(shipped))
    run_tensors, run_meta = load_checkpoint(run_file)
    tensors, meta = load_checkpoint(shipped)
    assert meta["kind"] == "diffusion" and meta["step"] == run_meta["step"] == 3
    assert meta["train"] == run_meta["record"]["train"]
    assert not any(k.startswith(("optim.", "model.", "ema.")) for k in tensors), "only the sampled weights ship"
    ema = {k[4:]: v for k, v in run_tensors.items() if k.startswith("ema.")}
    raw = {k[6:]: v for k, v in run_tensors.items() if k.startswith("model.")}
    assert any(not torch.equal(ema[k], raw[k]) for k in ema), "EMA and raw weights differ after 3 steps at decay 0.5"
    assert all(torch.equal(tensors[f"net.{k}"], v) for k, v in ema.items())
    x = torch.zeros(2, 1, 28, 28)
    t = torch.tensor([10, 40])
    labels = torch.tensor([3, 10])
    a, b = load_denoiser(run_file), load_denoiser(shipped)
    assert torch.equal(a.net(x, t, labels), b.net(x, t, labels))


def test_convert_refuses_a_file_that_is_not_a_training_run(tmp_path):
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, {"w": torch.zeros(2)}, {"format": "diffusion_lab/2", "kind": "classifier"})
    with pytest.raises(CheckpointError, match="neither a training run"):
        convert_checkpoint.convert(str(other), str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()


def test_measure_grid_rows_are_the_cli_and_an_interrupted_run_resumes(run_file, tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    calls = []
    real_run = measure_grid.sample.run
    monkeypatch.setattr(measure_grid.sample, "run", lambda args: calls.append(args) or real_run(args))
    settings = [("ddpm", 2, 1.0), ("ddim", 2, 2.0)]
    measure_grid.measure(str(run_file), settings[:1], out, n=12)
    measure_grid.measure(str(run_file), settings, out, n=12)       # the first row is kept, only the second runs
    assert [(a.sampler, a.steps, a.guidance) for a in calls] == settings
    record = json.loads(out.read_text())
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in record["rows"]] == settings
    for row in record["rows"]:
        assert {"classifier_fid", "classifier_fid_real", "conditional_accuracy"} <= row.keys() and row["n"] == 12
        assert f"--sampler {row['sampler']} --steps {row['steps']} --guidance {row['guidance']:g}" in row["command"]
    with pytest.raises(SystemExit):
        measure_grid.main(["--checkpoint", str(run_file), "--settings", "ddpm-2-1", "--out", str(out)])
