"""Ask the running service to do something with its database.

DuckDB lets one process open a file for writing, and then no other process can
open it, not even read-only. Operator commands that need the database while the
service runs (``prop-stream export``, ``prop-stream session``) therefore hand their
job to the service through a spool directory beside the database
(``PATH.requests/``): :func:`submit` drops a request file and waits; the evaluator
loop calls :func:`serve_requests` between batches, does the job with its own
connection and writes a result file (mode 0600: a session token passes through
it), which the caller reads and deletes.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from prop_stream.store.db import Connection, transaction
from prop_stream.store.exceptions import StoreError
from prop_stream.store.export import export_parquet
from prop_stream.store.sessions import create_session

#: How long :func:`submit` waits for the service by default.
DEFAULT_TIMEOUT_S: Final = 60.0

Handler = Callable[[Connection, Mapping[str, Any]], dict[str, Any]]


def spool_dir(db_path: str | Path) -> Path:
    """The directory where requests for a database's service go."""
    return Path(f"{Path(db_path).resolve()}.requests")


def submit(
    db_path: str | Path,
    kind: str,
    payload: Mapping[str, Any],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Hand a job to the service that holds a database, and wait for its answer.

    Args:
        db_path: The DuckDB file.
        kind: The job: a key of :data:`HANDLERS`.
        payload: The job's arguments (JSON).
        timeout_s: How long to wait.
        sleep: How to wait between looks for the answer (tests).

    Returns:
        The handler's answer.

    Raises:
        StoreError: No answer in time (the request is taken back), or the job
            failed (the service's message is included).
    """
    spool = spool_dir(db_path)
    spool.mkdir(parents=True, exist_ok=True)
    name = f"{kind}-{uuid.uuid4().hex}"
    request = spool / f"{name}.json"
    result = spool / f"{name}.result"
    _write_atomic(request, dict(payload))
    deadline = time.monotonic() + timeout_s
    while not result.exists():
        if time.monotonic() >= deadline:
            request.unlink(missing_ok=True)
            raise StoreError(
                f"{db_path} is in use by another process that did not take the "
                f"{kind} request within {timeout_s:g} s (is it a running "
                "prop-stream service?)"
            )
        sleep(0.05)
    answer = json.loads(result.read_text(encoding="utf-8"))
    result.unlink(missing_ok=True)
    if not answer.get("ok"):
        raise StoreError(f"the running service failed to {kind}: {answer.get('error')}")
    return dict(answer["value"])


def serve_requests(
    conn: Connection,
    db_path: str | Path,
    handlers: Mapping[str, Handler] | None = None,
) -> int:
    """Carry out the pending requests for a database (the service's side).

    Args:
        conn: A connection of the service, not in a transaction.
        db_path: The database file the service owns.
        handlers: Job kind to handler (default :data:`HANDLERS`).

    Returns:
        Requests handled.
    """
    spool = spool_dir(db_path)
    if not spool.is_dir():
        return 0
    handlers = HANDLERS if handlers is None else handlers
    handled = 0
    for request in sorted(spool.glob("*.json")):
        kind = request.name.split("-", 1)[0]
        answer: dict[str, Any]
        handler = handlers.get(kind)
        try:
            payload = json.loads(request.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue  # the client gave up and took its request back
        if handler is None:
            answer = {"ok": False, "error": f"unknown request kind {kind!r}"}
        else:
            try:
                answer = {"ok": True, "value": handler(conn, payload)}
            except Exception as exc:  # reported to the client, never fatal here
                answer = {"ok": False, "error": f"{exc}"}
        _write_atomic(request.with_suffix(".result"), answer)
        request.unlink(missing_ok=True)
        handled += 1
    return handled


def _export(conn: Connection, payload: Mapping[str, Any]) -> dict[str, Any]:
    done = export_parquet(conn, str(payload["out"]))
    return {"out": str(done.out_dir), "rows": done.rows}


def _session(conn: Connection, payload: Mapping[str, Any]) -> dict[str, Any]:
    with transaction(conn):
        token = create_session(
            conn,
            email=str(payload["email"]),
            ttl=timedelta(seconds=float(payload["ttl_s"])),
        )
    return {"token": token}


#: The jobs a running service does for operator commands.
HANDLERS: Final[Mapping[str, Handler]] = {"export": _export, "session": _session}


def _write_atomic(path: Path, doc: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(doc, handle)
    os.replace(tmp, path)
