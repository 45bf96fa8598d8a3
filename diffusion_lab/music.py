"""Music (chapter 11): Bach's four-part chorales as arrays, and the two ways to show them to a denoiser.

- `bach_chorales` parses the chorales bundled in music21's corpus once, keeps those with exactly four parts,
  puts them on a 16th-note grid in C major / A minor, and caches the result (an .npz with a size and SHA-256
  sidecar) under the data root, so every later load is a plain `np.load`;
- `split` / `windows` split by chorale (never by window; editions and tunes harmonised twice stay together) and
  cut fixed-length windows;
- `encode` / `decode` (a one-hot piano roll, voices as channels) and `encode_pitch` / `decode_pitch`
  (one continuous pitch per voice and step), and `compare_representations`, which measures the two.

A chorale is an int16 array `pitches` of shape (4, steps): MIDI note numbers, voices ordered S, A, T, B,
one 16th note per step, REST (-1) where a voice is silent.
"""
from __future__ import annotations

import hashlib
import io
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import default_root
from .utils import CacheError, read_pinned, verified_cache, write_pinned

REST = -1
VOICES = ("soprano", "alto", "tenor", "bass")
STEPS_PER_QUARTER = 4  # the 16th-note grid
SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn")  # the corpus folder also holds Roman-numeral analyses (.rntxt)

# The shared pitch axis: MIDI 30 (F#1) .. 84 (C6). The kept chorales, in C major / A minor, span 31..84
# (bach_chorales().pitch_range(): bass 31..67, tenor 44..74, alto 48..79, soprano 52..84); one more row below
# makes 55 pitches + 1 rest = 56 levels, which a UNet can halve three times.
PITCH_LOW, PITCH_HIGH = 30, 84


@dataclass
class Chorales:
    """Parsed chorales: `pitches[i]` is chorale i's (4, steps) int16 array; the rest is one entry per chorale."""

    pitches: list[np.ndarray]
    names: list[str]      # the corpus file's stem, e.g. "bwv1.6"
    keys: list[str]       # the key music21's analysis found in the original, e.g. "F major"
    shifts: list[int]     # semitones added to reach C major / A minor (subtract them to get Bach's key back)
    meters: list[str]     # the first time signature, e.g. "4/4"
    pickups: list[int]    # steps before the first full bar (the anacrusis)
    stats: dict = field(default_factory=dict)  # counts, skip reasons, parse time (from the cache's sidecar)

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, names) -> "Chorales":
        wanted = set(names)
        keep = [i for i, n in enumerate(self.names) if n in wanted]
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        return Chorales(pick(self.pitches), pick(self.names), pick(self.keys), pick(self.shifts),
                        pick(self.meters), pick(self.pickups), self.stats)

    def pitch_range(self) -> dict[str, tuple[int, int]]:
        """The lowest and highest MIDI note of each voice over these chorales."""
        out = {}
        for v, voice in enumerate(VOICES):
            notes = np.concatenate([p[v][p[v] != REST] for p in self.pitches])
            out[voice] = (int(notes.min()), int(notes.max()))
        return out


# ----------------------------------------------------------------------------------------------------------
# Parsing one file
# ----------------------------------------------------------------------------------------------------------


class Skip(Exception):
    """This file is not a four-part chorale we can use; the message is the reason, counted in the stats."""


def corpus_files() -> list[Path]:
    """The score files of the Bach folder in music21's corpus, sorted by name."""
    import music21

    folder = Path(music21.__file__).parent / "corpus" / "bach"
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SCORE_SUFFIXES)


def key_shift(tonic_pitch_class: int, mode: str) -> int:
    """Semitones in -6..5 that take this key to C major (or A minor): the nearest way, so voices move least."""
    target = 9 if mode == "minor" else 0
    return (target - tonic_pitch_class + 6) % 12 - 6


