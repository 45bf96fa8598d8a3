"""Tests of diffusion_lab.music: parsing Bach chorales, the self-verifying cache, the split, the two encodings.

Only a few corpus files are parsed here (a tmp data root and `files=`); the full corpus is parsed by the chapter."""
import numpy as np
import pytest

import music21  # a base dependency: its absence must fail here, not skip

from diffusion_lab import music
from diffusion_lab.utils import sidecar_path

FOUR_PART = ("bwv10.7.mxl", "bwv67.4.xml", "bwv366.krn")  # MusicXML in 4/4, MusicXML in 3/4, Humdrum
FIVE_PART = "bwv1.6.mxl"  # a horn part above SATB: not a four-part chorale


def corpus(*names):
    folder = music.corpus_files()[0].parent
    return [folder / n for n in names]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    bad = root / "broken.xml"
    bad.write_text("<score-partwise><part id='P1'><measure>not music")
    files = corpus(*FOUR_PART, FIVE_PART) + [bad]
    return music.bach_chorales(root=root, files=files), root, files


# ------------------------------------------------------------------------------------------------- parsing


def test_corpus_is_bundled():
    files = music.corpus_files()
    assert len(files) > 400, f"music21's corpus should bundle ~400 Bach chorale scores, found {len(files)}"


def test_four_voices_on_the_16th_grid_with_satb_ranges(sample):
    chorales, _, _ = sample
    assert chorales.names == ["bwv10.7", "bwv67.4", "bwv366"]
    for pitches, name in zip(chorales.pitches, chorales.names):
        assert pitches.dtype == np.int16 and pitches.shape[0] == 4
        score = music21.converter.parse(str(corpus(*[f for f in FOUR_PART if f.startswith(name + ".")])[0]))
        assert pitches.shape[1] == round(float(score.highestTime) * 4), "one step per 16th note"
        means = [p[p != music.REST].mean() for p in pitches]
        assert means == sorted(means, reverse=True), f"{name}: voices not ordered S, A, T, B"
    ranges = chorales.pitch_range()
    plausible = {"soprano": (57, 84), "alto": (50, 77), "tenor": (43, 72), "bass": (33, 65)}  # MIDI, with a margin
    for voice, (lo, hi) in ranges.items():
        assert plausible[voice][0] <= lo <= hi <= plausible[voice][1], f"{voice} spans {lo}..{hi}"


def test_soprano_matches_music21_note_by_note(sample):
    chorales, _, _ = sample
    score = music21.converter.parse(str(corpus("bwv10.7.mxl")[0]))
    soprano, shift = chorales.pitches[0][0], chorales.shifts[0]
    notes = [n for n in score.parts[0].flatten().notes]
    assert len(notes) > 20
    for n in notes:
        step = round(float(n.offset) * 4)
        assert soprano[step] == n.pitch.midi + shift


def test_transposed_to_c_major_or_a_minor(sample):
    chorales, _, _ = sample
    for pitches, key, shift in zip(chorales.pitches, chorales.keys, chorales.shifts):
        stream = music21.stream.Stream()
        for p in pitches.ravel():
            stream.append(music21.note.Rest(quarterLength=0.25) if p == music.REST
                          else music21.note.Note(midi=int(p), quarterLength=0.25))
        found = stream.analyze("key")
        mode = key.split()[1]
        assert (found.tonic.name, found.mode) == (("C", "major") if mode == "major" else ("A", "minor"))
        assert -6 <= shift <= 5
        assert music.in_key_share(pitches) > 0.85


def test_parts_listed_bass_first_come_out_satb(tmp_path):
    lines = {"S": [74, 76, 78, 79], "A": [69, 69, 71, 71], "T": [66, 64, 62, 62], "B": [50, 49, 47, 43]}  # D major
    score = music21.stream.Score()
    for voice in "BTAS":
        part = music21.stream.Part([music21.meter.TimeSignature("4/4")])
        part.append([music21.note.Note(midi=m, quarterLength=1) for m in lines[voice]])
        score.insert(0, part)
    path = tmp_path / "bass_first.musicxml"
    score.write("musicxml", fp=str(path))
    pitches, key, shift, meter, pickup = music.parse_chorale(path)
    assert pitches.shape == (4, 16) and meter == "4/4" and pickup == 0
    expected = np.repeat(np.array([lines[v] for v in "SATB"]), 4, axis=1) + shift
    assert np.array_equal(pitches, expected)
    tonic = music21.pitch.Pitch(key.split()[0]).pitchClass
    assert (tonic + shift) % 12 == (9 if key.endswith("minor") else 0)


