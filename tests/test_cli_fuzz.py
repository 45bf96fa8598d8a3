"""Fuzz every command line `python -m diffusion_lab.*` over its argument space, with hypothesis.

Each CLI's `main(argv)` runs in-process, with stdout and stderr captured and the working folder set to a fresh
temporary folder. Whatever the arguments, the contract is:
- it succeeds (exit 0, its output complete), or it exits with 1 (`error: ...`) or 2 (argparse) and one line that
  says what is wrong; never a traceback (any other exception fails the test);
- no output file is left half-written: every file it writes is complete, a file that was there before a failed
  run is untouched, and no temporary or lock file is left behind.

The argument space is read from each CLI's own parser, so a new flag is fuzzed without editing this file; the
values of flags that set an amount of work (images, steps, epochs) stay tiny, and so does every integer.
Malformed input files (truncated, empty and random `.safetensors`, a file of the wrong kind, a folder) are among
the values of every flag that reads a checkpoint (and, copied into the run's folder, of train's --out, which it
resumes). A fixed example count and derandomize=True make every run the same; the module takes about 15 s here.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import diffusion_lab
from diffusion_lab import (autoencoder, distill, edit, lora, metrics, music, sample, tiny_sd, training, video,
                           watermark)
from diffusion_lab.checkpoint import load_checkpoint
from diffusion_lab.denoiser import save_denoiser

pytestmark = pytest.mark.usefixtures("one_thread")

# The CLIs fuzzed here: module -> (main, parser factory). test_every_cli_is_fuzzed keeps this list complete.
CLIS = {
    "diffusion_lab.sample": (sample.main, sample._parser),
    "diffusion_lab.train": (training.main, training._parser),
    "diffusion_lab.metrics": (metrics.main, metrics._parser),
    "diffusion_lab.edit": (edit.main, edit._parser),
    "diffusion_lab.watermark": (watermark.main, watermark._parser),
    "diffusion_lab.distill": (distill.main, distill._parser),
}


def fuzz_settings(n: int):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------- input files

REPO = Path(diffusion_lab.__file__).resolve().parent.parent
CLASSIFIER_FILE = str(REPO / "checkpoints" / "mnist-classifier.safetensors")  # valid safetensors, not a denoiser
MALFORMED = ["truncated.safetensors", "empty.safetensors", "random.safetensors", "huge-header.safetensors",
             "folder.safetensors", "missing.safetensors"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder with one tiny trained checkpoint (made by the training CLI itself) and malformed inputs."""
    folder = tmp_path_factory.mktemp("inputs")
    tiny = folder / "tiny.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        assert training.main(["--out", str(tiny), "--steps", "1", "--batch-size", "2", "--channels", "8", "16", "16",
                              "--attention", "0", "--T", "20", "--device", "cpu", "--quiet"]) == 0
    blob = tiny.read_bytes()
    (folder / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "random.safetensors").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    (folder / "huge-header.safetensors").write_bytes((2**40).to_bytes(8, "little") + b'{"a": 1}')
    (folder / "folder.safetensors").mkdir()
    shutil.copyfile(tiny, folder / "existing.safetensors")  # a run to resume (or to refuse to resume)
    np.savez(folder / "existing.npz", images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros(2, np.int64))
    # chapter 09 (edit, --lora): a LoRA for the tiny model, one for another base, digits and masks to edit
    from diffusion_lab.denoiser import load_denoiser
    from diffusion_lab.utils import file_sha256

    for name, base_sha in (("tiny-lora", file_sha256(tiny)), ("other-lora", "0" * 64)):
        net = load_denoiser(tiny, device="cpu").net
        lora.add_lora(net, rank=1)
        lora.save_lora(folder / f"{name}.safetensors", net, base="tiny", base_sha256=base_sha)
    digits = np.random.default_rng(1).integers(0, 256, (2, 28, 28), np.uint8)
    np.savez(folder / "digits.npz", images=digits, labels=np.array([3, 7]))
    np.savez(folder / "digits-float.npz", images=digits.astype(np.float32))
    np.savez(folder / "mask.npz", mask=np.ones((1, 28, 28), np.uint8))
    np.savez(folder / "mask-3.npz", mask=np.ones((3, 28, 28), np.uint8))
    torch.manual_seed(0)  # an untrained chorale model (chapter 11): the same CLI writes `rolls` for it
    save_denoiser(folder / "chorales.safetensors", music.chorale_denoiser(channels=(8, 16, 16), T=20))
    np.savez(folder / "wrong-shape.npz", images=np.zeros((2, 32, 32), np.uint8))     # for watermark detect
    np.savez(folder / "float-images.npz", images=np.zeros((2, 28, 28), np.float32))
    np.savez(folder / "no-images.npz", labels=np.zeros(2, np.int64))
    (folder / "garbage.npz").write_bytes(b"PK\x03\x04" + bytes(100))
    # chapter 10: a tiny text-to-image model (untrained) with its autoencoder, and prompt files good and bad
    autoencoder.save_autoencoder(folder / "tiny-vae.safetensors", autoencoder.Autoencoder(2, widths=(8, 8)), 1.0)
    tiny_sd.save_tiny_sd(folder / "tiny-sd.safetensors", tiny_sd.build(2, T=20), str(folder / "tiny-vae.safetensors"))
    (folder / "prompts.txt").write_text("a thick slanted seven\nthin 2\n\n")
    (folder / "blank.txt").write_text("\n \n")
    (folder / "binary.txt").write_bytes(b"\xff\xfe\x00seven")
    (folder / "oov.txt").write_text("a seven\na sevn\n")
    # chapter 12: an untrained clip model (2 frames); the same CLI writes `clips` for it
    torch.manual_seed(0)
    save_denoiser(folder / "clips.safetensors", video.video_denoiser(None, channels=(8, 8), frames=2))
    return folder


