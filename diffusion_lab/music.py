"""Music (chapter 11): Bach's four-part chorales as arrays, and the two ways to show them to a denoiser.

- `bach_chorales` parses the chorales bundled in music21's corpus once, keeps those with exactly four parts,
  puts them on a 16th-note grid in C major / A minor, and caches the result (an .npz with a size and SHA-256
  sidecar) under the data root, so every later load is a plain `np.load`;
- `split` / `windows` split by chorale (never by window; editions and tunes harmonised twice stay together) and
  cut fixed-length windows;
- `encode` / `decode` (a one-hot piano roll, voices as channels) and `encode_pitch` / `decode_pitch`
  (one continuous pitch per voice and step), and `compare_representations`, which measures the two.
- the model: `to_signal` / `from_signal` (the code it learns: a position on the C major scale plus a "raised"
  flag per voice), `chorale_denoiser` (the package UNet, 1-D), `train_chorales` (training.fit), `compose` and
  `harmonise` (sample.generate, the soprano as a known region), `sample_with_rules` (rule-guided sampling: the
  best of K candidates per step by `rule_violations`), `parse_melody` (a typed melody);
- evaluation: `evaluate` (key, ranges, crossings, parallel fifths and octaves, note lengths), the baselines
  `random_notes` and `MarkovVoices`, and `compare` (the model against both and held-out Bach, over seeds);
- listening: `synthesise` (a numpy organ), `wav_bytes`, `midi_bytes`; and `sample_command`, which
  `python -m diffusion_lab.sample` calls for a chorale checkpoint.

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
CLI_CANDIDATES = 8     # rule-guided sampling's candidates per step, the command line's default (1: the model alone)
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


# ----------------------------------------------------------------------------------------------------------
# The model's code: per voice and step, a continuous position on the C major scale plus a "sharp" flag
# ----------------------------------------------------------------------------------------------------------
# Chapter 11 measured three codes on one CPU thread at the same budget (the model card has the commands):
# - the folded piano roll, (4 * LEVELS, 64) channels with argmax decoding, still drew noise for alto, tenor and bass
#   after 1,200 steps: its loss had barely left the plateau of "every pitch off";
# - one continuous MIDI pitch per voice learned ranges and voice order within a few hundred steps, but its notes
#   came out chromatic (in key about 0.68, like random notes): a rounding error of one semitone usually leaves the
#   scale;
# - this code: the pitch as a step on the C major scale (C D E F G A B), continuous, and a second channel that
#   says "raised a semitone" (F#, G#, C#, ...). A rounding error of one step now lands on the neighbouring scale
#   note, and a chromatic note is a separate decision, as it is in the chorales (in C major / A minor, about 7% of
#   the notes are raised). Each voice is centred on the middle of its range, and half an octave (3.5 scale steps)
#   is one unit, so the values spread about as far as the noise schedules assume.
WINDOW = 64                                 # 4 bars of 4/4 in 16th notes
CENTRES = (70, 65, 58, 50)                  # mid-range of S, A, T, B in the transposed chorales (MIDI)
NATURALS = np.array([0, 2, 4, 5, 7, 9, 11])  # pitch classes of the C major scale
SCALE_STEPS_PER_UNIT = 3.5
SHAPE = (8, WINDOW)                         # channels 0-3: scale position of S, A, T, B; 4-7: their sharp flags


def to_scale(pitches) -> tuple[np.ndarray, np.ndarray]:
    """MIDI pitches -> (scale step number, 7 per octave from C-1; sharp 0 or 1): F#4 = (F4's step, 1)."""
    octave, pitch_class = np.divmod(np.asarray(pitches, dtype=np.int64), 12)
    index = np.searchsorted(NATURALS, pitch_class, side="right") - 1
    return 7 * octave + index, pitch_class - NATURALS[index]


def from_scale(step, sharp) -> np.ndarray:
    octave, index = np.divmod(np.asarray(step, dtype=np.int64), 7)
    return 12 * octave + NATURALS[index] + np.asarray(sharp, dtype=np.int64)


SCALE_CENTRES = to_scale(CENTRES)[0]


def fill_rests(pitches) -> np.ndarray:
    """Each rest takes the voice's previous note (or, at the start, its next one): the code has no rest, and the
    model is trained on windows without rests."""
    x = np.array(pitches, dtype=np.int16, copy=True)
    for line in x.reshape(-1, x.shape[-1]):
        notes = np.flatnonzero(line != REST)
        if notes.size == 0:
            raise ValueError("a voice rests for the whole window: there is nothing to hold")
        index = np.maximum.accumulate(np.where(line != REST, np.arange(len(line)), -1))
        line[:] = line[np.where(index < 0, notes[0], index)]
    return x


