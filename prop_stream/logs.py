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

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final, Literal

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
    # uvicorn's own loggers propagate to the root instead of their handlers.
    for name in ("uvicorn", "uvicorn.error"):
        named = logging.getLogger(name)
        named.handlers = []
        named.propagate = True