def parse_chorale(path: str | os.PathLike):
    """One file -> (pitches (4, steps) int16 in C major / A minor, key name, shift, meter, pickup). Raises Skip."""
    from music21 import chord, converter

    try:
        score = converter.parse(str(path))
    except Exception as err:  # music21 raises many types for a bad file; any of them means "skip and count"
        raise Skip(f"parse error ({type(err).__name__})") from err
    parts = list(getattr(score, "parts", []))
    if len(parts) != 4:
        raise Skip(f"{len(parts)} parts")
    steps = round(float(score.highestTime) * STEPS_PER_QUARTER)
    pitches = np.full((4, steps), REST, dtype=np.int16)
    for v, part in enumerate(parts):
        for element in part.flatten().notesAndRests:
            if element.isRest or element.duration.quarterLength == 0:  # rests stay REST; grace notes take no time
                continue
            start = round(float(element.offset) * STEPS_PER_QUARTER)
            end = round(float(element.offset + element.duration.quarterLength) * STEPS_PER_QUARTER)
            # a chord inside one voice (rare divisi) keeps its outer note: the top for S/A, the bottom for T/B
            notes = [p.midi for p in element.pitches] if isinstance(element, chord.Chord) else [element.pitch.midi]
            pitches[v, start:end] = max(notes) if v < 2 else min(notes)
    if (pitches == REST).all(axis=1).any():
        raise Skip("a silent part")
    # the corpus lists parts S, A, T, B; order by mean pitch anyway, so a file listing them bass first still works
    means = [pitches[v][pitches[v] != REST].mean() for v in range(4)]
    pitches = pitches[np.argsort(means)[::-1]]

    key = score.analyze("key")  # Krumhansl-Schmuckler over the whole chorale
    shift = key_shift(key.tonic.pitchClass, key.mode)
    pitches[pitches != REST] += shift
    signatures = list(score.recurse().getElementsByClass("TimeSignature"))
    meter = signatures[0].ratioString if signatures else "?"
    first_bar = parts[0].getElementsByClass("Measure")
    pickup = 0
    if len(first_bar) and first_bar[0].barDuration.quarterLength > first_bar[0].duration.quarterLength:
        pickup = round(float(first_bar[0].duration.quarterLength) * STEPS_PER_QUARTER)
    return pitches, f"{key.tonic.name} {key.mode}", shift, meter, pickup


# ----------------------------------------------------------------------------------------------------------
# The cache: parse once, then np.load
# ----------------------------------------------------------------------------------------------------------


def music21_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("music21")


def cache_path(root: str | os.PathLike | None = None, files=None) -> Path:
    """<root>/bach_chorales/chorales-music21-<version>[-<files hash>].npz: parsing depends on music21's version,
    so a new version gets a new file; a chosen list of files (tests) gets its own file beside the full corpus."""
    root = Path(root) if root is not None else default_root()
    name = f"chorales-music21-{music21_version()}"
    if files is not None:
        listing = "\n".join(sorted(str(Path(f).resolve()) for f in files))
        name += "-" + hashlib.sha256(listing.encode()).hexdigest()[:12]
    return root / "bach_chorales" / f"{name}.npz"


def build_cache(path: Path, files=None) -> dict:
    """Parse every file, write the .npz and then its sidecar (size, SHA-256, counts), each atomically.

    The sidecar is written last: a kill between the two leaves a sidecar that does not match, so the next load
    parses again rather than trusting a half-finished cache."""
    files = corpus_files() if files is None else [Path(f) for f in files]
    start = time.perf_counter()
    kept, skipped = [], Counter()
    for f in files:
        try:
            kept.append((f.stem, *parse_chorale(f)))
        except Skip as reason:
            skipped[str(reason)] += 1
    seconds = time.perf_counter() - start
    if not kept:
        raise CacheError(f"none of the {len(files)} files is a four-part chorale ({dict(skipped)})")
    names, pitches, keys, shifts, meters, pickups = zip(*kept)
    lengths = [p.shape[1] for p in pitches]
    buffer = io.BytesIO()
    np.savez(buffer, pitches=np.concatenate(pitches, axis=1),  # (4, total steps): chorales end to end
             offsets=np.cumsum([0, *lengths]).astype(np.int64), names=np.array(names), keys=np.array(keys),
             shifts=np.array(shifts, dtype=np.int8), meters=np.array(meters), pickups=np.array(pickups, np.int64))
    parsed = len(files) - sum(n for r, n in skipped.items() if r.startswith("parse error"))
    return write_pinned(path, buffer.getvalue(), music21=music21_version(), files=len(files), parsed=parsed,
                        kept=len(kept), skipped=dict(sorted(skipped.items())), parse_seconds=round(seconds, 2))


