"""Headless Chromium driven over the DevTools protocol: load a page, collect what went wrong, take a screenshot.

Used by tests/test_docs.py. Chromium is Debian's `chromium` package (`make browser` installs it when missing).
"""
from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from websockets.sync.client import connect

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-default-apps", "--disable-sync", "--no-first-run",
         "--metrics-recording-only", "--disable-extensions", "--window-size=1280,900"]

# What a page may show in the console and still pass: nothing. What it may request: only the local server.
BROKEN_IMAGES_JS = """Array.from(document.images)
  .filter(image => !image.complete || image.naturalWidth === 0)
  .map(image => image.currentSrc || image.src)"""


# What a reader sees of the page's content (MkDocs Material's article): code blocks that scroll sideways (their text is
# wider than their box), tables that show past the content column (a table in frames that scroll sideways shows only
# as far as the narrowest frame), and the outputs on show — the builder's `docs-output` frames and the images — that
# have a size (not in a collapsed block).
LAYOUT_JS = """(() => {
  const content = document.querySelector('.md-content__inner') || document.body;
  const column = (document.querySelector('.md-content') || document.body).getBoundingClientRect().right + 1;
  const shown = element => element.getClientRects().length > 0 && element.offsetWidth > 0 && element.offsetHeight > 0;
  const wideCode = Array.from(content.querySelectorAll('pre > code'))
    .filter(code => shown(code) && code.scrollWidth > code.clientWidth + 1)
    .map(code => code.textContent.trim().split('\\n')[0].slice(0, 80));
  const clips = element => ['auto', 'scroll', 'hidden', 'clip'].includes(getComputedStyle(element).overflowX);
  const spillingTables = Array.from(content.querySelectorAll('table')).filter(table => {
    if (!shown(table)) return false;
    let visibleRight = table.getBoundingClientRect().right;
    for (let frame = table.parentElement; frame && frame !== content; frame = frame.parentElement)
      if (clips(frame)) visibleRight = Math.min(visibleRight, frame.getBoundingClientRect().right);
    return visibleRight > column;
  }).map(table => (table.querySelector('th, td') || table).textContent.trim().slice(0, 60));
  const outputs = Array.from(content.querySelectorAll('.docs-output')).filter(shown).length;
  const images = Array.from(content.querySelectorAll('img')).filter(image => shown(image) && image.naturalWidth > 0).length;
  return {wideCode, spillingTables, outputs, images};
})()"""


@dataclass
class PageReport:
    url: str
    console_errors: list[str] = field(default_factory=list)   # console.error, uncaught exceptions, log errors
    failed_requests: list[str] = field(default_factory=list)  # network failures and HTTP status >= 400
    foreign_requests: list[str] = field(default_factory=list)  # anything not from the local server
    broken_images: list[str] = field(default_factory=list)
    wide_code: list[str] = field(default_factory=list)         # code blocks that scroll sideways (first line of each)
    spilling_tables: list[str] = field(default_factory=list)   # tables reaching past the content column
    visible_outputs: int = 0                                   # `docs-output` frames on show
    visible_images: int = 0                                    # loaded images on show in the content

    @property
    def problems(self) -> list[str]:
        return ([f"console: {text}" for text in self.console_errors]
                + [f"request failed: {text}" for text in self.failed_requests]
                + [f"request outside the site: {url}" for url in self.foreign_requests]
                + [f"broken image: {url}" for url in self.broken_images]
                + [f"code wider than its column: {line}" for line in self.wide_code]
                + [f"table spills outside the content: {text}" for text in self.spilling_tables])


