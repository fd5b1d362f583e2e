"""Run the service: the evaluator loop and the HTTP API in one process.

This is the composition root, so it lives in the top layer: ``prop_stream`` never
imports ``api``. The ``prop-stream serve`` and ``demo`` commands reach :func:`run`
through the ``prop_stream.server`` entry point that this distribution registers.

**Roles** (``serve --role``, ``docs/scale-out.md``): ``all`` runs the API, the
evaluator and the job worker (the embedded deployment); ``api`` the API only
(purchases reach the evaluators through the store's phase-change poll);
``evaluator`` the evaluator only; ``jobs`` the outbox worker and the tick
archive's mover. Every role serves ``/healthz``, ``/readyz`` and ``/metrics``;
``api`` and ``all`` serve the API too.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import uvicorn

from api.core.config import ApiSettings
from api.limits import uvicorn_options
from api.main import create_app
from prop_stream.admin import AdminEndpoint, new_token, publish, withdraw
from prop_stream.config import StreamSettings
from prop_stream.dburl import is_url, redact
from prop_stream.evaluator.faults import transient_reason
from prop_stream.evaluator.service import SupervisedEvaluator
from prop_stream.jobs import JobWorker
from prop_stream.jobs.worker import WorkerStats
from prop_stream.store.archive import (
    TickArchiver,
    archive_root,
    staged_deals,
    staged_rows,
)
from prop_stream.store.db import Connection, connect, cursor
from prop_stream.store.init import init_database
from prop_stream.store.job_worker import outbox_summary
from prop_stream.store.mirror import RiskMirror
from prop_stream.supervisor import EXIT_FATAL, Supervisor
from prop_stream.telemetry import Probes, ServiceMetrics

log = logging.getLogger("prop_stream.serve")

#: How long a stop waits for the evaluator to finish its batch and checkpoint.
STOP_TIMEOUT_S = 60.0

Role = Literal["all", "api", "evaluator", "jobs"]
#: The roles ``serve --role`` takes.
ROLES: Final[tuple[Role, ...]] = ("all", "api", "evaluator", "jobs")


def run(
    settings: StreamSettings,
    *,
    host: str,
    port: int,
    announce: Callable[[str], None] | None = None,
    role: Role = "all",
) -> int:
    """Serve until SIGINT or SIGTERM, then stop cleanly.

    The database must exist (``prop-stream init``); it is migrated first. One
    :class:`~prop_stream.supervisor.Supervisor` owns the components — the
    evaluator loop, the outbox job worker and the API's cache sync — each in a
    thread: a transient fault (disk full, database locked, broker away, topic
    missing) is retried with a backoff while ``/readyz`` names it; any other
    fault stops the HTTP server and the process exits with status 1 within
    seconds, so no purchase is taken with a dead component. uvicorn serves the
    API on the main thread and turns SIGINT/SIGTERM into a graceful shutdown,
    after which the loop finishes its batch, commits, checkpoints and stops.

    Args:
        settings: The evaluator's settings (database file, tick source, ...).
        host: The address to listen on.
        port: The port to listen on (0 picks a free one).
        announce: Called once with the ready line when requests can be taken
            (default: print it on stderr).
        role: What this process runs (see the module's docstring).

    Returns:
        0 after a clean stop, 1 if a component failed for good.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    runs_evaluator = role in ("all", "evaluator")
    runs_jobs = role in ("all", "jobs")
    init_database(settings.db, create=False)
    conn = connect(settings.db)
    telemetry = ServiceMetrics()
    evaluator = SupervisedEvaluator(settings, conn, on_batch=telemetry.observe_batch)
    server_box: list[uvicorn.Server] = []

    def fatal() -> None:
        for server in server_box:
            server.should_exit = True

    supervisor = Supervisor(classify=transient_reason, on_fatal=fatal)
    if runs_evaluator:
        supervisor.add("evaluator", evaluator.build)
    admin_token = new_token()
    app = create_app(
        settings=ApiSettings(db=settings.db),
        conn=conn,
        # No evaluator here: the API reads metrics_latest (the api role).
        metrics=evaluator.metrics if runs_evaluator else None,
        # Without an evaluator here, purchases reach the group's evaluators
        # through the store (the phase-change poll).
        phases=evaluator if runs_evaluator else None,
        checks=supervisor.checks,
        telemetry=telemetry,
        supervisor=supervisor,
        admin_token=admin_token if role in ("all", "api") else None,
        api_routes=role in ("all", "api"),
    )

    def refresh(challenge_ids: Iterable[int]) -> None:
        runtime = getattr(app.state, "runtime", None)
        if runtime is not None:
            runtime.cache.refresh(challenge_ids)

    worker_stats = WorkerStats()
    if runs_jobs:
        supervisor.add(
            "jobs",
            lambda: JobWorker(
                cursor(conn),
                phases=evaluator if runs_evaluator else None,
                on_change=refresh,
                stats=worker_stats,
                transient=transient_reason,
            ),
        )
    telemetry.probes = Probes(
        loop_stats=lambda: evaluator.stats,
        dead_letters=lambda: _source_attr(evaluator, "dead_letters", {}),
        lag=lambda: _source_call(evaluator, "lag", {}),
        jobs_stats=lambda: worker_stats,
        checks=supervisor.checks,
        restarts=supervisor.restarts,
        store=functools.partial(_store_numbers, conn),
    )
    postgres = is_url(settings.db)
    archive_to = archive_root(settings.db, settings.archive_dir)
    if postgres and settings.risk_mirror_interval_s > 0:
        # DuckDB-only by design (docs/scale-out.md): on PostgreSQL the risk team
        # reads the database itself (role prop_stream_risk).
        log.info("postgresql: no risk mirror file (DuckDB only)")
    if postgres and settings.archive and archive_to is None:
        log.info("postgresql: no archive (set PROP_STREAM_ARCHIVE_DIR to keep one)")
    # The risk team's read-only copy of the store (docs/store.md).
    db_file = settings.db if isinstance(settings.db, Path) else None
    if settings.risk_mirror_interval_s > 0 and role == "all" and db_file is not None:
        interval = settings.risk_mirror_interval_s
        supervisor.add("risk", lambda: _RiskMirrorComponent(conn, db_file, interval))
    # The archive: staged ticks and deals moved to ROOT/ticks and ROOT/deals
    # (docs/store.md); on PostgreSQL every jobs process runs one, each stream
    # moved by one at a time (docs/scale-out.md).
    if settings.archive and runs_jobs and archive_to is not None:
        root = archive_to
        supervisor.add(
            "archive",
            lambda: _ArchiveComponent(
                conn,
                root,
                settings.archive_interval_s,
                settings.archive_retention_days,
            ),
        )
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            **uvicorn_options(app.state.settings),
        )
    )
    server_box.append(server)
    stop = threading.Event()
    endpoint: list[AdminEndpoint] = []

    def say_ready() -> None:
        while not stop.is_set():
            if supervisor.fatal is not None:
                return
            loop = evaluator.current
            evaluating = loop is not None and loop.ready.is_set()
            if server.started and (evaluating or not runs_evaluator):
                bound = _bound_port(server) or port
                published = AdminEndpoint(
                    f"http://{_loopback(host)}:{bound}", admin_token, os.getpid()
                )
                if role == "all" and not postgres:
                    # The operator commands reach the process that owns the
                    # DuckDB file; the scale-out roles own no file, and
                    # PostgreSQL is shared: commands open it directly.
                    publish(settings.db, published)
                    endpoint.append(published)
                log.info("ready: listening at %s:%d", host, bound)
                line = (
                    f"prop-stream: ready on http://{host}:{bound} "
                    f"(db {_shown(settings.db)}, source {settings.source})"
                )
                if role != "all":
                    line += f" as {role}"
                (announce or _stderr)(line)
                return
            stop.wait(0.05)

    supervisor.start()
    ready_thread = threading.Thread(target=say_ready, name="prop-stream-ready")
    ready_thread.start()
    try:
        server.run()
    finally:
        stop.set()
        ready_thread.join()
        for published in endpoint:
            withdraw(settings.db, published)
        supervisor.stop(timeout_s=STOP_TIMEOUT_S if supervisor.fatal is None else 5.0)
        conn.close()
    stats = evaluator.stats
    _stderr(
        f"prop-stream: stopped after {stats.ticks} ticks in {stats.batches} batches "
        f"({stats.breach_rows} breach rows, {stats.transitions} transitions)"
    )
    if supervisor.fatal is not None:
        name, exc = supervisor.fatal
        _stderr(f"prop-stream: error: {name} failed: {type(exc).__name__}: {exc}")
        return EXIT_FATAL
    return 0


