"""Command line for training: `python -m diffusion_lab.train --help`. The loop lives in training.py."""
from .training import main

if __name__ == "__main__":
    raise SystemExit(main())
