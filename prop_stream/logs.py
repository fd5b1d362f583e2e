"""Logging, configured once per process: JSON lines by default, text on a terminal.

:func:`configure_logging` is called by the command line before a command runs
(``serve`` and ``demo`` above all). Every logger of the process — ours, uvicorn's,
kafka-python's — goes through one handler on stderr:

- ``json`` (the default when stderr is not a terminal): one JSON object per line
  with ``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``message`` and the record's
  extra fields (the access log's ``method``, ``path``, ``status``, ...);
- ``text`` (the default on a terminal): ``HH:MM:SS LEVEL logger: message``.

``PROP_STREAM_LOG_FORMAT`` (``json``, ``text``, ``auto``) and
``PROP_STREAM_LOG_LEVEL`` choose. Secrets never reach a log: the access log
records no header and no query string, and no code logs a token.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import IO, Any, Final, Literal

import orjson
from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["auto", "json", "text"]

#: Third-party loggers that are too chatty for a service's log. kafka-python logs
#: an ERROR per reconnect attempt during an outage; the Kafka source reports the
#: outage itself, one line per retry.
_QUIET: Final = {"kafka": logging.CRITICAL, "uvicorn.access": logging.WARNING}
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _UtcJsonFormatter(JsonFormatter):
    """JSON lines with a UTC ``ts`` and short key names."""

    def add_fields(
        self,
        log_data: dict[str, Any],
        record: logging.LogRecord,
        message_dict: dict[str, Any],
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["ts"] = datetime.fromtimestamp(record.created, UTC).isoformat(
            timespec="milliseconds"
        )
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        # uvicorn adds an ANSI-coloured copy of its message for terminals.
        log_data.pop("color_message", None)


#: The access log's logger name (also the ``logger`` field of its JSON lines).
ACCESS_LOGGER: Final = "prop_stream.access"


class AccessLog:
    """The access log's fast path: one line per request, written in batches.

    A request costs one small dict serialised by orjson (or one f-string) and a
    list append: formatting a ``LogRecord`` through the JSON formatter and
    writing it to an unbuffered stderr cost about as much as answering a hot
    read. A thread writes what accumulated every ``flush_interval_s`` seconds
    (and at exit), so a line reaches the log within that time. The lines have
    the fields and format of every other log line.

    Args:
        stream: Where lines go (stderr).
        fmt: ``json`` or ``text``.
        flush_interval_s: The longest a line waits in the buffer.
    """

    def __init__(
        self, stream: IO[str], fmt: Literal["json", "text"], flush_interval_s: float
    ) -> None:
        self._stream = stream
        self._json = fmt == "json"
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = flush_interval_s
        self._second = -1
        self._stamp = ""
        self._clock = ""
        self._thread = threading.Thread(
            target=self._flush_forever, name="prop-stream-access-log", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)

    def record(
        self,
        method: str,
        path: str,
        route: str,
        status: int,
        duration_ms: float,
        client: str | None,
    ) -> None:
        """Add one request's line."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = datetime.fromtimestamp(second, UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
            self._clock = datetime.fromtimestamp(second, UTC).strftime("%H:%M:%S")
        millis = int((now - second) * 1000)
        message = f"{method} {path} {status} {duration_ms:.1f} ms"
        if self._json:
            # Only the path and the client come from outside: orjson escapes
            # them; method and route are ours (api/telemetry.py bounds them).
            line = (
                f'{{"message": {orjson.dumps(message).decode()}, '
                f'"method": "{method}", "path": {orjson.dumps(path).decode()}, '
                f'"route": "{route}", "status": {status}, '
                f'"duration_ms": {round(duration_ms, 3)}, '
                f'"client": {orjson.dumps(client).decode()}, '
                f'"ts": "{self._stamp}.{millis:03d}+00:00", "level": "INFO", '
                f'"logger": "{ACCESS_LOGGER}"}}'
            )
        else:
            line = f"{self._clock} INFO {ACCESS_LOGGER}: {message}"
        with self._lock:
            self._lines.append(line)

    def flush(self) -> None:
        """Write what accumulated."""
        with self._lock:
            lines, self._lines = self._lines, []
        if lines:
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # a closed stderr must not kill a request
                pass

    def close(self) -> None:
        """Stop the writer thread and write what is left."""
        self._stop.set()
        self.flush()

    def _flush_forever(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()


_access: AccessLog | None = None


def access_log() -> AccessLog | None:
    """The process's access log when :func:`configure_logging` set one up.

    None otherwise (tests, an embedding application): callers then log through
    the ``prop_stream.access`` logger.
    """
    return _access


def close_access_log() -> None:
    """Write the access log's last lines and fall back to the logger (tests)."""
    global _access
    if _access is not None:
        _access.close()
        _access = None


def configure_logging(fmt: LogFormat = "auto", level: str | int = "INFO") -> None:
    """Send every logger's records to stderr in one format; call it once.

    Args:
        fmt: ``json``, ``text``, or ``auto`` (text on a terminal, JSON otherwise).
        level: The root level (``INFO`` by default).
    """
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_UtcJsonFormatter("%(message)s", json_ensure_ascii=False))
    else:
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    for name, quiet in _QUIET.items():
        logging.getLogger(name).setLevel(quiet)
    close_access_log()
    global _access
    _access = (
        AccessLog(sys.stderr, fmt, flush_interval_s=0.25)
        if logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)
        else None
    )
    # uvicorn's own loggers propagate to the root instead of their handlers.
    for name in ("uvicorn", "uvicorn.error"):
        named = logging.getLogger(name)
        named.handlers = []
        named.propagate = True
