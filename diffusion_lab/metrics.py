"""Metrics for generated digits: the repo's own MNIST classifier, FID on its features, conditional accuracy.

Introduced in chapter 01. FID with Inception features means little on 28x28 digits, so we measure with a
small CNN trained here (`train_classifier`, shipped as checkpoints/mnist-classifier.safetensors):

- `classifier_fid`: the Frechet distance between Gaussians fitted to classifier features of two image sets;
- `conditional_accuracy`: how often the classifier reads the digit a conditional model was asked for;
- `class_histogram`: which digits a model draws at all (a GAN that mode-collapses shows gaps).

CLI:
    python -m diffusion_lab.metrics train-classifier --out checkpoints/mnist-classifier.safetensors --epochs 4 --seed 0
    python -m diffusion_lab.metrics evaluate [--checkpoint PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusion_lab import checkpoint, data
from diffusion_lab.utils import NUM_CLASSES, USER_ERRORS, get_device, seed_everything

CLASSIFIER_NAME = "mnist-classifier"


# ----------------------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------------------


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    # no conv bias: BatchNorm's shift does that job
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class MNISTClassifier(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-fc128-fc10, with BatchNorm and dropout (chapter 01).

    Input: x float (N, 1, 28, 28) in [-1, 1]. `features(x)` is the 128-d penultimate layer that FID uses;
    `forward(x)` gives the 10 class logits.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), hidden: int = 128, dropout: float = 0.3):
        super().__init__()
        c1, c2 = channels
        self.config = {"channels": [c1, c2], "hidden": hidden, "dropout": dropout}
        self.body = nn.Sequential(
            *_conv_bn_relu(1, c1), *_conv_bn_relu(c1, c1), nn.MaxPool2d(2),  # (N, c1, 14, 14)
            *_conv_bn_relu(c1, c2), *_conv_bn_relu(c2, c2), nn.MaxPool2d(2),  # (N, c2, 7, 7)
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(c2 * 7 * 7, hidden), nn.ReLU(inplace=True),  # (N, hidden)
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, NUM_CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_classifier(device: torch.device | str | None = None, name_or_path: str = CLASSIFIER_NAME) -> MNISTClassifier:
    """The shipped classifier (SHA-256 verified by `checkpoint.load_checkpoint`), in eval mode (chapter 01)."""
    tensors, config = checkpoint.load_checkpoint(name_or_path)
    if config.get("model") != "MNISTClassifier":
        raise checkpoint.CheckpointError(f"{name_or_path} is not an MNIST classifier checkpoint "
                                         f"(its config names model {config.get('model')!r})")
    model = MNISTClassifier(tuple(config["channels"]), config["hidden"], config["dropout"])
    model.load_state_dict(tensors)
    return model.to(get_device(device)).eval()


_cached: dict[str, MNISTClassifier] = {}


def _default_classifier() -> MNISTClassifier:
    # loaded once per process: notebooks call the metrics many times
    device = str(get_device())
    if device not in _cached:
        _cached[device] = load_classifier(device)
    return _cached[device]


@contextlib.contextmanager
def _evaluating(model: nn.Module):
    # metrics need eval mode (BatchNorm running statistics, no dropout) but must not change the caller's model
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def classifier_features(
    images: torch.Tensor, classifier: MNISTClassifier | None = None, batch_size: int = 500
) -> torch.Tensor:
    """The classifier's penultimate features, float32 (N, 128) on the CPU (chapter 01).

    `images`: uint8 (N, 28, 28) / (N, 1, 28, 28), or float (N, 1, 28, 28) in [-1, 1].
    """
    x = data.as_image_batch(images)
    model = classifier if classifier is not None else _default_classifier()
    device = _device_of(model)
    with _evaluating(model):
        chunks = [model.features(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, model.config["hidden"])


def classifier_logits(
    images: torch.Tensor, classifier: MNISTClassifier | None = None, batch_size: int = 500
) -> torch.Tensor:
    """Class logits, float32 (N, 10) on the CPU; same inputs as `classifier_features` (chapter 01)."""
    x = data.as_image_batch(images)
    model = classifier if classifier is not None else _default_classifier()
    device = _device_of(model)
    with _evaluating(model):
        chunks = [model(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, NUM_CLASSES)


def predict(images: torch.Tensor, classifier: MNISTClassifier | None = None, batch_size: int = 500) -> torch.Tensor:
    """The digit the classifier reads in each image, int64 (N,) (chapter 01)."""
    return classifier_logits(images, classifier, batch_size).argmax(dim=1)


def _check_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"expected integer class labels, a tensor of shape ({n},), got {getattr(labels, 'dtype', type(labels))}")
    if labels.shape != (n,):
        raise ValueError(f"expected one label per image, shape ({n},), got {tuple(labels.shape)}")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be digits 0..9, got values in [{labels.min().item()}, {labels.max().item()}]")
    return labels.long().cpu()


def conditional_accuracy(
    images: torch.Tensor, labels: torch.Tensor, classifier: MNISTClassifier | None = None, batch_size: int = 500
) -> float:
    """Fraction of images the classifier reads as the digit in `labels` (chapter 01).

    For real digits this is the classifier's accuracy; for samples of a class-conditional model it says
    how often the model drew the digit it was asked for.
    """
    x = data.as_image_batch(images)
    labels = _check_labels(labels, len(x))
    if len(x) == 0:
        raise ValueError("conditional_accuracy: no images")
    return (predict(x, classifier, batch_size) == labels).double().mean().item()


def class_histogram(images: torch.Tensor, classifier: MNISTClassifier | None = None, batch_size: int = 500) -> torch.Tensor:
    """How many images the classifier assigns to each digit, int64 (10,) (chapter 01).

    A mode-collapsed GAN puts almost everything in a few bins; a good model is close to uniform.
    """
    return torch.bincount(predict(images, classifier, batch_size), minlength=NUM_CLASSES)


# ----------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean mu (D,) and covariance sigma (D, D) of features (N, D), in float64 (chapter 01)."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"feature_statistics needs features (N, D) with N >= 2, got shape {tuple(features.shape)}")
    f = features.detach().cpu().double().numpy()
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (len(f) - 1)
    return mu, sigma


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    # square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues are round-off
    eigenvalues, vectors = np.linalg.eigh((a + a.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2) (chapter 01):

        d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1^1/2 sigma2 sigma1^1/2)^1/2)

    (the trace of (sigma1 sigma2)^1/2 equals that of the symmetric form used here, whose square root is
    stable through an eigendecomposition). Computed in float64. Returns d^2, as FID papers report it.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    root1 = _sym_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    d2 = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return float(max(d2, 0.0))


def classifier_fid(
    images_a: torch.Tensor, images_b: torch.Tensor, classifier: MNISTClassifier | None = None, batch_size: int = 500
) -> float:
    """FID between two image sets, measured on the MNIST classifier's features (chapter 01).

    Lower is better; 0 for identical sets. Compare values only across runs that use the same
    classifier and similar sample sizes: the estimate is biased upwards for small sets.
    """
    mu_a, sigma_a = feature_statistics(classifier_features(images_a, classifier, batch_size))
    mu_b, sigma_b = feature_statistics(classifier_features(images_b, classifier, batch_size))
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


# ----------------------------------------------------------------------------------------------------------
# Training (run once; its result ships in checkpoints/)
# ----------------------------------------------------------------------------------------------------------


def augment(x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0, shift: float = 2.0, scale: float = 0.1) -> torch.Tensor:
    """Random small rotations, shifts (pixels) and zooms of a [-1, 1] batch, via one affine resampling.

    The classifier must read imperfect generated digits, so it should not depend on exact centring.
    """
    n, _, h, _ = x.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
    offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * shift * 2 / h  # pixels -> grid units ([-1, 1] spans h)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    # resample ink (x + 1), so that pixels pulled in from outside are background (-1), not grey (0)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train_classifier(
    epochs: int = 4,
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    root=None,
) -> tuple[MNISTClassifier, float]:
    """Train MNISTClassifier on the 60,000 training digits; return (model in eval mode, test accuracy) (chapter 01).

    AdamW with a one-cycle learning rate, light augmentation; about 99.5% test accuracy after 4 epochs.
    """
    generator = seed_everything(seed)
    device = get_device(device)
    images, labels = data.mnist(train=True, root=root)  # uint8, scaled per batch to keep memory small
    test_images, test_labels = data.mnist(train=False, root=root)
    model = MNISTClassifier().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(images) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    accuracy = float("nan")
    for epoch in range(epochs):
        model.train()
        bar = tqdm(data.batches(images, labels, batch_size, generator), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}")
        for x_uint8, y in bar:
            x = augment(data.to_unit_range(x_uint8), generator).to(device)
            loss = F.cross_entropy(model(x), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        accuracy = conditional_accuracy(test_images, test_labels, model)
        tqdm.write(f"epoch {epoch + 1}: test accuracy {accuracy:.4%}")
    return model.eval(), accuracy


def _cmd_train(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, accuracy = train_classifier(args.epochs, args.seed, args.device, args.batch_size, args.lr)
    seconds = time.perf_counter() - start
    config = {
        **model.config,
        "model": "MNISTClassifier",
        "data": "MNIST train (60,000)",
        "epochs": args.epochs,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "test_accuracy": round(accuracy, 6),
    }  # no wall time in the file: the same run then gives the same bytes and the same SHA-256
    sha = checkpoint.save_checkpoint(args.out, model.state_dict(), config)
    print(f"saved {args.out}\nsha256 {sha}\ntest accuracy {accuracy:.4%}\nwall time {seconds:.0f} s")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_classifier(args.device, args.checkpoint)
    images, labels = data.mnist(train=False)
    predicted = predict(images, model)
    correct = int((predicted == labels).sum())
    print(f"checkpoint {args.checkpoint}: MNIST test accuracy {correct / len(labels):.4%} ({correct}/{len(labels)})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffusion_lab.metrics", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train-classifier", help="train the MNIST classifier and save it as safetensors")
    train.add_argument("--out", default="checkpoints/mnist-classifier.safetensors")
    train.add_argument("--epochs", type=int, default=4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--device", default=None, help="e.g. cpu or cuda; default: the best available")
    train.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    train.set_defaults(run=_cmd_train)
    evaluate = commands.add_parser("evaluate", help="print the test accuracy of a classifier checkpoint")
    evaluate.add_argument("--checkpoint", default=CLASSIFIER_NAME, help="a shipped name or a .safetensors path")
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--threads", type=int, default=0)
    evaluate.set_defaults(run=_cmd_evaluate)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    problems = []
    if args.threads < 0:
        problems.append(f"--threads must be 0 (torch's default) or more, got {args.threads}")
    if args.command == "train-classifier":
        if args.epochs < 1:
            problems.append(f"--epochs must be at least 1, got {args.epochs}")
        if args.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {args.batch_size}")
        if not (math.isfinite(args.lr) and args.lr > 0):
            problems.append(f"--lr must be a positive number, got {args.lr}")
        if not str(args.out).endswith(".safetensors"):
            problems.append(f"--out must name a .safetensors file, got {args.out!r}")
    if problems:
        raise ValueError("; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        args.run(args)
    except USER_ERRORS as err:
        raise SystemExit(f"error: {err}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
