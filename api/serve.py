"""Run the service: the evaluator loop and the HTTP API in one process.

This is the composition root, so it lives in the top layer: ``prop_stream`` never
imports ``api``. The ``prop-stream serve`` and ``demo`` commands reach :func:`run`
through the ``prop_stream.server`` entry point that this distribution registers.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator

import uvicorn

from api.core.config import ApiSettings
from api.limits import uvicorn_options
from api.main import create_app
from prop_stream.config import StreamSettings
from prop_stream.evaluator.service import build_loop, build_source
from prop_stream.jobs import JobWorker
from prop_stream.store.db import connect, cursor
from prop_stream.store.init import init_database

log = logging.getLogger("prop_stream.serve")

#: How long a stop waits for the evaluator to finish its batch and checkpoint.
STOP_TIMEOUT_S = 60.0


def run(
    settings: StreamSettings,
    *,
    host: str,
    port: int,
    announce: Callable[[str], None] | None = None,
) -> int:
    """Serve until SIGINT or SIGTERM, then stop cleanly.

    The database is created or migrated first. The evaluator loop and the outbox
    job worker run in threads over their own cursors; uvicorn serves the API on the
    main thread and turns SIGINT/SIGTERM into a graceful shutdown, after which the
    loop finishes its batch, commits, checkpoints and stops, and the worker
    finishes its job.

    Args:
        settings: The evaluator's settings (database file, tick source, ...).
        host: The address to listen on.
        port: The port to listen on (0 picks a free one).
        announce: Called once with the ready line when requests can be taken
            (default: print it on stderr).

    Returns:
        0 after a clean stop, 1 if the evaluator died with an error.
    """
    init_database(settings.db)
    conn = connect(settings.db)
    source = build_source(settings)
    loop = build_loop(settings, conn, source=source)
    stop = threading.Event()
    worker = threading.Thread(
        target=loop.run, args=(stop,), name="prop-stream-evaluator", daemon=True
    )
    app = create_app(
        settings=ApiSettings(db=settings.db),
        conn=conn,
        metrics=loop.metrics,
        # Ready: the loop runs and, for Kafka, the broker answers.
        evaluator_ready=lambda: loop.ready.is_set() and source.healthy(),
        phases=loop,
    )

    def refresh(challenge_ids: Iterable[int]) -> None:
        runtime = getattr(app.state, "runtime", None)
        if runtime is not None:
            runtime.cache.refresh(challenge_ids)

    jobs = JobWorker(cursor(conn), phases=loop, on_change=refresh)
    jobs_thread = threading.Thread(
        target=jobs.run, args=(stop,), name="prop-stream-jobs", daemon=True
    )
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            **uvicorn_options(app.state.settings),
        )
    )

    def say_ready() -> None:
        while not stop.is_set():
            if server.started and loop.ready.is_set():
                bound = _bound_port(server) or port
                line = (
                    f"prop-stream: ready on http://{host}:{bound} "
                    f"(db {settings.db}, source {settings.source})"
                )
                (announce or _stderr)(line)
                return
            if loop.error is not None:
                server.should_exit = True
                return
            stop.wait(0.05)

    worker.start()
    jobs_thread.start()
    ready_thread = threading.Thread(target=say_ready, name="prop-stream-ready")
    ready_thread.start()
    try:
        server.run()
    finally:
        stop.set()
        loop.stop()
        jobs.stop()
        worker.join(STOP_TIMEOUT_S)
        jobs_thread.join(STOP_TIMEOUT_S)
        ready_thread.join()
        conn.close()
    stats = loop.stats
    _stderr(
        f"prop-stream: stopped after {stats.ticks} ticks in {stats.batches} batches "
        f"({stats.breach_rows} breach rows, {stats.transitions} transitions)"
    )
    if loop.error is not None:
        log.error("evaluator stopped with an error: %s", loop.error)
        _stderr(f"prop-stream: error: evaluator stopped: {loop.error}")
        return 1
    return 0


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
