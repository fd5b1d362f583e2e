"""The risk team reads DB.risk/risk.duckdb from another process while serve runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest

PROP_STREAM = Path(sys.executable).with_name("prop-stream")
pytestmark = pytest.mark.integration

#: The risk team: opens risk.duckdb read-only every PERIOD seconds, one JSON line
#: per attempt, for at most LIFETIME seconds.
READER = textwrap.dedent(
    """
    import json, sys, time, duckdb
    path, period, lifetime = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    end = time.monotonic() + lifetime
    while time.monotonic() < end:
        line = {"t": time.time()}
        try:
            con = duckdb.connect(path, read_only=True)
            try:
                rows, breaches, newest = con.execute(
                    "SELECT (SELECT count(*) FROM metric_history), "
                    "(SELECT count(*) FROM breaches), "
                    "(SELECT epoch(max(ts)) FROM metric_history)"
                ).fetchone()
                line.update(rows=rows, breaches=breaches, newest=newest)
            finally:
                con.close()
        except duckdb.Error as exc:
            line["error"] = str(exc)
        print(json.dumps(line), flush=True)
        time.sleep(period)
    """
)


def _serve(db: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    subprocess.run(  # noqa: S603 - our own command
        [str(PROP_STREAM), "init", "--db", str(db), "--demo"],
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen(  # noqa: S603 - our own command
        [str(PROP_STREAM), "serve", "--db", str(db), "--source", "demo",
         "--port", "0"],
        cwd=db.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PROP_STREAM_RISK_MIRROR_INTERVAL_S": "2",
            **env,
        },
    )  # fmt: skip
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "ready on http://" in line:
            return proc
    proc.kill()
    proc.communicate()
    pytest.fail(f"no ready line; stderr: {''.join(lines)}")


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=90)
    return proc.returncode


def _reader(risk_db: Path, lifetime_s: float) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603 - our own script
        [sys.executable, "-c", READER, str(risk_db), "2", str(lifetime_s)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _observe(
    reader: subprocess.Popen[str], done: Any, deadline_s: float
) -> list[dict[str, Any]]:
    """The reader's lines until ``done(lines)`` or the deadline."""
    assert reader.stdout is not None
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        line = reader.stdout.readline()
        if not line:
            break
        seen.append(json.loads(line))
        if done(seen):
            break
    return seen


def _after_first_open(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # On a service's very first start, risk.duckdb appears with the first refresh.
    first = next((i for i, s in enumerate(seen) if "error" not in s), len(seen))
    assert all("does not exist" in s["error"] for s in seen[:first]), seen
    return seen[first:]


def test_risk_db_opens_while_serve_runs_and_is_within_60_s(tmp_path: Path) -> None:
    db = tmp_path / "prop.duckdb"
    # Real time: a demo tick's ts is the wall clock when it is committed, so
    # `now - max(ts)` seen in the mirror bounds how far behind it is.
    proc = _serve(db, {})
    reader = _reader(db.with_name("prop.duckdb.risk") / "risk.duckdb", 120)
    try:

        def grown(seen: list[dict[str, Any]]) -> bool:
            rows = [s["rows"] for s in seen if s.get("rows")]
            return len(rows) >= 3 and rows[-1] > rows[0]

        seen = _observe(reader, grown, 100)
        assert grown(seen), seen
        opened = _after_first_open(seen)
        assert all("error" not in s for s in opened), opened
        for s in opened:
            if s["rows"]:
                assert s["t"] - s["newest"] <= 60, s
    finally:
        reader.kill()
        reader.communicate()
        assert _stop(proc) == 0


def test_breaches_reach_the_risk_db_within_60_s(tmp_path: Path) -> None:
    db = tmp_path / "prop.duckdb"
    # The demo as fast as it goes, ten demo minutes a batch: accounts breach
    # their limits within seconds of wall time.
    fast = {
        "PROP_STREAM_DEMO_REALTIME": "false",
        "PROP_STREAM_DEMO_BATCH_MS": "600000",
        "PROP_STREAM_DEMO_RATE": "2",
    }
    proc = _serve(db, fast)
    reader = _reader(db.with_name("prop.duckdb.risk") / "risk.duckdb", 90)
    try:
        seen = _observe(
            reader, lambda seen: seen[-1].get("breaches", 0) > 0, deadline_s=60
        )
        opened = _after_first_open(seen)
        assert opened, seen
        assert all("error" not in s for s in opened), opened
        assert opened[-1]["breaches"] > 0, seen
    finally:
        reader.kill()
        reader.communicate()
        assert _stop(proc) == 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        stored = con.execute("SELECT count(*) FROM breaches").fetchall()[0][0]
    finally:
        con.close()
    assert stored >= opened[-1]["breaches"]
