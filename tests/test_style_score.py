"""Tests of diffusion_lab.style_score: the typeset-vs-handwritten classifier of chapter 09.

Trained here on a few faces for a few hundred steps (seconds on one thread); the held-out faces never appear
in training, and the handwriting it is tested on is MNIST's test split.
"""
import numpy as np
import pytest
import torch

from diffusion_lab import data, style_score

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_FACES = ["DejaVu Sans", "DejaVu Serif Bold", "STIXGeneral Italic", "cmr10", "cmtt10"]
TEST_FACES = ["DejaVu Sans Mono", "cmss10"]  # other families than the training faces: a real hold-out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    model, accuracy = style_score.train_style_score(
        steps=300, seed=0, fonts=TRAIN_FACES + TEST_FACES, test_fonts=TEST_FACES, variants=4)
    return model, accuracy


def test_split_fonts_holds_out_whole_faces():
    faces = list(data.typeset_fonts())
    train, test = style_score.split_fonts(faces, seed=3)
    assert set(train).isdisjoint(test) and sorted(train + test) == sorted(faces)
    assert len(test) == round(len(faces) / 3) and style_score.split_fonts(faces, seed=3) == (train, test)
    assert style_score.split_fonts(faces, seed=4) != (train, test)
    with pytest.raises(ValueError, match="at least 2"):
        style_score.split_fonts(["cmr10"])


def test_style_score_separates_typeset_from_handwritten_on_held_out_fonts(trained):
    model, accuracy = trained
    assert 0.8 < accuracy <= 1.0  # balanced, so chance is 0.5
    # recomputed by hand on the held-out faces (rendered with another seed: new jitter) and unseen handwriting
    typeset = data.typeset_digits(fonts=TEST_FACES, variants=4, seed=1, cache=False)[0]
    handwritten = data.mnist(train=False)[0][-len(typeset):]
    p_typeset, p_hand = style_score.style_score(typeset, model), style_score.style_score(handwritten, model)
    assert p_typeset.shape == (len(typeset),) and p_typeset.dtype == torch.float32
    assert ((p_typeset >= 0) & (p_typeset <= 1)).all()
    assert (p_typeset > 0.5).double().mean() > 0.8 and (p_hand <= 0.5).double().mean() > 0.8
    assert p_typeset.mean() - p_hand.mean() > 0.5


def test_style_score_accepts_uint8_and_unit_range_and_keeps_the_mode(trained):
    model, _ = trained
    images = data.mnist(train=False)[0][:7]
    model.train()
    scores = style_score.style_score(images, model)
    assert model.training  # the caller's mode is restored
    model.eval()
    assert torch.allclose(scores, style_score.style_score(data.to_unit_range(images), model))
    assert style_score.style_score(images[:0], model).shape == (0,)
    with pytest.raises(ValueError, match="values in"):
        style_score.style_score(data.to_unit_range(images) * 3, model)


def test_training_is_deterministic_and_seeded():
    kwargs = dict(steps=20, fonts=["cmr10", "cmtt10"], test_fonts=["cmtt10"], variants=2)
    (a, acc_a), (b, acc_b) = style_score.train_style_score(seed=0, **kwargs), style_score.train_style_score(seed=0, **kwargs)
    assert acc_a == acc_b and all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c, _ = style_score.train_style_score(seed=1, **kwargs)
    assert not torch.equal(a.head.weight, c.head.weight)
    before = torch.random.get_rng_state()
    style_score.train_style_score(seed=0, **kwargs)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's random stream is left alone


def test_train_style_score_refuses_a_leaky_or_empty_hold_out():
    with pytest.raises(ValueError, match="proper subset"):
        style_score.train_style_score(steps=1, fonts=["cmr10", "cmtt10"], test_fonts=["cmr10", "cmtt10"], variants=1)
    with pytest.raises(ValueError, match="proper subset"):
        style_score.train_style_score(steps=1, fonts=["cmr10", "cmtt10"], test_fonts=["DejaVu Sans"], variants=1)
    with pytest.raises(ValueError, match="proper subset"):
        style_score.train_style_score(steps=1, fonts=["cmr10", "cmtt10"], test_fonts=[], variants=1)
