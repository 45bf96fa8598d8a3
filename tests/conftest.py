"""Shared pytest setup for the unit tests and the notebook run.

`make test` already sets DIFFUSION_LAB_PROFILE=smoke; the defaults below make a bare `pytest` from the
repository root behave the same. They are set before nbval starts any kernel, and kernels inherit them.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("DIFFUSION_LAB_PROFILE", "smoke")

import pytest  # noqa: E402  (after the environment defaults on purpose)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: its tensors are tiny, and on a shared CPU the thread pool costs more
    than it saves. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
