"""The sampling command line `python -m diffusion_lab.sample` and its helpers (chapter 06).

Every test uses a tiny checkpoint written to a temporary folder, so none needs the shipped model.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_lab import checkpoint, sample
from diffusion_lab.denoiser import load_denoiser, save_denoiser
from diffusion_lab.training import TrainConfig, build_denoiser
from diffusion_lab.utils import file_sha256, tile


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.py


def write_checkpoint(path: Path, **overrides) -> Path:
    """A tiny randomly initialised model saved as a shipped checkpoint is saved."""
    style = dict(style_mean=(0.1, 2.0), style_std=(0.2, 0.5)) if overrides.get("style") else {}  # slant, thickness
    config = TrainConfig(channels=(8, 16, 16), attention=False, T=100, steps=1, **overrides, **style)
    torch.manual_seed(0)
    denoiser = build_denoiser(config)
    with torch.no_grad():  # the default init zeroes the output layer; make the output depend on the input
        for p in denoiser.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_denoiser(path, denoiser)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", conditional=True, style=True)


def run_cli(*args) -> dict:
    """Run main() in-process and return its printed JSON summary."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert sample.main([*map(str, args), "--quiet"]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def load(path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_cli_writes_images_labels_and_grid(ckpt, tmp_path):
    out, grid = tmp_path / "s.npz", tmp_path / "s.png"
    summary = run_cli("--checkpoint", ckpt, "--n", 23, "--labels", "cycle", "--steps", 4, "--sampler", "dpm++2m",
                      "--guidance", 2, "--seed", 0, "--out", out, "--grid", grid, "--batch-size", 10)
    f = load(out)
    assert f["images"].shape == (23, 28, 28) and f["images"].dtype == np.uint8
    assert f["labels"].dtype == np.int64 and f["labels"].tolist() == [i % 10 for i in range(23)]
    assert f["images"].std() > 0  # not a constant picture
    meta = json.loads(str(f["meta"]))
    assert meta["sampler"] == "dpm++2m" and meta["steps"] == 4 and meta["sha256"] == file_sha256(ckpt)
    assert meta["sha256_verified"] is False  # a path, not a shipped name
    assert summary["n"] == 23 and summary["ms_per_image"] > 0
    from PIL import Image

    with Image.open(grid) as img:  # 23 images, 10 per row -> 3 rows of 28 px + 2 px padding
        assert img.size == (10 * 30 + 2, 3 * 30 + 2)


@pytest.mark.parametrize("sampler", ["dpm++2m", "ddim", "ddpm"])
def test_same_seed_same_images_and_another_seed_differs(ckpt, tmp_path, sampler):
    common = ["--checkpoint", ckpt, "--n", 6, "--steps", 3, "--sampler", sampler, "--labels", "random"]
    run_cli(*common, "--seed", 1, "--out", tmp_path / "a.npz")
    run_cli(*common, "--seed", 1, "--out", tmp_path / "b.npz")
    run_cli(*common, "--seed", 2, "--out", tmp_path / "c.npz")
    a, b, c = load(tmp_path / "a.npz"), load(tmp_path / "b.npz"), load(tmp_path / "c.npz")
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert not np.array_equal(a["images"], c["images"])
    assert a["labels"].min() >= 0 and a["labels"].max() <= 9


def test_deterministic_samplers_do_not_depend_on_the_batch_size(ckpt, tmp_path):
    common = ["--checkpoint", ckpt, "--n", 7, "--steps", 3, "--seed", 4]
    run_cli(*common, "--batch-size", 7, "--out", tmp_path / "a.npz")
    run_cli(*common, "--batch-size", 3, "--out", tmp_path / "b.npz")
    a, b = load(tmp_path / "a.npz")["images"], load(tmp_path / "b.npz")["images"]
    # same x_T per sample; batched convolutions may differ in the last float bit -> at most 1 grey level
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_clip_x0_keeps_the_prediction_in_range(ckpt, tmp_path):
    common = ["--checkpoint", ckpt, "--n", 4, "--steps", 3, "--sampler", "ddim"]
    run_cli(*common, "--out", tmp_path / "a.npz")
    run_cli(*common, "--clip-x0", 0.5, "--out", tmp_path / "b.npz")
    a, b = load(tmp_path / "a.npz"), load(tmp_path / "b.npz")
    assert json.loads(str(b["meta"]))["clip_x0"] == 0.5
    # the last step returns x0_hat itself, so with clip 0.5 no pixel can exceed (0.5 + 1) * 127.5
    assert b["images"].max() <= round(1.5 * 127.5) and not np.array_equal(a["images"], b["images"])