def to_signal(pitches) -> "torch.Tensor":
    """(..., 4, steps) pitches -> float32 tensor (..., 8, steps): channels 0-3 the scale position of each voice
    relative to its centre, in half-octaves; channels 4-7 +1 where the note is raised, -1 where not. Rests are
    filled by `fill_rests` first."""
    import torch

    step, sharp = to_scale(fill_rests(pitches))
    position = (step - SCALE_CENTRES[:, None]) / SCALE_STEPS_PER_UNIT
    return torch.from_numpy(np.concatenate([position, 2.0 * sharp - 1], axis=-2).astype(np.float32))


def from_signal(x) -> np.ndarray:
    """(..., 8, steps) codes -> int16 MIDI pitches: the nearest scale step, raised where the flag is > 0, clipped to
    the shared pitch range."""
    x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    step = np.rint(x[..., :4, :] * SCALE_STEPS_PER_UNIT + SCALE_CENTRES[:, None])
    pitches = from_scale(step, x[..., 4:, :] > 0)
    return np.clip(pitches, PITCH_LOW, PITCH_HIGH).astype(np.int16)


def training_windows(chorales: Chorales) -> np.ndarray:
    """The 4-bar windows of the training split that have no rest (the code has none): int16 (N, 4, 64)."""
    x = windows(split(chorales, "train"), WINDOW)
    return x[(x != REST).all(axis=(1, 2))]


def chorale_denoiser(channels=(48, 96, 128), dropout: float = 0.0, T: int = 1000, prediction: str = "v"):
    """An untrained Denoiser for 4-bar chorale windows: the package UNet in its 1-D layout (voices as channels,
    time as length), cosine schedule."""
    from .denoiser import Denoiser
    from .schedules import NoiseSchedule
    from .unet import UNet

    net = UNet(in_channels=SHAPE[0], channels=tuple(channels), dims="1d", attention=True, dropout=dropout)
    return Denoiser(net, prediction, NoiseSchedule.from_name("cosine", T), SHAPE)


def train_chorales(out=None, steps: int = 1200, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                   channels=(48, 96, 128), max_minutes: float = 0.0, ckpt_every: int = 100, progress: bool = True,
                   chorales: Chorales | None = None, device: str = "cpu"):
    """Fit `chorale_denoiser` on the training split's 4-bar windows with `training.fit` (resumable through `out`).

    Returns fit's FitResult; its `.denoiser` holds the EMA weights."""
    import torch

    from .training import FitConfig, fit, tensor_batches

    chorales = bach_chorales() if chorales is None else chorales
    x0 = to_signal(training_windows(chorales))
    config = FitConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=100, seed=seed, device=device,
                       ckpt_every=ckpt_every, log_every=50, max_minutes=max_minutes, p_uncond=0.0)
    torch.manual_seed(seed)
    denoiser = chorale_denoiser(channels)
    record = {"data": "music.training_windows(bach_chorales())", "windows": len(x0)}
    return fit(denoiser, tensor_batches(x0), config, checkpoint=out, progress=progress, record=record)


# ----------------------------------------------------------------------------------------------------------
# Generation and harmonisation
# ----------------------------------------------------------------------------------------------------------


def soprano_mask(n: int = 1, steps: int = WINDOW) -> "torch.Tensor":
    """(n, 8, steps): 1 on the soprano's two channels (known), 0 on alto, tenor and bass (generated)."""
    import torch

    mask = torch.zeros(n, SHAPE[0], steps)
    mask[:, [0, 4]] = 1
    return mask


def _check_candidates(candidates) -> int:
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"candidates must be a whole number >= 1 (1: the model alone), got {candidates!r}")
    return int(candidates)


