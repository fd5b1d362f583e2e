"""The tick archive over a real Kafka broker: a replay cut otherwise doubles nothing.

A loop reads a topic in small polls and crashes; the archiver moves what it
staged; a new loop restores the (older) checkpoint and replays with polls of
another size, so its batches straddle the committed offsets. The archive then
holds every produced tick exactly once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from kafka import KafkaConsumer, TopicPartition

from integration.conftest import TopicFactory
from prop_stream.evaluator import EvaluatorLoop
from prop_stream.evaluator.service import KafkaTickSource
from prop_stream.kafka import produce_file
from prop_stream.rules import TICK_SCHEMA
from prop_stream.sinks import DuckDBSink
from prop_stream.store import Connection, connect, cursor, init_database
from prop_stream.store.archive import TickArchiver, archive_dir, staged_rows

pytestmark = pytest.mark.integration

TICKS = 3_000
_SORT = ["account_id", "ts", "equity", "balance"]


def _ticks(path: Path) -> pl.DataFrame:
    rng = np.random.default_rng(5)
    start = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp() * 1_000_000)
    frame = pl.DataFrame(
        {
            "account_id": 1_000 + np.arange(TICKS) % 20,
            "ts": start + np.arange(TICKS) * 1_000,
            "equity": 100_000 + rng.normal(0, 50, TICKS).round(2),
            "balance": 100_000.0,
        }
    ).with_columns(pl.from_epoch("ts", time_unit="us").dt.replace_time_zone("UTC"))
    frame.write_parquet(path)
    return frame.cast(TICK_SCHEMA)  # type: ignore[arg-type]


def _loop(conn: Connection, bootstrap: str, topic: str, batch: int) -> EvaluatorLoop:
    source = KafkaTickSource(
        bootstrap=bootstrap,
        topic=topic,
        group_id=None,
        consumer_config={"request_timeout_ms": 10_000},
    )
    return EvaluatorLoop(
        cursor(conn),
        source,
        DuckDBSink(cursor(conn), source=source.name),
        max_batch_records=batch,
        poll_timeout_s=0.2,
        checkpoint_every=1_000,  # the restart replays from the first checkpoint
        archive=True,
    )


def _ends(bootstrap: str, topic: str) -> dict[str, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = consumer.partitions_for_topic(topic)
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in parts])
    finally:
        consumer.close()
    return {f"{tp.topic}:{tp.partition}": int(off) for tp, off in ends.items()}


@pytest.mark.parametrize("encoding", ["json", "batch"])
def test_kafka_replay_cut_differently_archives_each_tick_once(
    tmp_path: Path, kafka_bootstrap: str, topic_factory: TopicFactory, encoding: str
) -> None:
    topic = topic_factory(partitions=3)
    produced = _ticks(tmp_path / "ticks.parquet")
    produce_file(
        tmp_path / "ticks.parquet",
        bootstrap=kafka_bootstrap,
        topic=topic,
        encoding=encoding,  # type: ignore[arg-type]
        batch_rows=70,  # batch messages of 70 ticks, cut by the polls
    )
    ends = _ends(kafka_bootstrap, topic)
    db = tmp_path / "prop.duckdb"
    init_database(db)
    conn = connect(db)
    try:
        first = _loop(conn, kafka_bootstrap, topic, batch=170)
        first.start()
        while first.stats.ticks < TICKS // 2:
            first.run_once()
        first.source.close()  # a crash: no checkpoint on the way out
        assert TickArchiver(cursor(conn), db).archive_once().rows == first.stats.ticks

        second = _loop(conn, kafka_bootstrap, topic, batch=230)
        second.start()
        assert second.stats.restored_from is not None
        while any(second.source.position().get(k, 0) < v for k, v in ends.items()):
            second.run_once()
        second.source.close()
        # The replay judged again what the first loop had committed...
        assert second.stats.ticks == TICKS
        TickArchiver(cursor(conn), db).archive_once()
        assert staged_rows(conn) == 0
    finally:
        conn.close()
    # ...and staged none of it twice.
    archived = pl.read_parquet(
        archive_dir(db) / "ticks" / "**" / "*.parquet", hive_partitioning=False
    )
    assert archived.height == TICKS
    assert archived.sort(_SORT).equals(produced.sort(_SORT))
