"""How long a refresh of the risk team's mirror takes at 10M ``metric_history`` rows.

Builds a store (the demo reference data) with ``--rows`` metric rows of
``--accounts`` accounts spread evenly over ``--days`` days (the last day half
full), their ``metrics_latest``, one daily snapshot per account and day and
``--breaches`` breaches (a third unresolved), all in time order as the service
writes them. Then times, with :class:`prop_stream.store.mirror.RiskMirror`:

1. the first refresh (everything written);
2. a refresh with nothing changed;
3. a refresh after ``--new-rows`` new metric rows on the last day, written as the
   sink writes them (history, latest, that day's snapshots in one transaction),
   and half the unresolved warnings of the two days before resolved by those ticks;
4. a refresh after the first 100 rows of 10 new accounts (no watermark yet: their
   rows are looked for in the whole history);
5. a query of ``risk_breaches_by_day_rule`` and a count of ``metric_history`` by
   another connection that opened ``risk.duckdb`` read-only.

Example:
    .venv/bin/python benchmarks/risk_mirror.py --rows 10000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from prop_stream.store import connect, cursor, init_database
from prop_stream.store.mirror import RiskMirror

START = datetime(2026, 1, 1, tzinfo=UTC)

#: One metric row of sample ``k`` of account ``a``, from ``range`` rows ``i``.
_METRIC_ROW = """
    5000001 + a AS account_id, 1 + a AS challenge_id, 0 AS phase_index,
    ts, 'active' AS status, CAST(ts AS DATE) AS day,
    100000 + 500 * sin(k / 40 + a) AS equity, 100000.0 AS balance,
    500 * sin(k / 40 + a) AS profit,
    100000.0 AS daily_start_equity, 100000.0 AS daily_start_balance,
    500 * sin(k / 40 + a) AS daily_pnl, 5000.0 AS daily_loss_limit,
    95000.0 AS daily_floor, 5000 + 500 * sin(k / 40 + a) AS daily_room,
    false AS daily_paused, 10000.0 AS max_loss_limit, 90000.0 AS overall_floor,
    10000 + 500 * sin(k / 40 + a) AS overall_room, 100500.0 AS hwm,
    CAST(k % 30 AS INTEGER) AS trading_days, CAST(k % 30 AS INTEGER) AS days_elapsed,
    500.0 AS best_day_profit, 110000.0 AS profit_target_level,
    0.05 AS profit_progress, 0.5 AS trading_days_progress