def harmonise(denoiser, sopranos, seed: int = 0, sampler: str = "dpm++2m", steps: int = 20, resample: int = 1,
              batch_size: int = 256, candidates: int = 1) -> np.ndarray:
    """Alto, tenor and bass under given soprano lines, by inpainting: (N, steps) or (N, 4, steps) pitches in, whose
    soprano is kept exactly; int16 (N, 4, steps) out. The other voices of a (N, 4, steps) input are ignored.

    candidates = 1: the model alone, with `sampler`. candidates = K > 1: rule-guided ancestral sampling
    (`sample_with_rules`, K candidates per step; `sampler` and `resample` do not apply)."""
    from .sample import generate

    sopranos = np.asarray(sopranos)
    if sopranos.ndim == 2:
        sopranos = np.stack([sopranos] * 4, axis=1)  # placeholders under the mask: only the soprano is read
    if sopranos.ndim != 3 or sopranos.shape[1:] != (4, denoiser.shape[-1]):
        raise ValueError(f"sopranos must be (N, {denoiser.shape[-1]}) or (N, 4, {denoiser.shape[-1]}) pitches, "
                         f"got shape {sopranos.shape}")
    known, mask = to_signal(sopranos), soprano_mask(len(sopranos), sopranos.shape[-1])
    if _check_candidates(candidates) > 1:
        x0 = sample_with_rules(denoiser, len(known), candidates, steps=steps, seed=seed, known=known, mask=mask,
                               batch_size=batch_size)
    else:
        x0 = generate(denoiser, n=len(known), known=known, mask=mask, sampler=sampler, steps=steps,
                      resample=resample, seed=seed, batch_size=batch_size, clamp=None)
    out = from_signal(x0)
    out[:, 0] = sopranos[:, 0]  # the given line exactly, rests included (the code filled them)
    return out


def compose(denoiser, n: int, seed: int = 0, sampler: str = "dpm++2m", steps: int = 20,
            batch_size: int = 256, candidates: int = 1) -> np.ndarray:
    """n unconditional 4-bar fragments: int16 (n, 4, steps) pitches. candidates > 1: rule-guided, as in `harmonise`."""
    from .sample import generate

    if _check_candidates(candidates) > 1:
        return from_signal(sample_with_rules(denoiser, n, candidates, steps=steps, seed=seed, batch_size=batch_size))
    return from_signal(generate(denoiser, n=n, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
                                clamp=None))


def sample_with_rules(denoiser, n: int, candidates: int, steps: int = 20, seed: int = 0, known=None, mask=None,
                      batch_size: int = 256) -> "torch.Tensor":
    """Rule-guided ancestral sampling: n codes (n, 8, 64) whose decoded notes break few harmony rules.

    A plain ancestral (DDPM) step draws one x_{t_prev} from the model's posterior. Here each step draws
    `candidates` of them, asks the network for each one's clean estimate x0_hat, decodes it to notes, and keeps
    the candidate whose notes break fewest rules (`rule_violations`: parallel fifths and octaves, crossings). The
    network is not changed and the rules need no gradient: this is the stochastic control guidance of Huang et al.
    (2024) with its simplest policy, "keep the best of K". It costs K network evaluations per step instead of one.
    With `known`/`mask` (harmonisation) the known region is conditioned by replacement, as in `harmonise`.
    """
    import torch

    from .samplers import check_known_region, ddpm_posterior, predict, sampling_timesteps, with_known_region

    K, (shape, schedule) = _check_candidates(candidates), (tuple(denoiser.shape), denoiser.schedule)
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((n, *shape), generator=generator)
    if known is None:
        known, mask = torch.zeros_like(x_T), torch.zeros_like(x_T)
    known, mask = check_known_region(known, mask, x_T.shape)
    ts, device = sampling_timesteps(schedule.T, steps).tolist(), denoiser.device
    alpha_bar = lambda t: schedule.alpha_bars[t].to(device=device, dtype=torch.float32)  # noqa: E731
    out = []
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            x, k, m = (a[lo:lo + batch_size].to(device) for a in (x_T, known, mask))
            B, k_K, m_K = len(x), k.repeat(K, 1, 1), m.repeat(K, 1, 1)
            _, x0_hat = predict(with_known_region(denoiser, schedule, k, m, generator), x, ts[0], alpha_bar(ts[0]),
                                denoiser.prediction)
            model = with_known_region(denoiser, schedule, k_K, m_K, generator)  # scores K candidates at once
            for t, t_prev in zip(ts, ts[1:] + [-1]):
                mean, std = ddpm_posterior(schedule, x, x0_hat, t, t_prev)
                if t_prev < 0:
                    x = mean
                    break
                noise = torch.randn((K * B, *shape), generator=generator).to(device)
                tries = mean.repeat(K, 1, 1) + std * noise
                _, x0_tries = predict(model, tries, t_prev, alpha_bar(t_prev), denoiser.prediction)
                score = rule_violations(from_signal(m_K * k_K + (1 - m_K) * x0_tries)).reshape(K, B)
                best = torch.from_numpy(score.argmin(axis=0)).to(device) * B + torch.arange(B, device=device)
                x, x0_hat = tries[best], x0_tries[best]
            out.append((m * k + (1 - m) * x).cpu())
    return torch.cat(out)