class Chromium:
    "One headless Chromium process; `load(url)` opens the page in a fresh tab and reports on it."

    def __init__(self, executable: str | None = None, timeout: float = 30.0):
        self.executable = executable or shutil.which("chromium")
        if self.executable is None:
            raise RuntimeError("chromium is not installed: run `make browser` (apt-get install chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.process = subprocess.Popen(
            [self.executable, *FLAGS, "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._resources = contextlib.ExitStack()  # websockets wants its connection used as a context manager
        self.socket = self._resources.enter_context(connect(self._browser_endpoint(), max_size=None,
                                                            open_timeout=timeout))
        self._next_id = 0

    def _browser_endpoint(self) -> str:
        "Chromium writes its port and browser path to DevToolsActivePort in the profile once it listens."
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode} before listening")
            lines = marker.read_text().split() if marker.exists() else []
            if len(lines) == 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.05)
        raise TimeoutError("chromium did not open its DevTools port")

    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        return self._next_id

    def _call(self, method: str, params: dict | None = None, session: str | None = None,
              events: list | None = None) -> dict:
        "Send a command and wait for its answer; events that arrive meanwhile are appended to `events`."
        call_id = self._send(method, params, session)
        deadline = time.monotonic() + self.timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if events is not None and "method" in message:
                events.append(message)

    def load(self, url: str, screenshot: Path | None = None, full_page: bool = False,
             settle: float = 0.3) -> PageReport:
        "Open `url` in a new tab, wait for its load event (and `settle` seconds), report what went wrong; maybe a screenshot."
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        events: list[dict] = []
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                self._call(f"{domain}.enable", session=session, events=events)
            self._call("Page.navigate", {"url": url}, session=session, events=events)
            deadline = time.monotonic() + self.timeout
            while not any(event["method"] == "Page.loadEventFired" for event in events):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url}: no load event within {self.timeout} s")
                message = json.loads(self.socket.recv(timeout=max(0.1, deadline - time.monotonic())))
                if "method" in message:
                    events.append(message)
            end = time.monotonic() + settle  # late console messages (scripts run after load)
            while time.monotonic() < end:
                try:
                    message = json.loads(self.socket.recv(timeout=max(0.01, end - time.monotonic())))
                except TimeoutError:
                    break
                if "method" in message:
                    events.append(message)
            broken = self._call("Runtime.evaluate", {"expression": BROKEN_IMAGES_JS, "returnByValue": True},
                                session=session, events=events)["result"]["value"]
            layout = self._call("Runtime.evaluate", {"expression": LAYOUT_JS, "returnByValue": True},
                                session=session, events=events)["result"]["value"]
            if screenshot is not None:
                options = {"format": "png"}
                if full_page:
                    size = self._call("Page.getLayoutMetrics", session=session, events=events)["cssContentSize"]
                    options.update(captureBeyondViewport=True,
                                   clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
                shot = self._call("Page.captureScreenshot", options, session=session, events=events)
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            report = self._report(url, events, broken)
            report.wide_code, report.spilling_tables = layout["wideCode"], layout["spillingTables"]
            report.visible_outputs, report.visible_images = layout["outputs"], layout["images"]
            return report
        finally:
            self._call("Target.closeTarget", {"targetId": target})

    @staticmethod
    def _report(url: str, events: list[dict], broken_images: list[str]) -> PageReport:
        report = PageReport(url, broken_images=list(broken_images))
        origin = "/".join(url.split("/")[:3])
        requests = {}
        for event in events:
            method, params = event["method"], event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                report.console_errors.append(" ".join(str(arg.get("value", arg.get("description", "")))
                                                      for arg in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                report.console_errors.append(details.get("exception", {}).get("description", details["text"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                report.console_errors.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
            elif method == "Network.requestWillBeSent":
                request_url = params["request"]["url"]
                requests[params["requestId"]] = request_url
                if not request_url.startswith((origin, "data:", "blob:", "about:")):
                    report.foreign_requests.append(request_url)
            elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
                report.failed_requests.append(f"{params['response']['status']} {params['response']['url']}")
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                report.failed_requests.append(f"{params['errorText']} {requests.get(params['requestId'], '?')}")
        return report

    def close(self):
        try:
            self._resources.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