def _inputs_path(name: str) -> str:
    return f"@inputs/{name}"  # resolved against the inputs folder when the example runs


# ------------------------------------------------------------------------------------------- argument space

# generic values of a flag of each type: mostly typical, one time in four an edge case, one in twelve junk that
# argparse rejects (junk must stay rare, or it would end almost every argv before the CLI's own checks)
INTS = (["1", "2"], ["0", "-1", "3"])
FLOATS = (["0.5", "1"], ["0", "-1", "2.5", "nan", "inf", "-inf", "1e308"])
TEXT = (["bogus"], [""])
JUNK = ["x", "", "1.5e", "0x10", "--"]


def _tiers(typical: list, edge: list, junk: list = JUNK):
    # hypothesis favours small draws (0 is "simplest"), so the common tier takes the small numbers
    return st.integers(0, 11).flatmap(lambda k: st.sampled_from(typical if k < 8 else edge if k < 11 else junk))


def _values(action: argparse.Action, overrides: dict):
    """A strategy for the values that follow one flag, from the parser's own description of it."""
    flag = max(action.option_strings, key=len)
    if flag in overrides:  # (typical, edge) values, each a string or a list of strings
        typical, edge = ([v if isinstance(v, list) else [v] for v in tier] for tier in overrides[flag])
        return _tiers(typical, edge or typical, junk=edge or typical)
    if action.nargs == 0:  # store_true and friends
        return st.just([])
    if action.choices is not None:
        return _tiers([str(c) for c in action.choices], ["bogus"]).map(lambda v: [v])
    typical, edge = INTS if action.type is int else FLOATS if action.type is float else TEXT
    if action.type not in (int, float) and isinstance(action.default, str) and action.default:
        typical = [action.default]  # text: its default, sometimes something else
    scalars = _tiers(typical, edge)
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        return st.lists(scalars, max_size=4)
    return scalars.map(lambda v: [v])


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {max(a.option_strings, key=len): a for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)}


@st.composite
def argvs(draw, parser: argparse.ArgumentParser, overrides: dict, always=(), poison=(), one_in: int = 4):
    """An argv for `parser`: each flag present one time in `one_in` (`always` ones always), in any order, each with
    a value from its space; then, if given, one `poison` chunk at the end (argparse keeps a flag's last value)."""
    chunks = []
    for flag, action in _flags(parser).items():
        if flag in always or draw(st.integers(0, one_in - 1)) == one_in - 1:  # not 0: hypothesis favours small draws
            chunks.append([flag, *draw(_values(action, overrides))])
    argv = [arg for chunk in draw(st.permutations(chunks)) for arg in chunk]
    if poison:
        argv += draw(st.sampled_from(poison))
    return argv


# ------------------------------------------------------------------------------------------- the contract


