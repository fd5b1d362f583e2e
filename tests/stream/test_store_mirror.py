"""The risk team's mirror: DB.risk/risk.duckdb equals the store, refreshed by change."""

from __future__ import annotations

import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest

from prop_stream.evaluator import DemoConfig, DemoSource, EvaluatorLoop
from prop_stream.rules import RuleEngine
from prop_stream.sinks import DuckDBSink
from prop_stream.store import (
    Connection,
    active_phase_specs,
    connect,
    cursor,
    init_database,
    query_frame,
)
from prop_stream.store.mirror import (
    CURRENT_TABLES,
    HISTORY_TABLES,
    MirrorStats,
    RiskMirror,
    mirror_dir,
)

START = datetime(2026, 1, 5, tzinfo=UTC)
DEMO = DemoConfig(
    seed=3, rate=5 / 60, batch_ms=20 * 60_000, realtime=False, epoch=START
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Path, Connection]]:
    path = tmp_path / "prop.duckdb"
    init_database(path, demo=True, now=START)
    conn = connect(path)
    yield path, conn
    conn.close()


def _run_demo(conn: Connection, batches: int) -> None:
    loop = EvaluatorLoop(
        cursor(conn), DemoSource(DEMO), DuckDBSink(cursor(conn), source="demo")
    )
    loop.run(max_batches=batches)


def _names(conn: Connection) -> list[str]:
    views = conn.execute(
        "SELECT view_name FROM duckdb_views() WHERE NOT internal "
        "AND starts_with(view_name, 'risk_') ORDER BY view_name"
    ).fetchall()
    return [*HISTORY_TABLES, *CURRENT_TABLES, *(str(v[0]) for v in views)]


def _open_risk(mirror: RiskMirror) -> Connection:
    risk = duckdb.connect(str(mirror.risk_db), read_only=True)
    risk.execute("SET TimeZone = 'UTC'")  # the service's sessions are in UTC
    return risk


def _assert_mirrors(conn: Connection, mirror: RiskMirror) -> dict[str, int]:
    """Every mirrored table and risk_* view equals the store's, row for row."""
    risk = _open_risk(mirror)
    rows = {}
    try:
        names = _names(conn)
        assert len(names) >= len(HISTORY_TABLES) + len(CURRENT_TABLES) + 3
        for name in names:
            query = f"SELECT * FROM {name} ORDER BY ALL"  # noqa: S608 - catalog names
            # Same names and types (views carry no keys or NOT NULL).
            describe = f"SELECT column_name, column_type FROM (DESCRIBE {name})"  # noqa: S608 - catalog names
            assert (
                risk.execute(describe).fetchall() == conn.execute(describe).fetchall()
            ), name
            expected = query_frame(conn, query)
            got = query_frame(risk, query)
            assert got.equals(expected, null_equal=True), name
            rows[name] = got.height
    finally:
        risk.close()
    return rows


def _nothing_written(stats: MirrorStats) -> bool:
    return (
        stats.files_written == 0
        and stats.rows_written == 0
        and not any(stats.days_written.values())
        and stats.tables_written == ()
        and not stats.risk_db_rebuilt
    )


def test_mirror_equals_the_store_after_a_refresh(
    store: tuple[Path, Connection],
) -> None:
    path, conn = store
    _run_demo(conn, 90)  # 30 hours of demo time: two days and more
    mirror = RiskMirror(cursor(conn), path)
    assert mirror.risk_db == path.with_name("prop.duckdb.risk") / "risk.duckdb"
    stats = mirror.refresh()
    assert stats.full
    assert stats.risk_db_rebuilt
    with _open_risk(mirror) as risk:
        # Written for DuckDB 1.0 and later, not only for this DuckDB.
        tags = risk.execute(
            "SELECT tags FROM duckdb_databases() WHERE database_name = 'risk'"
        ).fetchall()
    assert tags == [({"storage_version": "v1.0.0+"},)]
    rows = _assert_mirrors(conn, mirror)
    assert rows["metric_history"] > 0
    assert rows["prop_daily_snapshots"] > 0
    assert rows["challenges"] > 0
    assert stats.days_written["metric_history"] >= 2

    _run_demo(conn, 30)  # the service goes on: new metric rows, days, breaches
    again = mirror.refresh()
    assert not again.full
    assert again.changed_accounts > 0
    assert again.days_written["metric_history"] >= 1
    _assert_mirrors(conn, mirror)


def test_a_refresh_with_nothing_changed_writes_nothing(
    store: tuple[Path, Connection],
) -> None:
    path, conn = store
    _run_demo(conn, 60)
    mirror = RiskMirror(cursor(conn), path)
    mirror.refresh()
    files = {p: p.stat().st_mtime_ns for p in mirror.root.rglob("*") if p.is_file()}
    files.pop(mirror.root / ".mirror-state.json")
    stats = mirror.refresh()
    assert _nothing_written(stats), stats
    assert stats.changed_accounts == 0
    # A restarted service picks up where the last one left (the state is on disk).
    restarted = RiskMirror(cursor(conn), path)
    assert _nothing_written(restarted.refresh())
    after = {p: p.stat().st_mtime_ns for p in mirror.root.rglob("*") if p.is_file()}
    after.pop(mirror.root / ".mirror-state.json")
    assert after == files


