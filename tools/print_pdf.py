"""Print the single-page build of the book to one PDF with headless Chromium (make pdf).

    python tools/print_pdf.py [_build/singlehtml] [_build/pdf/diffusion-lab.pdf]

Chromium's own `--print-to-pdf` prints at the load event, before MathJax has typeset anything, so this drives
the same browser over the DevTools protocol instead: open the page (served locally, offline), wait for MathJax
and for every image, then print. Animations print their first frame, which is what the page shows before
anyone presses play. Exercise solutions stay hidden, as on the site: the PDF is the students' copy.
"""
from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chromium import BrowserError, Chromium, SiteServer, redirect_target  # noqa: E402

PREPARE = r"""
(async () => {
  const within = (promise, ms) => Promise.race([promise, new Promise(r => setTimeout(r, ms))]);
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await within(MathJax.startup.promise, 120000);
  // Solutions are folded away on the site; the theme would unfold every toggle for print. Keep them out.
  const style = document.createElement('style');
  style.textContent = `@media print {
    .solution, .animation .anim-controls { display: none !important; }
    img, figure, .cell_output, .cell_input { break-inside: avoid; }
    pre { white-space: pre-wrap !important; overflow-wrap: anywhere; }  /* paper cannot scroll sideways */
    /* Page breaks are ignored inside the theme's flex layout: lay it out as plain blocks for print. */
    .bd-container, .bd-container__inner, .bd-main, .bd-content, .bd-article-container, .bd-article { display: block !important; }
  }`;
  document.head.appendChild(style);
  // Each chapter starts on a new page. The single-page builder marks where each document begins.
  for (const mark of document.querySelectorAll('span[id^="document-"]')) {
    if (mark.nextElementSibling) mark.nextElementSibling.style.breakBefore = 'page';
  }
  // Only the book's own images: the browser is offline, so a remote one (a Colab badge) would print as a hole.
  const local = (img) => img.src.startsWith('data:') || new URL(img.src, location.href).origin === location.origin;
  for (const img of document.images) if (!local(img)) img.style.display = 'none';
  const images = [...document.images].filter(local);
  for (const img of images) img.loading = 'eager';
  await Promise.all(images.map(img => within(img.decode().catch(() => null), 30000)));
  return {
    images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).length,
    math: document.querySelectorAll('mjx-container').length,
    unrendered: [...document.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container')).length,
  };
})()
"""


def single_page(site: Path) -> str:
    """The page to print, relative to `site`.

    Jupyter Book writes the single page to the root document's path (book/intro.html) and redirects index.html
    there, but every link inside it is relative to the site root. A copy at the root resolves them, and its links
    to its own sections become in-document links (which stay clickable in the PDF).
    """
    target = redirect_target(site / "index.html")
    if target is None:
        return "index.html"
    target = target.split("#")[0]
    html = (site / target).read_text(encoding="utf-8").replace(f'href="{target}#', 'href="#')
    (site / "diffusion-lab.html").write_text(html, encoding="utf-8")
    return "diffusion-lab.html"


def print_pdf(site: Path, out: Path, chromium: str | None = None) -> dict:
    page = single_page(site)
    server = SiteServer(site)
    try:
        with Chromium(chromium) as browser:
            browser.open(server.url + page, timeout=300)
            stats = browser.evaluate(PREPARE, timeout=300)
            pdf = browser.call("Page.printToPDF", tab=True, timeout=600, printBackground=True,
                               paperWidth=8.27, paperHeight=11.69,  # A4, in inches
                               marginTop=0.6, marginBottom=0.6, marginLeft=0.6, marginRight=0.6,
                               displayHeaderFooter=True, headerTemplate="<span></span>",
                               footerTemplate='<div style="font-size:8px;width:100%;text-align:center">'
                                              '<span class="pageNumber"></span> / <span class="totalPages"></span></div>')
    finally:
        server.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(pdf["data"]))
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", default="_build/singlehtml", type=Path)
    parser.add_argument("out", nargs="?", default="_build/pdf/diffusion-lab.pdf", type=Path)
    parser.add_argument("--chromium", help="the browser binary (default: chromium on PATH, or $CHROMIUM)")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"pdf: no single-page build at {args.site} (jupyter-book build . --builder singlehtml)", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        stats = print_pdf(args.site, args.out, args.chromium)
    except BrowserError as err:
        print(f"pdf: {err}", file=sys.stderr)
        return 2
    print(f"pdf: {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, {stats['math']} formulas, "
          f"{stats['images']} images) in {time.monotonic() - start:.0f} s")
    if stats["broken"] or stats["unrendered"]:
        print(f"pdf: {stats['broken']} images did not load and {stats['unrendered']} formulas did not render",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
