"""What the Kafka benchmarks share: a fresh topic, and a loop over a fresh store.

``kafka_e2e.py`` and ``kafka_latency.py`` both time the service's evaluator loop
(``KafkaSource`` → engine → the store's sink) over a topic of their own, with one
phase per account registered before the first poll. The store is a DuckDB file or
a PostgreSQL database (:func:`fresh_pg_database` makes one per run).
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from kafka.admin import KafkaAdminClient, NewTopic
from psycopg import sql

from prop_stream.evaluator import EvaluatorLoop, LatestMetrics
from prop_stream.evaluator.service import KafkaTickSource
from prop_stream.rules import PhaseSpec
from prop_stream.sinks import DuckDBSink
from prop_stream.sinks.duckdb_sink import DEFAULT_HEDGE_WINDOW_SECONDS
from prop_stream.store import Connection, connect, cursor, init_database

#: Record paths a benchmark can read a topic with (``KafkaSource(raw_records=…)``).
PATHS = ("raw", "kafka-python")

_databases = itertools.count()


@contextmanager
def fresh_pg_database(server: str, prefix: str = "bench") -> Iterator[str]:
    """A new, empty database on the server of ``server`` (a URL); dropped after.

    Each run gets its own database so that no run reads another's rows or
    positions (the DuckDB runs likewise get a fresh file).

    Args:
        server: A ``postgresql://`` URL of any database on the server, whose role
            may create databases (``scripts/pg-local``'s may).
        prefix: The start of the database's name.

    Yields:
        The new database's URL.
    """
    name = f"{prefix}_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


def create_bench_topic(
    bootstrap: str, prefix: str, partitions: int
) -> tuple[str, KafkaAdminClient]:
    """A uniquely named topic taking 8 MiB messages; its name and the admin client.

    Delete it with ``admin.delete_topics([name])`` and close the client after.
    """
    topic = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics(
        [NewTopic(topic, partitions, 1, topic_configs={"max.message.bytes": "8388608"})]
    )
    return topic, admin


def bench_loop(
    db: Path | str,
    *,
    bootstrap: str,
    topic: str,
    path: str,
    accounts: range,
    rules: Mapping[str, Any],
    batch: int,
    poll_timeout_s: float,
    metrics: LatestMetrics | None = None,
    archive: bool = False,
    hedge_flags: bool = True,
) -> tuple[EvaluatorLoop, KafkaTickSource, Connection]:
    """An evaluator loop over a fresh store at ``db`` reading ``topic``.

    Args:
        db: Where to make the store: a DuckDB file or an empty PostgreSQL
            database's URL.
        bootstrap: The broker.
        topic: The tick topic.
        path: ``raw`` or ``kafka-python`` (see :data:`PATHS`).
        accounts: The accounts that get one phase each, started 2026-01-01.
        rules: Their rules.
        batch: ``max_batch_records``.
        poll_timeout_s: The loop's poll timeout.
        metrics: The in-memory latest metrics to keep (default: a new one).
        archive: Stage each batch's ticks for the tick archive.
        hedge_flags: Flag cross-account hedges (the service's default window);
            off: deals are still recorded, no flags joined.

    Returns:
        The loop (started), its source and the store connection; close both.
    """
    if path not in PATHS:
        raise SystemExit(f"unknown path {path!r}")
    init_database(db)
    conn = connect(db)
    source = KafkaTickSource(
        bootstrap=bootstrap, topic=topic, group_id=None, raw_records=path == "raw"
    )
    loop = EvaluatorLoop(
        cursor(conn),
        source,
        DuckDBSink(
            cursor(conn),
            source=source.name,
            hedge_window_seconds=DEFAULT_HEDGE_WINDOW_SECONDS if hedge_flags else None,
        ),
        max_batch_records=batch,
        poll_timeout_s=poll_timeout_s,
        metrics=metrics,
        archive=archive,
    )
    for i, account in enumerate(accounts):
        loop.register_phase(
            PhaseSpec(
                account_id=account,
                challenge_id=str(i),
                phase_index=0,
                started_at=datetime(2026, 1, 1, tzinfo=UTC),
                rules=dict(rules),
            )
        )
    loop.start()
    return loop, source, conn