NOTE_NAMES = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


def parse_melody(text: str, steps: int = WINDOW) -> np.ndarray:
    """A typed melody -> int16 (steps,) MIDI pitches on the 16th grid.

    Notes are separated by spaces: a letter, optional # or b, an octave, and optionally ':' and a length in quarter
    notes (default 1), e.g. "E5 E5 F5 G5 G5 F5 E5 D5 C5 C5 D5 E5 E5:1.5 D5:0.5 D5:2"; "R" (with a length) is a rest.
    A shorter melody is held on its last note to fill `steps`; a longer one is refused."""
    out = []
    for token in str(text).split():
        name, _, length = token.partition(":")
        try:
            quarters = float(length) if length else 1.0
        except ValueError:
            quarters = float("nan")
        count = quarters * STEPS_PER_QUARTER
        if not (count >= 1 and count == int(count)):
            raise ValueError(f"{token!r}: a length must be a whole number of 16th notes (0.25, 0.5, 1, 1.5, ...)")
        if name.upper() == "R":
            pitch = REST
        else:
            letter, accidental, octave = name[:1].upper(), name[1:-1], name[-1:]
            if letter not in NOTE_NAMES or accidental not in ("", "#", "b") or not octave.isdigit() or len(name) < 2:
                raise ValueError(f"{token!r} is not a note such as C5, F#4, Bb4 or R (a rest)")
            pitch = 12 * (int(octave) + 1) + NOTE_NAMES[letter] + {"": 0, "#": 1, "b": -1}[accidental]
            if not PITCH_LOW <= pitch <= PITCH_HIGH:
                raise ValueError(f"{token!r} (MIDI {pitch}) lies outside the model's range MIDI {PITCH_LOW}..{PITCH_HIGH}")
        out += [pitch] * int(count)
    if not out:
        raise ValueError("the melody is empty: type notes such as 'C5 D5 E5:2'")
    if len(out) > steps:
        raise ValueError(f"the melody lasts {len(out) / STEPS_PER_QUARTER:g} quarter notes; at most "
                         f"{steps / STEPS_PER_QUARTER:g} fit in one window")
    return np.array(out + [out[-1]] * (steps - len(out)), dtype=np.int16)


# ----------------------------------------------------------------------------------------------------------
# Evaluation: what music theory checks, per set of windows (N, 4, steps)
# ----------------------------------------------------------------------------------------------------------
SCALE = (0, 2, 4, 5, 7, 9, 11)  # C major = A natural minor's pitch classes


def voice_ranges(x, low: float = 1, high: float = 99) -> np.ndarray:
    """(4, 2): each voice's [low, high] percentile of sounding pitches in x, e.g. the training windows."""
    x = np.asarray(x)
    return np.array([np.percentile(x[:, v][x[:, v] != REST], [low, high]) for v in range(4)])


def note_lengths(x) -> np.ndarray:
    """The length in steps of every note of every voice: runs of one pitch (a roll cannot tell a repeated note
    from a held one, so repeats count as one longer note)."""
    out = []
    for voice in np.asarray(x).reshape(-1, np.shape(x)[-1]):
        change = np.flatnonzero(np.r_[True, voice[1:] != voice[:-1], True])
        runs = np.diff(change)
        out.append(runs[voice[change[:-1]] != REST])
    return np.concatenate(out) if out else np.zeros(0, int)


def _distribution(values, bins: int) -> np.ndarray:
    counts = np.bincount(np.clip(values, 0, bins - 1), minlength=bins).astype(float)
    return counts / max(1.0, counts.sum())


def _parallel_counts(x, intervals) -> np.ndarray:
    """(N,) per window: pairs of voices that move in the same direction from one vertical to the next and sound one
    of `intervals` (mod 12) in both. Verticals are the steps where any voice changes; between two of them nothing
    moves, so comparing every step with the one before counts exactly the same pairs of verticals."""
    x = np.asarray(x, dtype=np.int64)
    i, j = np.triu_indices(4, 1)
    a, b = x[:, i], x[:, j]                                           # (N, 6 pairs of voices, steps)
    interval = (a - b) % 12
    sounding = (a != REST) & (b != REST)
    da, db = np.diff(a, axis=-1), np.diff(b, axis=-1)
    same = (interval[..., 1:] == interval[..., :-1]) & np.isin(interval[..., 1:], intervals)
    moved = (da != 0) & (np.sign(da) == np.sign(db))
    return (same & moved & sounding[..., 1:] & sounding[..., :-1]).sum(axis=(1, 2))


