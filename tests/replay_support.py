"""Helpers for the tests that replay a stream: backtest inputs and stored outputs.

Shared by the tests that prove a streaming run (demo or Kafka) equals what the
backtest command computes for the same ticks, and that a restarted run stores
exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from prop_stream.evaluator import DemoConfig, DemoSource
from prop_stream.rules import PhaseSpec
from prop_stream.store import Connection, connect, query_frame


def demo_backtest_inputs(
    db: Path, root: Path, *, config: DemoConfig, batches: int, active_only: bool
) -> tuple[Path, Path, list[int]]:
    """Write the store's phases as a rules file, and dump their ticks and deals.

    The deals go to ``deals.parquet`` beside the ticks (:func:`deals_file`).

    Args:
        db: The store the phases come from.
        root: Where ``rules.json`` and ``ticks.parquet`` are written.
        config: The demo source's configuration.
        batches: How many demo batches of ticks to dump.
        active_only: Only active phases (else every phase with an account).

    Returns:
        The rules file, the ticks file and the account ids, in order.
    """
    query = (
        "SELECT account_id, challenge_id, phase_index, started_at, rules "
        "FROM challenge_phases WHERE "
        + ("status = 'active'" if active_only else "account_id IS NOT NULL")
        + " ORDER BY account_id"
    )
    conn = connect(db, read_only=True)
    try:
        phases = query_frame(conn, query)
    finally:
        conn.close()
    source = DemoSource(config)
    accounts = []
    for row in phases.iter_rows(named=True):
        rules = json.loads(row["rules"])
        source.track(
            PhaseSpec(
                account_id=row["account_id"],
                challenge_id=str(row["challenge_id"]),
                phase_index=row["phase_index"],
                started_at=row["started_at"],
                rules=rules,
            )
        )
        accounts.append(
            {
                "account_id": row["account_id"],
                "challenge_id": str(row["challenge_id"]),
                "phase_index": row["phase_index"],
                "started_at": row["started_at"].isoformat(),
                "rules": rules,
            }
        )
    ticks = source.dump(
        root / "ticks.parquet", range(batches), deals=root / "deals.parquet"
    )
    rules_file = root / "rules.json"
    rules_file.write_text(json.dumps({"accounts": accounts}))
    return rules_file, ticks, [int(a["account_id"]) for a in accounts]


def deals_file(ticks: Path) -> Path:
    """The deals :func:`demo_backtest_inputs` dumped beside ``ticks``."""
    return ticks.with_name("deals.parquet")


def stored_outputs(
    conn: Connection, *, history: bool = True
) -> dict[str, pl.DataFrame]:
    """What a run stored, in a stable order, to compare runs with each other.

    Args:
        conn: The store.
        history: Include ``metric_history`` (its rows follow batch boundaries, which
            a replay after a kill need not reproduce).

    Returns:
        One frame per table: breaches, daily, latest, challenges, phases and
        (optionally) history.
    """
    queries = {
        "breaches": "SELECT * FROM breaches ORDER BY account_id, breach_seq",
        "daily": "SELECT * FROM prop_daily_snapshots ORDER BY account_id, day",
        "latest": "SELECT * FROM metrics_latest ORDER BY account_id",
        "challenges": "SELECT id, status, current_phase_index, ended_at "
        "FROM challenges ORDER BY id",
        "phases": "SELECT challenge_id, phase_index, status, account_id, ended_at "
        "FROM challenge_phases ORDER BY challenge_id, phase_index",
    }
    if history:
        queries["history"] = "SELECT * FROM metric_history ORDER BY account_id, ts"
    out = {name: query_frame(conn, sql) for name, sql in queries.items()}
    # The sequence's id differs between runs (SQL written for both backends).
    out["breaches"] = out["breaches"].drop("id")
    return out


def _frame_diff(got: pl.DataFrame, want: pl.DataFrame, rows: int = 8) -> str:
    """Rows only the store has and rows only the backtest has (a failure's detail)."""
    got_s = got.cast(want.schema, strict=False)
    only_got = got_s.join(want, on=want.columns, how="anti", nulls_equal=True)
    only_want = want.join(got_s, on=want.columns, how="anti", nulls_equal=True)
    return (
        f"store {got.height} rows, backtest {want.height} rows\n"
        f"only in the store ({only_got.height}):\n{only_got.head(rows)}\n"
        f"only in the backtest ({only_want.height}):\n{only_want.head(rows)}"
    )


def assert_matches_backtest(stored: dict[str, pl.DataFrame], backtest: Path) -> None:
    """The stored daily snapshots and breaches equal a backtest's output files.

    Args:
        stored: :func:`stored_outputs` of the run.
        backtest: The backtest command's ``--out`` folder for the same ticks.
    """
    daily = pl.read_parquet(backtest / "daily.parquet")
    got_daily = stored["daily"].select(daily.columns)
    assert got_daily.equals(daily), _frame_diff(got_daily, daily)
    breaches = pl.read_parquet(backtest / "breaches.parquet")
    assert breaches.height > 0
    got = (
        stored["breaches"]
        .with_columns(
            pl.col("challenge_id").cast(pl.String),
            pl.col("phase_index").cast(pl.Int64),
        )
        .sort(["account_id", "ts", "breach_seq"])
        .select(breaches.columns)
    )
    assert got.equals(breaches), _frame_diff(got, breaches)
