"""Publishing: the Pages workflow mirrors .ci/run, one version and year everywhere, MathJax ships with the site,
and the browser checks (tools/check_site.py, tools/print_pdf.py) really catch a broken page.

The browser tests need Debian's chromium. They skip without it, except under CI (CI=true), where .ci/run
installs it first, so there they fail instead of skipping.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


# ------------------------------------------------------------------------------------------ the workflow
def ci_run_targets() -> list[str]:
    return re.findall(r'^step "[^"]*" make ([\w-]+)\s*$', (ROOT / ".ci/run").read_text(encoding="utf-8"), re.M)


def workflow() -> dict:
    return load_yaml(ROOT / ".github/workflows/book.yml")


def job_make_targets(job: dict) -> list[str]:
    """`make X` commands (at the start of a line or after && or ;), in order."""
    runs = "\n".join(step.get("run", "") for step in job.get("steps", []))
    return re.findall(r"(?:^|&&|;)\s*make ([\w-]+)", runs, re.M)


def job_uses(job: dict) -> list[str]:
    return [step["uses"].split("@")[0] for step in job.get("steps", []) if "uses" in step]


def test_ci_run_calls_the_site_check_after_the_book():
    targets = ci_run_targets()
    assert "test" in targets and "check-site" in targets
    assert targets.index("book") < targets.index("check-site"), ".ci/run must check the site after building it"
    assert targets.index("chromium") < targets.index("test"), "chromium first, so the browser tests never skip in CI"


def test_workflow_builds_on_main_deploys_pages_and_tests_pull_requests():
    wf = workflow()
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert on["push"]["branches"] == ["main"] and "pull_request" in on
    jobs = wf["jobs"]
    build = next(job for job in jobs.values() if "actions/upload-pages-artifact" in job_uses(job))
    assert job_make_targets(build) == ci_run_targets(), "the Pages build must run exactly what .ci/run runs"
    assert "pull_request" not in build.get("if", "") or "!=" in build["if"]
    pr_jobs = [job for job in jobs.values() if "== 'pull_request'" in job.get("if", "")]
    assert pr_jobs and all("test" in job_make_targets(job) for job in pr_jobs)
    assert all(set(job_make_targets(job)) <= set(ci_run_targets()) for job in jobs.values()), \
        "the workflow may only call make targets that .ci/run calls"
    deploy = next(job for job in jobs.values() if "actions/deploy-pages" in job_uses(job))
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"


def test_workflow_caches_the_venv_and_the_executed_notebooks():
    caches = {}
    for job in workflow()["jobs"].values():
        for step in job.get("steps", []):
            if step.get("uses", "").startswith("actions/cache@"):
                caches.setdefault(step["with"]["path"], []).append(step["with"]["key"])
    assert all("hashFiles('pyproject.toml')" in key for key in caches[".venv"])
    [notebook_key] = caches["_build/.jupyter_cache"]
    assert all(part in notebook_key for part in ("pyproject.toml", "notebooks/**", "diffusion_lab/**"))


# ------------------------------------------------------------------------------- versions and citation
def test_version_and_year_agree_everywhere():
    v = version()
    cff = load_yaml(ROOT / "CITATION.cff")
    assert str(cff["version"]) == v, f"CITATION.cff says {cff['version']}, pyproject.toml {v}"
    top = re.search(r"^## \[(\S+)\] - (\d{4})-\d\d-\d\d", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), re.M)
    assert top and top.group(1) == v, f"CHANGELOG.md's latest entry must be {v}"
    year = str(cff["date-released"])[:4]
    assert top.group(2) == year, "CHANGELOG.md and CITATION.cff date the release differently"
    intro = (ROOT / "book/intro.md").read_text(encoding="utf-8")
    assert re.search(rf"\bEdition {re.escape(v)}, {year}\b", intro), f"book/intro.md must say 'Edition {v}, {year}'"
    assert str(load_yaml(ROOT / "_config.yml")["copyright"]) == year
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(rf"year\s*=\s*\{{{year}\}}", readme) and re.search(rf"version\s*=\s*\{{{re.escape(v)}\}}", readme)


def test_citation_and_badges_point_at_the_configured_repository():
    url = load_yaml(ROOT / "_config.yml")["repository"]["url"].rstrip("/")
    owner, repo = url.split("/")[-2:]
    site = f"https://{owner}.github.io/{repo}/"
    cff = load_yaml(ROOT / "CITATION.cff")
    assert cff["repository-code"].rstrip("/") == url and cff["url"] == site
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"]({site})" in readme, f"README's site badge must link to {site}"
    assert f"{url}/actions/workflows/book.yml/badge.svg" in readme


# ---------------------------------------------------------------------------------------- offline math
def test_mathjax_is_bundled_not_fetched():
    config = load_yaml(ROOT / "_config.yml")
    assert "sphinx-mathjax-offline" in config["sphinx"]["extra_extensions"]
    book = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]["book"]
    assert any(req.startswith("sphinx-mathjax-offline") for req in book)
    assert "mathjax_path" not in config["sphinx"].get("config", {}), "mathjax_path would override the bundled copy"
    # Executed chapters with a widget would otherwise pull require.js and the widget manager from a CDN.
    assert config["sphinx"]["config"].get("nb_ipywidgets_js") == {}


# ----------------------------------------------------------------------------------- the browser checks
def need_chromium():
    if shutil.which(os.environ.get("CHROMIUM", "chromium")) is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs it with `make chromium`")
        pytest.skip("chromium is not installed (apt-get install chromium); the browser checks did not run")


GOOD = """<!doctype html><html><head><title>good</title>
<script defer src="mathjax/tex-chtml.js"></script></head>
<body><p>Noise level <span class="math">\\(\\bar\\alpha_t\\)</span>, an image <img src="dot.png"></p>
<pre>print("$$ and \\\\( in code are fine")</pre></body></html>"""

BAD = {
    "raw_math.html": "<p>The schedule \\(\\bar\\alpha_t\\) falls.</p>",
    "unrendered.html": '<p><span class="math">\\(x_t\\)</span></p>',
    "broken_image.html": '<p><img src="missing.png"></p>',
    "js_error.html": "<script>noSuchFunction();</script><p>text</p>",
    "missing_video.html": '<video controls><source src="gone.mp4" type="video/mp4"></video>',
    "animation.html": '<img id="_anim_img0"><p>frames never set</p>',
    "cdn.html": '<script src="https://cdn.example.org/mathjax.js"></script><p>x</p>',
}
EXPECTED = {
    "raw_math.html": "raw TeX in the text",
    "unrendered.html": "unrendered math",
    "broken_image.html": "broken image",
    "js_error.html": "JavaScript error",
    "missing_video.html": "missing media source",
    "animation.html": "animation without a frame",
    "cdn.html": "script needs the internet",
}
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e2d4d1bb0000000049454e44ae426082"
)


def make_site(folder: Path, bad: bool) -> Path:
    folder.mkdir()
    mathjax = Path(importlib.import_module("sphinx-mathjax-offline").__file__).parent / "static" / "mathjax"
    (folder / "mathjax").symlink_to(mathjax)
    (folder / "dot.png").write_bytes(PNG)
    (folder / "index.html").write_text(GOOD, encoding="utf-8")
    if bad:
        for name, body in BAD.items():
            (folder / name).write_text(f"<!doctype html><html><body>{body}</body></html>", encoding="utf-8")
    return folder


def test_check_site_passes_a_good_page_and_names_each_fault(tmp_path):
    need_chromium()
    import check_site

    report = check_site.check_site(make_site(tmp_path / "site", bad=True))
    assert report["index.html"] == [], f"the good page (bundled MathJax, offline) should pass: {report['index.html']}"
    for page, kind in EXPECTED.items():
        assert kind in [k for k, _ in report[page]], f"{page}: expected '{kind}', got {report[page]}"


def test_check_site_exit_status(tmp_path, capsys):
    need_chromium()
    import check_site

    assert check_site.main([str(make_site(tmp_path / "good", bad=False))]) == 0
    assert check_site.main([str(make_site(tmp_path / "bad", bad=True))]) == 1
    assert "broken_image.html: broken image" in capsys.readouterr().out
    assert check_site.main([str(tmp_path / "nowhere")]) == 2


def test_print_pdf_prints_rendered_math_and_images(tmp_path):
    need_chromium()
    import print_pdf

    site = make_site(tmp_path / "site", bad=False)
    out = tmp_path / "pdf" / "book.pdf"
    stats = print_pdf.print_pdf(site, out)
    assert stats == {"images": 1, "broken": 0, "math": 1, "unrendered": 0}
    assert out.read_bytes().startswith(b"%PDF") and out.stat().st_size > 1000


def test_check_site_reads_matplotlib_animations(tmp_path):
    """A real jshtml animation (as the chapters embed them) passes; the same one without its frames fails."""
    need_chromium()
    import check_site
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation

    fig, ax = plt.subplots(figsize=(1, 1))
    image = ax.imshow([[0.0, 1.0], [1.0, 0.0]])
    html = FuncAnimation(fig, lambda i: image.set_data([[i, 1.0], [1.0, 0.0]]), frames=3).to_jshtml()
    plt.close(fig)
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(f"<!doctype html><html><body>{html}</body></html>", encoding="utf-8")
    no_frames = re.sub(r'frames\[\d+\] = "data:image/png;base64,[^"]*"', "", html, flags=re.S)
    assert no_frames != html
    (site / "no_frames.html").write_text(f"<!doctype html><html><body>{no_frames}</body></html>", encoding="utf-8")
    report = check_site.check_site(site)
    assert report["index.html"] == []
    assert "animation frame did not render" in [kind for kind, _ in report["no_frames.html"]]