def _ticks(account: int, rows: list[tuple[float, float]]) -> pl.DataFrame:
    """Ticks of one account: (hours after START, equity); balance stays 100,000."""
    return pl.DataFrame(
        {
            "account_id": [account] * len(rows),
            "ts": [START + timedelta(hours=h) for h, _ in rows],
            "equity": [e for _, e in rows],
            "balance": [100_000.0] * len(rows),
        }
    )


def test_a_later_resolution_and_a_status_change_reach_the_mirror(
    store: tuple[Path, Connection],
) -> None:
    path, conn = store
    engine = RuleEngine()
    specs = active_phase_specs(conn)
    for spec in specs:
        engine.register(spec)
    account = specs[0].account_id  # a two-step 100K phase, daily warning at 4,000
    newcomer = specs[1].account_id  # no metric yet at the first refresh
    sink = DuckDBSink(cursor(conn), source="test")
    # Day one: a daily-loss warning fires at 10:00.
    sink.add(
        engine.process(_ticks(account, [(9, 100_000), (10, 95_500)])),
        position={"0": 1},
    )
    sink.flush()
    mirror = RiskMirror(cursor(conn), path)
    mirror.refresh()
    assert _assert_mirrors(conn, mirror)["breaches"] == 1

    # Day two: the warning of day one resolves, then the daily limit breaks and
    # the phase (and the challenge) fails. Another account's first ticks arrive,
    # from day one too (a day the mirror already wrote).
    ticks = pl.concat(
        [
            _ticks(account, [(33, 99_000), (36, 93_000)]),
            _ticks(newcomer, [(20, 100_100), (34, 100_200)]),
        ]
    ).sort("ts")
    sink.add(engine.process(ticks), position={"0": 2})
    sink.flush()
    resolved = conn.execute(
        "SELECT CAST(ts AS DATE), resolved FROM breaches "
        "WHERE account_id = ? AND rule = 'daily_loss_warning'",
        [account],
    ).fetchall()
    assert resolved == [(START.date(), True)]  # a row of an older day changed
    assert conn.execute(
        "SELECT count(*) FROM challenges WHERE status = 3"
    ).fetchone() == (1,)
    stats = mirror.refresh()
    assert not stats.full
    assert stats.changed_accounts == 2
    assert stats.days_written["metric_history"] == 2
    assert "challenges" in stats.tables_written
    assert "challenge_phases" in stats.tables_written
    rows = _assert_mirrors(conn, mirror)
    assert rows["breaches"] == 2
    with _open_risk(mirror) as risk:
        assert risk.execute(
            "SELECT resolved FROM breaches WHERE rule = 'daily_loss_warning'"
        ).fetchall() == [(True,)]


def test_rows_older_than_the_watermark_are_found_by_count(
    store: tuple[Path, Connection],
) -> None:
    # A Kafka replay that batches differently may add samples between existing
    # ones: older than the account's latest metric, which does not move.
    path, conn = store
    _run_demo(conn, 60)
    mirror = RiskMirror(cursor(conn), path)
    mirror.refresh()
    row = conn.execute(
        "SELECT account_id, min(ts) FROM metric_history GROUP BY ALL "
        "ORDER BY account_id LIMIT 1"
    ).fetchone()
    assert row is not None
    conn.execute(
        "INSERT INTO metric_history SELECT * REPLACE (ts - INTERVAL 1 SECOND AS ts) "
        "FROM metric_history WHERE account_id = ? AND ts = ?",
        [row[0], row[1]],
    )
    stats = mirror.refresh()
    assert stats.changed_accounts == 0
    assert stats.days_written["metric_history"] == 1
    _assert_mirrors(conn, mirror)
    # A day deleted whole (say, by a retention job) leaves the mirror too.
    day = conn.execute("SELECT min(day) FROM metric_history").fetchall()[0][0]
    conn.execute("DELETE FROM metric_history WHERE day = ?", [day])
    first_day = mirror.root / "metric_history" / f"day={day.isoformat()}"
    assert first_day.is_dir()
    stats = mirror.refresh()
    assert stats.days_written["metric_history"] == 1
    assert not first_day.exists()
    _assert_mirrors(conn, mirror)


def test_mirror_files_are_private(store: tuple[Path, Connection]) -> None:
    path, conn = store
    _run_demo(conn, 30)
    mirror = RiskMirror(cursor(conn), path)
    mirror.refresh()
    assert stat.S_IMODE(mirror_dir(path).stat().st_mode) == 0o700
    for item in mirror.root.rglob("*"):
        mode = stat.S_IMODE(item.stat().st_mode)
        assert mode == (0o700 if item.is_dir() else 0o600), item
    assert not [p for p in mirror.root.iterdir() if p.name.startswith(".staging")]


