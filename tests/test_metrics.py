"""Tests of diffusion_lab.metrics: the shipped classifier, FID on its features, conditional accuracy."""
import numpy as np
import pytest
import torch

from diffusion_lab import checkpoint, data, metrics
from diffusion_lab.utils import file_sha256


@pytest.fixture(scope="module")
def mnist_test():
    return data.mnist(train=False)


@pytest.fixture(scope="module")
def classifier():
    return metrics.load_classifier("cpu")


@pytest.fixture(scope="module")
def test_features(mnist_test, classifier):
    return metrics.classifier_features(mnist_test[0][:3000], classifier)  # 3000 is plenty for 128-d statistics


def test_shipped_classifier_is_pinned_and_small():
    path = checkpoint.checkpoint_dir() / "mnist-classifier.safetensors"
    assert metrics.CLASSIFIER_NAME in checkpoint.SHIPPED
    assert file_sha256(path) == checkpoint.SHIPPED[metrics.CLASSIFIER_NAME].sha256
    assert path.stat().st_size < 2_000_000


def test_shipped_classifier_accuracy_on_full_test_set(mnist_test, classifier):
    images, labels = mnist_test
    assert len(labels) == 10_000
    accuracy = metrics.conditional_accuracy(images, labels, classifier)
    assert accuracy >= 0.993, f"classifier test accuracy {accuracy:.4f} is below 99.3%"


def test_classifier_is_in_eval_mode_and_deterministic(classifier, mnist_test):
    assert not classifier.training
    x = data.to_unit_range(mnist_test[0][:64])
    assert torch.equal(classifier(x), classifier(x))
    assert metrics.classifier_features(x, classifier).shape == (64, 128)


def test_metrics_leave_a_training_model_in_training_mode(mnist_test):
    model = metrics.MNISTClassifier().train()
    metrics.classifier_features(mnist_test[0][:8], model)
    assert model.training


def test_fid_is_zero_for_identical_sets_and_symmetric(test_features):
    mu, sigma = metrics.feature_statistics(test_features)
    scale = np.trace(sigma)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) < 1e-3 * scale
    shuffled = test_features[torch.randperm(len(test_features), generator=torch.Generator().manual_seed(0))]
    mu_s, sigma_s = metrics.feature_statistics(shuffled)
    assert metrics.frechet_distance(mu, sigma, mu_s, sigma_s) < 1e-3 * scale
    half_a, half_b = test_features[::2], test_features[1::2]
    stats_a, stats_b = metrics.feature_statistics(half_a), metrics.feature_statistics(half_b)
    d_ab = metrics.frechet_distance(*stats_a, *stats_b)
    assert d_ab == pytest.approx(metrics.frechet_distance(*stats_b, *stats_a), rel=1e-6)


def test_frechet_distance_matches_closed_form_for_commuting_gaussians():
    # diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))  # FID is rotation invariant
    got = metrics.frechet_distance(
        rotation @ mu1, rotation @ np.diag(s1) @ rotation.T, rotation @ mu2, rotation @ np.diag(s2) @ rotation.T
    )
    assert got == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="shapes"):
        metrics.frechet_distance(mu1, np.diag(s1), mu2[:2], np.diag(s2)[:2, :2])


def test_classifier_fid_separates_noise_from_digits(mnist_test, classifier):
    images = mnist_test[0]
    real_a, real_b = images[:1000], images[1000:2000]
    noise = torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    d_real = metrics.classifier_fid(real_a, real_b, classifier)
    d_noise = metrics.classifier_fid(real_a, noise, classifier)
    assert d_noise > 10 * d_real
    assert metrics.classifier_fid(real_a, data.to_unit_range(real_a), classifier) < 1e-6 * (1 + d_real)  # uint8 == float


def test_conditional_accuracy_and_histogram(mnist_test, classifier):
    images, labels = mnist_test[0][:2000], mnist_test[1][:2000]
    assert metrics.conditional_accuracy(images, labels, classifier) >= 0.99
    assert metrics.conditional_accuracy(images, (labels + 1) % 10, classifier) < 0.05  # the wrong digit each time
    histogram = metrics.class_histogram(images, classifier)
    assert histogram.sum() == 2000
    assert (histogram - torch.bincount(labels, minlength=10)).abs().max() <= 10
    ones = images[labels == 1]
    assert metrics.class_histogram(ones, classifier)[1] >= 0.98 * len(ones)  # a collapsed "model" shows one bin


def test_bad_inputs_raise_value_error(classifier):
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        metrics.classifier_features(torch.zeros(4, 3, 28, 28), classifier)
    with pytest.raises(ValueError, match=r"values in \[255, 255\].*to_unit_range"):
        metrics.classifier_features(torch.full((4, 1, 28, 28), 255.0), classifier)
    with pytest.raises(ValueError, match="shape"):
        metrics.predict(torch.zeros(4, 28, dtype=torch.uint8), classifier)
    with pytest.raises(ValueError, match="one label per image"):
        metrics.conditional_accuracy(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), classifier)
    with pytest.raises(ValueError, match="digits 0..9"):
        metrics.conditional_accuracy(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.tensor([0, 10]), classifier)
    with pytest.raises(ValueError, match="integer"):
        metrics.conditional_accuracy(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.tensor([0.0, 1.0]), classifier)
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.classifier_fid(torch.zeros(1, 28, 28, dtype=torch.uint8), torch.zeros(5, 28, 28, dtype=torch.uint8), classifier)


def test_tampered_classifier_is_refused(tmp_path, monkeypatch):
    original = (checkpoint.checkpoint_dir() / "mnist-classifier.safetensors").read_bytes()
    corrupted = bytearray(original)
    corrupted[-1] ^= 0xFF
    (tmp_path / "mnist-classifier.safetensors").write_bytes(bytes(corrupted))
    monkeypatch.setenv(checkpoint.CHECKPOINT_ENV, str(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256"):
        metrics.load_classifier("cpu")


def test_augment_keeps_range_and_identity(mnist_test):
    x = data.to_unit_range(mnist_test[0][:16])
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(metrics.augment(x, g, degrees=0, shift=0, scale=0), x, atol=1e-5)
    moved = metrics.augment(x, g)
    assert moved.min() >= -1 - 1e-5 and moved.max() <= 1 + 1e-5
    assert (moved - x).abs().mean() > 0.01


def test_train_classifier_smoke(monkeypatch):
    # two tiny "epochs" on 256 digits: the loop runs end to end and returns an eval-mode model
    images, labels = data.mnist(train=False)
    monkeypatch.setattr(metrics.data, "mnist", lambda train=True, root=None: (images[:256], labels[:256]))
    model, accuracy = metrics.train_classifier(epochs=2, seed=0, device="cpu", batch_size=64)
    assert not model.training and 0.0 <= accuracy <= 1.0
