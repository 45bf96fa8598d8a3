"""Tests of diffusion_lab.video: Moving MNIST from the real digits, its paths and bounces, the tracked crops."""
import math

import pytest
import torch

from diffusion_lab import data, video
from diffusion_lab.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = 8


@pytest.fixture(scope="module")
def train_digits():
    return data.mnist(train=True)


@pytest.fixture(scope="module")
def test_digits():
    return data.mnist(train=False)


@pytest.fixture(scope="module")
def small():
    """The default canvas, one or two digits."""
    return video.moving_mnist(64, frames=FRAMES, seed=0)


@pytest.fixture(scope="module")
def wide():
    """Two fast digits on Srivastava et al.'s 64x64 canvas: room to pass each other, and many bounces."""
    return video.moving_mnist(64, frames=FRAMES, size=64, digits=2, seed=3, speed=(3.0, 6.0))


def bounce_step_by_step(p, v, frames, room):
    """The simulation written the plain way: move one step; a coordinate that left [0, room] is mirrored back and
    its velocity reversed. (One mirror per step: the tests' speeds are below the room.)"""
    positions, velocities = [], []
    for _ in range(frames):
        positions.append(p)
        velocities.append(v)
        p = p + v
        low, high = p < 0, p > room
        p = torch.where(low, -p, torch.where(high, 2 * room - p, p))
        v = torch.where(low | high, -v, v)
    return torch.stack(positions, 1), torch.stack(velocities, 1)


def paste(images, sources, corners, frames, size):
    """A clip drawn the slow, obvious way: each digit's window max-combined with what is there."""
    clip = torch.zeros(frames, size, size, dtype=torch.uint8)
    for source, corner in zip(sources.tolist(), corners):
        if source < 0:
            continue
        for f, (r, c) in enumerate(video.pixel_positions(corner).tolist()):
            window = clip[f, r:r + 28, c:c + 28]
            window.copy_(torch.maximum(window, images[source]))
    return clip


# ------------------------------------------------------------------------------------ shapes, determinism
def test_shapes_and_dtypes(small):
    n, D = 64, video.MAX_DIGITS
    assert len(small) == n
    assert small.clips.shape == (n, FRAMES, video.SIZE, video.SIZE) and small.clips.dtype == torch.uint8
    for name in ("counts", "labels", "sources"):
        assert getattr(small, name).dtype == torch.int64
    assert small.counts.shape == (n,) and small.labels.shape == small.sources.shape == (n, D)
    for name in ("trajectories", "velocities"):
        assert getattr(small, name).shape == (n, D, FRAMES, 2) and getattr(small, name).dtype == torch.float32
    assert set(small.counts.tolist()) == {1, 2}  # digits=(1, 2) draws both counts
    one = small.counts == 1
    assert (small.labels[one, 1] == -1).all() and (small.sources[one, 1] == -1).all()
    assert small.trajectories[one, 1].isnan().all() and not small.trajectories[:, 0].isnan().any()
    assert not small.trajectories[~one].isnan().any()
    assert small.labels[small.labels >= 0].max() <= 9
    assert small.clips.max() == 255 and (small.clips.flatten(1).amax(1) > 0).all()  # every clip has ink


@pytest.mark.parametrize("digits, counts", [(1, {1}), (2, {2}), ((2,), {2}), ([1, 2], {1, 2}), (torch.tensor(2), {2})])
def test_digits_chooses_how_many_move(digits, counts):
    assert set(video.moving_mnist(12, frames=2, digits=digits).counts.tolist()) == counts


def test_same_seed_same_clips_other_seed_other_clips(small):
    again = video.moving_mnist(64, frames=FRAMES, seed=0)
    for name in ("clips", "counts", "labels", "sources"):
        assert torch.equal(getattr(small, name), getattr(again, name)), name
    for name in ("trajectories", "velocities"):
        assert torch.equal(getattr(small, name).nan_to_num(-9), getattr(again, name).nan_to_num(-9)), name
    other = video.moving_mnist(64, frames=FRAMES, seed=1)
    assert not torch.equal(small.sources, other.sources)
    assert (small.clips != other.clips).flatten(1).any(1).float().mean() > 0.9  # nearly every clip differs