def parallels(x, interval: int) -> int:
    """Parallel fifths (interval 7) or octaves/unisons (0) in windows x (N, 4, steps): pairs of voices that move in
    the same direction from one vertical to the next (verticals = steps where any voice changes) and sound that
    interval (mod 12) in both."""
    return int(_parallel_counts(x, [interval]).sum())


def crossings(x) -> np.ndarray:
    """(N,) per window: adjacent voices out of order (alto above soprano, ...), counted on every beat."""
    on_beat = np.asarray(x)[..., ::STEPS_PER_QUARTER]
    return ((on_beat[:, 1:] > on_beat[:, :-1]) & (on_beat[:, 1:] != REST) & (on_beat[:, :-1] != REST)).sum(axis=(1, 2))


def rule_violations(x) -> np.ndarray:
    """(N,) per window: parallel fifths + parallel octaves + voice crossings, the rules a harmony teacher checks
    first, as `evaluate` counts them. The score that rule-guided sampling (`sample_with_rules`) minimises."""
    return _parallel_counts(x, [0, 7]) + crossings(x)


def evaluate(x, reference, ranges=None) -> dict:
    """Music-theory statistics of windows x (N, 4, steps) against reference windows (held-out Bach).

    - pitch_class_distance: total variation between the pitch-class histograms (0 = same, 1 = disjoint);
    - in_key: share of sounding steps in C major / A natural minor;
    - range_violations: share of sounding steps outside each voice's `ranges` (default: the reference's 1-99%);
    - crossings_per_100_beats: adjacent voices out of order (alto above soprano, ...), counted on every beat;
    - parallel_fifths / parallel_octaves per 100 beats (see `parallels`);
    - note_length_distance: total variation between the note-length histograms (1..16+ steps), and the mean length.
    """
    x, reference = np.asarray(x), np.asarray(reference)
    ranges = voice_ranges(reference) if ranges is None else np.asarray(ranges)
    beats = x.shape[0] * x.shape[-1] / STEPS_PER_QUARTER
    sounding = x != REST
    pcs = lambda y: _distribution((y[y != REST] % 12).astype(int), 12)  # noqa: E731
    outside = sounding & ((x < ranges[None, :, :1]) | (x > ranges[None, :, 1:]))
    lengths, lengths_ref = note_lengths(x), note_lengths(reference)
    return {"pitch_class_distance": 0.5 * float(np.abs(pcs(x) - pcs(reference)).sum()),
            "in_key": in_key_share(x, SCALE),
            "range_violations": float(outside.sum() / max(1, sounding.sum())),
            "crossings_per_100_beats": 100 * float(crossings(x).sum()) / beats,
            "parallel_fifths_per_100_beats": 100 * parallels(x, 7) / beats,
            "parallel_octaves_per_100_beats": 100 * parallels(x, 0) / beats,
            "note_length_distance": 0.5 * float(np.abs(_distribution(lengths, 17) -
                                                       _distribution(lengths_ref, 17)).sum()),
            "mean_note_length": float(lengths.mean()) if lengths.size else float("nan")}


# ----------------------------------------------------------------------------------------------------------
# Two baselines
# ----------------------------------------------------------------------------------------------------------


def random_notes(n: int, ranges, lengths, seed: int = 0, steps: int = WINDOW, sopranos=None) -> np.ndarray:
    """Baseline 1: each voice draws chromatic pitches uniformly in its range, each held for a length drawn from
    `lengths` (e.g. Bach's note lengths). With `sopranos` (n, steps) the soprano is given and kept."""
    rng = np.random.default_rng(seed)
    ranges = np.rint(np.asarray(ranges)).astype(int)
    lengths = np.asarray(lengths)
    out = np.empty((n, 4, steps), dtype=np.int16)
    for i in range(n):
        for v in range(4):
            notes = []
            while len(notes) < steps:
                notes += [rng.integers(ranges[v, 0], ranges[v, 1] + 1)] * int(rng.choice(lengths))
            out[i, v] = notes[:steps]
    if sopranos is not None:
        out[:, 0] = sopranos
    return out


