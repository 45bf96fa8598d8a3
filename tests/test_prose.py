"""The book's two prose rules (DESIGN.md, "Every number from code"), as checks a change can fail.

1. Reader-facing text speaks of the book alone: no issue numbers, no "lent" machines, no sessions, no
   "when this was written", no placeholders left behind.
2. A claim-check box or an exercise solution never states a measured figure by hand: a decimal, a
   percentage, a number with a unit of time or size, or a number right after a metric's name must come
   through a `{glue}` role. Math (`$...$`), inline code and indented code are exempt: they hold formulas,
   settings and code, not measurements. The allow-list below names the few plain constants that remain.

Fast: reads files only, no torch, no notebook execution.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def reader_texts() -> list[tuple[str, str]]:
    """(label, text) for every piece of reader-facing prose: notebook markdown, book pages, model cards,
    benchmark docs and rendered result tables."""
    out = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] == "markdown":
                out.append((f"{path.name} cell {cell.get('id')}", source(cell)))
    pages = [*(ROOT / "book").glob("*.md"), *(ROOT / "checkpoints").glob("*.md"), ROOT / "benchmarks" / "README.md",
             *(ROOT / "benchmarks" / "results").glob("*.md")]
    for path in sorted(pages):
        out.append((str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")))
    return out


# ------------------------------------------------------------------------------ rule 1: the book alone
LEAKS = [
    re.compile(r"\bissues?\s*#?\d+", re.I),  # "issue 5", "Issue #13", "issues 4 and 5"
    re.compile(r"\(\s*issue\b", re.I),  # "(issue 5)" table columns
    re.compile(r"\b(?:front-door|foundation|this|that|an|the filed)\s+issue\b", re.I),
    re.compile(r"\blent\b", re.I),  # "one lent H200"
    # "a later session", "this session", "the session's time limit"; a Colab session and the script
    # benchmarks/gpu_session.sh are what they say
    re.compile(r"(?<!Colab )(?<!gpu_)\bsessions?\b(?!\.sh)", re.I),
    re.compile(r"when this was written|at the time of writing|as of (?:this )?writing|at the time this", re.I),
    re.compile(r"\b[A-Z][A-Z0-9]*_(?:SOLUTION|TODO|PLACEHOLDER)\b|\bTODO\b|\bFIXME\b|\bTBD\b"),
]


def leaks(text: str) -> list[str]:
    return [m.group(0) for pattern in LEAKS for m in pattern.finditer(text)]


def test_leak_patterns_catch_what_they_should():
    # The patterns themselves, on text that must fail and text that must pass
    for bad in ("Issue 5 asks for a step", "| target (issue 5) |", "on one lent H200", "a later session timed it",
                "cut off by the session's time limit", "true when this was written", "GAN's favour. EX5_SOLUTION"):
        assert leaks(bad), bad
    for good in ("on one H200 GPU", "a Colab session that times out", "`bash benchmarks/gpu_session.sh race`",
                 "the issue with large steps is", "a silent failure"):
        assert not leaks(good), good


@pytest.mark.parametrize("label,text", reader_texts(), ids=lambda v: v if len(v) < 60 else "")
def test_reader_text_speaks_of_the_book_alone(label, text):
    found = leaks(text)
    assert not found, f"{label}: process words in reader text {found}; say the plain fact (e.g. 'on one H200 GPU')"


# --------------------------------------------------------------- rule 2: measured figures are glued
# ```{admonition} Claim check: ...``` and ```{solution} ex-..``` blocks (backtick or colon fences)
BLOCK = re.compile(
    r"^[ \t]*(?P<fence>`{3,}|:{3,})\{(?P<name>admonition|solution)\}(?P<arg>[^\n]*)\n(?P<body>.*?)^[ \t]*(?P=fence)[ \t]*$",
    re.M | re.S,
)
GLUE = re.compile(r"\{glue(?::\w+)?\}`[^`]*`")
MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]+\$", re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# A measured-looking figure: a decimal, a percentage, a number with a unit of time, size or speed, or a
# number within a few characters after a metric's name ("FID 222", "accuracy of 96", "scores about 14")
FIGURE = re.compile(
    r"(?<![\w.\-])(?:\d[\d,]*(?:\.\d+)?(?:\ss|\s?(?:ms|min|minutes|seconds|hours|MB|GB|GiB|img/s|images/s))\b"  # "1s" are ones
    r"|\d[\d,]*(?:\.\d+)?\s?%"
    r"|\d[\d,]*\.\d+"
    r"|(?:FID|accuracy|MSE|loss|scores?|scored|floor)(?:\s+(?:is|was|of|about|around|near|only|=|:))*\s+\d[\d,]*)"
)
# Section and equation numbers are references, not figures: "(section 4.3)", "equation 2.1"
SECTION_REF = re.compile(r"\b(?:sections?|equations?|eq\.|§)\s*\d+(?:\.\d+)*", re.I)
# True constants that a box or solution may state by hand: no measurement can change them
ALLOWED = {
    "0.999", "0.9999",  # EMA decays, settings
    "0.1", "0.01", "0.001",  # round thresholds a solution sets itself
    "0.02",  # the DCGAN init standard deviation and a named tolerance
    "0.5",
}


def claim_and_solution_blocks(text: str):
    for m in BLOCK.finditer(text):
        if m.group("name") == "admonition" and "claim check" not in m.group("arg").lower():
            continue
        yield f"{m.group('name')} {m.group('arg').strip()[:40]}", m.group("body")


def hand_typed_figures(body: str) -> list[str]:
    body = GLUE.sub(" ", body)
    body = MATH.sub(" ", body)
    body = "\n".join(line for line in body.splitlines() if not line.startswith("    "))  # indented code
    body = INLINE_CODE.sub(" ", body)
    body = SECTION_REF.sub(" ", body)
    return [m.group(0) for m in FIGURE.finditer(body) if m.group(0) not in ALLOWED]


def test_figure_pattern_catches_what_it_should():
    planted = ("```{solution} ex-99-1\n:class: dropdown\n\nThe FID is 719 and the step takes 3.4 ms, 96% of the time;\n"
               "it trains in 40 s and draws more 1s than 7s.\n```\n")
    (_, body), = claim_and_solution_blocks(planted)
    assert hand_typed_figures(body) == ["FID is 719", "3.4 ms", "96%", "40 s"]
    glued = ("```{admonition} Claim check: x\n:class: tip\nFID {glue:text}`fid:.1f`, a ratio $\\approx 1.39$, `lr=2e-4`,\n"
             "as section 4.3 shows.\n```\n")
    (_, body), = claim_and_solution_blocks(glued)
    assert hand_typed_figures(body) == []


GLUE_CONTENT = re.compile(r"\w+(?::[^`{}\s]*)?")


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_glue_role_is_well_formed(path):
    """`{glue:text}`name:.2f`` and nothing else between the backticks: a stray brace or a missing backtick would
    swallow the prose up to the next role and print it as a key error in the book."""
    bad = [f"cell {cell.get('id')}: {m.group(0)[:80]!r}"
           for cell in json.loads(path.read_text(encoding="utf-8"))["cells"] if cell["cell_type"] == "markdown"
           for m in GLUE.finditer(source(cell)) if not GLUE_CONTENT.fullmatch(m.group(0).split("`")[1])]
    assert not bad, f"{path.name}: malformed glue roles:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_boxes_and_solutions_glue_their_figures(path):
    found = []
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for where, body in claim_and_solution_blocks(source(cell)):
            figures = hand_typed_figures(body)
            if figures:
                found.append(f"cell {cell.get('id')}, {where}: {figures}")
    assert not found, (f"{path.name}: measured figures typed by hand (glue them from a cell or a committed result "
                       "JSON, or state the fact without the number):\n  " + "\n  ".join(found))


def test_glue_reaches_the_book_and_prints_outside_it(monkeypatch, capsys):
    """diffusion_lab.utils.glue, the one every chapter imports: myst-nb's glue (a display output carrying the name,
    which the book build reads) when myst-nb is installed, and a printed `name: value` where it is not (Colab)."""
    import sys

    from diffusion_lab.utils import glue

    shown = []
    monkeypatch.setattr("myst_nb.ext.glue.ipy_display", lambda data, **kw: shown.append((data, kw["metadata"])))
    glue("acc", 97.5, display=False)
    assert [meta["scrapbook"]["name"] for _, meta in shown] == ["acc"] and capsys.readouterr().out == ""
    monkeypatch.setitem(sys.modules, "myst_nb", None)   # as in Colab: the import fails
    glue("acc", 97.5)
    assert capsys.readouterr().out == "acc: 97.5\n"