def test_first_clips_do_not_depend_on_n(small):
    few = video.moving_mnist(5, frames=FRAMES, seed=0)
    assert torch.equal(few.clips, small.clips[:5]) and torch.equal(few.sources, small.sources[:5])


def test_the_clip_is_the_digits_pasted_at_their_corners(wide, small, train_digits):
    images, _ = train_digits
    for s, size in ((wide, 64), (small, video.SIZE)):
        for i in range(6):
            expected = paste(images, s.sources[i], s.trajectories[i], FRAMES, size)
            assert torch.equal(s.clips[i], expected), f"clip {i} on the {size}x{size} canvas"


# ---------------------------------------------------------------------------------------- motion
@pytest.mark.parametrize("which, speed_range", [("small", video.SPEED), ("wide", (3.0, 6.0))])
def test_digits_stay_inside_and_bounce_with_constant_speed(which, speed_range, request):
    s = request.getfixturevalue(which)
    room = s.clips.shape[-1] - 28
    two = s.counts == 2
    p = torch.cat([s.trajectories[:, 0], s.trajectories[two, 1]])  # (k, F, 2): every present digit
    v = torch.cat([s.velocities[:, 0], s.velocities[two, 1]])
    assert (p >= 0).all() and (p <= room).all()
    corners = video.pixel_positions(p)
    assert (corners >= 0).all() and (corners <= room).all() and ((corners - p).abs() <= 0.5).all()  # drawn rounded

    # speed is preserved: |v| is the same in every frame, and inside the requested range
    speed = v.norm(dim=-1)  # (k, F)
    assert torch.allclose(speed, speed[:, :1].expand_as(speed), atol=1e-5)
    assert (speed >= speed_range[0] - 1e-5).all() and (speed <= speed_range[1] + 1e-5).all()

    # the path is what a frame-by-frame simulation from the first frame gives
    expected_p, expected_v = bounce_step_by_step(p[:, 0].double(), v[:, 0].double(), p.shape[1], room)
    assert torch.allclose(p.double(), expected_p, atol=1e-3) and torch.allclose(v.double(), expected_v, atol=1e-5)

    # a velocity component flips sign exactly where the straight step would have left the canvas
    flipped = torch.sign(v[:, 1:]) != torch.sign(v[:, :-1])
    ahead = p[:, :-1] + v[:, :-1]
    assert flipped.any(), "no digit bounced: the test would prove nothing"
    assert torch.equal(flipped, (ahead < 0) | (ahead > room))
    # and between bounces the step is exactly the velocity
    step = p[:, 1:] - p[:, :-1]
    assert torch.allclose(step[~flipped], v[:, :-1][~flipped], atol=1e-4)


def test_a_28_pixel_canvas_holds_the_digit_still(train_digits):
    s = video.moving_mnist(4, frames=3, size=28)
    assert (s.trajectories[:, 0] == 0).all() and (s.velocities[:, 0] == 0).all()
    assert torch.equal(s.clips[:, 0], s.clips[:, 2])


# -------------------------------------------------------------------------------- sources and crops
def test_crop_at_the_trajectory_is_the_source_digit(wide, small, train_digits):
    images, labels = train_digits
    for s in (small, wide):
        crops = video.track_crops(s.clips, s.trajectories)  # (n, 2, F, 28, 28)
        corners = video.pixel_positions(s.trajectories.nan_to_num(-100))
        # two 28x28 windows are apart when their corners differ by 28 or more along some axis
        apart = ((corners[:, 0] - corners[:, 1]).abs() >= 28).any(-1)  # (n, F); an empty slot is far away
        alone = apart[:, None] & (s.sources >= 0)[:, :, None]  # (n, D, F): a present digit that nothing covers
        clip, slot, frame = alone.nonzero(as_tuple=True)
        assert torch.equal(crops[clip, slot, frame], images[s.sources[clip, slot]])
        assert alone[:, 0].any()
        present = s.sources >= 0
        assert torch.equal(s.labels[present], labels[s.sources[present]])
        assert (crops[~present] == 0).all()  # an empty slot gives a blank crop
    # on the 64x64 canvas both digits of a pair are seen uncovered, on the 32x32 one only single digits
    assert alone[:, 1].any() and (wide.counts == 2).all()