class MarkovVoices:
    """Baseline 2: one first-order Markov chain per voice over 16th-note steps (pitch -> next pitch), fitted on
    training windows with add-`alpha` smoothing among the pitches that voice sang. Each voice is in key and in range, but deaf to the others."""

    def __init__(self, x, alpha: float = 0.01):
        levels = _levels(np.asarray(x))  # (N, 4, steps) in 0..LEVELS-1
        self.start = np.stack([_distribution(levels[:, v, 0], LEVELS) for v in range(4)])
        counts = np.full((4, LEVELS, LEVELS), 0.0)
        for v in range(4):
            np.add.at(counts[v], (levels[:, v, :-1].ravel(), levels[:, v, 1:].ravel()), 1)
        # smooth among the levels each voice sang (never outside them); rows never left stay put (never reached)
        sung = np.stack([np.isin(np.arange(LEVELS), levels[:, v]) for v in range(4)])[:, None, :]  # (4, 1, LEVELS)
        counts = counts + alpha * sung * sung.transpose(0, 2, 1)
        empty = counts.sum(axis=2) == 0  # (4, LEVELS)
        counts[empty] = np.broadcast_to(np.eye(LEVELS), counts.shape)[empty]
        self.transitions = counts / counts.sum(axis=2, keepdims=True)

    def sample(self, n: int, seed: int = 0, steps: int = WINDOW, sopranos=None) -> np.ndarray:
        rng = np.random.default_rng(seed)
        levels = np.zeros((n, 4, steps), dtype=np.int64)
        for v in range(4):
            levels[:, v, 0] = rng.choice(LEVELS, size=n, p=self.start[v])
            for s in range(1, steps):
                cdf = self.transitions[v][levels[:, v, s - 1]].cumsum(axis=1)
                levels[:, v, s] = np.minimum((cdf < rng.random((n, 1))).sum(axis=1), LEVELS - 1)
        out = _pitches(levels)
        if sopranos is not None:
            out[:, 0] = sopranos
        return out


# ----------------------------------------------------------------------------------------------------------
# Listening: a numpy organ, and MIDI files
# ----------------------------------------------------------------------------------------------------------
SAMPLE_RATE = 22_050
HARMONICS = (1.0, 0.5, 0.25, 0.12, 0.06)  # amplitudes of partials 1..5: a soft flue-pipe colour