def bach_chorales(root: str | os.PathLike | None = None, files=None) -> Chorales:
    """All four-part chorales of music21's Bach corpus, in C major / A minor, on a 16th-note grid (chapter 11).

    The first call parses the MusicXML (a minute or so) and caches the arrays under <root>/bach_chorales;
    later calls read the cache once it matches its sidecar's size and SHA-256, and parse again when it does not.
    `files` parses just those files (tests). Files that fail to parse, or are not four-part, are skipped and
    counted in `.stats["skipped"]`.

    Why transpose rather than augment: about 350 chorales spread over a dozen keys give few examples of each
    key; moving all to C major / A minor lets the model spend its capacity on voice leading and harmony, and
    makes "in key" a fixed set of pitch classes. `.shifts` keeps the way back, and transposing windows by a few
    semitones at training time remains possible on top.
    """
    path = cache_path(root, files)
    stats = read_pinned(path)
    if stats is None:  # missing, cut off, changed, or its sidecar lost: parse again
        stats = build_cache(path, files)
    fix = f"Delete {path.parent} and call bach_chorales() again."
    verified_cache(path, stats["bytes"], stats["sha256"], build=None, fix=fix)
    with np.load(path, allow_pickle=False) as z:
        offsets = z["offsets"]
        flat = z["pitches"]
        pitches = [flat[:, a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        return Chorales(pitches, z["names"].tolist(), z["keys"].tolist(), z["shifts"].astype(int).tolist(),
                        z["meters"].tolist(), z["pickups"].astype(int).tolist(), stats)


# ----------------------------------------------------------------------------------------------------------
# Split by chorale, then windows
# ----------------------------------------------------------------------------------------------------------


def chorale_id(name: str) -> str:
    """The chorale a file holds: "bwv18.5-lz" and "bwv18.5-w" are two editions of "bwv18.5"."""
    return name.split("-")[0]


def melody(pitches: np.ndarray) -> bytes:
    """The soprano's notes with repeats and rests removed (in C major / A minor): the hymn tune, as a key."""
    s = pitches[0][pitches[0] != REST]
    return s[np.r_[True, s[1:] != s[:-1]]].tobytes()


def chorale_groups(chorales: Chorales) -> list[str]:
    """One label per chorale; chorales that must not be split apart share it.

    Two files are one group when they are editions of one chorale (same `chorale_id`) or harmonise the same
    tune (same `melody`): the corpus holds the same chorale under two numbers (bwv274 and bwv62.6 parse to the
    same arrays) and many tunes harmonised twice, and a held-out soprano must not have been seen in training."""
    parent = list(range(len(chorales)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict = {}
    for i, (name, pitches) in enumerate(zip(chorales.names, chorales.pitches)):
        for key in (("id", chorale_id(name)), ("melody", melody(pitches))):
            j = first.setdefault(key, i)
            parent[root(i)] = root(j)
    labels = {}  # each group is named after its first chorale
    return [labels.setdefault(root(i), chorales.names[root(i)]) for i in range(len(chorales))]


def split_names(names, test_fraction: float = 0.1, seed: int = 0, groups=None) -> tuple[list[str], list[str]]:
    """(train names, test names): a seeded shuffle of whole groups of chorales (by default `chorale_id`), never of
    windows, so no chorale is in both."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    names = list(names)
    groups = [chorale_id(n) for n in names] if groups is None else list(groups)
    ids = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = max(1, round(test_fraction * len(ids))) if len(ids) > 1 else 0
    test_ids = {ids[i] for i in order[:n_test]}
    return ([n for n, g in zip(names, groups) if g not in test_ids],
            [n for n, g in zip(names, groups) if g in test_ids])


def split(chorales: Chorales, which: str, test_fraction: float = 0.1, seed: int = 0) -> Chorales:
    """The "train" or "test" chorales: whole `chorale_groups` go to one side (chapter 11 holds out 10%)."""
    if which not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {which!r}")
    train, test = split_names(chorales.names, test_fraction, seed, chorale_groups(chorales))
    return chorales.subset(train if which == "train" else test)


def windows(chorales: Chorales, length: int = 64, stride: int = 16, meter: str | None = "4/4") -> np.ndarray:
    """Every window of `length` steps (64 = 4 bars of 4/4) that starts on a bar line, as int16 (N, 4, length).

    Windows start at the end of the pickup and then every `stride` steps; `meter` keeps only chorales in that
    time signature (None keeps all), so that 64 steps are 4 whole bars. Cut one split at a time."""
    if length < 1 or stride < 1:
        raise ValueError(f"length and stride must be positive, got {length} and {stride}")
    out = [p[:, s:s + length]
           for p, m, pickup in zip(chorales.pitches, chorales.meters, chorales.pickups) if meter in (None, m)
           for s in range(pickup, p.shape[1] - length + 1, stride)]
    return np.stack(out) if out else np.zeros((0, 4, length), dtype=np.int16)


# ----------------------------------------------------------------------------------------------------------
# Two representations for a denoiser, both in [-1, 1]
# ----------------------------------------------------------------------------------------------------------
# Row 0 of the roll's pitch axis is the rest; row 1 + (p - PITCH_LOW) is MIDI pitch p. The continuous code uses
# the same levels, spread evenly over [-1, 1], so a rest is "one level below the lowest note".
LEVELS = PITCH_HIGH - PITCH_LOW + 2


def _levels(pitches) -> np.ndarray:
    pitches = np.asarray(pitches)
    notes = pitches[pitches != REST]
    if notes.size and (notes.min() < PITCH_LOW or notes.max() > PITCH_HIGH):
        raise ValueError(f"pitches must lie in MIDI {PITCH_LOW}..{PITCH_HIGH} (or be {REST} for a rest), "
                         f"got {notes.min()}..{notes.max()}")
    return np.where(pitches == REST, 0, pitches.astype(np.int64) - PITCH_LOW + 1)


def _pitches(levels: np.ndarray) -> np.ndarray:
    return np.where(levels == 0, REST, levels + PITCH_LOW - 1).astype(np.int16)


def encode(pitches) -> np.ndarray:
    """Piano roll: (..., 4, steps) pitches -> float32 (..., 4, LEVELS, steps), +1 at each voice's note (or rest
    row), -1 elsewhere. Voices are channels; pitch x time is the image, so a transposition is a vertical shift."""
    levels = _levels(pitches)
    roll = np.full((*levels.shape[:-1], LEVELS, levels.shape[-1]), -1.0, dtype=np.float32)
    np.put_along_axis(roll, levels[..., None, :], 1.0, axis=-2)
    return roll


def decode(roll) -> np.ndarray:
    """(..., 4, LEVELS, steps) -> int16 (..., 4, steps): the argmax per voice and step, so each voice sings one
    note (or rests) at a time."""
    return _pitches(np.asarray(roll).argmax(axis=-2))


def encode_pitch(pitches) -> np.ndarray:
    """Continuous pitch: (..., 4, steps) -> float32 (..., 4, steps) in [-1, 1], -1 for a rest."""
    return (_levels(pitches) * (2 / (LEVELS - 1)) - 1).astype(np.float32)


def decode_pitch(x) -> np.ndarray:
    """(..., 4, steps) in [-1, 1] -> int16 pitches: the nearest level (clipped to the range)."""
    levels = np.rint((np.clip(np.asarray(x, dtype=np.float64), -1, 1) + 1) * ((LEVELS - 1) / 2)).astype(np.int64)
    return _pitches(levels)


def in_key_share(pitches, pitch_classes=(0, 2, 4, 5, 7, 9, 11)) -> float:
    """The share of sounding steps whose pitch class is in the scale (C major = A natural minor's notes)."""
    notes = np.asarray(pitches)[np.asarray(pitches) != REST]
    return float(np.isin(notes % 12, pitch_classes).mean()) if notes.size else float("nan")


def compare_representations(x: np.ndarray, noise=(0.01, 0.1, 0.3, 0.5), seed: int = 0) -> dict:
    """Measure the roll and the continuous code on real windows x (N, 4, steps), without training anything.

    - values per window, and the share of steps that decode(encode(x)) gets wrong (both should be 0);
    - rests: how each code marks them, and the share of rest steps in x;
    - robustness: the share of steps decoded wrongly after adding Gaussian noise of each std to the code
      (a denoiser's x0_hat is never exact);
    - blending: decode the mean of two different windows' codes, which is what a denoiser unsure between
      them predicts under a squared loss; report the share of decoded notes in key (the windows themselves are
      nearly all in key) and the share that are neither window's note.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x)
    codes = {"roll": (encode, decode), "pitch": (encode_pitch, decode_pitch)}
    partner = x[rng.permutation(len(x))]
    out = {"windows": int(len(x)), "rest_share": float((x == REST).mean()), "in_key_share_data": in_key_share(x)}
    for name, (enc, dec) in codes.items():
        code = enc(x)
        row = {"values_per_window": int(np.prod(code.shape[1:])),
               "round_trip_error": float((dec(code) != x).mean())}
        for std in noise:
            noisy = code + rng.standard_normal(code.shape).astype(np.float32) * std
            row[f"error_at_noise_{std}"] = float((dec(noisy) != x).mean())
        blend = dec((code + enc(partner)) / 2)
        row["blend_in_key_share"] = in_key_share(blend)
        row["blend_neither_share"] = float(((blend != x) & (blend != partner)).mean())
        out[name] = row
    return out
