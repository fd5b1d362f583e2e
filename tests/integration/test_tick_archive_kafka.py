"""The archive over a real Kafka broker: a replay cut otherwise doubles nothing.

A loop reads a topic in small polls and crashes; the archiver moves what it
staged; a new loop restores the (older) checkpoint and replays with polls of
another size, so its batches straddle the committed offsets. The archive then
holds every produced tick exactly once. With deals on the topic, a real
``prop-stream serve --source kafka`` is killed with SIGKILL mid-run and started
again with another batch size: its archive holds every produced tick and deal
exactly once.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
from kafka import KafkaConsumer, TopicPartition
from service_process import ServiceProcess

from integration.conftest import TopicFactory
from prop_stream.evaluator import EvaluatorLoop
from prop_stream.evaluator.service import KafkaTickSource
from prop_stream.kafka import produce_file
from prop_stream.rules import DEAL_COLUMNS, DEAL_SCHEMA, TICK_SCHEMA
from prop_stream.sinks import DuckDBSink
from prop_stream.store import Connection, connect, cursor, init_database
from prop_stream.store.archive import (
    TickArchiver,
    archive_dir,
    staged_deals,
    staged_rows,
)

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


DEALS = 400
_DEAL_SORT = ["account_id", "deal_id"]


def _deals(start_us: int) -> pl.DataFrame:
    """Open-and-close pairs of the tick accounts, spread over the ticks' time."""
    rng = np.random.default_rng(9)
    pairs = DEALS // 2
    position = np.arange(pairs)
    opened = start_us + np.sort(rng.integers(0, TICKS * 1_000 - 10_000, pairs))
    ts = np.concatenate([opened, opened + 5_000 + 1])  # never on a tick's µs
    frame = pl.DataFrame(
        {
            "account_id": np.concatenate([1_000 + position % 20] * 2),
            "ts": ts,
            "deal_id": np.arange(DEALS),
            "position_id": np.concatenate([position, position]),
            "symbol": "EURUSD",
            "side": np.where(np.arange(DEALS) % 3 == 0, "sell", "buy"),
            "volume": np.concatenate([rng.integers(1, 300, pairs) / 100] * 2),
            "price": 1.085,
            "entry": ["in"] * pairs + ["out"] * pairs,
        }
    ).with_columns(pl.from_epoch("ts", time_unit="us").dt.replace_time_zone("UTC"))
    return frame.sort("ts", maintain_order=True)


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _parts(db: Path, table: str) -> int:
    return len(list((archive_dir(db) / table).rglob("part-*.parquet")))


@pytest.mark.parametrize("mode", ["embedded", "group"])
def test_serve_killed_mid_run_archives_each_kafka_tick_and_deal_once(
    tmp_path: Path, kafka_bootstrap: str, topic_factory: TopicFactory, mode: str
) -> None:
    topic = topic_factory(partitions=3)
    ticks = _ticks(tmp_path / "all-ticks.parquet")
    start_us = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp() * 1_000_000)
    deals = _deals(start_us)
    middle = ticks["ts"][TICKS // 2]
    halves = []
    for name, keep in (("first", pl.col("ts") < middle), ("second", None)):
        tick_half = ticks.filter(keep if keep is not None else pl.col("ts") >= middle)
        deal_half = deals.filter(keep if keep is not None else pl.col("ts") >= middle)
        tick_half.write_parquet(tmp_path / f"{name}-ticks.parquet")
        deal_half.write_parquet(tmp_path / f"{name}-deals.parquet")
        halves.append((tick_half.height, deal_half.height))
    assert all(t and d for t, d in halves)

    def produce(name: str) -> None:
        produce_file(
            tmp_path / f"{name}-ticks.parquet",
            bootstrap=kafka_bootstrap,
            topic=topic,
            encoding="batch",
            batch_rows=70,  # ticks and deals share batch messages
            deals=tmp_path / f"{name}-deals.parquet",
        )

    db = tmp_path / "prop.duckdb"
    init_database(db)
    args = ["serve", "--db", str(db), "--source", "kafka", "--kafka-bootstrap",
            kafka_bootstrap, "--topic", topic, "--port", "0"]  # fmt: skip
    if mode == "group":
        # A consumer-group member: one stream (and file name) per partition,
        # the deals of a replayed partition cut by KafkaSource.last_deal_cuts.
        args += ["--group", f"archive-{topic}"]
    env = {
        "PROP_STREAM_KAFKA_GROUP_ID": f"archive-{topic}",
        # Accounts the store doesn't have still reach the engine (and the archive).
        "PROP_STREAM_KAFKA_DLQ_UNKNOWN_ACCOUNTS": "false",
        "PROP_STREAM_ARCHIVE_INTERVAL_S": "0.5",
        # No checkpoint but the first: the restart replays everything committed.
        "PROP_STREAM_CHECKPOINT_EVERY": "100000",
        "PROP_STREAM_MAX_BATCH_RECORDS": "170",
    }
    produce("first")
    first = ServiceProcess(args, tmp_path, env=env)
    try:
        url = first.wait_ready()
        _until(
            lambda: _parts(db, "ticks") > 0 and _parts(db, "deals") > 0,
            90,
            "the first archived ticks and deals",
        )
        produce("second")
        _until(
            lambda: _metric(url, "prop_stream_ticks_polled_total") > halves[0][0],
            90,
            "some of the second half judged",
        )
        first.signal(signal.SIGKILL)  # wherever it is: mid-commit, mid-move
        assert first.wait(30) == -signal.SIGKILL
    finally:
        first.kill()

    second = ServiceProcess(
        args, tmp_path, env={**env, "PROP_STREAM_MAX_BATCH_RECORDS": "230"}
    )
    try:
        url = second.wait_ready()
        _until(
            lambda: (
                _metric(url, "prop_stream_ticks_polled_total") >= TICKS
                and _metric(url, "prop_stream_deals_polled_total") >= DEALS
            ),
            120,
            "every tick and deal judged again",
        )
    finally:
        code = second.stop(90)
    assert code == 0

    conn = connect(db)
    try:
        TickArchiver(cursor(conn), db).archive_once()  # what the stop left staged
        assert staged_rows(conn) == staged_deals(conn) == 0
    finally:
        conn.close()
    root = archive_dir(db)
    archived = pl.read_parquet(root / "ticks" / "**" / "*.parquet")
    assert archived.height == TICKS
    assert archived.sort(_SORT).equals(ticks.sort(_SORT))
    names = {p.name for p in (root / "ticks").rglob("part-*.parquet")}
    if mode == "group":
        assert all(name.startswith(f"part-{topic}_") for name in names), names
    else:
        assert all(name.count("-") == 2 for name in names), names
    archived_deals = pl.read_parquet(root / "deals" / "**" / "*.parquet")
    assert archived_deals.schema == pl.DataFrame(DEAL_SCHEMA.empty_table()).schema
    assert archived_deals.height == DEALS
    assert archived_deals.sort(_DEAL_SORT).equals(
        deals.select(DEAL_COLUMNS).cast(archived_deals.schema).sort(_DEAL_SORT)
    )