def test_style_request_changes_the_images(ckpt, tmp_path):
    common = ["--checkpoint", ckpt, "--n", 4, "--steps", 3, "--labels", "3"]
    run_cli(*common, "--out", tmp_path / "a.npz")
    run_cli(*common, "--slant", 0.4, "--thickness", 3.0, "--out", tmp_path / "b.npz")
    a, b = load(tmp_path / "a.npz"), load(tmp_path / "b.npz")
    assert (a["labels"] == 3).all()
    assert not np.array_equal(a["images"], b["images"])
    assert json.loads(str(b["meta"]))["slant"] == 0.4


def test_parse_labels():
    assert sample.parse_labels("cycle", 12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert sample.parse_labels("7", 3).tolist() == [7, 7, 7]
    assert sample.parse_labels("3, 5,8", 5).tolist() == [3, 5, 8, 3, 5]
    r = sample.parse_labels("random", 500, seed=0)
    assert r.dtype == torch.long and torch.equal(r, sample.parse_labels("random", 500, seed=0))
    assert set(r.tolist()) == set(range(10))
    for bad in ("10", "a", "", "3,,4", "-1", "1.5"):
        with pytest.raises(ValueError, match="--labels"):
            sample.parse_labels(bad, 4)
    with pytest.raises(ValueError):
        sample.parse_labels("cycle", 0)


def test_style_request_validation():
    denoiser = build_denoiser(TrainConfig(channels=(8, 16, 16), style=True, style_mean=(0.1, 2.0), style_std=(0.2, 0.5)))
    assert sample.style_request(denoiser, None, None) is None
    code = sample.style_request(denoiser, slant=0.3, n=2)  # thickness left out -> the mean (z = 0)
    assert code.shape == (2, 3) and torch.allclose(code[0], torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="far outside"):
        sample.style_request(denoiser, slant=5.0)
    with pytest.raises(ValueError, match="without style"):
        sample.style_request(build_denoiser(TrainConfig(channels=(8, 16, 16), style=False)), slant=0.1)


def test_tile_layout():
    images = np.stack([np.full((28, 28), i, dtype=np.uint8) for i in range(12)])
    grid = tile(images, ncol=5, fill=128)
    assert grid.shape == (3 * 30 + 2, 5 * 30 + 2) and grid.dtype == np.uint8
    assert grid[2 + 30 + 5, 2 + 2 * 30 + 5] == 7  # row 1, column 2 -> image 7


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "no-such-model"], "no checkpoint 'no-such-model'"),
    (["--checkpoint", "/nonexistent/x.safetensors"], "does not exist"),
    (["--n", "0"], "--n must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "101"], "more than the model's T=100"),
    (["--labels", "11"], "--labels must be"),
    (["--guidance", "-1"], "--guidance"),
    (["--eta", "0.5"], "--eta applies to --sampler ddim only"),
    (["--clip-x0", "0"], "--clip-x0 must be a positive number"),
    (["--grid", "x.jpg"], "--grid must name a .png"),
    (["--slant", "9"], "far outside the training data"),
    (["--labels", "none"], "unconditional checkpoints"),
    (["--out", "/nonexistent/dir/s.npz"], "folder of --out does not exist"),
])
def test_bad_arguments_exit_with_a_clear_error(ckpt, tmp_path, args, message):
    argv = ["--checkpoint", str(ckpt), "--n", "3", "--steps", "2", "--out", str(tmp_path / "s.npz"), "--quiet"]
    with pytest.raises(SystemExit) as info:
        sample.main(argv + args)  # later flags override earlier ones
    text = str(info.value.code)
    assert text.startswith("error: ") and message in text, text


def test_corrupt_file_is_an_error_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="error: .*not a valid safetensors"):
        sample.main(["--checkpoint", str(bad), "--out", str(tmp_path / "s.npz"), "--quiet"])