def test_test_clips_use_only_test_digits(test_digits, train_digits):
    s = video.moving_mnist(48, frames=3, seed=5, train=False)
    images, labels = test_digits
    present = s.sources >= 0
    assert not s.train and s.sources[present].max() < len(images)
    assert torch.equal(s.labels[present], labels[s.sources[present]])
    crops = video.track_crops(s.clips, s.trajectories)
    one = s.counts == 1  # on the small canvas only single digits are certain to be uncovered
    assert torch.equal(crops[one, 0], images[s.sources[one, 0]][:, None].expand(-1, 3, -1, -1))
    # the same seed with train=True draws from the 60,000 training digits instead
    trained = video.moving_mnist(48, frames=3, seed=5, train=True)
    assert trained.train and trained.sources.max() >= len(images)
    assert torch.equal(trained.labels[trained.sources >= 0], train_digits[1][trained.sources[trained.sources >= 0]])


def test_centroid_path_follows_a_single_digit(small, train_digits):
    images, _ = train_digits
    one = (small.counts == 1).nonzero().squeeze(1)[:5]
    path = video.centroid_path(small.clips[one])  # (k, F, 2)
    own = video.centroid_path(images[small.sources[one, 0]])  # (k, 2): within its own 28x28 window
    expected = video.pixel_positions(small.trajectories[one, 0]).float() + own[:, None]
    assert torch.allclose(path, expected, atol=1e-4)
    crops = video.track_crops(small.clips, small.trajectories)
    assert video.centroid_path(crops).shape == (64, 2, FRAMES, 2)
    assert video.centroid_path(torch.zeros(1, 2, 5, 5, dtype=torch.uint8)).isnan().all()  # blank: NaN


# ----------------------------------------------------------------------------- the network's layout
def test_unit_range_is_the_unets_clip_layout(small):
    x0 = video.clips_to_unit_range(small.clips[:2])
    assert x0.shape == (2, 1, FRAMES, video.SIZE, video.SIZE) and x0.dtype == torch.float32
    assert x0.min() == -1 and x0.max() == 1
    assert torch.equal(video.clips_from_unit_range(x0), small.clips[:2])
    net = UNet(in_channels=1, channels=(8, 16, 16), dims="2+1d")
    assert net(x0, torch.tensor([0, 999])).shape == x0.shape


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, words", [
    (dict(n=0), "n must be a whole number >= 1"),
    (dict(n=2.5), "n must be a whole number"),
    (dict(n=2, size=27), "size must be a whole number >= 28"),
    (dict(n=2, frames=0), "frames must be a whole number >= 1"),
    (dict(n=2, digits=3), "digits must be 1, 2"),
    (dict(n=2, digits=0), "digits must be 1, 2"),
    (dict(n=2, digits=(1, 3)), "digits must be 1, 2"),
    (dict(n=2, digits=()), "digits must be 1, 2"),
    (dict(n=2, digits=True), "digits must be 1, 2"),
    (dict(n=2, digits="2"), "digits must be 1, 2"),
    (dict(n=2, train="test"), "train must be True"),
    (dict(n=2, seed=-1), "seed must be a whole number >= 0"),
    (dict(n=2, speed=(2.0, 1.0)), "speed must be"),
    (dict(n=2, speed=(-1.0, 1.0)), "speed must be"),
    (dict(n=2, speed=(0.0, math.inf)), "speed must be"),
    (dict(n=2, speed=1.0), "speed must be"),
])
def test_bad_arguments_raise_one_clear_error(kwargs, words):
    with pytest.raises(ValueError, match=words) as err:
        video.moving_mnist(**kwargs)
    assert "\n" not in str(err.value)


