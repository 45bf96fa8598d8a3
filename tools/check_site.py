"""Open every page of the built book in headless Chromium, offline, and fail on what a reader would see broken.

    python tools/check_site.py [_build/html]          (make check-site)

Per page it reports: math that MathJax did not render (a `.math` element without MathJax output, a MathJax
error, or TeX delimiters left in the prose), local images that do not load, audio/video whose local source is
missing, matplotlib animations without a frame (or printed as text instead of rendered), JavaScript errors and
console errors, and scripts fetched from another host (the book must work without internet).
Exit status 0 when every page is clean, 1 when any is not, 2 when it cannot run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chromium import BrowserError, Chromium, SiteServer, redirect_target  # noqa: E402

SKIP_DIRS = {"_static", "_sources", "_images", "_downloads"}

# Runs in the page after its load event; returns a list of [kind, detail].
PAGE_CHECK = r"""
(async () => {
  const problems = [];
  const say = (kind, detail) => problems.push([kind, String(detail).replace(/\s+/g, ' ').trim().slice(0, 120)]);
  const within = (promise, ms) => Promise.race([promise, new Promise(r => setTimeout(r, ms))]);
  const local = (u) => { try { return new URL(u, location.href).origin === location.origin; } catch (e) { return false; } };

  // Math: MathJax typesets after load; wait for it (if it never loaded, the checks below catch that).
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await within(MathJax.startup.promise, 30000);
  for (const el of document.querySelectorAll('.math')) {
    if (!el.querySelector('mjx-container')) say('unrendered math', el.textContent);
  }
  for (const el of document.querySelectorAll('mjx-merror, [data-mjx-error]')) {
    say('MathJax error', el.getAttribute('data-mjx-error') || el.textContent);
  }
  const rawTex = /\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{|\$[^$\n]*\\[A-Za-z]+[^$\n]*\$/;
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node; (node = walker.nextNode()); ) {
    if (!rawTex.test(node.nodeValue)) continue;
    if (node.parentElement.closest('pre, code, script, style, textarea, mjx-container, .highlight')) continue;
    say('raw TeX in the text', node.nodeValue);
  }

  // Images (lazy ones are asked to load now), including the frame of each matplotlib animation.
  await Promise.all([...document.images].map(async (img) => {
    const anim = img.id.startsWith('_anim_img');
    const src = img.currentSrc || img.getAttribute('src') || '';
    if (!src) { say(anim ? 'animation without a frame' : 'image without a source', img.outerHTML); return; }
    if (!src.startsWith('data:') && !local(src)) return;  // e.g. a badge; external images are not ours
    img.loading = 'eager';
    await within(img.decode().catch(() => null), 15000);
    if (!(img.complete && img.naturalWidth > 0)) say(anim ? 'animation frame did not render' : 'broken image', src);
  }));
  if (/<matplotlib\.animation\.\w+ (object )?at 0x/.test(document.body.innerText)) {
    say('animation printed as text, not rendered', 'matplotlib.animation object');
  }

  // Audio and video: every local source must exist.
  for (const media of document.querySelectorAll('audio, video')) {
    const sources = [media.getAttribute('src'), ...[...media.querySelectorAll('source')].map(s => s.getAttribute('src'))]
      .filter(Boolean);
    if (!sources.length) say('media without a source', media.outerHTML);
    for (const s of sources) {
      if (s.startsWith('data:') || !local(s)) continue;
      const reply = await fetch(new URL(s, location.href), {method: 'HEAD'}).catch(() => null);
      if (!reply || !reply.ok) say('missing media source', s);
    }
  }
  return problems;
})()
"""


def pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if not SKIP_DIRS & set(p.relative_to(site).parts))


def redirect_problems(page: Path) -> list[tuple[str, str]] | None:
    """None for an ordinary page; for a redirect stub (the site's index.html), whether its target exists."""
    target = redirect_target(page)
    if target is None:
        return None
    return [] if (page.parent / urlsplit(target).path).is_file() else [("redirect to a missing page", target)]


def browser_problems(events: list[dict], origin: str) -> list[tuple[str, str]]:
    """JavaScript exceptions, console errors and off-line failures among one page's CDP events."""
    def local(url: str) -> bool:
        return not url or url.startswith(("data:", "blob:", "about:")) or url.startswith(origin)

    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params["exceptionDetails"]
            found.append(("JavaScript error", d.get("exception", {}).get("description") or d.get("text", "")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            found.append(("console error", text))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            # The browser asks for /favicon.ico by itself; the book declares none.
            if local(entry.get("url", "")) and not entry.get("url", "").endswith("/favicon.ico"):
                found.append(("console error", f"{entry['text']} {entry.get('url', '')}".strip()))
        elif method == "Network.requestWillBeSent" and params.get("type") == "Script":
            if not local(params["request"]["url"]):
                found.append(("script needs the internet", params["request"]["url"]))
    return [(kind, " ".join(detail.split())[:200]) for kind, detail in found]


def check_site(site: Path, chromium: str | None = None, page_timeout: float = 60.0) -> dict[str, list]:
    """{page path relative to `site`: [(kind, detail), ...]} for every HTML page under `site`."""
    server = SiteServer(site)
    origin = server.url.rstrip("/")
    report = {}
    try:
        with Chromium(chromium) as browser:
            for page in pages(site):
                rel = page.relative_to(site).as_posix()
                found = redirect_problems(page)
                if found is not None:
                    report[rel] = found
                    continue
                try:
                    browser.open(server.url + rel, timeout=page_timeout)
                    found = [tuple(p) for p in browser.evaluate(PAGE_CHECK, timeout=page_timeout)]
                    browser.drain()
                    found += browser_problems(browser.events, origin)
                except BrowserError as err:
                    found = [("page did not load", str(err))]
                report[rel] = found
    finally:
        server.close()
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", default="_build/html", type=Path, help="the built site (default: %(default)s)")
    parser.add_argument("--chromium", help="the browser binary (default: chromium on PATH, or $CHROMIUM)")
    parser.add_argument("--page-timeout", type=float, default=60.0, help="seconds per page (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"check-site: no built site at {args.site} (run `make book` first)", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        report = check_site(args.site, args.chromium, args.page_timeout)
    except BrowserError as err:
        print(f"check-site: {err}", file=sys.stderr)
        return 2
    bad = {page: found for page, found in report.items() if found}
    for page, found in bad.items():
        for kind, detail in found:
            print(f"{page}: {kind}: {detail}")
    seconds = time.monotonic() - start
    if bad:
        print(f"check-site: {len(bad)} of {len(report)} pages have problems ({seconds:.0f} s)")
        return 1
    print(f"check-site: {len(report)} pages render cleanly offline ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
