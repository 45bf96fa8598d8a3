"""Convert a training checkpoint into a format-2 shipped denoiser: the EMA weights, the schedule's betas and the
contract, nothing else. The weights are copied bit for bit. The source is a training run of the current format
(kind "training-run", written by `python -m diffusion_lab.train`) or an old format-1 file (config under "train").

    python tools/convert_checkpoint.py runs/old.safetensors checkpoints/new.safetensors
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from diffusion_lab.checkpoint import CheckpointError, load_checkpoint
from diffusion_lab.denoiser import load_denoiser, save_denoiser
from diffusion_lab.training import TrainConfig, build_denoiser
from diffusion_lab.utils import file_sha256


def convert(source: str, target: str) -> str:
    tensors, meta = load_checkpoint(source)
    if meta.get("kind") == "training-run" and "train" in meta.get("record", {}):  # the record travels with the weights
        return save_denoiser(target, load_denoiser(source), train=meta["record"]["train"], step=meta["step"],
                             elapsed_s=meta.get("elapsed_s"),
                             converted_from={"format": meta["format"], "kind": "training-run", "sha256": file_sha256(source)})
    if meta.get("format") != "diffusion_lab/1" or "train" not in meta:
        raise CheckpointError(f"{source} is neither a training run of `python -m diffusion_lab.train` nor a format-1 "
                              "training checkpoint")
    config = TrainConfig.from_dict(meta["train"])
    denoiser = build_denoiser(config)
    denoiser.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    return save_denoiser(target, denoiser, train=asdict(config), step=meta["step"], elapsed_s=meta.get("elapsed_s"),
                         converted_from={"format": "diffusion_lab/1", "sha256": file_sha256(source)})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("target")
    args = p.parse_args(argv)
    try:
        print(json.dumps({"target": args.target, "sha256": convert(args.source, args.target)}))
    except (CheckpointError, ValueError, OSError) as err:
        raise SystemExit(f"error: {err}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
