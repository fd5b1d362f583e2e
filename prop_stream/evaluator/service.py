"""Wire an evaluator loop from the settings: what ``serve`` runs in a thread.

Examples:
    >>> settings = StreamSettings(db=Path("prop.duckdb"), source="demo")
    >>> conn = connect(settings.db)
    >>> loop = build_loop(settings, conn)
    >>> stop = threading.Event()
    >>> thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    >>> thread.start()   # ... the API reads loop.metrics ...
    >>> stop.set(); thread.join()
"""

from __future__ import annotations

import functools

from prop_stream.config import StreamSettings
from prop_stream.evaluator.demo import DemoConfig, DemoSource
from prop_stream.evaluator.loop import EvaluatorLoop
from prop_stream.evaluator.metrics import LatestMetrics
from prop_stream.evaluator.sources import NoneSource, TickSource
from prop_stream.sinks.duckdb_sink import DuckDBSink
from prop_stream.store.db import Connection, cursor
from prop_stream.store.requests import serve_requests


def build_source(settings: StreamSettings) -> TickSource:
    """The tick source the settings name.

    Args:
        settings: The service's settings.

    Returns:
        A :class:`DemoSource` or :class:`NoneSource`.
    """
    if settings.source == "demo":
        return DemoSource(
            DemoConfig(
                seed=settings.demo_seed,
                rate=settings.demo_rate,
                batch_ms=settings.demo_batch_ms,
                realtime=settings.demo_realtime,
            )
        )
    return NoneSource()


def build_loop(
    settings: StreamSettings,
    conn: Connection,
    *,
    source: TickSource | None = None,
    metrics: LatestMetrics | None = None,
) -> EvaluatorLoop:
    """An evaluator loop over the service's database.

    The loop, its sink and its request handling each get their own cursor of
    ``conn``; between batches the loop also serves operator requests
    (``prop-stream export``/``session`` while the service holds the file).

    Args:
        settings: The service's settings.
        conn: The service's connection to ``settings.db``.
        source: The tick source (default: the one the settings name).
        metrics: The in-memory latest metrics to keep current.

    Returns:
        The loop, not started.
    """
    source = source if source is not None else build_source(settings)
    requests_conn = cursor(conn)
    return EvaluatorLoop(
        cursor(conn),
        source,
        DuckDBSink(
            cursor(conn),
            source=source.name,
            checkpoints_kept=settings.checkpoints_kept,
        ),
        max_batch_records=settings.max_batch_records,
        poll_timeout_s=settings.poll_timeout_s,
        checkpoint_every=settings.checkpoint_every,
        metrics=metrics,
        hooks=(functools.partial(serve_requests, requests_conn, settings.db),),
    )
