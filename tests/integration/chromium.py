"""Drive the machine's headless Chromium over the DevTools protocol (CDP).

Only the browser Debian installs (``apt-get install chromium``, which ``.ci/run``
does) is used; nothing is downloaded. The protocol is spoken directly over a
websocket (``websockets``, already a dependency through ``uvicorn[standard]``):
launch with ``--remote-debugging-port=0``, read the port from
``DevToolsActivePort`` in the profile directory, attach to the page target.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

_START_TIMEOUT_S = 30.0


def chromium_or_skip() -> str:
    """The chromium binary; skip the test off CI when it is missing, fail on CI."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is not None:
        return binary
    reason = "chromium is not installed (Debian: apt-get install -y chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; .ci/run installs it on CI", pytrace=False)
    pytest.skip(f"{reason}; CI installs it and runs this test")


@dataclass
class Page:
    """One page target: send commands, collect events."""

    ws: ClientConnection
    events: list[dict[str, Any]] = field(default_factory=list)
    _next_id: int = 0

    def send(self, method: str, timeout: float = 20.0, **params: Any) -> Any:
        """Send a command and return its result (events seen meanwhile are kept)."""
        self._next_id += 1
        self.ws.send(
            json.dumps({"id": self._next_id, "method": method, "params": params})
        )
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(
                self.ws.recv(timeout=max(0.0, deadline - time.monotonic()))
            )
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_event(self, method: str, timeout: float = 20.0) -> dict[str, Any]:
        """The first event named ``method`` (already seen or coming)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.events.append(json.loads(self.ws.recv(timeout=remaining)))

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its value."""
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll ``expression`` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression} still {value!r} after {timeout} s")
            time.sleep(0.05)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in (
                "error",
                "assert",
            ):
                found.append(json.dumps(params.get("args"))[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(json.dumps(params["entry"])[:500])
        return found

    def screenshot(self, path: Path) -> Path:
        """Save a PNG of the whole page."""
        result = self.send(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True
        )
        path.write_bytes(base64.b64decode(result["data"]))
        return path


@contextlib.contextmanager
def open_page(binary: str, profile: Path, url: str) -> Iterator[Page]:
    """Start headless Chromium, open ``url``, yield the page; always stop it."""
    profile.mkdir(parents=True, exist_ok=True)
    log = (profile / "chromium.log").open("wb")
    process = subprocess.Popen(  # noqa: S603 - the machine's chromium, fixed flags
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            "--window-size=1300,1100",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its helper processes stop with its group
    )
    try:
        port = _devtools_port(profile, process)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/json/list", timeout=10
        ) as response:
            targets = json.load(response)
        page_url = next(
            t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"
        )
        with connect(page_url, max_size=None, open_timeout=10) as ws:
            page = Page(ws)
            for domain in ("Runtime", "Log", "Page"):
                page.send(f"{domain}.enable")
            page.send("Page.navigate", url=url)
            page.wait_event("Page.loadEventFired")
            yield page
    finally:
        _stop(process)
        log.close()


def _devtools_port(profile: Path, process: subprocess.Popen[bytes]) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = (profile / "chromium.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"chromium exited with {process.returncode}: {text}")
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(marker.read_text().splitlines()[0])
        time.sleep(0.05)
    raise TimeoutError(f"chromium wrote no {marker} within {_START_TIMEOUT_S} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