def _complete(path: Path, kind: str) -> None:
    """Raise unless `path` is a whole file of `kind` (npz, safetensors or png)."""
    if kind == "npz":
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}  # reads every member: a cut-off zip fails here
        if "rolls" in arrays:  # a chorale model's (N, 4, steps) MIDI pitches
            assert arrays["rolls"].dtype == np.int16 and arrays["rolls"].shape[1] == 4
        elif "clips" in arrays:  # a clip model's (N, F, H, W) frames
            assert arrays["clips"].dtype == np.uint8 and arrays["clips"].ndim == 4
            assert len(arrays["labels"]) == len(arrays["clips"])
            if "context_index" in arrays:
                assert len(arrays["context_index"]) == len(arrays["clips"])
        else:
            assert arrays["images"].dtype == np.uint8 and arrays["images"].ndim == 3
            assert len(arrays["labels"]) == len(arrays["images"])
    elif kind == "folder":  # one file per sample (MIDI, WAV, GIF) or per training round (safetensors), each whole
        if path.suffix == ".safetensors":
            load_checkpoint(path)
        elif path.suffix == ".gif":
            from PIL import Image

            with Image.open(path) as img:
                img.seek(img.n_frames - 1)  # every frame is there
        elif path.suffix == ".mid":
            blob = path.read_bytes()
            assert blob.startswith(b"MThd") and blob.endswith(b"\x00\xff\x2f\x00")
        else:
            import wave

            with wave.open(str(path)) as f:
                assert len(f.readframes(f.getnframes())) == 2 * f.getnframes()
    elif kind == "safetensors":
        from safetensors.torch import load_file

        assert load_file(path)
    elif kind == "json":
        assert isinstance(json.loads(path.read_text())["p_values"], list)
    elif kind == "png":
        from PIL import Image

        with Image.open(path) as img:
            img.load()
    else:
        raise AssertionError(f"unknown kind {kind}")


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def run_cli(module: str, argv: list[str], inputs: Path, outputs: dict[str, str], seed_files=()):
    """Run `module`'s main(argv) in a fresh folder and check the contract. `outputs` maps each output flag to the
    kind of file it writes; `seed_files` are input files copied into the folder first (they must survive a failed
    run). Returns (status, stdout) for checks of the caller's own."""
    main, _ = CLIS[module]
    argv = [a.replace("@inputs", str(inputs)) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    threads, cwd = torch.get_num_threads(), os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in seed_files:
            if (inputs / name).is_dir():
                (work / name).mkdir()
            else:
                shutil.copyfile(inputs / name, work / name)
        before = _snapshot(work)
        os.chdir(work)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    status, message = main(argv), None
                except SystemExit as exit_:
                    status, message = (1, exit_.code) if isinstance(exit_.code, str) else (exit_.code, None)
        finally:
            os.chdir(cwd)
            torch.set_num_threads(threads)
        status = 0 if status is None else status
        stdout, stderr = out.getvalue(), err.getvalue()
        shown = f"argv={argv}\nstatus={status}\nmessage={message}\nstdout={stdout[-2000:]}\nstderr={stderr[-2000:]}"
        assert status in (0, 1, 2), shown
        assert "Traceback" not in stdout + stderr + str(message), shown
        if status == 1:
            assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message.strip(), shown
        if status == 2:  # argparse: usage lines, then exactly one line "prog: error: ..."
            lines = stderr.strip().splitlines()
            assert re.match(r"python -m diffusion_lab\.\w+.*: error: ", lines[-1]), shown
            assert sum("error:" in line for line in lines) == 1, shown

        # files: an output is absent, untouched or complete; every other file is as it was
        parsed = _last_values(argv)
        targets = {(work / parsed[flag]).resolve(): kind for flag, kind in outputs.items()
                   if parsed.get(flag) not in (None, "")}
        folders = [t for t, kind in targets.items() if kind == "folder"]
        after = _snapshot(work)
        for path, blob in after.items():
            assert not path.name.endswith((".tmp", ".lock")), f"left behind: {path.name}\n{shown}"
            in_folder = any(f in path.resolve().parents for f in folders) and path.suffix in (".mid", ".wav", ".gif",
                                                                                              ".safetensors")
            if (path.resolve() in targets or in_folder) and before.get(path) != blob:
                _complete(path, "folder" if in_folder else targets[path.resolve()])  # whole, never half
            else:
                assert before.get(path) == blob, f"{path.name} was changed by a run that did not write it\n{shown}"
        assert all(p in after for p in before), f"a file was deleted\n{shown}"
        if status == 0 and module != "diffusion_lab.metrics":
            assert all(t.exists() for t in targets), shown
            json.loads(stdout.strip().splitlines()[-1])  # the one-line JSON summary
    return status, stdout


def _last_values(argv: list[str]) -> dict[str, str]:
    """The value each output flag ends up with (argparse keeps the last), read leniently from the raw argv."""
    values = {}
    for i, arg in enumerate(argv[:-1]):
        if arg.startswith("--") and not argv[i + 1].startswith("--"):
            values[arg] = argv[i + 1]
    return values


# ------------------------------------------------------------------------------------------- the CLIs


def test_every_cli_is_fuzzed():
    """Every module with a `__main__` block is a CLI: it must be in CLIS, with a main(argv) and a _parser()."""
    package = Path(diffusion_lab.__file__).parent
    with_main = {f"diffusion_lab.{p.stem}" for p in package.glob("*.py")
                 if re.search(r"^if __name__ == .__main__.:", p.read_text(), re.MULTILINE)}
    assert with_main == set(CLIS), f"fuzz these CLIs too (add them to CLIS): {sorted(with_main - set(CLIS))}"
    for module, (main, parser) in CLIS.items():
        assert importlib.import_module(module).main is main
        assert isinstance(parser(), argparse.ArgumentParser)


TINY = _inputs_path("tiny.safetensors")
CLIPS = _inputs_path("clips.safetensors")
BAD_CHECKPOINTS = ["no-such-model", CLASSIFIER_FILE, *map(_inputs_path, MALFORMED)]

# (typical, edge) values of the flags whose generic values would not do: files, and amounts of work kept tiny
SAMPLE = {
    "--checkpoint": ([TINY, "mnist-cond", _inputs_path("chorales.safetensors"), _inputs_path("tiny-sd.safetensors"),
                      CLIPS], BAD_CHECKPOINTS),
    "--prompt": (["a seven", "a thick slanted seven", "thin upright 2"], ["a sevn", "", "seven " * 9, "\u00e9t\u00e9 7"]),
    "--prompts": ([_inputs_path("prompts.txt")], [_inputs_path(n) for n in ("blank.txt", "binary.txt", "oov.txt",
                                                                           "missing.txt", "folder.safetensors")]),
    "--negative-prompt": (["thick", "slanted seven"], ["thik", ""]),
    "--n": (["1", "3"], ["0", "-2", "x"]),                     # tiny: the fuzz checks arguments, not throughput
    "--steps": (["1", "2", "3"], ["0", "-1", "1000000", "x"]),
    "--labels": (["cycle", "random", "3", "3,5,8"], ["none", "10", "-1", "x", "", "3,,5", "0,1,2,3,4,5,6,7,8,9,0"]),
    "--seed": (["0", "1"], ["-1", str(2**63), str(-(2**63) - 1), str(2**64), "x"]),
    "--out": (["s.npz", "existing.npz"], ["sub/s.npz", "no-such-folder/s.npz", "s.txt", "", "."]),
    "--grid": (["g.png"], ["g.jpg", "sub/g.png", "", "."]),
    "--device": (["cpu", "auto"], ["nonsense", "cuda:7"]),
    "--lora": (["", _inputs_path("tiny-lora.safetensors")],
               ["typeset-lora", _inputs_path("other-lora.safetensors"), TINY, "no-such-lora", *BAD_CHECKPOINTS[2:5]]),
    "--midi": (["mid", "."], ["existing.npz", "existing.npz/sub", ""]),
    "--wav": (["wav", "sub/wav"], ["existing.npz", ""]),
    "--candidates": (["1", "2"], ["0", "-3", "x"]),
    "--watermark": (["3f9a1c2e"], ["xyz", "", "3f9a", "g" * 8, "0" * 65]),
    "--context-from": (["test"], ["train", ""]),
    "--context-frames": (["1"], ["0", "2", "-1", "x"]),
    "--gif": (["gif", "sub/gif"], ["existing.npz", ""]),
}
SAMPLE_OUTPUTS = {"--out": "npz", "--grid": "png", "--midi": "folder", "--wav": "folder", "--gif": "folder"}


@fuzz_settings(300)
@given(argv=argvs(sample._parser(), SAMPLE, always=("--n", "--steps", "--out", "--checkpoint")))
@example(argv=["--checkpoint", _inputs_path("tiny.safetensors"), "--n", "2", "--steps", "2", "--out", "s.npz",
               "--grid", "g.png", "--quiet"])
@example(argv=["--checkpoint", _inputs_path("truncated.safetensors"), "--n", "2", "--steps", "2",
               "--out", "existing.npz"])
@example(argv=["--checkpoint", _inputs_path("empty.safetensors"), "--n", "2", "--steps", "2",
               "--out", "existing.npz"])
@example(argv=["--checkpoint", _inputs_path("random.safetensors"), "--n", "2", "--steps", "2",
               "--out", "existing.npz"])
@example(argv=["--checkpoint", CLASSIFIER_FILE, "--n", "2", "--steps", "2", "--out", "s.npz"])
@example(argv=["--n", "2", "--steps", "2"])  # --out missing
@example(argv=["--checkpoint", _inputs_path("chorales.safetensors"), "--n", "2", "--steps", "2", "--out", "c.npz",
               "--soprano-from", "test", "--midi", "mid", "--wav", "sub/wav", "--quiet"])
@example(argv=["--checkpoint", _inputs_path("chorales.safetensors"), "--n", "2", "--steps", "2", "--out", "c.npz",
               "--midi", "existing.npz/sub"])
@example(argv=["--checkpoint", _inputs_path("tiny-sd.safetensors"), "--n", "2", "--steps", "2", "--out", "s.npz",
               "--prompt", "a thick seven", "--negative-prompt", "thin", "--grid", "g.png", "--quiet"])
@example(argv=["--checkpoint", _inputs_path("tiny-sd.safetensors"), "--n", "3", "--steps", "1", "--out",
               "existing.npz", "--prompts", _inputs_path("oov.txt")])
@example(argv=["--checkpoint", CLIPS, "--n", "2", "--steps", "2", "--out", "v.npz", "--gif", "gif", "--quiet"])
@example(argv=["--checkpoint", CLIPS, "--n", "2", "--steps", "1", "--out", "v.npz", "--context-from", "test",
               "--context-frames", "1", "--quiet"])
@example(argv=["--checkpoint", CLIPS, "--n", "2", "--steps", "1", "--out", "existing.npz", "--context-frames", "2"])
@example(argv=["--checkpoint", TINY, "--n", "2", "--steps", "1", "--out", "existing.npz", "--gif", "gif"])
def test_sample_cli(inputs, argv):
    status, _ = run_cli("diffusion_lab.sample", argv, inputs, SAMPLE_OUTPUTS, seed_files=["existing.npz"])
    if argv in (["--checkpoint", _inputs_path("tiny.safetensors"), "--n", "2", "--steps", "2", "--out", "s.npz",
                 "--grid", "g.png", "--quiet"],
                ["--checkpoint", _inputs_path("chorales.safetensors"), "--n", "2", "--steps", "2", "--out", "c.npz",
                 "--soprano-from", "test", "--midi", "mid", "--wav", "sub/wav", "--quiet"]):
        assert status == 0  # the space holds successful runs too, so "always an error" would not pass
    if "--prompt" in argv and "a thick seven" in argv:
        assert status == 0  # a text-to-image run succeeds too
    if argv[:2] == ["--checkpoint", CLIPS] and "v.npz" in argv:
        assert status == 0  # a clip model's generation and prediction succeed too


@pytest.mark.parametrize("out", ["", "."])
def test_sample_cli_out_that_names_a_folder(inputs, out):
    run_cli("diffusion_lab.sample", ["--checkpoint", TINY, "--n", "1", "--steps", "1", "--out", out], inputs,
            {"--out": "npz"})


TRAIN = {
    "--out": (["run.safetensors", "existing.safetensors"],                  # copies in the run's folder
              ["sub/run.safetensors", "run.txt", ".", "", *MALFORMED]),
    "--steps": (["1", "2"], ["0", "-1", "x"]),                # at most two optimizer steps
    "--batch-size": (["1", "2", "4"], ["0", "-3", "x"]),
    "--channels": ([["8", "16", "16"]], [["8", "16"], ["8"], ["0", "8", "8"], ["3", "5", "5"], [], ["x"]]),
    "--T": (["20", "2"], ["1", "0", "-5", "x"]),
    "--blocks-per-level": (["1", "2"], ["0", "x"]),
    "--device": (["cpu", "auto"], ["nonsense", "cuda:7"]),
    "--compile": (["0"], ["2", "x"]),                           # torch.compile takes minutes: left out
    "--ckpt-every": (["1", "500"], ["0", "x"]),
    "--seed": (["0", "1"], ["-1", str(2**64), "x"]),
}
TRAIN_SEEDS = ["existing.safetensors", *(name for name in MALFORMED if name != "missing.safetensors")]
# one chunk that every training config must refuse, appended last so that it is the value argparse keeps
TRAIN_POISON = [["--steps", "0"], ["--batch-size", "0"], ["--lr", "nan"], ["--lr", "-1"], ["--T", "0"],
                ["--channels", "0"], ["--ema-decay", "1"], ["--p-uncond", "1"], ["--schedule", "bogus"],
                ["--prediction", "bogus"], ["--amp", "bogus"], ["--weighting", "bogus"], ["--lr-decay", "bogus"],
                ["--out", "run.txt"], ["--ckpt-every", "0"], ["--log-every", "0"], ["--max-minutes", "-1"],
                ["--blocks-per-level", "0"], ["--grad-clip", "0"], ["--warmup", "-1"], ["--weight-decay", "nan"],
                ["--no-such-flag"], ["stray"], ["--steps"], ["--compile", "yes"]]


def _poison(parser, chunks):
    """Drop the poisons for flags that the parser no longer has (the CLI changed), rather than guess."""
    flags = _flags(parser)
    return [c for c in chunks if c[0] in flags or c[0] in ("--no-such-flag", "stray")]


@fuzz_settings(200)
@given(argv=argvs(training._parser(), TRAIN, always=("--out", "--steps", "--batch-size", "--channels", "--quiet"),
                  poison=_poison(training._parser(), TRAIN_POISON)))
def test_train_cli_refuses_bad_arguments(inputs, argv):
    status, _ = run_cli("diffusion_lab.train", argv, inputs, {"--out": "safetensors"}, seed_files=TRAIN_SEEDS)
    assert status in (1, 2)


@fuzz_settings(25)
@given(argv=argvs(training._parser(), {**TRAIN, "--steps": (["1", "2"], []), "--batch-size": (["2"], [])},
                  always=("--out", "--steps", "--batch-size", "--channels", "--quiet"), one_in=8))
@example(argv=["--out", "existing.safetensors", "--steps", "2", "--batch-size", "2", "--channels", "8", "16", "16",
               "--attention", "0", "--T", "20", "--device", "cpu", "--quiet"])   # resumes the tiny run: succeeds
@example(argv=["--out", "existing.safetensors", "--steps", "2", "--batch-size", "2", "--channels", "16", "32", "32",
               "--attention", "0", "--T", "20", "--quiet"])                         # another architecture: refused
@example(argv=["--out", "existing.safetensors", "--no-resume", "--steps", "1", "--batch-size", "2",
               "--channels", "16", "32", "32", "--device", "cpu", "--quiet"])        # ... unless starting over
@example(argv=["--out", "truncated.safetensors", "--steps", "1", "--batch-size", "2", "--channels", "8", "16", "16",
               "--quiet"])                                                             # a damaged run: refused, kept
def test_train_cli_short_runs(inputs, argv):
    """Runs that may really train (one or two steps of a tiny net), into fresh or existing --out files."""
    run_cli("diffusion_lab.train", argv, inputs, {"--out": "safetensors"}, seed_files=TRAIN_SEEDS)


METRICS = {
    "--epochs": (["-1", "0"], ["x"]),                           # one epoch is minutes of work: left out
    "--checkpoint": ([TINY, "mnist-cond"], BAD_CHECKPOINTS[:1] + BAD_CHECKPOINTS[2:]),  # the real one: minutes
    "--out": (["c.safetensors"], ["c.txt", "sub/c.safetensors", ""]),
    "--device": (["cpu"], ["nonsense", "cuda:7"]),
    "--threads": (["0", "1"], ["-1", "x"]),
}


@st.composite
def metrics_argvs(draw):
    """A subcommand from the parser (or a bogus one), then an argv for that subcommand's own parser."""
    commands = next(a for a in metrics._parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    name = draw(st.sampled_from([*commands, "bogus"]))
    if name == "bogus":
        return [name]
    always = {"train-classifier": ("--epochs", "--out"), "evaluate": ("--checkpoint",)}.get(name, ())
    return [name, *draw(argvs(commands[name], METRICS, always=always))]


@fuzz_settings(100)
@given(argv=metrics_argvs())
@example(argv=["evaluate", "--checkpoint", _inputs_path("truncated.safetensors")])
@example(argv=["evaluate", "--checkpoint", _inputs_path("empty.safetensors")])
@example(argv=["evaluate", "--checkpoint", _inputs_path("random.safetensors")])
@example(argv=["evaluate", "--checkpoint", "mnist-cond"])
@example(argv=["evaluate", "--checkpoint", CLASSIFIER_FILE, "--device", "nonsense"])
@example(argv=["train-classifier", "--epochs", "0", "--out", "c.safetensors"])
def test_metrics_cli(inputs, argv):
    status, _ = run_cli("diffusion_lab.metrics", argv, inputs, {"--out": "safetensors"})
    assert status in (1, 2)  # the space holds no valid run: each would train or evaluate on all of MNIST


EDIT = {
    "--checkpoint": ([TINY, "mnist-cond"], BAD_CHECKPOINTS),
    "--lora": ([_inputs_path("tiny-lora.safetensors"), "typeset-lora"],
               [_inputs_path("other-lora.safetensors"), TINY, "no-such-lora", *BAD_CHECKPOINTS[2:5]]),
    "--in": ([_inputs_path("digits.npz"), "existing.npz"],
             [_inputs_path("digits-float.npz"), _inputs_path("mask.npz"), TINY, "missing.npz", "."]),
    "--out": (["e.npz", "existing.npz"], ["sub/e.npz", "no-such-folder/e.npz", "e.txt", "", "."]),
    "--strength": (["0.5", "1", "0.05"], ["0", "-0.5", "1.5", "nan", "inf"]),
    "--mask": (["left", "square", _inputs_path("mask.npz")], [_inputs_path("mask-3.npz"), "bogus", TINY,
                                                              _inputs_path("digits.npz")]),
    "--resample": (["1", "2"], ["0", "-1", "x"]),
    "--steps": (["1", "2", "3"], ["0", "-1", "1000000", "x"]),
    "--target": (["8", "3,5"], ["10", "x", ""]),
    "--labels": (["auto", "3", "cycle"], ["10", "-1", "x", ""]),
    "--seed": (["0", "1"], ["-1", str(2**64), "x"]),
    "--device": (["cpu"], ["nonsense", "cuda:7"]),
}


WATERMARK = {
    "--in": ([_inputs_path("existing.npz")], [_inputs_path(n) for n in ("wrong-shape.npz", "float-images.npz",
                                                                         "no-images.npz", "garbage.npz")]
             + ["missing.npz", ".", ""]),
    "--key": (["3f9a1c2e", "DEADBEEF00"], ["xyz", "", "3f9a", "3f9a1c2e" * 9, "g" * 8]),
    "--checkpoint": ([TINY, "mnist-cond"], BAD_CHECKPOINTS),
    "--steps": (["1", "2"], ["0", "-1", "1000000", "x"]),
    "--out": (["p.json"], ["sub/p.json", "", "."]),
    "--device": (["cpu"], ["nonsense", "cuda:7"]),
}


@st.composite
def edit_argvs(draw):
    command = draw(st.sampled_from(["sdedit", "inpaint", "invert", "bogus"]))
    return [command, *draw(argvs(edit._parser(), EDIT, always=("--in", "--out", "--steps", "--checkpoint")))]


EDIT_OK = ["sdedit", "--checkpoint", TINY, "--lora", _inputs_path("tiny-lora.safetensors"),
           "--in", _inputs_path("digits.npz"), "--strength", "0.6", "--steps", "2", "--out", "e.npz"]


REFUSALS = {  # the errors the edit CLI owes its users, each one line
    "mask-3.npz": (["inpaint", "--checkpoint", TINY, "--mask", _inputs_path("mask-3.npz")], "does not match the images"),
    "strength": (["sdedit", "--checkpoint", TINY, "--strength", "1.5"], "--strength must lie in (0, 1]"),
    "other base": (["sdedit", "--checkpoint", TINY, "--lora", _inputs_path("other-lora.safetensors")], "SHA-256"),
    "base differs": (["invert", "--checkpoint", "mnist-cond", "--lora", _inputs_path("tiny-lora.safetensors")],
                     "SHA-256"),
}


@fuzz_settings(150)
@given(argv=edit_argvs())
@example(argv=EDIT_OK)
@example(argv=[*REFUSALS["mask-3.npz"][0], "--in", _inputs_path("digits.npz"), "--steps", "2", "--out", "existing.npz"])
def test_edit_cli(inputs, argv):
    status, _ = run_cli("diffusion_lab.edit", argv, inputs, {"--out": "npz"}, seed_files=["existing.npz"])
    if argv == EDIT_OK:
        assert status == 0


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_edit_cli_refusals(inputs, tmp_path, case):
    argv, message = REFUSALS[case]
    argv = [a.replace("@inputs", str(inputs)) for a in argv]
    out = tmp_path / "e.npz"
    with pytest.raises(SystemExit) as refused:
        edit.main([*argv, "--in", str(inputs / "digits.npz"), "--steps", "2", "--out", str(out)])
    assert message in str(refused.value.code) and str(refused.value.code).startswith("error: ")
    assert "\n" not in str(refused.value.code) and not out.exists()


@st.composite
def watermark_argvs(draw):
    commands = next(a for a in watermark._parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    name = draw(st.sampled_from([*commands, "bogus"]))
    if name == "bogus":
        return [name]
    return [name, *draw(argvs(commands[name], WATERMARK, always=("--in", "--key", "--steps")))]


GOOD_DETECT = ["detect", "--in", _inputs_path("existing.npz"), "--key", "3f9a1c2e", "--checkpoint", TINY,
               "--steps", "2", "--out", "p.json", "--device", "cpu"]


@fuzz_settings(80)
@given(argv=watermark_argvs())
@example(argv=GOOD_DETECT)
@example(argv=["detect", "--in", _inputs_path("wrong-shape.npz"), "--key", "3f9a1c2e", "--steps", "1"])
@example(argv=["detect", "--in", "missing.npz", "--key", "3f9a1c2e", "--steps", "1"])
@example(argv=["detect", "--in", _inputs_path("existing.npz"), "--key", "not-hex!", "--steps", "1"])
def test_watermark_cli(inputs, argv):
    status, stdout = run_cli("diffusion_lab.watermark", argv, inputs, {"--out": "json"})
    if argv == GOOD_DETECT:
        assert status == 0 and len(json.loads(stdout)["p_values"]) == 2


# --- distill (chapter 13): a tiny teacher, a step or two of training, and every way to get the arguments wrong

DISTILL = {
    "--out": (["d.safetensors", "existing.safetensors"], ["sub/d.safetensors", "d.txt", "", "."]),
    "--run-dir": (["rounds"], []),
    "--teacher": ([TINY], BAD_CHECKPOINTS),
    "--flow": ([TINY], BAD_CHECKPOINTS),
    "--steps": (["1", "2"], ["0", "-1", "x"]),
    "--batch-size": (["2"], ["0", "-2"]),
    "--lr": (["1e-3"], ["0", "-1", "nan"]),
    "--warmup": (["0", "1"], ["-1"]),
    "--ema-decay": (["0.9"], ["1", "-0.1"]),
    "--ckpt-every": (["1"], ["0"]),
    "--guidance": (["1", "2"], ["-1", "nan", "inf"]),
    "--rounds": (["2 1", "4 2 1"], ["4 1", "3", "0", "2 2"]),
    "--default-steps": (["1", "2"], ["3", "0"]),
    "--grid": (["2", "20"], ["0", "21", "-1"]),
    "--pairs": (["2", "4"], ["0", "-1"]),
    "--pair-steps": (["1", "2"], ["0", "21"]),
}


@st.composite
def distill_argvs(draw):
    commands = next(a for a in distill._parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    name = draw(st.sampled_from([*commands, "bogus"]))
    if name == "bogus":
        return [name]
    argv = draw(argvs(commands[name], DISTILL, always=("--out", "--steps", "--batch-size", "--quiet", "--run-dir",
                                                         "--pairs", "--pair-steps")))
    return [name, *(word for arg in argv for word in arg.split(" "))]   # "--rounds 2 1" is three words


GOOD_DISTILL = ["progressive", "--teacher", TINY, "--run-dir", "rounds", "--rounds", "2", "1", "--default-steps", "1",
                "--steps", "1", "--batch-size", "2", "--out", "d.safetensors", "--quiet"]


@fuzz_settings(40)
@given(argv=distill_argvs())
@example(argv=GOOD_DISTILL)
def test_distill_cli(inputs, argv):
    outputs = {"--out": "safetensors", "--run-dir": "folder"}
    status, stdout = run_cli("diffusion_lab.distill", argv, inputs, outputs, seed_files=("existing.safetensors",))
    if argv == GOOD_DISTILL:
        assert status == 0 and json.loads(stdout.strip().splitlines()[-1])["steps"] == [1, 2]


def test_distill_cli_refuses_a_reflow_of_a_model_that_is_not_a_flow(inputs, tmp_path):
    with pytest.raises(SystemExit, match="reflow retrains a flow model"):
        distill.main(["reflow", "--flow", str(inputs / "tiny.safetensors"), "--pairs", "2", "--pair-steps", "1",
                      "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "r.safetensors"), "--quiet"])
    assert not (tmp_path / "r.safetensors").exists()