#: Holds risk.duckdb open read-only in another process and answers on stdin.
READER = textwrap.dedent(
    """
    import sys, duckdb
    con = duckdb.connect(sys.argv[1], read_only=True)
    print("open", flush=True)
    for line in sys.stdin:
        if line.strip() == "reopen":
            con.close()
            con = duckdb.connect(sys.argv[1], read_only=True)
        try:
            rows = con.execute(
                "SELECT (SELECT count(*) FROM metric_history), "
                "(SELECT count(*) FROM duckdb_views() WHERE view_name = 'risk_new')"
            ).fetchone()
            print(rows[0], rows[1], flush=True)
        except duckdb.Error as exc:
            print("error", exc, flush=True)
    """
)


def test_a_reader_holding_risk_db_never_fails_a_refresh(
    store: tuple[Path, Connection],
) -> None:
    path, conn = store
    _run_demo(conn, 30)
    mirror = RiskMirror(cursor(conn), path)
    mirror.refresh()
    reader = subprocess.Popen(  # noqa: S603 - our own script
        [sys.executable, "-c", READER, str(mirror.risk_db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert reader.stdin is not None
    assert reader.stdout is not None

    def ask(command: str) -> str:
        assert reader.stdin is not None
        assert reader.stdout is not None
        reader.stdin.write(command + "\n")
        reader.stdin.flush()
        return reader.stdout.readline().strip()

    try:
        assert reader.stdout.readline().strip() == "open"
        before = int(ask("count").split()[0])
        # New rows, and a new risk view: risk.duckdb itself must be rebuilt
        # while the reader holds it.
        _run_demo(conn, 30)
        conn.execute("CREATE VIEW risk_new AS SELECT 1 AS one")
        stats = mirror.refresh()
        assert stats.risk_db_rebuilt
        expected = conn.execute("SELECT count(*) FROM metric_history").fetchone()
        assert expected is not None
        assert expected[0] > before
        # The views read the Parquet files: new rows show without reopening...
        assert ask("count") == f"{expected[0]} 0"
        # ...and the new view after reopening.
        assert ask("reopen") == f"{expected[0]} 1"
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)
        reader.stdout.close()
    _assert_mirrors(conn, mirror)


def test_a_refresh_clears_what_a_crashed_one_left(
    store: tuple[Path, Connection],
) -> None:
    path, conn = store
    _run_demo(conn, 30)
    RiskMirror(cursor(conn), path).refresh()
    root = mirror_dir(path)
    leftovers = [
        root / ".staging-0123" / "metric_history" / "day=2026-01-05",
        root / ".risk.duckdb.0123.tmp",
        root / "challenges" / ".data.parquet.0123.tmp",
    ]
    leftovers[0].mkdir(parents=True)
    leftovers[1].write_bytes(b"half a database")
    leftovers[2].write_bytes(b"half a file")
    mirror = RiskMirror(cursor(conn), path)  # the service restarts
    assert _nothing_written(mirror.refresh())
    assert not [p for p in leftovers if p.exists()]
    assert not (root / ".staging-0123").exists()
    _assert_mirrors(conn, mirror)


def test_a_database_created_again_at_the_same_path_is_mirrored_in_full(
    tmp_path: Path,
) -> None:
    path = tmp_path / "prop.duckdb"
    for batches in (60, 30):
        path.unlink(missing_ok=True)
        init_database(path, demo=True, now=START)
        conn = connect(path)
        try:
            _run_demo(conn, batches)
            stats = RiskMirror(cursor(conn), path).refresh()
            assert stats.full
            _assert_mirrors(conn, RiskMirror(cursor(conn), path))
        finally:
            conn.close()


def test_run_refreshes_until_stopped_and_raises_what_fails(
    store: tuple[Path, Connection], tmp_path: Path
) -> None:
    path, conn = store
    mirror = RiskMirror(cursor(conn), path)
    assert mirror.last is None
    stop = threading.Event()
    before = datetime.now(UTC)
    thread = threading.Thread(target=mirror.run, args=(stop, 0.05))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while mirror.last is None and time.monotonic() < deadline:
            stop.wait(0.05)
        first = mirror.last
        assert first is not None
        assert first.full
        assert first.snapshot_at >= before
        _run_demo(conn, 10)
        while (
            mirror.last is first or not (mirror.last and mirror.last.changed_accounts)
        ) and time.monotonic() < deadline:
            stop.wait(0.05)
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    assert mirror.last is not None
    assert mirror.last.changed_accounts > 0  # it refreshed while the demo wrote
    mirror.refresh()  # and the batches after that refresh:
    _assert_mirrors(conn, mirror)

    # A failure (here: the mirror's directory can't be created) ends run().
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    failing = RiskMirror(cursor(conn), path, root=blocked / "mirror")
    with pytest.raises(NotADirectoryError):
        failing.run(threading.Event(), 0.05)
    with pytest.raises(ValueError, match="interval_s"):
        mirror.run(threading.Event(), 0)
