"""The change feeds (migration 9): what scale-out readers re-read.

A PostgreSQL sink records, per stream, which accounts each flush wrote to
``metrics_latest``; a :class:`MetricFeed` reads the rows of those accounts only,
and the whole table when it is new or fell behind the kept changes. Triggers
notify every challenge and phase change, whoever writes it, to a
:class:`ChallengeListener`. On DuckDB (one process) nothing is recorded: the
feed reads the whole table and the listener answers None.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from prop_stream.rules import RuleEngine
from prop_stream.sinks import DuckDBSink
from prop_stream.store import (
    Connection,
    active_phase_specs,
    cancel_challenge,
    connect,
    init_database,
    query_frame,
    transaction,
)
from prop_stream.store.changes import (
    METRIC_CHANGES_PRUNE_EVERY,
    ChallengeListener,
    MetricFeed,
)

START = datetime(2026, 1, 5, tzinfo=UTC)


@pytest.fixture
def pg(pg_url: str) -> Iterator[Connection]:
    init_database(pg_url, demo=True, now=START)
    conn = connect(pg_url)
    yield conn
    conn.close()


def _accounts(conn: Connection) -> list[int]:
    return [spec.account_id for spec in active_phase_specs(conn)]


def _flush(
    conn: Connection,
    engine: RuleEngine,
    accounts: list[int],
    *,
    stream: str,
    hour: float,
    offset: int,
) -> None:
    """One flush of one tick per account, at ``hour`` hours after START."""
    ticks = pl.DataFrame(
        {
            "account_id": accounts,
            "ts": [START + timedelta(hours=hour)] * len(accounts),
            "equity": [100_000.0 + hour] * len(accounts),
            "balance": [100_000.0] * len(accounts),
        }
    )
    sink = DuckDBSink(conn, source=f"test-{stream}")
    sink.add(engine.process(ticks), position={stream or "p": offset}, stream=stream)
    sink.flush()


def _engine(conn: Connection) -> RuleEngine:
    engine = RuleEngine()
    for spec in active_phase_specs(conn):
        engine.register(spec)
    return engine


def _ids(frame: pl.DataFrame | None) -> set[int]:
    return set() if frame is None else set(frame["account_id"].to_list())


def test_a_feed_reads_the_rows_written_since_its_last_read(pg: Connection) -> None:
    accounts = _accounts(pg)
    assert len(accounts) >= 5
    engine = _engine(pg)
    feed = MetricFeed()
    _flush(pg, engine, accounts[:4], stream="ticks:0", hour=1, offset=1)

    frame, whole = feed.read(pg)  # a new reader reads the whole table
    assert whole
    assert _ids(frame) == set(accounts[:4])
    assert feed.read(pg) == (None, False)  # nothing since

    _flush(pg, engine, accounts[1:2], stream="ticks:0", hour=2, offset=2)
    _flush(pg, engine, accounts[3:5], stream="ticks:1", hour=2, offset=1)
    frame, whole = feed.read(pg)
    assert not whole
    assert _ids(frame) == {accounts[1], *accounts[3:5]}
    assert frame is not None
    newest = frame.filter(pl.col("account_id") == accounts[1])
    assert newest["ts"].to_list() == [START + timedelta(hours=2)]
    assert (feed.whole_reads, feed.change_reads) == (1, 1)

    # Rows of the whole table and of the feed are the same columns and values.
    table = query_frame(pg, "SELECT * FROM metrics_latest").sort("account_id")
    assert frame.columns == table.columns


def test_a_feed_behind_the_kept_changes_reads_the_whole_table(pg: Connection) -> None:
    accounts = _accounts(pg)
    engine = _engine(pg)
    feed = MetricFeed()
    _flush(pg, engine, accounts[:1], stream="s", hour=0.5, offset=1)
    feed.read(pg)
    # The writer prunes changes older than the retention: age them all, then
    # write up to the next prune.
    for n in range(2, METRIC_CHANGES_PRUNE_EVERY + 1):
        if n == METRIC_CHANGES_PRUNE_EVERY:
            with transaction(pg):
                pg.execute(
                    "UPDATE metrics_changes SET written_at = now() - interval '1 day'"
                )
        _flush(pg, engine, accounts[1:2], stream="s", hour=1 + n / 100, offset=n)
    kept = pg.execute("SELECT min(seq), max(seq) FROM metrics_changes").fetchone()
    assert kept == (METRIC_CHANGES_PRUNE_EVERY, METRIC_CHANGES_PRUNE_EVERY)

    frame, whole = feed.read(pg)
    assert whole  # the changes after its last read are gone
    assert _ids(frame) == set(_ids(query_frame(pg, "SELECT * FROM metrics_latest")))
    assert feed.read(pg) == (None, False)


def test_a_feed_takes_a_new_stream_from_its_first_change(pg: Connection) -> None:
    accounts = _accounts(pg)
    engine = _engine(pg)
    feed = MetricFeed()
    _flush(pg, engine, accounts[:1], stream="ticks:0", hour=1, offset=1)
    feed.read(pg)
    _flush(pg, engine, accounts[2:3], stream="ticks:5", hour=1, offset=1)
    frame, whole = feed.read(pg)
    assert not whole
    assert _ids(frame) == {accounts[2]}


def test_a_listener_hears_every_writer_of_challenges_and_phases(
    pg: Connection, pg_url: str
) -> None:
    listener = ChallengeListener.of(pg)
    assert listener.enabled
    assert listener.drain() is None  # not started: read everything
    assert listener.drain() == set()  # started by the call above
    [(challenge, other)] = pg.execute(
        "SELECT min(id), max(id) FROM challenges"
    ).fetchall()

    # By hand, in another session: a phase's row.
    with connect(pg_url) as writer, transaction(writer):
        writer.execute(
            "UPDATE challenge_phases SET name = name WHERE challenge_id = ?",
            [other],
        )
    # The store's own lifecycle call.
    with transaction(pg):
        cancel_challenge(pg, challenge_id=challenge, now=START + timedelta(days=1))
    # A rolled-back change is not heard.
    [(third,)] = pg.execute(
        "SELECT min(id) FROM challenges WHERE id NOT IN (?, ?)", [challenge, other]
    ).fetchall()
    pg.execute("BEGIN TRANSACTION")
    pg.execute("UPDATE challenges SET status = status WHERE id = ?", [third])
    pg.execute("ROLLBACK")
    assert listener.drain() == {challenge, other}
    assert listener.drain() == set()
    listener.close()


def test_a_listener_that_lost_its_session_answers_none_then_listens_again(
    pg: Connection,
) -> None:
    listener = ChallengeListener.of(pg)
    listener.start()
    pid = listener._conn.raw.info.backend_pid  # type: ignore[union-attr]
    pg.execute("SELECT pg_terminate_backend(?)", [pid])
    deadline = time.monotonic() + 30
    while pg.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = ?", [pid]
    ).fetchone() != (0,):
        assert time.monotonic() < deadline, "the listener's session did not end"
    assert listener.drain() is None
    with transaction(pg):
        pg.execute("UPDATE challenges SET status = status WHERE id = 1")
    assert listener.drain() == {1}
    listener.close()


def test_duckdb_records_no_change_and_its_feed_reads_the_whole_table(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.duckdb"
    init_database(path, demo=True, now=START)
    with connect(path) as conn:
        accounts = _accounts(conn)
        engine = _engine(conn)
        _flush(conn, engine, accounts[:2], stream="", hour=1, offset=1)
        assert conn.execute("SELECT count(*) FROM metrics_changes").fetchall() == [(0,)]
        feed = MetricFeed()
        for _ in range(2):
            frame, whole = feed.read(conn)
            assert whole
            assert _ids(frame) == set(accounts[:2])
        listener = ChallengeListener.of(conn)
        assert not listener.enabled
        listener.start()
        assert listener.drain() is None


def test_a_feed_reads_the_whole_table_when_most_rows_changed(pg: Connection) -> None:
    accounts = _accounts(pg)
    engine = _engine(pg)
    feed = MetricFeed()
    _flush(pg, engine, accounts, stream="s", hour=1, offset=1)
    feed.read(pg, held=0)
    _flush(pg, engine, accounts[:3], stream="s", hour=2, offset=2)
    # 3 changed of the 5 the reader holds: one scan, not a probe per row.
    frame, whole = feed.read(pg, held=len(accounts))
    assert whole
    assert _ids(frame) == set(accounts)
    _flush(pg, engine, accounts[:1], stream="s", hour=3, offset=3)
    frame, whole = feed.read(pg, held=len(accounts))  # 1 of 5: the changes
    assert not whole
    assert _ids(frame) == {accounts[0]}