def test_key_shift_is_the_nearest_way():
    assert music.key_shift(0, "major") == 0 and music.key_shift(9, "minor") == 0
    assert music.key_shift(7, "major") == 5  # G major -> C major: up a fourth
    assert music.key_shift(2, "minor") == -5  # D minor -> A minor: down a 4th
    for tonic in range(12):
        assert (tonic + music.key_shift(tonic, "major")) % 12 == 0
        assert (tonic + music.key_shift(tonic, "minor")) % 12 == 9


def test_bad_and_five_part_files_are_counted_not_fatal(sample):
    chorales, _, files = sample
    stats = chorales.stats
    assert stats["files"] == len(files) == 5
    assert stats["kept"] == 3 and stats["parsed"] == 4
    assert stats["skipped"] == {"5 parts": 1, **{k: 1 for k in stats["skipped"] if k.startswith("parse error")}}
    assert sum(stats["skipped"].values()) == 2


# ------------------------------------------------------------------------------------------------- cache


def test_cache_is_reused_without_parsing(sample, monkeypatch):
    chorales, root, files = sample

    def no_parsing(path):
        raise AssertionError(f"parsed {path} again instead of reading the cache")

    monkeypatch.setattr(music, "parse_chorale", no_parsing)
    again = music.bach_chorales(root=root, files=files)
    assert again.names == chorales.names and again.keys == chorales.keys
    assert all(np.array_equal(a, b) for a, b in zip(again.pitches, chorales.pitches))
    assert music.cache_path(root, files).name.startswith(f"chorales-music21-{music21.__version__}-")


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar"])
def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch, damage):
    files = corpus("bwv10.7.mxl")
    first = music.bach_chorales(root=tmp_path, files=files)
    path = music.cache_path(tmp_path, files)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-40] + bytes([data[-40] ^ 1]) + data[-39:])
    else:
        sidecar_path(path).unlink()
    calls = []
    real = music.parse_chorale
    monkeypatch.setattr(music, "parse_chorale", lambda p: calls.append(p) or real(p))
    again = music.bach_chorales(root=tmp_path, files=files)
    assert len(calls) == 1, "a damaged cache must be parsed again"
    assert path.read_bytes() == data and np.array_equal(again.pitches[0], first.pitches[0])


def test_no_chorale_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(music.CacheError, match="none of the 1 files"):
        music.bach_chorales(root=tmp_path, files=corpus(FIVE_PART))


# ------------------------------------------------------------------------------------------------- split


def test_split_is_by_chorale_seeded_and_deterministic():
    names = [f"bwv{i}.{j}" for i in range(60) for j in (1, 6)] + [f"bwv{i}.6-sc" for i in range(60)]
    train, test = music.split_names(names, test_fraction=0.2, seed=0)
    assert sorted(train + test) == sorted(names)
    assert not {music.chorale_id(n) for n in train} & {music.chorale_id(n) for n in test}
    for i in range(60):  # like bwv112.5 and bwv112.5-sc in the corpus: two editions of one chorale
        assert (f"bwv{i}.6" in train) == (f"bwv{i}.6-sc" in train), "two editions of one chorale split together"
    assert 0.15 < len(test) / len(names) < 0.25
    assert music.split_names(names, 0.2, seed=0) == (train, test)
    assert music.split_names(names, 0.2, seed=1) != (train, test)
    with pytest.raises(ValueError, match="test_fraction"):
        music.split_names(names, test_fraction=1.0)


