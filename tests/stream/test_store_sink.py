"""The DuckDB sink: one transaction per flush, idempotent upserts."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest

from prop_stream.rules import Evaluation, RuleEngine
from prop_stream.sinks import DuckDBSink, SinkError
from prop_stream.store import (
    Connection,
    EngineCheckpoint,
    active_phase_specs,
    connect,
    init_database,
    latest_checkpoint,
    load_position,
    query_frame,
)

START = datetime(2026, 1, 5, tzinfo=UTC)
TABLES = (
    "breaches",
    "prop_daily_snapshots",
    "metrics_latest",
    "metric_history",
    "challenges",
    "challenge_phases",
    "source_offsets",
)


@pytest.fixture
def db(store_db: Path | str) -> Iterator[Connection]:
    path = store_db
    init_database(path, demo=True, now=START)
    conn = connect(path)
    yield conn
    conn.close()


def _ticks(account: int, rows: list[tuple[float, float, float]]) -> pl.DataFrame:
    """Ticks of one account: (hours after START, equity, balance)."""
    return pl.DataFrame(
        {
            "account_id": [account] * len(rows),
            "ts": [START + timedelta(hours=h) for h, _, _ in rows],
            "equity": [e for _, e, _ in rows],
            "balance": [b for _, _, b in rows],
        }
    )


def _engine(db: Connection) -> tuple[RuleEngine, int]:
    engine = RuleEngine()
    specs = active_phase_specs(db)
    for spec in specs:
        engine.register(spec)
    return engine, specs[0].account_id  # a two-step 100K phase, warning at 0.8


def _state(db: Connection) -> dict[str, pl.DataFrame]:
    out = {}
    for table in TABLES:
        frame = query_frame(db, f"SELECT * FROM {table}")  # noqa: S608 - constants
        drop = [c for c in ("updated_at",) if c in frame.columns]
        out[table] = frame.drop(drop).sort(frame.columns[:2])
    return out


def _evaluations(db: Connection) -> tuple[Evaluation, Evaluation, int]:
    engine, account = _engine(db)
    # A daily-loss warning (loss >= 4000) fires, resolves, then the 5000 daily
    # limit is broken and the phase fails.
    first = engine.process(
        _ticks(account, [(9, 100_000, 100_000), (10, 95_500, 100_000)])
    )
    second = engine.process(
        _ticks(account, [(11, 97_000, 100_000), (12, 94_000, 100_000)])
    )
    return first, second, account


def test_sink_same_evaluation_twice_gives_same_rows(db: Connection) -> None:
    first, second, _ = _evaluations(db)
    sink = DuckDBSink(db, source="test")
    sink.setup()
    sink.add(first, position={"0": 1})
    sink.flush()
    sink.add(second, position={"0": 2})
    sink.flush()
    once = _state(db)
    assert once["breaches"].height == 2  # the warning, daily_loss
    assert once["prop_daily_snapshots"].height == 1
    assert once["metric_history"].height == 2
    sink.add(first, position={"0": 1})
    sink.add(second, position={"0": 2})
    sink.flush()
    sink.add(second, position={"0": 2})
    sink.flush()
    again = _state(db)
    for table in TABLES:
        if table == "source_offsets":
            continue
        assert again[table].equals(once[table]), table


def test_sink_replay_never_reopens_a_resolved_breach(db: Connection) -> None:
    first, second, account = _evaluations(db)
    sink = DuckDBSink(db, source="test")
    sink.add(first, position={"0": 1})
    sink.add(second, position={"0": 2})
    sink.flush()
    sink.add(first, position={"0": 1})  # a replay of the older batch alone
    sink.flush()
    warning = db.execute(
        "SELECT resolved, resolved_ts FROM breaches "
        "WHERE account_id = ? AND rule = 'daily_loss_warning'",
        [account],
    ).fetchall()
    assert warning == [(True, START + timedelta(hours=11))]
    latest = db.execute(
        "SELECT ts, equity FROM metrics_latest WHERE account_id = ?", [account]
    ).fetchall()
    assert latest == [(START + timedelta(hours=12), 94_000.0)]


def test_sink_applies_transitions_in_the_batch_transaction(db: Connection) -> None:
    _, second, account = _evaluations(db)
    assert second.transitions["status"].to_list() == ["failed"]
    sink = DuckDBSink(db, source="test")
    sink.add(second, position={"0": 2})
    sink.flush()
    row = db.execute(
        "SELECT c.status, ph.status, ph.ended_at FROM challenges c "
        "JOIN challenge_phases ph ON ph.challenge_id = c.id WHERE ph.account_id = ?",
        [account],
    ).fetchone()
    assert row == (3, "failed", START + timedelta(hours=12))
    assert load_position(db, source="test") == {"0": 2}


def test_sink_commits_nothing_when_the_transaction_fails(db: Connection) -> None:
    first, _, _ = _evaluations(db)
    before = _state(db)
    # A metric row for a challenge id that isn't a number can't be written.
    bad = Evaluation(
        breaches=first.breaches,
        metrics=first.metrics.with_columns(challenge_id=pl.lit("x")),
        daily=first.daily,
        transitions=first.transitions,
        counts=first.counts,
    )
    sink = DuckDBSink(db, source="test")
    sink.add(bad, position={"0": 1})
    with pytest.raises(SinkError):
        sink.flush()
    after = _state(db)
    for table in TABLES:
        assert after[table].equals(before[table]), table


def test_sink_writes_checkpoints_and_keeps_the_newest(db: Connection) -> None:
    sink = DuckDBSink(db, source="test", checkpoints_kept=2)
    for n in range(4):
        sink.flush(
            checkpoint=EngineCheckpoint(
                source="test",
                position={"0": n},
                batch_seq=n,
                engine_version="x",
                snapshot=bytes([n]),
                created_at=START,
            )
        )
    count = db.execute("SELECT count(*) FROM engine_checkpoints").fetchone()
    assert count == (2,)
    latest = latest_checkpoint(db, source="test")
    assert latest is not None
    assert (latest.position, latest.batch_seq, latest.snapshot) == (
        {"0": 3},
        3,
        b"\x03",
    )
    assert load_position(db, source="test") == {"0": 3}


def test_sink_setup_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    conn = duckdb.connect(str(tmp_path / "empty.duckdb"))
    with pytest.raises(SinkError, match="prop-stream init"):
        DuckDBSink(conn, source="test").setup()
    conn.close()
