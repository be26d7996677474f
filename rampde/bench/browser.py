"""Drive headless Chromium over the DevTools protocol through a pipe, with the standard library.

``--remote-debugging-pipe`` makes Chromium read protocol messages on fd 3 and write them on fd 4,
each one JSON object ended by a NUL byte: no websocket, no third-party package. ``load_page``
(``DevTools.navigate``) opens a file and waits for its load event; ``evaluate`` runs JavaScript in
the page; ``errors`` lists console errors, uncaught exceptions and error log entries;
``screenshot`` saves a PNG. ``screenshot_dashboard`` does all of it for a dashboard
(``rampde-bench report --screenshot``); the browser test of the dashboard uses the same driver.
Chromium is not a Python dependency: Debian's ``chromium`` package, or any Chrome on the PATH.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM_CANDIDATES = ("chromium", "/usr/bin/chromium", "chromium-browser", "google-chrome")
FLAGS = (
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
)


def find_chromium() -> str | None:
    """The path of a Chromium binary, or None."""
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class DevTools:
    """One headless Chromium and one page, spoken to over the DevTools pipe."""

    def __init__(self, binary: str, width: int = 1400, height: int = 2000) -> None:
        self._profile = tempfile.mkdtemp(prefix="rampde-chromium-")
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # Move the child's ends to fds >= 10, so that dup2 onto 3 and 4 below always copies.
        child_in = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def wire_pipes() -> None:  # runs in the child, before exec
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [binary, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-pipe",
                f"--window-size={width},{height}", "about:blank"]  # fmt: skip
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
            preexec_fn=wire_pipes, close_fds=False,
        )  # fmt: skip
        os.close(child_in)
        os.close(child_out)
        self._write = to_chrome_w
        self._read = from_chrome_r
        self._inbox: queue.Queue[dict | None] = queue.Queue()
        self._events: list[dict] = []
        self._next_id = 0
        threading.Thread(target=self._reader, daemon=True).start()
        self.session = self._attach(width, height)

    # -- transport -----------------------------------------------------------------------
    def _reader(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._read, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._inbox.put(None)
                return
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._inbox.put(json.loads(message))

    def send(self, method: str, params: dict | None = None, *, session: str | None = None,
             timeout: float = 30.0) -> dict:  # fmt: skip
        """Send one command and wait for its answer (events seen meanwhile are kept)."""
        self._next_id += 1
        message: dict = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._get(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def _get(self, deadline: float, waiting_for: str) -> dict:
        try:
            reply = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"Chromium did not answer {waiting_for}") from None
        if reply is None:
            raise RuntimeError(f"Chromium closed the pipe; its stderr:\n{self.stderr()[-3000:]}")
        return reply

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        """Wait for the first event named ``method`` (also one that already came)."""
        for event in self._events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._get(deadline, method)
            self._events.append(event)
            if event.get("method") == method:
                return event

    def drain(self) -> None:
        """Keep every event that has arrived so far."""
        while True:
            try:
                event = self._inbox.get_nowait()
            except queue.Empty:
                return
            if event is not None:
                self._events.append(event)

    # -- page ----------------------------------------------------------------------------
    def _attach(self, width: int, height: int) -> str:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        sid = session["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.send(domain, session=sid)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                  session=sid)  # fmt: skip
        return sid

    def evaluate(self, expression: str) -> object:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send("Runtime.evaluate",
                           {"expression": expression, "returnByValue": True,
                            "awaitPromise": True}, session=self.session)  # fmt: skip
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url: str, timeout: float = 30.0) -> float:
        """Open ``url`` and return the seconds until its load event."""
        start = time.monotonic()
        self._events = [e for e in self._events if e.get("method") != "Page.loadEventFired"]
        self.send("Page.navigate", {"url": url}, session=self.session)
        self.wait_event("Page.loadEventFired", timeout)
        return time.monotonic() - start

    def screenshot(self, path: Path) -> Path:
        """A PNG of the viewport."""
        data = self.send("Page.captureScreenshot", {"format": "png"}, session=self.session)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        self.drain()
        found = []
        for event in self._events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text")
                found.append(f"uncaught: {text}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = [str(a.get("value", a.get("description", "")))
                        for a in params.get("args", [])]  # fmt: skip
                found.append(f"console.{params['type']}: {' '.join(args)}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(f"log: {params['entry'].get('text')}")
        return found

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._write, self._read):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> DevTools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until(browser: DevTools, expression: str, timeout: float = 15.0) -> object:
    """Poll a JavaScript expression until it is truthy; return its last value."""
    deadline = time.monotonic() + timeout
    value = browser.evaluate(expression)
    while not value and time.monotonic() < deadline:
        time.sleep(0.1)
        value = browser.evaluate(expression)
    return value


DASHBOARD_READY = "document.documentElement.dataset.dashboardReady"
MIN_SCREENSHOT_PX = 200  # each side of a screenshot's viewport, at least


def screenshot_dashboard(html: Path, png: Path, *, width: int = 1400, height: int = 1600,
                         timeout: float = 30.0) -> Path:
    """Open the dashboard ``html`` in headless Chromium, wait until its first tab is drawn and save
    the viewport (``width`` x ``height`` CSS pixels) as ``png``.

    ``FileNotFoundError`` when there is no Chromium or no ``html``; ``RuntimeError`` when the page
    does not finish drawing or reports errors (no PNG is written then).
    """
    if min(width, height) < MIN_SCREENSHOT_PX:
        raise ValueError(f"screenshot size must be at least {MIN_SCREENSHOT_PX}x{MIN_SCREENSHOT_PX}, "
                         f"got {width}x{height}")
    html = Path(html)
    if not html.is_file():
        raise FileNotFoundError(f"no dashboard at {html}")
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium found (tried " + ", ".join(CHROMIUM_CANDIDATES) + "); "
                                "install Debian's chromium package to take screenshots")
    with DevTools(binary, width=width, height=height) as browser:
        browser.navigate(html.resolve().as_uri(), timeout)
        if not wait_until(browser, DASHBOARD_READY, timeout):
            raise RuntimeError(f"the dashboard {html} was not drawn within {timeout:.0f} s")
        errors = browser.errors()
        if errors:
            raise RuntimeError(f"the dashboard {html} reported errors: {'; '.join(errors[:5])}")
        png = Path(png)
        png.parent.mkdir(parents=True, exist_ok=True)
        tmp = png.with_name(png.name + ".part")
        browser.screenshot(tmp)
        os.replace(tmp, png)
    return png