class _RiskMirrorComponent:
    """The risk mirror as a supervised component (its own cursor per run)."""

    def __init__(self, conn: Connection, db: Path, interval_s: float) -> None:
        self._cursor = cursor(conn)
        self._mirror = RiskMirror(self._cursor, db)
        self._interval = interval_s

    def run(self, stop: threading.Event) -> None:
        try:
            self._mirror.run(stop, self._interval)
        finally:
            self._cursor.close()

    def stop(self) -> None:
        """Nothing to do: ``run`` watches the supervisor's stop event."""


class _ArchiveComponent:
    """The archiver as a supervised component (its own cursor per run)."""

    def __init__(
        self, conn: Connection, root: Path, interval_s: float, retention_days: int
    ) -> None:
        self._cursor = cursor(conn)
        self._archiver = TickArchiver(
            self._cursor, None, root=root, retention_days=retention_days
        )
        self._interval = interval_s

    def run(self, stop: threading.Event) -> None:
        try:
            self._archiver.run(stop, self._interval)
        finally:
            self._cursor.close()

    def stop(self) -> None:
        """Nothing to do: ``run`` watches the supervisor's stop event."""


def _source_attr(evaluator: SupervisedEvaluator, name: str, default: Any) -> Any:
    """A Kafka source's counter (``dead_letters``); ``default`` for other sources."""
    return getattr(evaluator.source, name, default)


def _source_call(evaluator: SupervisedEvaluator, name: str, default: Any) -> Any:
    """A Kafka source's probe (``lag()``); ``default`` for other sources."""
    method = getattr(evaluator.source, name, None)
    return method() if callable(method) else default


def _store_numbers(conn: Connection) -> dict[str, object]:
    cur = cursor(conn)
    try:
        return {
            **outbox_summary(cur, now=datetime.now(UTC)),
            "archive_staged": staged_rows(cur),
            "archive_staged_deals": staged_deals(cur),
        }
    finally:
        cur.close()


def _loopback(host: str) -> str:
    """The address a local client reaches a server listening on ``host`` at."""
    if host in ("0.0.0.0", ""):  # noqa: S104 - mapping a wildcard to loopback
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising the stop signal after its shutdown.

    uvicorn re-raises a captured SIGTERM/SIGINT once it has shut down, which kills
    the process before the evaluator can finish its batch and checkpoint. Here the
    signals only ask the server to exit (a second SIGINT forces it), and :func:`run`
    then stops the loop and returns.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _bound_port(server: uvicorn.Server) -> int | None:
    for srv in getattr(server, "servers", []):
        for sock in srv.sockets:
            return int(sock.getsockname()[1])
    return None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _shown(db: Path | str) -> str:
    return redact(db) if isinstance(db, str) else str(db)
