"""A real `prop-stream serve --source demo` keeps every judged tick in its archive.

The service is killed with SIGKILL mid-run (the evaluator may be mid-commit, the
archiver mid-move), started again, and stopped. Its archive, read with polars,
then equals the ticks the (deterministic) demo source hands out for the batches
the store says were judged — each once — and ``prop-stream backtest --ticks
DB.archive/ticks`` reads it as it is and agrees with what the service stored.
"""

from __future__ import annotations

import shutil
import signal
import stat
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import polars as pl
import pytest
from replay_support import demo_backtest_inputs, stored_outputs
from service_process import ServiceProcess, run_prop_stream

from prop_stream.config import StreamSettings
from prop_stream.evaluator import DemoConfig, DemoSource, build_loop
from prop_stream.rules import TICK_SCHEMA
from prop_stream.store import connect, cursor, init_database, load_position
from prop_stream.store.archive import TickArchiver, archive_dir, staged_rows
from prop_stream.store.progress import Position

pytestmark = pytest.mark.integration

_ENV = {
    "PROP_STREAM_DEMO_RATE": "2000",
    "PROP_STREAM_ARCHIVE_INTERVAL_S": "1",
    # Checkpoints further apart than the kill comes: the restart replays.
    "PROP_STREAM_CHECKPOINT_EVERY": "1000",
}
_SORT = ["account_id", "ts", "equity", "balance"]


def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _batches(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("prop_stream_batches_total "):
            return float(line.split()[1])
    return 0.0


def _archived_files(db: Path) -> int:
    return len(list((archive_dir(db) / "ticks").rglob("part-*.parquet")))


class _Recording(DemoSource):
    def __init__(self, config: DemoConfig) -> None:
        super().__init__(config)
        self.polled: list[pl.DataFrame] = []

    def poll(self, max_records: int, timeout: float) -> tuple[pl.DataFrame, Position]:
        ticks, position = super().poll(max_records, timeout)
        if ticks.height:
            self.polled.append(ticks)
        return ticks, position


def _demo_ticks(clean: Path, position: dict[str, int]) -> pl.DataFrame:
    """The ticks of demo batches 0..N-1, judged on a copy of the initial store."""
    epoch = datetime.fromtimestamp(position["epoch_us"] / 1e6, UTC)
    config = DemoConfig(seed=7, rate=2000, batch_ms=200, realtime=False, epoch=epoch)
    source = _Recording(config)
    conn = connect(clean)
    try:
        loop = build_loop(StreamSettings(db=clean, source="demo"), conn, source=source)
        loop.run(max_batches=position["batch"])
        assert source.position()["tick_us"] == position["tick_us"]
    finally:
        conn.close()
    return pl.concat(source.polled)


def test_serve_archive_equals_the_judged_ticks_after_a_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "prop.duckdb"
    init_database(db, demo=True)
    clean = tmp_path / "clean.duckdb"
    shutil.copy(db, clean)
    args = ["serve", "--db", str(db), "--source", "demo", "--port", "0"]

    first = ServiceProcess(args, tmp_path, env=_ENV)
    try:
        url = first.wait_ready()
        _until(lambda: _archived_files(db) > 0, 60, "the first archived ticks")
        _until(lambda: _batches(url) >= 30, 60, "30 judged batches")
        first.signal(signal.SIGKILL)  # wherever it is, maybe mid-commit
        assert first.wait(30) == -signal.SIGKILL
    finally:
        first.kill()
    conn = connect(db, read_only=True)
    killed_at = load_position(conn, source="demo")["batch"]
    conn.close()

    second = ServiceProcess(args, tmp_path, env=_ENV)
    try:
        url = second.wait_ready()
        # Past the batches judged before the kill: the replay is over.
        _until(lambda: _batches(url) >= killed_at + 10, 90, "the replay and more")
        staged = [
            line
            for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
            if line.startswith("prop_stream_archive_staged_ticks ")
        ]
        assert len(staged) == 1, staged
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["archive"] == "ok"
    finally:
        code = second.stop(90)
    assert code == 0

    # What the stop left staged goes out on the next start's first run: do
    # that run here, with the service stopped.
    conn = connect(db)
    try:
        TickArchiver(cursor(conn), db).archive_once()
        assert staged_rows(conn) == 0
        position = load_position(conn, source="demo")
        stored = stored_outputs(conn, history=False)
    finally:
        conn.close()
    assert position["batch"] > killed_at + 10

    ticks_dir = archive_dir(db) / "ticks"
    archived = pl.read_parquet(ticks_dir / "**" / "*.parquet", hive_partitioning=False)
    assert archived.schema == pl.Schema(TICK_SCHEMA)
    expected = _demo_ticks(clean, position)
    assert archived.height == expected.height
    assert archived.sort(_SORT, maintain_order=True).equals(
        expected.sort(_SORT, maintain_order=True)
    )
    for day in ticks_dir.iterdir():
        assert stat.S_IMODE(day.stat().st_mode) == 0o700
        for part in day.iterdir():
            assert stat.S_IMODE(part.stat().st_mode) == 0o600

    # The backtest reads the archive directory as it is.
    (tmp_path / "inputs").mkdir()
    rules_file, _, _ = demo_backtest_inputs(
        db,
        tmp_path / "inputs",
        config=DemoConfig(seed=7, rate=2000, batch_ms=200, realtime=False),
        batches=1,  # its ticks file is not used
        active_only=False,
    )
    out = tmp_path / "backtest"
    result = run_prop_stream(
        [
            "backtest",
            "--rules",
            str(rules_file),
            "--ticks",
            str(ticks_dir),
            "--out",
            str(out),
        ]
    )
    assert result.returncode == 0, result.stderr
    daily = pl.read_parquet(out / "daily.parquet")
    assert daily.height > 0
    assert stored["daily"].select(daily.columns).equals(daily)
    # A run of seconds breaches little: the counts agree (the unit tests
    # compare breach rows on a run long enough to have them).
    assert pl.read_parquet(out / "breaches.parquet").height == stored["breaches"].height
