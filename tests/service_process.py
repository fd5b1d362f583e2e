"""A real `prop-stream` process for tests: started, read, signalled, stopped.

The service logs to stderr (JSON lines, an access-log line per request). A pipe
nobody reads fills up and blocks the service, so :class:`ServiceProcess` reads
stderr on a thread of its own from the start and keeps every line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

PROP_STREAM = Path(sys.executable).with_name("prop-stream")
_ROOT = Path(__file__).resolve().parents[1]


class ServiceProcess:
    """``prop-stream ARGS`` as a child process whose stderr is read as it comes.

    Args:
        args: The command's arguments (``["serve", "--db", ...]``).
        cwd: Its working directory.
        env: Extra environment variables.
    """

    def __init__(
        self,
        args: Sequence[str],
        cwd: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - our own command
            [str(PROP_STREAM), *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._out: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._out_reader = threading.Thread(target=self._read_out, daemon=True)
        self._out_reader.start()
        self.url: str | None = None

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._out.append(line)

    def lines(self) -> list[str]:
        """Every stderr line so far."""
        with self._cond:
            return list(self._lines)

    def stdout(self) -> str:
        """Everything printed on stdout so far."""
        return "".join(self._out)

    def wait_for_line(
        self, predicate: Callable[[str], bool], timeout_s: float = 120.0
    ) -> str:
        """The first stderr line (old or new) that matches, waiting for it.

        Raises:
            AssertionError: None came in time, or the process ended first.
        """
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if left <= 0 or (
                    self.proc.poll() is not None and not self._reader.is_alive()
                ):
                    text = "".join(self._lines[-40:])
                    raise AssertionError(f"no matching line; last stderr:\n{text}")
                self._cond.wait(min(left, 0.5))

    def wait_ready(self, timeout_s: float = 120.0) -> str:
        """Wait for the ready line and return the service's base URL."""
        line = self.wait_for_line(
            lambda text: text.startswith("prop-stream: ready on http://"), timeout_s
        )
        self.url = line.split("ready on ", 1)[1].split()[0]
        return self.url

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal."""
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        """Wait for the exit status (and the rest of stderr)."""
        code = self.proc.wait(timeout_s)
        self._close()
        return code

    def _close(self) -> None:
        self._reader.join(10)
        self._out_reader.join(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def stop(self, timeout_s: float = 90.0) -> int:
        """SIGTERM, then the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL it if it still runs (a test's clean-up)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._close()


def run_prop_stream(
    args: Sequence[str], cwd: Path | None = None, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a short ``prop-stream`` command to its end."""
    return subprocess.run(  # noqa: S603 - our own command
        [str(PROP_STREAM), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def api_server(db: Path) -> Iterator[str]:
    """A real uvicorn serving the API on ``db`` until the block ends."""
    port = free_port()
    log_path = db.with_suffix(f".{port}.log")
    env = {
        **os.environ,
        "PROP_STREAM_API_DB": str(db),
        "PROP_STREAM_API_CACHE_SYNC_INTERVAL_S": "0.2",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--no-access-log", "--log-level", "warning"],
            cwd=_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    output = log_path.read_text(errors="replace")
                    pytest.fail(f"uvicorn exited with {process.returncode}:\n{output}")
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("uvicorn did not answer /healthz within 30 s")
                time.sleep(0.1)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