def test_shipped_names_are_hash_verified(ckpt, tmp_path, monkeypatch):
    folder = tmp_path / "shipped"
    folder.mkdir()
    (folder / "tiny-cond.safetensors").write_bytes(ckpt.read_bytes())
    monkeypatch.setenv(checkpoint.CHECKPOINT_ENV, str(folder))
    monkeypatch.setitem(checkpoint.SHIPPED, "tiny-cond", checkpoint.Shipped(file_sha256(ckpt), "diffusion"))
    args = ["--checkpoint", "tiny-cond", "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.npz")]
    run_cli(*args)
    assert json.loads(str(load(tmp_path / "s.npz")["meta"]))["sha256_verified"] is True
    # one flipped byte near the end (inside the weights) and the name is refused before use
    data = bytearray(ckpt.read_bytes())
    data[-10] ^= 0xFF
    (folder / "tiny-cond.safetensors").write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="error: .*failed its SHA-256 check"):
        sample.main(args + ["--quiet"])


def test_unconditional_checkpoint_with_labels_none(tmp_path):
    path = write_checkpoint(tmp_path / "uncond.safetensors", conditional=False, style=False)
    run_cli("--checkpoint", path, "--n", 3, "--steps", 2, "--labels", "none", "--guidance", 3,
            "--out", tmp_path / "s.npz")
    f = load(tmp_path / "s.npz")
    assert f["images"].shape == (3, 28, 28) and (f["labels"] == -1).all()
    with pytest.raises(SystemExit, match="error: this checkpoint is unconditional"):
        sample.main(["--checkpoint", str(path), "--out", str(tmp_path / "t.npz"), "--quiet"])


def test_generate_checks_its_inputs(ckpt):
    denoiser = load_denoiser(ckpt, device="cpu")
    labels = torch.zeros(2, dtype=torch.long)
    for kwargs, message in [(dict(sampler="euler"), "unknown sampler"), (dict(style=torch.zeros(3, 3)), "common length"),
                            (dict(batch_size=0), "batch size"), (dict(eta=0.5), "eta is DDIM's"),
                            (dict(x_T=torch.zeros(2, 1, 8, 8)), "x_T must have shape"),
                            (dict(known=torch.zeros(1, 28, 28)), "go together"),
                            (dict(known=torch.zeros(1, 28, 28), mask=torch.full((1, 28, 28), 0.5)), "only 0"),
                            (dict(known=torch.zeros(1, 20, 28), mask=torch.ones(1, 20, 28)), "broadcast"),
                            (dict(known=torch.zeros(1, 28, 28), mask=torch.ones(1, 28, 28), resample=3), "ddpm")]:
        with pytest.raises(ValueError, match=message):
            sample.generate(denoiser, labels, steps=2, **kwargs)
    seen = []
    x = sample.generate(denoiser, torch.arange(3), steps=2, batch_size=2,
                        callback=lambda i, x_t, x0_hat: seen.append((i, tuple(x_t.shape))))
    assert x.shape == (3, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert seen == [(0, (2, 1, 28, 28)), (1, (2, 1, 28, 28))]  # first batch only


def test_evaluate_reports_accuracy_and_fid(monkeypatch):
    """The plumbing of --evaluate, with a random classifier standing in for the shipped one."""
    from diffusion_lab import data, metrics

    monkeypatch.setattr(metrics, "_cached", {})
    torch.manual_seed(0)
    monkeypatch.setattr(metrics, "load_classifier", lambda device=None, name_or_path=None: metrics.MNISTClassifier().eval())
    images, labels = data.mnist(train=False)
    result = sample.evaluate(images[:200], labels[:200])
    assert set(result) == {"classifier_fid", "classifier_fid_real", "conditional_accuracy", "n_real"}
    assert 0 <= result["conditional_accuracy"] <= 1 and result["classifier_fid"] >= 0 and result["n_real"] == 200


def test_module_entry_point_runs(ckpt, tmp_path):
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "diffusion_lab.sample", "--checkpoint", str(ckpt), "--n", "2",
                           "--steps", "2", "--out", str(tmp_path / "s.npz"), "--quiet"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["n"] == 2
    proc = subprocess.run([sys.executable, "-m", "diffusion_lab.sample", "--checkpoint", "nope", "--out",
                           str(tmp_path / "t.npz")], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "error: no checkpoint 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_classifier_cannot_be_sampled(tmp_path):
    with pytest.raises(SystemExit, match="error: mnist-classifier is a shipped classifier, not a generative model"):
        sample.main(["--checkpoint", "mnist-classifier", "--out", str(tmp_path / "s.npz"), "--quiet"])
    assert not (tmp_path / "s.npz").exists()