def test_crop_and_layout_helpers_refuse_wrong_input(small):
    with pytest.raises(ValueError, match="uint8 clips"):
        video.track_crops(small.clips.float(), small.trajectories)
    with pytest.raises(ValueError, match="trajectories"):
        video.track_crops(small.clips, small.trajectories[:, :, :3])
    with pytest.raises(ValueError, match="leave the"):
        video.track_crops(small.clips, small.trajectories + 10)
    with pytest.raises(ValueError, match="uint8 clips"):
        video.clips_to_unit_range(small.clips[0])
    with pytest.raises(ValueError, match=r"\(n, 1, F, H, W\)"):
        video.clips_from_unit_range(torch.zeros(2, FRAMES, 32, 32))
    with pytest.raises(ValueError, match="uint8 frames"):
        video.centroid_path(small.clips.float())


# ------------------------------------------------------------------------- the clip model and its tasks
@pytest.fixture(scope="module")
def warm():
    """The clip model before training: mnist-cond-small's spatial layers, temporal convs at zero."""
    return video.video_denoiser()


def test_fresh_clip_model_is_the_image_model_on_each_frame(warm):
    """With the temporal convs at zero and the null style folded into a bias, every frame of a clip gets exactly
    what mnist-cond-small gives that frame alone (same t, same label): the clip model starts frame by frame."""
    from diffusion_lab.denoiser import load_denoiser

    image = load_denoiser("mnist-cond-small", device="cpu")
    x_t = torch.randn(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([10, 700]), torch.tensor([3, 10])  # 10: the null label
    with torch.no_grad():
        clip_out = warm(x_t, t, labels=labels)
        frame_out = image(x_t.transpose(1, 2).flatten(0, 1), t.repeat_interleave(3), labels=labels.repeat_interleave(3))
    assert torch.allclose(clip_out.transpose(1, 2).flatten(0, 1), frame_out, atol=1e-5)
    assert warm.shape == (1, FRAMES, 32, 32) and warm.prediction == image.prediction
    temporal = [p for name, p in warm.net.named_parameters() if ".temporal." in name]
    assert temporal and all((p == 0).all() for p in temporal)
    assert video.video_denoiser(None, channels=(8, 16)).net.time_embed[3].bias.abs().sum() > 0  # from scratch too


def test_clip_batches_draw_fresh_one_digit_clips():
    draw = video.clip_batches()
    g = torch.Generator().manual_seed(0)
    a, b = draw(g, 4), draw(g, 4)
    assert a["x0"].shape == (4, 1, FRAMES, 32, 32) and a["labels"].shape == (4,)
    assert a["x0"].min() == -1 and a["x0"].max() == 1 and not torch.equal(a["x0"], b["x0"])


def test_train_video_runs_and_resumes(tmp_path):
    run = tmp_path / "run.safetensors"
    first = video.train_video(run, steps=1, batch_size=2, image_model=None, channels=(8, 16), progress=False)
    again = video.train_video(run, steps=2, batch_size=2, image_model=None, channels=(8, 16), progress=False)
    assert first.step == 1 and again.resumed_from == 1 and again.step == 2


def test_complete_keeps_the_given_frames_and_fills_the_rest(warm, small):
    clips = small.clips[small.counts == 1][:2]
    out = video.complete(warm, clips, range(3), steps=2)
    assert out.dtype == torch.uint8 and out.shape == clips.shape
    assert torch.equal(out[:, :3], clips[:, :3]) and not torch.equal(out[:, 3:], clips[:, 3:])
    ends = video.complete(warm, clips, (0, FRAMES - 1), steps=2)
    assert torch.equal(ends[:, [0, -1]], clips[:, [0, -1]])
    assert video.frame_mask(4, (0, 3)).flatten().tolist() == [1, 0, 0, 1]


def test_frame_by_frame_pastes_a_new_digit_along_the_path(small):
    from diffusion_lab.denoiser import load_denoiser

    one = small.counts == 1
    paths, labels = small.trajectories[one][:2, 0], small.labels[one][:2, 0]
    clips = video.frame_by_frame(load_denoiser("mnist-cond-small", device="cpu"), labels, paths, steps=3)
    assert clips.shape == (2, FRAMES, 32, 32) and clips.dtype == torch.uint8
    crops = video.track_crops(clips, paths[:, None])[:, 0]  # the pasted window is the whole ink
    assert torch.equal(crops.flatten(2).sum(-1).long(), clips.flatten(2).sum(-1).long())
    assert not torch.equal(crops[:, 0], crops[:, 1])  # each frame draws its own digit


# ------------------------------------------------------------------------------------------ evaluation
def test_bounce_residual_is_small_for_real_motion_and_large_for_jumps(small):
    s = video.moving_mnist(32, digits=1, seed=4)
    path = video.centroid_path(s.clips)
    real = video.bounce_residual(path)
    assert (real < 0.5).all()  # whole-pixel rounding only
    exact = video.bounce_residual(s.trajectories[:, 0])  # the unrounded corners: on the fit's grid up to ~0.05 px
    assert (exact < 0.15).all()
    jumpy = path + torch.randn(path.shape, generator=torch.Generator().manual_seed(0)) * 2
    assert video.bounce_residual(jumpy).mean() > 3 * real.mean()
    still = path[:, :1].expand_as(path)
    assert torch.allclose(video.bounce_residual(still), torch.zeros(32), atol=1e-5)  # standing still fits (v = 0)


def test_evaluate_clips_scores_real_clips_and_notices_a_swapped_digit(train_digits):
    s = video.moving_mnist(40, digits=1, seed=2, train=False)
    labels = s.labels[:, 0]
    real = video.evaluate_clips(s.clips, labels, s.trajectories)
    assert real["accuracy"] > 0.95 and real["consistency"] > 0.95 and real["smoothness_px"] < 0.5
    assert 0.5 < real["speed_px"] < 1.6 and len(real["frame_accuracy"]) == FRAMES
    tracked = video.evaluate_clips(s.clips, labels)  # by centroid, as for generated clips
    assert tracked["accuracy"] > 0.9
    # replace the second half of each clip by another clip's frames: a different digit half the time
    swapped = torch.cat([s.clips[:, :4], s.clips.roll(1, 0)[:, 4:]], dim=1)
    worse = video.evaluate_clips(swapped, labels)
    assert worse["consistency"] < real["consistency"] - 0.1 and worse["smoothness_px"] > real["smoothness_px"]


def test_stroke_change_is_zero_for_a_rigid_digit_and_high_for_a_new_one_each_frame(small):
    s = video.moving_mnist(32, digits=1, seed=6, train=False)
    assert torch.equal(video.stroke_change(s.clips, s.trajectories), torch.zeros(32))  # the true path: same crops
    tracked = video.stroke_change(s.clips)  # cut around the ink's centre, as generated clips are
    assert tracked.max() < 0.02, tracked.max()  # rounding and the walls only: the shift absorbs the rest
    new_each_frame = s.clips.roll(1, 0)  # every frame from a different clip: a different digit (or handwriting)
    mixed = torch.where((torch.arange(FRAMES) % 2 == 0)[None, :, None, None], s.clips, new_each_frame)
    assert video.stroke_change(mixed).mean() > 10 * tracked.mean() + 0.02
    # a rigid one-pixel step between frames is not a change of stroke, but it is without the shift
    stepped = torch.stack([s.clips[:, 0], s.clips[:, 0].roll(1, -1)] * (FRAMES // 2), dim=1)
    assert video.stroke_change(stepped, s.trajectories[:, :, :1].expand(-1, -1, FRAMES, -1)).max() < 1e-6
    assert video.stroke_change(stepped, s.trajectories[:, :, :1].expand(-1, -1, FRAMES, -1), shift=0).min() > 0.01


def test_horizon_errors_are_zero_for_the_truth_and_grow_when_copying(small):
    s = video.moving_mnist(16, digits=1, seed=5)
    truth = s.clips
    same = video.horizon_errors(truth, truth, range(4, FRAMES))
    assert same["mse"] == [0.0] * 4 and same["centre_px"] == [0.0] * 4
    copy = video.horizon_errors(truth[:, 3:4].expand(-1, FRAMES, -1, -1), truth, range(4, FRAMES))
    assert copy["centre_px"][0] > 0.3 and copy["centre_px"][-1] > copy["centre_px"][0]


def test_clip_flops_grow_with_frames_and_pixels(warm):
    f8, f16, f32 = (video.clip_flops(warm.net, f, 32) for f in (8, 16, 32))
    assert f32 - f16 == 2 * (f16 - f8)  # linear in frames: every layer works per frame or per pixel across 3 frames,
    assert abs(f16 - 2 * f8) < 1e-3 * f8  # but for the time and label embedding, once per clip
    assert video.clip_flops(warm.net, 8, 64) > 4 * f8 * 0.99  # 4x the pixels, a little more for attention


def test_test_clips_are_seeded_held_out_and_indexed():
    clips, index = video.test_clips(5, seed=1)
    again, index_again = video.test_clips(5, seed=1)
    assert torch.equal(clips.clips, again.clips) and torch.equal(index, index_again)
    assert not clips.train and (clips.counts == 1).all() and len(set(index.tolist())) == 5
    full = video.moving_mnist(int(index.max()) + 1, digits=1, train=False, seed=0)
    assert torch.equal(full.clips[index], clips.clips)


def test_gif_bytes_hold_every_frame(small):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(video.gif_bytes(small.clips[0], scale=2))) as gif:
        assert gif.n_frames == FRAMES and gif.size == (64, 64)


def test_sample_cli_writes_clips_and_context(tmp_path, monkeypatch, capsys):
    from diffusion_lab import sample
    from diffusion_lab.denoiser import save_denoiser

    torch.manual_seed(0)
    model = tmp_path / "clips.safetensors"
    save_denoiser(model, video.video_denoiser(None, channels=(8, 8)))
    out = tmp_path / "v.npz"
    assert sample.main(["--checkpoint", str(model), "--n", "3", "--steps", "1", "--out", str(out), "--quiet",
                        "--context-from", "test", "--context-frames", "4", "--gif", str(tmp_path / "gif")]) == 0
    import numpy as np

    with np.load(out) as f:
        assert f["clips"].shape == (3, FRAMES, 32, 32) and f["clips"].dtype == np.uint8
        held_out, index = video.test_clips(3, seed=0)
        assert f["context_index"].tolist() == index.tolist() and f["labels"].tolist() == held_out.labels[:, 0].tolist()
        assert (f["clips"][:, :4] == held_out.clips[:, :4].numpy()).all()
    assert len(list((tmp_path / "gif").glob("*.gif"))) == 3
    with pytest.raises(SystemExit, match="--context-frames must be between 1 and 7"):
        sample.main(["--checkpoint", str(model), "--n", "1", "--out", str(out), "--context-from", "test",
                     "--context-frames", "8"])
    with pytest.raises(SystemExit, match="need a clip model"):
        sample.main(["--checkpoint", "mnist-cond-small", "--n", "1", "--out", str(out), "--gif", str(tmp_path / "g")])


def test_the_clip_model_card_is_the_benchmarks_rendering_of_its_stored_results():
    """Every number in checkpoints/moving-mnist.md comes from benchmarks/results/video.json through the script."""
    import importlib.util
    import json
    from pathlib import Path

    from diffusion_lab.utils import file_sha256

    repo = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("video_bench", repo / "benchmarks" / "video.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shipped = repo / "checkpoints" / "moving-mnist.safetensors"
    result = json.loads((repo / "benchmarks" / "results" / "video.json").read_text())
    expected = bench.card(result, file_sha256(shipped), shipped.stat().st_size)
    assert (repo / "checkpoints" / "moving-mnist.md").read_text() == expected
