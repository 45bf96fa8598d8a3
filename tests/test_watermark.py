"""diffusion_lab.watermark: Tree-Ring keys in x_T, their p-values, attacks, and the two command lines end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion_lab import data, sample, watermark
from diffusion_lab.denoiser import load_denoiser

pytestmark = pytest.mark.usefixtures("one_thread")
KEY, OTHER = "3f9a1c2e", "deadbeef01"


@pytest.mark.parametrize("bad", ["", "xyz", "3f9a1c2", "g" * 8, "0" * 65, "3f9a 1c2e", None])
def test_bad_keys_are_refused_with_the_format(bad):
    with pytest.raises(ValueError, match="8 to 64 hexadecimal digits"):
        watermark.parse_key(bad)


def test_keys_are_case_insensitive_and_distinct():
    assert watermark.parse_key(" 3F9A1C2E ") == KEY
    assert torch.equal(watermark.key_pattern("3F9A1C2E"), watermark.key_pattern(KEY))
    assert not torch.equal(watermark.key_pattern(KEY), watermark.key_pattern(OTHER))


def test_embedding_changes_only_the_band_and_keeps_noise_real_and_white():
    x_T = torch.randn(200, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    marked = watermark.embed(x_T, KEY)
    assert marked.dtype == x_T.dtype and marked.shape == x_T.shape
    ring, _ = watermark.ring_band((28, 28))
    before, after = watermark._spectrum(x_T), watermark._spectrum(marked)
    assert torch.allclose(before[..., ring < 0], after[..., ring < 0], atol=1e-4)       # outside: untouched
    assert torch.allclose(after[..., ring >= 0], watermark.key_pattern(KEY)[ring >= 0].expand(200, 1, -1), atol=1e-4)
    assert 0.9 < marked.std().item() < 1.1                                             # still about N(0, 1) per pixel


def test_p_values_are_calibrated_on_noise_and_tiny_on_marked_noise():
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(4000, 1, 28, 28, generator=g)
    p = watermark.p_values(clean, KEY)
    assert ((p < 0.01).float().mean() - 0.01).abs() < 0.006          # a false-positive rate of 1% at alpha = 1%
    assert ((p < 0.5).float().mean() - 0.5).abs() < 0.03
    marked = watermark.embed(clean[:500], KEY)
    assert watermark.p_values(marked, KEY).max() < 1e-10
    wrong = watermark.p_values(marked, OTHER)                         # the wrong key finds nothing
    assert ((wrong < 0.01).float().mean()) < 0.03


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_denoiser("mnist-cond-small", device="cpu")


def test_detection_through_the_model(model):
    labels = torch.arange(12) % 10
    x_T = watermark.watermarked_noise(12, KEY, model.shape, seed=3)
    options = dict(sampler="dpm++2m", steps=10, guidance=2.0)        # the sampling command's choices, fewer steps
    marked = data.from_unit_range(sample.generate(model, labels, x_T=x_T, **options))[:, 0]
    clean = data.from_unit_range(sample.generate(model, labels, seed=4, **options))[:, 0]
    p_marked = watermark.detect(model, marked, KEY)
    assert (p_marked < watermark.ALPHA).float().mean() >= 0.8
    assert (watermark.detect(model, clean, KEY) >= watermark.ALPHA).all()
    assert (watermark.detect(model, marked, OTHER) >= watermark.ALPHA).float().mean() >= 0.9


@pytest.mark.parametrize("name,strength", [("noise", 10.0), ("blur", 1.0), ("shift", 2), ("crop", 2), ("quantise", 4)])
def test_attacks_keep_shape_and_change_the_image(name, strength):
    images = data.mnist(train=False)[0][:8]
    out = watermark.attack(images, name, strength)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert not torch.equal(out, images)
    if name == "quantise":
        assert len(out.unique()) <= 4
    if name == "shift":
        assert torch.equal(out[:, 2:, 2:], images[:, :-2, :-2])


def test_unknown_attack_is_named():
    with pytest.raises(ValueError, match="unknown attack"):
        watermark.attack(torch.zeros(1, 28, 28, dtype=torch.uint8), "rotate", 1)


def test_cli_sample_then_detect_in_input_order(tmp_path, capsys):
    common = ["--checkpoint", "mnist-cond-small", "--n", "6", "--steps", "10", "--device", "cpu", "--quiet"]
    assert sample.main([*common, "--out", str(tmp_path / "w.npz"), "--watermark", KEY, "--seed", "5"]) == 0
    assert sample.main([*common, "--out", str(tmp_path / "c.npz"), "--seed", "6"]) == 0
    with np.load(tmp_path / "w.npz") as f:
        assert json.loads(str(f["meta"]))["watermarked"] is True
        w = f["images"]
    with np.load(tmp_path / "c.npz") as f:
        c = f["images"]
    mixed = np.concatenate([w[:3], c[:3], w[3:]])                    # marked, clean, marked
    np.savez(tmp_path / "mixed.npz", images=mixed)
    capsys.readouterr()
    assert watermark.main(["detect", "--in", str(tmp_path / "mixed.npz"), "--key", KEY,
                           "--out", str(tmp_path / "p.json"), "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "p.json").read_text())
    assert list(written) == ["p_values"] and written["p_values"] == printed["p_values"]
    p = np.array(written["p_values"])
    assert (p[3:6] >= watermark.ALPHA).all()                          # the clean ones, in their places
    assert (p[[0, 1, 2, 6, 7, 8]] < watermark.ALPHA).sum() >= 4


@pytest.mark.parametrize("argv,message", [
    (["--in", "missing.npz", "--key", KEY], "no such file"),
    (["--in", "@wrong", "--key", KEY], "must be uint8 of shape (N, 28, 28)"),
    (["--in", "@good", "--key", "zz-top"], "8 to 64 hexadecimal digits"),
])
def test_cli_errors_are_one_line(tmp_path, argv, message):
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 32, 32), np.uint8))
    np.savez(tmp_path / "good.npz", images=np.zeros((2, 28, 28), np.uint8))
    argv = [a.replace("@wrong", str(tmp_path / "wrong.npz")).replace("@good", str(tmp_path / "good.npz"))
            for a in argv]
    with pytest.raises(SystemExit) as exit_:
        watermark.main(["detect", *argv, "--steps", "1", "--device", "cpu"])
    assert str(exit_.value.code).startswith("error: ") and message in str(exit_.value.code)
