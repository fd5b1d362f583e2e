"""Parquet export, and operator commands while a service process holds the file."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import polars as pl
import pytest
from service_process import ServiceProcess

from prop_stream.admin import AdminEndpoint, publish, read_endpoint
from prop_stream.cli import main
from prop_stream.evaluator import DemoConfig, DemoSource, EvaluatorLoop
from prop_stream.sinks import DuckDBSink
from prop_stream.store import (
    DatabaseLockedError,
    connect,
    cursor,
    customer_id_by_email,
    init_database,
    query_frame,
    session_customer,
)
from prop_stream.store.access import export_database

START = datetime(2026, 1, 5, tzinfo=UTC)
DEMO = DemoConfig(
    seed=3, rate=5 / 60, batch_ms=20 * 60_000, realtime=False, epoch=START
)


def _run_demo(path: Path | str, batches: int) -> None:
    conn = connect(path)
    source = DemoSource(DEMO)
    loop = EvaluatorLoop(cursor(conn), source, DuckDBSink(cursor(conn), source="demo"))
    loop.run(max_batches=batches)
    conn.close()


@pytest.fixture
def demo_db(store_db: Path | str) -> Path | str:
    path = store_db
    init_database(path, demo=True, now=START)
    _run_demo(path, 90)
    return path


def test_export_writes_parquet_partitioned_by_day(
    demo_db: Path | str, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    result = export_database(demo_db, out)
    assert not result.via_service
    conn = connect(demo_db, read_only=True)
    for table, day in [
        ("metric_history", "day"),
        ("prop_daily_snapshots", "day"),
        ("breaches", "CAST(ts AS DATE)"),
    ]:
        stored = query_frame(conn, f"SELECT *, {day} AS _day FROM {table}")  # noqa: S608 - constants
        assert result.rows[table] == stored.height > 0
        parts = sorted(p.name for p in (out / table).iterdir())
        assert parts == sorted(
            f"day={d}" for d in stored["_day"].unique().cast(pl.String)
        )
        exported = pl.read_parquet(out / table, hive_partitioning=True)
        key = ["account_id", "ts" if table != "prop_daily_snapshots" else "day"]
        expected = stored.drop("_day")
        if table == "breaches":
            expected = expected.with_columns(day=pl.col("ts").cast(pl.Date))
        assert (
            exported.select(expected.columns)
            .sort(key)
            .equals(expected.sort(key), null_equal=True)
        ), table
    conn.close()


def test_export_again_replaces_partitions(demo_db: Path | str, tmp_path: Path) -> None:
    out = tmp_path / "export"
    export_database(demo_db, out)
    _run_demo(demo_db, 30)
    second = export_database(demo_db, out)
    exported = pl.read_parquet(out / "metric_history", hive_partitioning=True)
    assert exported.height == second.rows["metric_history"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_export_cli_reports_rows(
    demo_db: Path | str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "export"
    assert main(["export", "--db", str(demo_db), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "of metric_history" in err
    assert str(out) in err


def test_export_cli_without_database_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["export", "--db", str(tmp_path / "x.duckdb"), "--out", "o"])
    assert code == 2
    assert "database not found" in capsys.readouterr().err


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Path, ServiceProcess]]:
    path = tmp_path / "served.duckdb"
    init_database(path, demo=True)
    proc = ServiceProcess(
        ["serve", "--db", str(path), "--source", "demo", "--port", "0"],
        tmp_path,
        env={"PROP_STREAM_DEMO_BATCH_MS": "100", "PROP_STREAM_DEMO_RATE": "200"},
    )
    try:
        proc.wait_ready()
        yield path, proc
    finally:
        proc.kill()


def test_export_while_the_service_runs_goes_through_it(
    service: tuple[Path, ServiceProcess],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = service
    with pytest.raises(DatabaseLockedError):
        connect(path, read_only=True)
    out = tmp_path / "live-export"
    # Poll until the service has stored a batch: an export then has history.
    deadline = time.monotonic() + 60
    history = pl.DataFrame()
    while history.height == 0 and time.monotonic() < deadline:
        args = ["export", "--db", str(path), "--out", str(out), "--timeout", "30"]
        assert main(args) == 0
        assert "through the running service" in capsys.readouterr().err
        # An empty table exports no day files.
        if any((out / "metric_history").rglob("*.parquet")):
            history = pl.read_parquet(out / "metric_history", hive_partitioning=True)
    assert history.height > 0
    assert set(history["account_id"]) <= set(range(5_000_000, 6_000_000))


def test_session_while_the_service_runs_goes_through_it(
    service: tuple[Path, ServiceProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, proc = service
    admin = Path(f"{path.resolve()}.admin.json")
    assert admin.stat().st_mode & 0o777 == 0o600
    assert main(["session", "bob@example.com", "--db", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["session", "nobody@example.com", "--db", str(path)]) == 2
    assert "nobody@example.com" in capsys.readouterr().err
    assert proc.stop(30) == 0
    assert not admin.exists()
    conn = connect(path)
    bob = customer_id_by_email(conn, email="bob@example.com")
    assert session_customer(conn, token=token) == bob
    conn.close()


def test_admin_routes_refuse_a_wrong_token(
    service: tuple[Path, ServiceProcess],
) -> None:
    path, proc = service
    assert proc.url is not None
    for headers in ({}, {"Authorization": "Bearer nope"}):
        answer = httpx.post(
            f"{proc.url}/admin/session",
            json={"email": "bob@example.com", "ttl_s": 60},
            headers=headers,
        )
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "unauthorized"
    # The token is checked before the body is read: not JSON is still a 401.
    garbled = httpx.post(
        f"{proc.url}/admin/session",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert garbled.status_code == 401
    # With the token, a bad body is a 422 naming the field.
    endpoint = read_endpoint(path)
    assert endpoint is not None
    bad = httpx.post(
        f"{proc.url}/admin/session",
        json={"email": "bob@example.com", "ttl_s": -1},
        headers={"Authorization": f"Bearer {endpoint.token}"},
    )
    assert bad.status_code == 422
    assert "ttl_s" in bad.text


def test_a_stale_admin_file_does_not_stop_the_commands(
    demo_db: Path | str, capsys: pytest.CaptureFixture[str]
) -> None:
    if not isinstance(demo_db, Path):
        pytest.skip("PostgreSQL has no admin file: commands open it directly")
    # A service killed with SIGKILL leaves its admin file behind.
    publish(demo_db, AdminEndpoint("http://127.0.0.1:9", "t", 1))
    assert main(["session", "bob@example.com", "--db", str(demo_db)]) == 0
    assert capsys.readouterr().out.strip()


def test_service_stops_gracefully_on_sigterm(
    service: tuple[Path, ServiceProcess],
) -> None:
    path, proc = service
    assert proc.stop(30) == 0
    assert any("stopped after" in line for line in proc.lines())
    conn = connect(path, read_only=True)
    row = conn.execute(
        "SELECT c.position, o.n FROM (SELECT position FROM engine_checkpoints "
        "ORDER BY id DESC LIMIT 1) c, (SELECT count(*) n FROM source_offsets) o"
    ).fetchone()
    conn.close()
    assert row is not None
    assert row[1] == 3  # batch, epoch_us, tick_us