def test_same_tune_or_edition_never_straddles_the_split(sample):
    chorales, _, _ = sample
    twin = chorales.pitches[0].copy()
    twin[1:] = np.roll(twin[1:], 3, axis=1)  # Bach's tune harmonised another way
    names = chorales.names + ["bwv9999.1", "bwv67.4-a"]  # the twin tune, and another edition of bwv67.4
    edition = np.where(chorales.pitches[1] != music.REST, chorales.pitches[1] + 1, music.REST)  # another melody
    alt = music.Chorales(chorales.pitches + [twin, edition], names, *[[None] * 5] * 4)
    groups = music.chorale_groups(alt)
    assert groups == ["bwv10.7", "bwv67.4", "bwv366", "bwv10.7", "bwv67.4"]
    for seed in range(20):
        test = music.split(alt, "test", test_fraction=0.5, seed=seed).names
        assert ("bwv10.7" in test) == ("bwv9999.1" in test) and ("bwv67.4" in test) == ("bwv67.4-a" in test)


def test_windows_come_from_one_split_and_start_on_bar_lines(sample):
    chorales, _, _ = sample
    train, test = music.split(chorales, "train", 0.34), music.split(chorales, "test", 0.34)
    assert set(train.names).isdisjoint(test.names) and len(train) + len(test) == len(chorales)
    x = music.windows(chorales, length=64, stride=16, meter=None)
    assert x.shape[1:] == (4, 64) and x.dtype == np.int16
    per_chorale = [len(range(pu, p.shape[1] - 63, 16)) for p, pu in zip(chorales.pitches, chorales.pickups)]
    assert len(x) == sum(per_chorale)
    # bwv67.4 opens with a quarter-note upbeat in 3/4; the other two start on a full bar
    assert chorales.pickups == [0, 4, 0] and chorales.meters == ["4/4", "3/4", "3/4"]
    second = chorales.pitches[1]
    assert np.array_equal(x[per_chorale[0]], second[:, 4:68]), "the first window starts after the upbeat"
    assert np.array_equal(x[per_chorale[0] + 1], second[:, 20:84])
    in_44 = music.windows(chorales, meter="4/4")
    assert len(in_44) == sum(n for n, m in zip(per_chorale, chorales.meters) if m == "4/4") < len(x)


# ------------------------------------------------------------------------------------------- representations


def test_roll_and_pitch_codes_round_trip_exactly_on_real_chorales(sample):
    chorales, _, _ = sample
    for pitches in chorales.pitches:
        roll = music.encode(pitches)
        assert roll.shape == (4, music.LEVELS, pitches.shape[1]) and roll.dtype == np.float32
        assert set(np.unique(roll)) == {-1.0, 1.0} and (roll.max(axis=1) == 1).all()
        assert np.array_equal(music.decode(roll), pitches)
        x = music.encode_pitch(pitches)
        assert x.shape == pitches.shape and -1 <= x.min() and x.max() <= 1
        assert np.array_equal(music.decode_pitch(x), pitches)
    w = music.windows(chorales, meter=None)
    assert np.array_equal(music.decode(music.encode(w)), w)  # batched too


def test_rests_and_out_of_range():
    x = np.array([[60, music.REST], [55, 55], [48, 50], [music.PITCH_LOW, music.PITCH_HIGH]], dtype=np.int16)
    roll = music.encode(x)
    assert roll[0, 0, 1] == 1, "a rest is row 0 of the roll"
    assert music.encode_pitch(x)[0, 1] == -1, "a rest is -1 in the continuous code"
    assert np.array_equal(music.decode(roll), x) and np.array_equal(music.decode_pitch(music.encode_pitch(x)), x)
    with pytest.raises(ValueError, match="MIDI"):
        music.encode(x + 40)


def test_compare_representations_measures_both(sample):
    chorales, _, _ = sample
    report = music.compare_representations(music.windows(chorales, meter=None, stride=4))
    for name in ("roll", "pitch"):
        assert report[name]["round_trip_error"] == 0
    assert report["roll"]["values_per_window"] == 4 * music.LEVELS * 64
    assert report["pitch"]["values_per_window"] == 4 * 64
    # the continuous code is the fragile one: neighbouring notes are 2 / (LEVELS - 1) apart
    assert report["pitch"]["error_at_noise_0.1"] > report["roll"]["error_at_noise_0.1"]
