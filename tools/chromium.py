"""A small headless-Chromium driver over the DevTools protocol (CDP), for check_site.py and print_pdf.py.

It runs Debian's `chromium` (no browser download of its own) and talks to it through one websocket
(`websockets`, from PyPI). The browser gets an empty profile and no network except 127.0.0.1: every other
host name fails to resolve, so a page that still needs the internet shows it here as it would offline.
The built site is served by a local HTTP server, as GitHub Pages or a classroom mirror would serve it.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    # Offline: only the local server resolves.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-port=0",
]


class BrowserError(RuntimeError):
    """Chromium is missing, did not start, or a protocol call failed."""


def find_chromium(explicit: str | None = None) -> str:
    for name in [explicit, os.environ.get("CHROMIUM"), "chromium", "chromium-browser"]:
        if name and shutil.which(name):
            return shutil.which(name)
    raise BrowserError("no Chromium found: install Debian's `chromium` (apt-get install -y chromium) or set CHROMIUM")


REFRESH = re.compile(r'<meta[^>]+http-equiv="refresh"[^>]+content="\d+;\s*url=([^"]+)"', re.I)


def redirect_target(page: Path) -> str | None:
    """The URL a redirect stub (like the book's index.html) sends the reader to; None for a real page."""
    match = REFRESH.search(page.read_text(encoding="utf-8", errors="replace"))
    return match.group(1) if match else None


class SiteServer:
    """Serves a folder on 127.0.0.1 at a free port, in a background thread."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class Chromium:
    """One headless browser with one tab. `call` sends a CDP command; events are kept in `self.events`."""

    def __init__(self, binary: str | None = None, start_timeout: float = 30.0):
        try:
            from websockets.sync.client import connect
        except ImportError:
            raise BrowserError("the Python package `websockets` (>= 13) is missing; it is in the [book] extra") from None

        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.proc = subprocess.Popen(
            [find_chromium(binary), *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # Chromium writes its port and websocket path to DevToolsActivePort in the profile once it listens.
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + start_timeout
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise BrowserError("Chromium did not start (try running it by hand with --headless)")
            time.sleep(0.05)
        port, path = port_file.read_text().split()
        self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=start_timeout)
        self.next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", tab=True)

    def call(self, method: str, tab: bool = False, timeout: float = 60.0, **params) -> dict:
        """Send one command (to the tab when `tab`) and wait for its answer, keeping the events that arrive."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if tab:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = self._receive(deadline, method)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 60.0) -> dict:
        """Wait for an event of the tab (one that already arrived counts)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for e in self.events[seen:]:
                if e.get("method") == event:
                    return e
            seen = len(self.events)
            self.events.append(self._receive(deadline, event))

    def drain(self, quiet: float = 0.2):
        """Keep the events that arrive until none has for `quiet` seconds."""
        while True:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=quiet)))
            except TimeoutError:
                return

    def _receive(self, deadline: float, what: str) -> dict:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BrowserError(f"timed out waiting for {what}")
        try:
            return json.loads(self.ws.recv(timeout=left))
        except TimeoutError:
            raise BrowserError(f"timed out waiting for {what}") from None

    def open(self, url: str, timeout: float = 60.0):
        """Navigate the tab to `url` and wait for its load event."""
        self.events.clear()
        self.call("Page.navigate", tab=True, url=url)
        self.wait_for("Page.loadEventFired", timeout=timeout)

    def evaluate(self, expression: str, timeout: float = 60.0):
        """Run JavaScript in the page (awaiting a promise) and return its JSON value."""
        result = self.call("Runtime.evaluate", tab=True, timeout=timeout, expression=expression,
                           awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    def close(self):
        try:
            if getattr(self, "ws", None):
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