def synthesise(pitches, seconds_per_step: float = 0.1, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(4, steps) pitches -> float32 mono audio in [-1, 1]: each note a sum of harmonics with a 10 ms attack and a
    40 ms release (so repeated pitches are heard as one held note, as the roll stores them)."""
    pitches = np.asarray(pitches)
    total = int(round(pitches.shape[-1] * seconds_per_step * sample_rate))
    audio = np.zeros(total, dtype=np.float64)
    for voice in pitches:
        change = np.flatnonzero(np.r_[True, voice[1:] != voice[:-1], True])
        for a, b in zip(change[:-1], change[1:]):
            if voice[a] == REST:
                continue
            start, stop = int(a * seconds_per_step * sample_rate), int(b * seconds_per_step * sample_rate)
            t = np.arange(stop - start) / sample_rate
            freq = 440.0 * 2 ** ((int(voice[a]) - 69) / 12)
            tone = sum(amp * np.sin(2 * np.pi * k * freq * t) for k, amp in enumerate(HARMONICS, 1)
                       if k * freq < sample_rate / 2)
            envelope = np.minimum(1, np.minimum(t / 0.01, (t[-1] - t) / 0.04 + 1e-9))
            audio[start:stop] += tone * np.clip(envelope, 0, 1)
    peak = np.abs(audio).max()
    return (audio / peak * 0.9 if peak > 0 else audio).astype(np.float32)


def wav_bytes(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit mono PCM WAV of float audio in [-1, 1]."""
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def _varlen(n: int) -> bytes:
    out = [n & 0x7F]
    while n > 0x7F:
        n >>= 7
        out.insert(0, (n & 0x7F) | 0x80)
    return bytes(out)


def midi_bytes(pitches, tempo_bpm: float = 150.0) -> bytes:
    """(4, steps) pitches -> a Standard MIDI File (format 1): one track per voice, on channels 1-4, organ (19)."""
    ticks_per_step = 120  # 480 ticks per quarter note
    tempo = round(60_000_000 / tempo_bpm)
    tracks = [b"\x00\xff\x51\x03" + tempo.to_bytes(3, "big") + b"\x00\xff\x2f\x00"]
    for v, voice in enumerate(np.asarray(pitches)):
        events, last = [bytes([0, 0xC0 | v, 19])], 0
        change = np.flatnonzero(np.r_[True, voice[1:] != voice[:-1], True])
        for a, b in zip(change[:-1], change[1:]):
            if voice[a] == REST:
                continue
            p = int(voice[a])
            events.append(_varlen((a - last) * ticks_per_step) + bytes([0x90 | v, p, 80]))
            events.append(_varlen((b - a) * ticks_per_step) + bytes([0x80 | v, p, 0]))
            last = b
        events.append(b"\x00\xff\x2f\x00")
        tracks.append(b"".join(events))
    head = b"MThd" + (6).to_bytes(4, "big") + (1).to_bytes(2, "big") + len(tracks).to_bytes(2, "big") \
        + (4 * ticks_per_step).to_bytes(2, "big")
    return head + b"".join(b"MTrk" + len(t).to_bytes(4, "big") + t for t in tracks)


# ----------------------------------------------------------------------------------------------------------
# The command line: python -m diffusion_lab.sample --checkpoint bach-chorales ... (sample.run dispatches here)
# ----------------------------------------------------------------------------------------------------------


def is_chorale_model(denoiser) -> bool:
    return tuple(denoiser.shape) == SHAPE


def test_sopranos(n: int, seed: int = 0, chorales: Chorales | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n held-out 4-bar windows, drawn without repeats (then cycling) in a seeded order: (windows (n, 4, 64),
    their indices into windows(split(bach_chorales(), "test"), 64))."""
    test = windows(split(bach_chorales() if chorales is None else chorales, "test"), WINDOW)
    order = np.random.default_rng(seed).permutation(len(test))
    index = order[np.arange(n) % len(test)]
    return test[index], index


def sample_command(denoiser, args, checkpoint_file: str, sha256: str | None) -> dict:
    """`python -m diffusion_lab.sample` for a chorale model: write `rolls` int16 (N, 4, 64), -1 = rest, voices
    S, A, T, B, one 16th per step; with --soprano-from test also `soprano_index` into the held-out windows.
    --midi / --wav write one file per sample into those folders."""
    import json
    import time

    from .utils import atomic_write_bytes

    if not is_chorale_model(denoiser):
        raise ValueError(f"--soprano-from, --midi, --wav and --candidates need a chorale model (samples of shape "
                         f"{SHAPE}); {args.checkpoint} makes {tuple(denoiser.shape)}")
    unused = [flag for flag, value in (("--grid", args.grid), ("--slant", args.slant),
                                       ("--thickness", args.thickness), ("--evaluate", args.evaluate or None),
                                       ("--clip-x0", args.clip_x0)) if value is not None]
    if args.labels.strip().lower() not in ("cycle", "none"):
        unused.append("--labels")
    if unused:
        raise ValueError(f"{', '.join(unused)}: for digit models only; {args.checkpoint} is a chorale model")
    if args.steps > denoiser.schedule.T:
        raise ValueError(f"--steps {args.steps} is more than the model's T={denoiser.schedule.T} diffusion steps")
    candidates = CLI_CANDIDATES if args.candidates is None else args.candidates
    if candidates < 1:
        raise ValueError(f"--candidates must be at least 1 (1: the model alone), got {candidates}")
    for flag, folder in zip(("--midi", "--wav"), (args.midi, args.wav)):
        if folder is not None and (not str(folder).strip() or Path(folder).expanduser().is_file()):
            raise ValueError(f"{flag} must name a folder, got {folder!r}")
    start = time.perf_counter()
    if args.soprano_from == "test":
        sopranos, index = test_sopranos(args.n, args.seed)
        rolls = harmonise(denoiser, sopranos, seed=args.seed, sampler=args.sampler, steps=args.steps,
                          batch_size=args.batch_size, candidates=candidates)
    else:
        index = None
        rolls = compose(denoiser, args.n, seed=args.seed, sampler=args.sampler, steps=args.steps,
                        batch_size=args.batch_size, candidates=candidates)
    seconds = time.perf_counter() - start
    sampler = args.sampler if candidates == 1 else f"ddpm, rule-guided ({candidates} candidates per step)"
    meta = {"checkpoint": str(args.checkpoint), "file": str(checkpoint_file), "sha256": sha256,
            "sha256_verified": sha256 is not None, "sampler": sampler, "candidates": candidates, "steps": args.steps,
            "seed": args.seed,
            "n": args.n, "soprano_from": args.soprano_from, "voices": list(VOICES), "steps_per_quarter":
            STEPS_PER_QUARTER, "rest": REST, "key": "C major / A minor", "seconds": round(seconds, 3)}
    arrays = {"rolls": rolls.astype(np.int16), "meta": np.array(json.dumps(meta))}
    if index is not None:
        arrays["soprano_index"] = index.astype(np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(args.out, buffer.getvalue())
    summary = {"out": str(args.out), "n": args.n, "seconds": meta["seconds"]}
    for flag, folder, suffix, render in (("midi", args.midi, "mid", midi_bytes),
                                         ("wav", args.wav, "wav", lambda r: wav_bytes(synthesise(r)))):
        if folder is not None:
            Path(folder).expanduser().mkdir(parents=True, exist_ok=True)
            for i, roll in enumerate(rolls):
                atomic_write_bytes(Path(folder).expanduser() / f"chorale-{i:04d}.{suffix}", render(roll))
            summary[flag] = str(folder)
    return summary


# ----------------------------------------------------------------------------------------------------------
# The comparison the chapter reports: the model against held-out Bach and the two baselines, over seeds
# ----------------------------------------------------------------------------------------------------------


def compare(denoiser, seeds=(0, 1, 2), n: int | None = None, steps: int = 20, chorales: Chorales | None = None,
            progress=None, candidates: int = CLI_CANDIDATES) -> dict:
    """Harmonise every held-out soprano (or the first n windows) and compose as many fragments, once per seed; score
    them and both baselines (given the same sopranos) against the held-out windows with `evaluate`. "diffusion" is
    the model alone (DPM-Solver++(2M)); "diffusion + rules" is rule-guided sampling with `candidates` per step.

    Returns {"n", "seeds", "steps", "candidates", "rows": {task: {method: {metric: [one value per seed]}}}}; the
    ceiling "bach" (held-out windows against themselves: distances 0) and "bach-train" (as many training windows)
    appear once."""
    chorales = bach_chorales() if chorales is None else chorales
    train, test = windows(split(chorales, "train"), WINDOW), windows(split(chorales, "test"), WINDOW)
    test = test if n is None else test[:n]
    ranges, lengths = voice_ranges(train), note_lengths(train)
    markov = MarkovVoices(train)
    pick = np.random.default_rng(0).choice(len(train), size=len(test), replace=False)
    rows = {"harmonise": {}, "compose": {}}
    add = lambda task, method, x: [rows[task].setdefault(method, {}).setdefault(k, []).append(v)  # noqa: E731
                                   for k, v in evaluate(x, test, ranges).items()]
    add("harmonise", "bach", test)
    add("harmonise", "bach-train", train[pick])
    for seed in seeds:
        sopranos = test[:, 0]
        add("harmonise", "diffusion", harmonise(denoiser, sopranos, seed=seed, steps=steps))
        add("harmonise", "diffusion + rules", harmonise(denoiser, sopranos, seed=seed, steps=steps,
                                                        candidates=candidates))
        add("harmonise", "markov", markov.sample(len(test), seed=seed, sopranos=sopranos))
        add("harmonise", "random", random_notes(len(test), ranges, lengths, seed=seed, sopranos=sopranos))
        add("compose", "diffusion", compose(denoiser, len(test), seed=seed, steps=steps))
        add("compose", "diffusion + rules", compose(denoiser, len(test), seed=seed, steps=steps, candidates=candidates))
        add("compose", "markov", markov.sample(len(test), seed=seed))
        add("compose", "random", random_notes(len(test), ranges, lengths, seed=seed))
        if progress is not None:
            progress(seed)
    return {"n": int(len(test)), "seeds": list(seeds), "steps": steps, "candidates": candidates,
            "ranges": ranges.tolist(), "rows": rows}


def summary_table(result: dict) -> str:
    """A markdown table of `compare`'s result: mean ± std over seeds (std omitted for one value)."""
    metrics = list(next(iter(result["rows"]["harmonise"].values())))
    head = "| task | method | " + " | ".join(m.replace("_", " ") for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 2)]
    for task, methods in result["rows"].items():
        for method, values in methods.items():
            cells = [f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else "") for v in values.values()]
            lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
