"""Tests of chapter 11's model side of diffusion_lab.music: the roll as a 1-D signal, harmonisation by inpainting,
typed melodies, the music-theory statistics, the two baselines, the organ synth, MIDI export and the sample CLI.

The statistics are checked on small hand-made chorales whose answers are counted by hand."""
import io
import json
import wave

import music21
import numpy as np
import pytest
import torch

from diffusion_lab import music, sample
from diffusion_lab.denoiser import load_denoiser, save_denoiser

pytestmark = pytest.mark.usefixtures("one_thread")
C, D, E, F, G, A, B = 60, 62, 64, 65, 67, 69, 71  # the C major scale from middle C


def chord_line(*verticals, each: int = 4) -> np.ndarray:
    """(4, steps) from verticals (S, A, T, B), each held `each` steps."""
    return np.repeat(np.array(verticals, dtype=np.int16).T, each, axis=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained chorale-shaped denoiser, saved as a checkpoint the CLI can read."""
    torch.manual_seed(0)
    denoiser = music.chorale_denoiser(channels=(8, 16, 16), T=20)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-chorales.safetensors"
    save_denoiser(path, denoiser)
    return load_denoiser(path, device="cpu"), path


@pytest.fixture(scope="module")
def held_out():
    return music.windows(music.split(music.bach_chorales(), "test"), music.WINDOW)


# --------------------------------------------------------------------------------------------- representation


def test_signal_round_trip_on_real_windows(held_out):
    x = held_out[(held_out != music.REST).all(axis=(1, 2))][:20]
    code = music.to_signal(x)
    assert code.shape == (20, 8, music.WINDOW) and code.dtype == torch.float32
    assert np.array_equal(music.from_signal(code), x)
    assert 0.5 < code[:, :4].std() < 1.5, "the positions keep a spread near 1, as the noise schedules assume"
    assert set(np.unique(code[:, 4:]).tolist()) == {-1.0, 1.0}
    # a nudge of under half a scale step rounds back; a whole step up lands on the next note of the scale
    nudged = code.clone()
    nudged[:, :4] += 0.49 / music.SCALE_STEPS_PER_UNIT
    assert np.array_equal(music.from_signal(nudged), x)
    up = code.clone()
    up[:, :4] += 1 / music.SCALE_STEPS_PER_UNIT
    up[:, 4:] = -1
    assert music.in_key_share(music.from_signal(up)) == 1
    step, _ = music.to_scale(x)
    assert np.array_equal(music.from_signal(up), music.from_scale(step + 1, 0))


def test_scale_code_by_hand():
    step, sharp = music.to_scale([60, 61, 62, 66, 70, 71])  # C4 C#4 D4 F#4 A#4 B4
    assert sharp.tolist() == [0, 1, 0, 1, 1, 0]
    assert (step - step[0]).tolist() == [0, 0, 1, 3, 5, 6]
    assert music.from_scale(step, sharp).tolist() == [60, 61, 62, 66, 70, 71]


def test_rests_are_held_and_training_windows_have_none():
    line = np.array([[music.REST, 60, music.REST, music.REST, 62, music.REST]] * 4, dtype=np.int16)
    assert music.fill_rests(line)[0].tolist() == [60, 60, 60, 60, 62, 62]
    with pytest.raises(ValueError, match="rests for the whole window"):
        music.fill_rests(np.full((4, 8), music.REST, dtype=np.int16))
    train = music.training_windows(music.bach_chorales())
    assert len(train) > 2000 and (train != music.REST).all()


def test_denoiser_takes_the_window(tiny):
    denoiser, _ = tiny
    assert music.is_chorale_model(denoiser)
    out = denoiser(torch.randn(3, *music.SHAPE), torch.tensor([0, 5, 19]))  # (3, 8, 64)
    assert out.shape == (3, *music.SHAPE)


# --------------------------------------------------------------------------------------------- harmonisation


def test_harmonise_keeps_the_soprano_and_fills_three_voices(tiny, held_out):
    denoiser, _ = tiny
    out = music.harmonise(denoiser, held_out[:5, 0], steps=3)
    assert out.shape == (5, 4, music.WINDOW) and out.dtype == np.int16
    assert np.array_equal(out[:, 0], held_out[:5, 0])
    again = music.harmonise(denoiser, held_out[:5], steps=3)  # (N, 4, steps) input: only its soprano is read
    assert np.array_equal(out, again), "the other voices of the input must not leak into the result"
    with pytest.raises(ValueError, match="sopranos must be"):
        music.harmonise(denoiser, held_out[:2, 0, :32])


def test_parse_melody():
    line = music.parse_melody("C5 D5:0.5 R:0.5 Bb4:2")
    assert line.shape == (music.WINDOW,) and line.dtype == np.int16
    assert list(line[:12]) == [72] * 4 + [74] * 2 + [music.REST] * 2 + [70] * 4
    assert (line[12:] == 70).all(), "a short melody is held on its last note"
    assert music.parse_melody("F#4:16")[0] == 66
    for bad, message in (("H5", "not a note"), ("C5:0.1", "whole number"), ("C9", "outside"), ("", "empty"),
                         ("C5:17", "at most 16")):
        with pytest.raises(ValueError, match=message):
            music.parse_melody(bad)


# --------------------------------------------------------------------------------------------- statistics


def test_parallel_fifths_and_octaves_counted_by_hand():
    # S and B a twelfth apart (a fifth mod 12) moving up together: one parallel fifth; A and T static
    x = chord_line((G + 12, E, C, C - 12), (A + 12, E, C, D - 12))[None]
    assert music.parallels(x, 7) == 1 and music.parallels(x, 0) == 0
    # contrary motion into the same fifth is not parallel
    x = chord_line((G + 12, E, C, C - 12), (A + 12, E, C, D - 24))[None]
    assert music.parallels(x, 7) == 0
    # octaves: S and T an octave apart moving down together; oblique motion (T still) is not
    x = chord_line((E + 12, C, E, C - 12), (D + 12, B - 12, D, G - 24))[None]
    assert music.parallels(x, 0) == 1
    x = chord_line((E + 12, G, E, C - 12), (E + 12, G, E, C - 12))[None]
    assert music.parallels(x, 0) == 0, "repeated (held) verticals move nowhere"


def _parallels_by_verticals(x, interval):
    """The definition read literally: collapse each window to its verticals, then compare neighbouring ones."""
    total = 0
    for w in x:
        v = w[:, np.flatnonzero(np.r_[True, (w[:, 1:] != w[:, :-1]).any(axis=0)])]
        for i in range(4):
            for j in range(i + 1, 4):
                for k in range(v.shape[1] - 1):
                    a0, a1, b0, b1 = v[i, k], v[i, k + 1], v[j, k], v[j, k + 1]
                    if music.REST in (a0, a1, b0, b1) or a0 == a1 or np.sign(a1 - a0) != np.sign(b1 - b0):
                        continue
                    total += (a0 - b0) % 12 == interval and (a1 - b1) % 12 == interval
    return total


def test_parallels_step_by_step_equal_parallels_between_verticals(held_out):
    """`parallels` compares neighbouring steps (vectorised); between two verticals nothing moves, so it must count
    exactly what comparing neighbouring verticals counts, on real windows and on random ones with rests."""
    rng = np.random.default_rng(0)
    noisy = rng.integers(55, 67, size=(40, 4, 16)).astype(np.int16)
    noisy[rng.random(noisy.shape) < 0.1] = music.REST
    for x in (held_out[:60], noisy):
        for interval in (0, 7):
            assert music.parallels(x, interval) == _parallels_by_verticals(x, interval)
    assert (music.rule_violations(noisy) == music._parallel_counts(noisy, [0, 7]) + music.crossings(noisy)).all()


def test_rule_guided_sampling_breaks_fewer_rules_and_keeps_the_soprano(held_out):
    """The shipped model with K = 4 candidates per step against the same ancestral sampler with K = 1 (which is
    plain DDPM): keeping the candidate with the fewest violations must at least halve them."""
    model = load_denoiser("bach-chorales", device="cpu")
    sopranos = held_out[:24, 0]
    known, mask = music.to_signal(np.stack([sopranos] * 4, axis=1)), music.soprano_mask(24)
    plain, ruled = (music.from_signal(music.sample_with_rules(model, 24, k, steps=10, seed=3, known=known, mask=mask))
                    for k in (1, 4))
    assert np.array_equal(music.to_signal(ruled)[:, [0, 4]], known[:, [0, 4]]), "the soprano's code is kept"
    assert music.rule_violations(ruled).sum() <= 0.5 * music.rule_violations(plain).sum(), (
        music.rule_violations(ruled).sum(), music.rule_violations(plain).sum())
    out = music.harmonise(model, held_out[:6, 0], steps=4, candidates=2)
    assert np.array_equal(out[:, 0], held_out[:6, 0])
    with pytest.raises(ValueError, match="candidates must be"):
        music.compose(model, 2, candidates=0)


def test_evaluate_counts_crossings_ranges_and_key():
    reference = chord_line((E + 12, G, C, C - 12), (F + 12, A, C, F - 24), each=8)[None]
    ranges = [[70, 80], [60, 70], [55, 62], [40, 50]]
    crossed = chord_line((E + 12, G, C, C - 12), (F + 12, A, C, F - 24), each=8)[None].copy()
    crossed[0, 1, :8] = 79  # alto (G5) above the soprano (E5) for two beats, above its range
    crossed[0, 3, 8:] = 51  # bass D#3: above its range and out of key
    stats = music.evaluate(crossed, reference, ranges)
    beats = 16 / 4
    assert stats["crossings_per_100_beats"] == pytest.approx(100 * 2 / beats)
    sounding = 4 * 16
    # out of range: the alto's 79 (8 steps, above 70) and the bass's 51 (8 steps, above 50)
    assert stats["range_violations"] == pytest.approx(16 / sounding)
    assert stats["in_key"] == pytest.approx(1 - 8 / sounding)
    same = music.evaluate(reference, reference, ranges)
    assert same["pitch_class_distance"] == 0 and same["note_length_distance"] == 0
    assert same["crossings_per_100_beats"] == 0 and same["range_violations"] == 0


def test_note_lengths_merge_repeats_and_skip_rests():
    x = np.array([[[60] * 4 + [62] * 2 + [music.REST] * 2]], dtype=np.int16)
    assert list(music.note_lengths(x)) == [4, 2]


# --------------------------------------------------------------------------------------------- baselines


def test_baselines_keep_the_soprano_and_their_ranges(held_out):
    ranges = music.voice_ranges(held_out)
    lengths = music.note_lengths(held_out)
    rand = music.random_notes(10, ranges, lengths, seed=1, sopranos=held_out[:10, 0])
    assert np.array_equal(rand[:, 0], held_out[:10, 0])
    for v in range(1, 4):
        assert ranges[v, 0] - 0.5 <= rand[:, v].min() and rand[:, v].max() <= ranges[v, 1] + 0.5
    markov = music.MarkovVoices(held_out)
    np.testing.assert_allclose(markov.transitions.sum(axis=2), 1)
    draws = markov.sample(10, seed=2, sopranos=held_out[:10, 0])
    assert np.array_equal(draws[:, 0], held_out[:10, 0])
    for v in range(1, 4):  # only pitches that voice sang in the fitted windows (smoothing stays among seen ones)
        seen = set(held_out[:, v].ravel().tolist())
        assert set(draws[:, v].ravel().tolist()) <= seen
    assert np.array_equal(markov.sample(3, seed=5), markov.sample(3, seed=5))


# --------------------------------------------------------------------------------------------- audio and MIDI


def test_synthesise_plays_the_right_pitch():
    x = np.full((4, 16), music.REST, dtype=np.int16)
    x[0] = 69  # A4 alone
    audio = music.synthesise(x, seconds_per_step=0.1)
    assert audio.dtype == np.float32 and len(audio) == round(16 * 0.1 * music.SAMPLE_RATE)
    assert np.abs(audio).max() <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.fft.rfftfreq(len(audio), 1 / music.SAMPLE_RATE)[spectrum.argmax()]
    assert abs(peak_hz - 440) < 2
    with wave.open(io.BytesIO(music.wav_bytes(audio))) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (music.SAMPLE_RATE, 1, 2)
        assert f.getnframes() == len(audio)


def test_midi_reads_back_note_for_note(tmp_path, held_out):
    roll = held_out[3]
    path = tmp_path / "x.mid"
    path.write_bytes(music.midi_bytes(roll))
    score = music21.converter.parse(str(path))
    assert len(score.parts) == 4
    for v, part in enumerate(score.parts):
        back = np.full(music.WINDOW, music.REST, dtype=np.int16)
        for n in part.flatten().notes:
            start = round(float(n.offset) * 4)
            back[start:start + round(float(n.duration.quarterLength) * 4)] = n.pitch.midi
        assert np.array_equal(back, roll[v]), f"voice {v}"


# --------------------------------------------------------------------------------------------- the CLI


def test_cli_harmonises_test_sopranos(tiny, held_out, tmp_path, capsys):
    _, path = tiny
    out = tmp_path / "c.npz"
    argv = ["--checkpoint", str(path), "--n", "3", "--steps", "2", "--seed", "4", "--out", str(out),
            "--soprano-from", "test", "--midi", str(tmp_path / "mid"), "--wav", str(tmp_path / "wav"), "--quiet"]
    assert sample.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 3
    with np.load(out) as z:
        rolls, index = z["rolls"], z["soprano_index"]
        meta = json.loads(str(z["meta"]))
    assert rolls.dtype == np.int16 and rolls.shape == (3, 4, music.WINDOW)
    assert np.array_equal(rolls[:, 0], held_out[index, 0])
    assert len(set(index.tolist())) == 3 and meta["soprano_from"] == "test"
    assert sorted(p.name for p in (tmp_path / "mid").iterdir()) == [f"chorale-000{i}.mid" for i in range(3)]
    assert len(list((tmp_path / "wav").iterdir())) == 3


def test_cli_unconditional_and_bad_input(tiny, tmp_path):
    _, path = tiny
    out = tmp_path / "u.npz"
    assert sample.main(["--checkpoint", str(path), "--n", "2", "--steps", "2", "--out", str(out), "--quiet"]) == 0
    with np.load(out) as z:
        assert z["rolls"].shape == (2, 4, music.WINDOW) and "soprano_index" not in z.files
    for extra, message in ((["--slant", "1"], "digit models only"), (["--grid", "g.png"], "digit models only"),
                           (["--midi", str(out)], "must name a folder"), (["--steps", "21"], "T=20")):
        with pytest.raises(SystemExit, match=message):
            sample.main(["--checkpoint", str(path), "--n", "2", "--steps", "2", "--out", str(tmp_path / "v.npz"),
                         "--quiet", *extra])
        assert not (tmp_path / "v.npz").exists()
    with pytest.raises(SystemExit, match="need a chorale model"):
        sample.main(["--checkpoint", "mnist-cond", "--n", "1", "--steps", "1", "--out", str(tmp_path / "w.npz"),
                     "--soprano-from", "test"])
    with pytest.raises(SystemExit, match="need a chorale model"):
        sample.main(["--checkpoint", "mnist-cond", "--n", "1", "--steps", "1", "--out", str(tmp_path / "w.npz"),
                     "--candidates", "4"])
    with pytest.raises(SystemExit, match="--candidates must be at least 1"):
        sample.main(["--checkpoint", str(path), "--n", "2", "--steps", "2", "--out", str(tmp_path / "w.npz"),
                     "--candidates", "0"])
