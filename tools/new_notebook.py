#!/usr/bin/env python3
"""Small authoring helper for Diffusion Lab chapters. Standard library only.

    python tools/new_notebook.py new 03_noise_schedules "Noise schedules"   # a chapter skeleton
    python tools/new_notebook.py strip notebooks/*.ipynb                     # drop outputs before a commit
    python tools/new_notebook.py rebadge                                     # point badges at _config.yml's repo

`new` writes notebooks/NN_name.ipynb in the standard shape that tests/test_repo.py checks: title and
Colab badge, the setup cell, learning goals, the chapter, a summary, and exercises with hidden solutions.
It never overwrites a file. Add the chapter to _toc.yml afterwards.

`rebadge` is for forks: after changing `repository: url:` in _config.yml, it rewrites every chapter's
Colab badge and the repository URL in its setup cell.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAME_RE = re.compile(r"^\d\d_[a-z0-9_]+$")
BADGE_IMG = "https://colab.research.google.com/assets/colab-badge.svg"


def repository() -> tuple[str, str]:
    """(url, branch) from the `repository:` block of _config.yml, read without a YAML parser."""
    text = (ROOT / "_config.yml").read_text()
    block = re.search(r"^repository:\s*\n((?:[ \t]+.*\n?)+)", text, re.M)
    if not block:
        raise SystemExit("_config.yml has no repository: block")
    url = re.search(r"^\s+url:\s*(\S+)", block.group(1), re.M)
    branch = re.search(r"^\s+branch:\s*(\S+)", block.group(1), re.M)
    if not url:
        raise SystemExit("_config.yml: repository.url is missing")
    return url.group(1).rstrip("/"), branch.group(1) if branch else "main"


def colab_url(name: str) -> str:
    url, branch = repository()
    owner_repo = url.split("github.com/", 1)[-1]
    return f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/notebooks/{name}.ipynb"


def badge(name: str) -> str:
    return f"[![Open In Colab]({BADGE_IMG})]({colab_url(name)})"


def setup_source() -> str:
    url, branch = repository()
    return f'''# Setup. In Colab: fetch Diffusion Lab and install it (with its checkpoints). Anywhere else: nothing.
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess

    if not os.path.isdir("diffusion-lab"):
        subprocess.run(["git", "clone", "--depth", "1", "--branch", "{branch}", "{url}", "diffusion-lab"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "diffusion-lab"], check=True)
    sys.path.insert(0, os.path.abspath("diffusion-lab"))'''


def md(cell_id: str, source: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": source}


def code(cell_id: str, source: str, tags: list[str] | None = None) -> dict:
    meta = {"tags": tags} if tags else {}
    return {"cell_type": "code", "execution_count": None, "id": cell_id, "metadata": meta, "outputs": [],
            "source": source}


def exercise(num: str, i: int) -> str:
    label = f"ex-{num}-{i}"
    return (
        f"```{{exercise}}\n:label: {label}\n\nExercise {i}: state the task.\n```\n\n"
        f"```{{solution}} {label}\n:class: dropdown\n\nThe worked answer.\n```"
    )


def skeleton(name: str, title: str) -> dict:
    num = name[:2]
    n_ex = 2 if num == "00" else 4
    cells = [
        md("title", f"# {num} · {title}\n\n{badge(name)}\n\nOne paragraph: what this chapter builds and why."),
        code("setup", setup_source(), tags=["hide-input"]),
        md("goals", "## Learning goals\n\nAfter this chapter you can:\n\n- ...\n- ...\n- ..."),
        code("first-code", "import diffusion_lab\nfrom diffusion_lab.utils import profile\n\nprint(\"run profile:\", profile())"),
        md("summary", "## Summary\n\n- ..."),
        md("exercises", "## Exercises\n\n" + "\n\n".join(exercise(num, i) for i in range(1, n_ex + 1))),
    ]
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def write(path: Path, nb: dict) -> None:
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def strip(nb: dict) -> dict:
    """Drop outputs, execution counts and saved widget state: committed notebooks carry none."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in ("execution", "collapsed", "scrolled"):
            cell.get("metadata", {}).pop(key, None)
    nb.get("metadata", {}).pop("widgets", None)
    return nb


def cmd_new(args: argparse.Namespace) -> int:
    if not NAME_RE.match(args.name):
        raise SystemExit(f"{args.name!r}: use NN_short_name, e.g. 03_noise_schedules")
    path = NOTEBOOKS / f"{args.name}.ipynb"
    if path.exists():
        raise SystemExit(f"{path} exists; not overwriting it")
    NOTEBOOKS.mkdir(exist_ok=True)
    write(path, skeleton(args.name, args.title))
    print(f"wrote {path.relative_to(ROOT)}; now add `- file: notebooks/{args.name}` to _toc.yml")
    return 0


def cmd_strip(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths] or sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        write(path, strip(json.loads(path.read_text())))
        print(f"stripped {path}")
    return 0


def cmd_rebadge(args: argparse.Namespace) -> int:
    url, branch = repository()
    badge_re = re.compile(r"https://colab\.research\.google\.com/github/[^)\s\"']+")
    clone_re = re.compile(r'"--branch", "[^"]*", "https://github\.com/[^"]+"')
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            new = badge_re.sub(colab_url(path.stem), src)
            new = clone_re.sub(f'"--branch", "{branch}", "{url}"', new)
            cell["source"] = new
        write(path, nb)
        print(f"rebadged {path.relative_to(ROOT)} -> {url} ({branch})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_new = sub.add_parser("new", help="create notebooks/NN_name.ipynb in the standard chapter shape")
    p_new.add_argument("name", help="file stem, e.g. 03_noise_schedules")
    p_new.add_argument("title", help='chapter title, e.g. "Noise schedules"')
    p_new.set_defaults(func=cmd_new)
    p_strip = sub.add_parser("strip", help="remove outputs and execution counts (default: every chapter)")
    p_strip.add_argument("paths", nargs="*")
    p_strip.set_defaults(func=cmd_strip)
    p_rebadge = sub.add_parser("rebadge", help="point Colab badges and setup cells at _config.yml's repository")
    p_rebadge.set_defaults(func=cmd_rebadge)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
