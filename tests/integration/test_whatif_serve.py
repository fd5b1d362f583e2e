"""``prop-stream whatif`` on the store and archive of a real ``prop-stream serve``.

A real service judges demo ticks, archives them (every second) and keeps its
risk copy (every second). While it runs, ``whatif`` can't open the store and
reads the risk copy, and says that the ticks not archived yet are missing.
After the service stops, ``whatif`` reads the store itself, the staged ticks
included: the replay with the unchanged rules then equals every recorded
outcome, and a tighter daily limit fails exactly the phases whose worst day in
the store's daily snapshots exceeds it (``tests/whatif_support.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import httpx
import polars as pl
import pytest
from service_process import ServiceProcess, run_prop_stream
from whatif_support import limit_failing, worst_daily_loss

from prop_stream.store import init_database
from prop_stream.store.archive import archive_dir

pytestmark = pytest.mark.integration

_ENV = {
    "PROP_STREAM_DEMO_RATE": "2000",
    "PROP_STREAM_ARCHIVE_INTERVAL_S": "1",
    "PROP_STREAM_RISK_MIRROR_INTERVAL_S": "1",
}


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


def _phase_ids(db: Path) -> list[str]:
    conn = duckdb.connect(str(db), read_only=True)
    try:
        rows = conn.execute(
            "SELECT challenge_id, phase_index FROM challenge_phases "
            "WHERE account_id IS NOT NULL AND status IN ('active', 'passed') "
            "ORDER BY account_id"
        ).fetchall()
    finally:
        conn.close()
    return [f"{c}:{p}" for c, p in rows]


def test_whatif_on_a_served_store_flips_exactly_the_expected_phases(
    tmp_path: Path,
) -> None:
    db = tmp_path / "prop.duckdb"
    init_database(db, demo=True)
    risk_copy = Path(f"{db}.risk") / "risk.duckdb"
    service = ServiceProcess(
        ["serve", "--db", str(db), "--source", "demo", "--port", "0"],
        tmp_path,
        env=_ENV,
    )
    try:
        url = service.wait_ready()
        _until(
            lambda: any((archive_dir(db) / "ticks").rglob("part-*.parquet")),
            60,
            "the first archived ticks",
        )
        _until(lambda: _batches(url) >= 100, 90, "100 judged batches")
        _until(risk_copy.is_file, 60, "the risk copy")

        # The service holds the store: whatif reads the risk copy.
        live = tmp_path / "live"
        result = run_prop_stream(
            [
                "whatif",
                "--db",
                str(db),
                "--program",
                "1",
                "--set",
                "max_daily_loss=0.01",
                "--out",
                str(live),
            ]
        )
        assert result.returncode == 0, result.stderr
        assert "is held by a running service: read its risk copy" in result.stderr
        summary = json.loads((live / "summary.json").read_text())
        assert summary["read_from"] == str(risk_copy)
        assert summary["staged_ticks_included"] is False
        assert summary["ticks"] > 0
    finally:
        code = service.stop(90)
    assert code == 0

    # Stopped: the store itself, with the ticks the stop left staged.
    worst = worst_daily_loss(db)
    limit, expected = limit_failing(worst)
    out = tmp_path / "out"
    result = run_prop_stream(
        [
            "whatif",
            "--db",
            str(db),
            "--phase-ids",
            *_phase_ids(db),
            "--set",
            f"max_daily_loss={limit}",
            "--out",
            str(out),
            "--report",
        ]
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["read_from"] == "store"
    assert summary["staged_ticks_included"] is True
    outcomes = pl.read_parquet(out / "outcomes.parquet")
    assert outcomes["as_recorded"].all(), outcomes.filter(~pl.col("as_recorded"))
    changed = outcomes.filter(pl.col("change").is_not_null())
    assert set(changed["account_id"]) == expected
    assert set(changed["change"]) == {"active_to_failed"}
    assert set(changed["whatif_rule"]) == {"daily_loss"}
    assert summary["changes"] == {"active_to_failed": len(expected)}
    assert (out / "report.html").stat().st_size > 0