"""


def _history(
    accounts: int, samples: int, *, origin: datetime, step_s: float, first_k: int = 0
) -> str:
    """``samples`` rows of every account, ``step_s`` apart from ``origin``, ts order."""
    return f"""
        SELECT {_METRIC_ROW} FROM (
            SELECT i % {accounts} AS a, {first_k} + i // {accounts} AS k,
                TIMESTAMPTZ '{origin.isoformat()}'
                    + to_microseconds(CAST((i // {accounts}) * {step_s * 1e6}
                        AS BIGINT)) AS ts
            FROM range({accounts * samples}) AS r(i)
        )
    """  # noqa: S608 - numbers only


def build(db: Path, *, rows: int, accounts: int, days: int, breaches: int) -> None:
    """Create the store."""
    init_database(db, demo=True, now=START)
    samples = rows // accounts
    # The last day half full, so new rows fit after every account's latest.
    step_s = (days - 0.5) * 86_400 / samples
    conn = connect(db)
    try:
        conn.execute(
            "INSERT INTO metric_history "
            + _history(accounts, samples, origin=START, step_s=step_s)
        )
        conn.execute(
            "INSERT INTO metrics_latest SELECT * FROM metric_history "
            "QUALIFY row_number() OVER (PARTITION BY account_id ORDER BY ts DESC) = 1"
        )
        conn.execute(
            "INSERT INTO prop_daily_snapshots SELECT account_id, day, "
            "any_value(challenge_id), 0, 100000, 100000, min(equity), "
            "arg_max(equity, ts) FROM metric_history GROUP BY account_id, day"
        )
        conn.execute(
            f"""
            INSERT INTO breaches (account_id, challenge_id, phase_index, breach_seq,
                rule, severity, threshold, actual, action, ts, resolved, resolved_ts)
            SELECT 5000001 + i % {accounts}, 1 + i % {accounts}, 0, i,
                'daily_loss_warning', 'warning', 4000, 4100, 'notify',
                TIMESTAMPTZ '{START.isoformat()}'
                    + to_microseconds(CAST(i * {(days - 1) * 86_400e6 / breaches}
                        AS BIGINT)),
                i % 3 <> 0, NULL
            FROM range({breaches}) AS r(i) ORDER BY 10
            """  # noqa: S608 - numbers only
        )
        conn.execute(
            "UPDATE breaches SET resolved_ts = ts + INTERVAL 1 HOUR WHERE resolved"
        )
        conn.execute("CHECKPOINT")
    finally:
        conn.close()


def ingest(
    conn: duckdb.DuckDBPyConnection, *, new_rows: int, accounts: int, days: int
) -> None:
    """New rows in the last day's second half, as one sink transaction writes them."""
    samples = new_rows // accounts
    noon = START + timedelta(days=days - 0.5)
    history = _history(
        accounts, samples, origin=noon, step_s=43_000 / samples, first_k=10**6
    )
    conn.execute("BEGIN TRANSACTION")
    conn.execute("CREATE TEMP TABLE new_rows AS " + history)
    conn.execute("INSERT INTO metric_history SELECT * FROM new_rows")
    conn.execute(
        "INSERT OR REPLACE INTO metrics_latest SELECT * FROM new_rows "
        "QUALIFY row_number() OVER (PARTITION BY account_id ORDER BY ts DESC) = 1"
    )
    conn.execute(
        "INSERT OR REPLACE INTO prop_daily_snapshots SELECT account_id, day, "
        "any_value(challenge_id), 0, 100000, 100000, min(equity), "
        "arg_max(equity, ts) FROM new_rows GROUP BY account_id, day"
    )
    # Warnings of the last two days resolve, at a tick of their account.
    conn.execute(
        """
        UPDATE breaches AS b SET resolved = true, resolved_ts = l.ts
        FROM metrics_latest AS l
        WHERE l.account_id = b.account_id AND NOT b.resolved
            AND b.ts >= ? AND b.id % 2 = 0
        """,
        [noon - timedelta(days=2)],
    )
    conn.execute("DROP TABLE new_rows")
    conn.execute("COMMIT")


def new_accounts(
    conn: duckdb.DuckDBPyConnection, *, accounts: int, days: int, count: int = 10
) -> None:
    """``count`` accounts' first rows (100 each, last day): no watermark for them."""
    late = START + timedelta(days=days - 0.1)
    history = _history(count, 100, origin=late, step_s=60, first_k=2 * 10**6)
    conn.execute("BEGIN TRANSACTION")
    conn.execute(
        "CREATE TEMP TABLE new_rows AS SELECT * REPLACE "  # noqa: S608 - numbers only
        f"(account_id + {accounts} AS account_id) FROM ({history})"
    )
    conn.execute("INSERT INTO metric_history SELECT * FROM new_rows")
    conn.execute(
        "INSERT INTO metrics_latest SELECT * FROM new_rows "
        "QUALIFY row_number() OVER (PARTITION BY account_id ORDER BY ts DESC) = 1"
    )
    conn.execute("DROP TABLE new_rows")
    conn.execute("COMMIT")


def _timed(mirror: RiskMirror) -> dict[str, Any]:
    stats = mirror.refresh()
    out = asdict(stats)
    out["seconds"] = round(stats.seconds, 3)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--breaches", type=int, default=20_000)
    parser.add_argument("--new-rows", type=int, default=100_000)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.duckdb"
        started = time.perf_counter()
        build(
            db,
            rows=args.rows,
            accounts=args.accounts,
            days=args.days,
            breaches=args.breaches,
        )
        result["build_s"] = round(time.perf_counter() - started, 1)
        conn = connect(db)
        assert isinstance(conn, duckdb.DuckDBPyConnection)
        try:
            mirror = RiskMirror(cursor(conn), db)
            result["first_refresh"] = _timed(mirror)
            result["unchanged_refresh"] = _timed(mirror)
            ingest(conn, new_rows=args.new_rows, accounts=args.accounts, days=args.days)
            result["incremental_refresh"] = _timed(mirror)
            new_accounts(conn, accounts=args.accounts, days=args.days)
            result["new_accounts_refresh"] = _timed(mirror)
            source = conn.execute(
                "SELECT (SELECT count(*) FROM metric_history), "
                "(SELECT count(*) FILTER (WHERE resolved) FROM breaches)"
            ).fetchall()[0]
            reader = duckdb.connect(str(mirror.risk_db), read_only=True)
            try:
                started = time.perf_counter()
                mirrored = reader.execute(
                    "SELECT (SELECT count(*) FROM metric_history), "
                    "(SELECT count(*) FILTER (WHERE resolved) FROM breaches)"
                ).fetchall()[0]
                result["reader_count_s"] = round(time.perf_counter() - started, 3)
                started = time.perf_counter()
                reader.execute("SELECT * FROM risk_breaches_by_day_rule").fetchall()
                result["reader_risk_view_s"] = round(time.perf_counter() - started, 3)
            finally:
                reader.close()
            if mirrored != source:
                raise SystemExit(f"mirror {mirrored} != store {source}")
            result["metric_rows"] = source[0]
            result["mirror_bytes"] = sum(
                p.stat().st_size for p in mirror.root.rglob("*") if p.is_file()
            )
            result["db_bytes"] = db.stat().st_size
        finally:
            conn.close()
    print(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
