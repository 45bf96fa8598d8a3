"""Chapter 10's tiny Stable Diffusion: captions, tokenizer, text encoder, autoencoder, the prompt pipeline and its
command line, on tiny untrained models (the shipped models' quality is in tests/test_shipped_quality.py)."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from diffusion_lab import autoencoder, sample, text, tiny_sd
from diffusion_lab.checkpoint import CheckpointError
from diffusion_lab.utils import file_sha256

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny autoencoder and a tiny untrained text-to-image model saved as files, the way the shipped ones are."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    vae = autoencoder.Autoencoder(2, widths=(8, 8))
    autoencoder.save_autoencoder(folder / "vae.safetensors", vae, 1.5)
    denoiser = tiny_sd.build(2, T=20)
    tiny_sd.save_tiny_sd(folder / "sd.safetensors", denoiser, str(folder / "vae.safetensors"))
    return folder


def test_tokenize_pads_and_the_empty_prompt_is_all_padding():
    ids = text.tokenize(["a thick slanted seven", "", "7"])
    assert ids.shape == (3, text.MAX_WORDS) and ids.dtype == torch.long
    assert (ids[0, :4] > 0).all() and (ids[0, 4:] == 0).all()
    assert (ids[1] == 0).all()
    assert text.tokenize("A THICK, slanted Seven!").equal(ids[:1])  # case and punctuation do not matter


def test_an_unknown_word_is_named_with_close_words():
    with pytest.raises(text.VocabularyError, match=r"unknown word 'sevn'.*close words: seven"):
        text.tokenize(["a thick sevn"])
    with pytest.raises(text.VocabularyError, match="the words are"):   # nothing close: the whole vocabulary
        text.tokenize(["zzzzqqq"])
    with pytest.raises(text.VocabularyError, match="at most 8"):
        text.tokenize(["a " * 9 + "seven"])


def test_captions_name_only_outer_thirds_never_the_held_out_pairs_and_always_tokenize():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(3000):
        digit = int(torch.randint(0, 10, (1,), generator=g))
        bins = dict(zip(text.ATTRIBUTES, torch.randint(-1, 2, (2,), generator=g).tolist()))
        c = text.caption(digit, bins, torch.rand(8, generator=g).tolist())
        text.tokenize(c)
        assert text.named_digit(c) == digit, c
        for name, b in text.named_attributes(c).items():
            assert b == bins[name] != 0, (c, bins)
            assert (digit, name, b) not in text.HELD_OUT, c
            seen.add((digit, name, b))
        assert not c.startswith("a e") and not c.startswith("a 8") and not c.startswith("an t"), c  # a/an
    # every other (digit, attribute, end) combination does occur
    assert len(seen) == 10 * 2 * 2 - len(text.HELD_OUT)


def test_attribute_bins_are_thirds_within_each_digit():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3000) % 3
    attributes = torch.randn(3000, 2, generator=g) + labels[:, None] * 10  # digits differ a lot: bins must not
    bins = text.attribute_bins(attributes, labels)
    for d in range(3):
        for j in range(2):
            counts = torch.bincount(bins[labels == d, j] + 1, minlength=3)
            assert (counts - 333).abs().max() <= 2, counts


def test_text_encoder_zeroes_padding_and_the_empty_prompt():
    torch.manual_seed(0)
    encoder = text.TextEncoder(width=16, layers=1)
    ids = text.tokenize(["a thick seven", ""])
    out = encoder(ids)
    assert torch.isfinite(out).all()
    assert (out[0, :3].abs().sum(-1) > 0).all() and (out[0, 3:] == 0).all()
    assert (out[1] == 0).all()  # the null prompt -> the UNet's null context


def test_the_empty_prompt_is_the_unets_null_condition():
    torch.manual_seed(0)
    denoiser = tiny_sd.build(2, T=20)
    for p in denoiser.net.parameters():  # the zero-initialised output layers would hide a difference
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 2, 7, 7), torch.tensor([3, 7])
    null = denoiser(x, t, context=text.tokenize(["", ""]))
    assert torch.allclose(null, denoiser(x, t), atol=1e-6)
    assert not torch.allclose(null, denoiser(x, t, context=text.tokenize(["seven", "seven"])), atol=1e-3)


def test_negative_prompt_replaces_the_null_branch():
    torch.manual_seed(0)
    net = tiny_sd.build(2, T=20).net
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    wrapped = tiny_sd.NegativePrompt(net, text.tokenize("thin")[0])
    x, t = torch.randn(2, 2, 7, 7), torch.tensor([3, 3])
    ids = text.tokenize(["seven", ""])
    out = wrapped(x, t, context=ids)
    assert torch.allclose(out[0], net(x, t, context=ids)[0])
    assert torch.allclose(out[1], net(x, t, context=text.tokenize(["seven", "thin"]))[1])


def test_autoencoder_shapes_scale_and_exact_resume(tmp_path):
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    a = autoencoder.Autoencoder(2, widths=(8, 8))
    mean, logvar = a.encode(torch.zeros(3, 1, 28, 28))
    assert mean.shape == logvar.shape == (3, 2, 7, 7) and a.decode(mean).shape == (3, 1, 28, 28)
    z = torch.randn(1000, 2, 7, 7) * 3
    assert abs((z * autoencoder.scale_factor(z)).std().item() - 1) < 1e-5
    quiet = lambda _: None  # noqa: E731
    torch.manual_seed(0)
    whole = autoencoder.Autoencoder(2, widths=(8, 8))
    autoencoder.train_autoencoder(whole, images, steps=4, batch_size=8, log=quiet)
    torch.manual_seed(0)
    split = autoencoder.Autoencoder(2, widths=(8, 8))
    run = tmp_path / "run.safetensors"
    autoencoder.train_autoencoder(split, images, steps=4, batch_size=8, checkpoint=run, stop_at=2, log=quiet)
    torch.manual_seed(0)
    resumed = autoencoder.Autoencoder(2, widths=(8, 8))
    autoencoder.train_autoencoder(resumed, images, steps=4, batch_size=8, checkpoint=run, log=quiet)
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(CheckpointError, match="another autoencoder run"):
        autoencoder.train_autoencoder(autoencoder.Autoencoder(4, widths=(8, 8)), images, steps=4, checkpoint=run,
                                      log=quiet)


def test_pipeline_draws_digits_and_refuses_a_changed_autoencoder(pipeline, tmp_path):
    pipe = tiny_sd.load_tiny_sd(pipeline / "sd.safetensors")
    images = tiny_sd.draw(pipe, ["a seven", "thick 2"], steps=2)
    assert images.shape == (2, 1, 28, 28) and images.abs().max() <= 1
    images_neg = tiny_sd.draw(pipe, ["a seven", "thick 2"], "thin", steps=2)
    assert images_neg.shape == images.shape
    with pytest.raises(ValueError, match="negative prompt needs a non-empty prompt"):
        tiny_sd.draw(pipe, [""], "thin", steps=2)
    words, maps = tiny_sd.attention_maps(pipe, "a thick seven")
    assert words == ["a", "thick", "seven"] and maps.shape == (3, 7, 7)
    assert torch.allclose(maps.sum(0), torch.ones(7, 7), atol=1e-5) or (maps.sum(0) <= 1 + 1e-5).all()
    # the pipeline pins its autoencoder's bytes
    vae = pipeline / "vae.safetensors"
    blob = vae.read_bytes()
    try:
        autoencoder.save_autoencoder(vae, autoencoder.Autoencoder(2, widths=(8, 8)), 2.0)
        with pytest.raises(CheckpointError, match="has changed"):
            tiny_sd.load_tiny_sd(pipeline / "sd.safetensors")
    finally:
        vae.write_bytes(blob)
    assert file_sha256(vae) == tiny_sd.load_tiny_sd(pipeline / "sd.safetensors").meta["autoencoder"]["sha256"]


def _cli(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            return sample.main(argv), out.getvalue()
        except SystemExit as exit_:
            return exit_.code, out.getvalue()


def test_cli_prompt_and_prompts_file(pipeline, tmp_path):
    sd = str(pipeline / "sd.safetensors")
    status, _ = _cli(["--checkpoint", sd, "--prompt", "a thick slanted seven", "--n", "3", "--steps", "2",
                      "--out", str(tmp_path / "s.npz"), "--quiet"])
    assert status == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["images"].shape == (3, 28, 28) and f["images"].dtype == np.uint8
        assert list(f["prompts"]) == ["a thick slanted seven"] * 3 and list(f["labels"]) == [7] * 3
    (tmp_path / "p.txt").write_text("a seven\n\nthin upright 2\nthe digit\n")
    status, _ = _cli(["--checkpoint", sd, "--prompts", str(tmp_path / "p.txt"), "--n", "4", "--steps", "1",
                      "--out", str(tmp_path / "p.npz"), "--negative-prompt", "thick", "--quiet"])
    assert status == 0
    with np.load(tmp_path / "p.npz") as f:
        assert list(f["prompts"]) == ["a seven", "thin upright 2", "the digit", "a seven"]
        assert list(f["labels"]) == [7, 2, -1, 7]


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "a sevn"], "unknown word 'sevn' in prompt 'a sevn'; close words: seven"),
    ([], "pass exactly one of --prompt TEXT or --prompts FILE"),
    (["--prompt", "7", "--prompts", "x.txt"], "pass exactly one of"),
    (["--prompts", "no-such-file.txt"], "does not exist"),
    (["--prompt", "7", "--slant", "0.3"], "takes its style from the prompt"),
    (["--prompt", "7", "--negative-prompt", "thik"], "unknown word 'thik'"),
])
def test_cli_errors_are_one_line(pipeline, tmp_path, argv, message):
    status, _ = _cli(["--checkpoint", str(pipeline / "sd.safetensors"), "--n", "2", "--steps", "1",
                      "--out", str(tmp_path / "s.npz"), *argv])
    assert isinstance(status, str) and status.startswith("error: ") and "\n" not in status
    assert message in status
    assert not (tmp_path / "s.npz").exists()


def test_a_prompt_for_a_model_without_text_is_refused(tmp_path):
    status, _ = _cli(["--checkpoint", "mnist-cond", "--prompt", "a seven", "--n", "1", "--steps", "1",
                      "--out", str(tmp_path / "s.npz")])
    assert isinstance(status, str) and "takes no prompts" in status
