"""The README's commands, run as written there (the Kafka block has its own test).

The commands are read from README.md, so a README that changes breaks this test
until the commands work again. The deviations are the least a shared machine
needs: ``serve`` gets ``--port 0`` (port 8000 may be taken), ``.venv/`` means the
repository's venv, and the placeholders ``RULES.json``/``TICKS.parquet`` are
files this test writes first. ``make run``/``make test`` are what CI runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import polars as pl
import pytest
from service_process import PROP_STREAM, ServiceProcess

from integration.conftest import REPO
from prop_stream.config import StreamSettings
from prop_stream.evaluator import DemoConfig, DemoSource, build_loop
from prop_stream.store import connect, cursor
from prop_stream.store.archive import TickArchiver

pytestmark = pytest.mark.integration

README = REPO / "README.md"


def _inline(prefix: str) -> str:
    # Code blocks out first: their fences would pair up the inline backticks.
    text = re.sub(r"```.*?```", "", README.read_text(), flags=re.DOTALL)
    spans: list[str] = re.findall(r"`([^`]+)`", text)
    return next(span for span in spans if span.startswith(prefix))


def _block_with(needle: str) -> list[str]:
    text = README.read_text()
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if any(needle in line for line in lines):
            return lines
    raise AssertionError(f"no code block with {needle!r} in README.md")


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "prop-stream":
        words[0] = str(PROP_STREAM)
    elif words[0].startswith(".venv/bin/"):
        words[0] = str(
            Path(sys.executable).parent / words[0].removeprefix(".venv/bin/")
        )
    return words


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(  # noqa: S603 - the README's own commands
        _argv(command),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done


def test_readme_service_commands_as_written(tmp_path: Path) -> None:
    init = _inline("prop-stream init ")
    serve = _inline("prop-stream serve ")
    session = _inline("prop-stream session ")
    (risk,) = _block_with("risk.duckdb")
    _run(init, tmp_path)
    proc = ServiceProcess(
        [*_argv(serve)[1:], "--port", "0"],
        tmp_path,
        env={"PROP_STREAM_RISK_MIRROR_INTERVAL_S": "1"},
    )
    try:
        url = proc.wait_ready()
        token = _run(session, tmp_path).stdout.strip()
        answer = httpx.get(
            f"{url}/prop/challenges",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert answer.status_code == 200
        assert answer.json()["total_count"] > 0
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(f"{url}{path}", timeout=30).status_code == 200
        # The risk team's command, while the service runs (after the first
        # refresh has written the copy).
        deadline = time.monotonic() + 60
        while not (tmp_path / "prop.duckdb.risk" / "risk.duckdb").exists():
            assert time.monotonic() < deadline, "no risk.duckdb after 60 s"
            time.sleep(0.2)
        printed = _run(risk, tmp_path).stdout
        assert "status" in printed
    finally:
        assert proc.stop(90) == 0


def test_readme_backtest_command_as_written(tmp_path: Path) -> None:
    lines = _block_with("prop-stream backtest")
    assert lines[0] == "make install"  # what `make test` has just done
    command = lines[1]
    rules = {
        "accounts": [
            {
                "account_id": 1001,
                "challenge_id": "c-1",
                "phase_index": 0,
                "started_at": "2026-01-05T00:00:00Z",
                "rules": {
                    "initial_balance": 100_000,
                    "max_daily_loss": 0.05,
                    "max_total_loss": 0.1,
                    "profit_target": 0.1,
                },
            }
        ]
    }
    (tmp_path / "RULES.json").write_text(json.dumps(rules))
    pl.DataFrame(
        {
            "account_id": [1001, 1001, 1001],
            "ts": [
                "2026-01-05T09:00:00Z",
                "2026-01-05T10:00:00Z",
                "2026-01-05T11:00:00Z",
            ],
            "equity": [100_000.0, 96_000.0, 94_000.0],
            "balance": [100_000.0, 100_000.0, 100_000.0],
        }
    ).with_columns(pl.col("ts").str.to_datetime(time_zone="UTC")).write_parquet(
        tmp_path / "TICKS.parquet"
    )
    _run(command, tmp_path)
    out = tmp_path / "results"
    for table in ("breaches", "accounts", "daily"):
        assert (out / f"{table}.parquet").is_file()
        assert (out / f"{table}.csv").is_file()
    assert (out / "report.html").is_file()
    breaches = pl.read_parquet(out / "breaches.parquet")
    assert breaches["rule"].to_list() == ["daily_loss"]


def test_readme_whatif_command_as_written(tmp_path: Path) -> None:
    # The store and archive a served demo leaves (judged in-process, faster
    # than the demo's wall clock), then the README's command on them.
    _run(_inline("prop-stream init "), tmp_path)
    db = tmp_path / "prop.duckdb"
    conn = connect(db)
    try:
        source = DemoSource(DemoConfig(rate=20_000, realtime=False))
        loop = build_loop(StreamSettings(db=db, source="demo"), conn, source=source)
        loop.run(max_batches=20)
        TickArchiver(cursor(conn), db).archive_once()
    finally:
        conn.close()
    done = _run(_inline("prop-stream whatif "), tmp_path)
    assert "prop-stream: whatif: 3 phases" in done.stderr
    summary = json.loads((tmp_path / "whatif" / "summary.json").read_text())
    assert summary["program"] == 1
    assert summary["mismatches"] == 0


def test_readme_make_help_lists_the_targets() -> None:
    done = subprocess.run(
        ["make", "help"],  # noqa: S607 - the machine's make
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ},
    )
    assert done.returncode == 0
    for target in ("install", "test", "lint", "bench", "run", "lock"):
        assert re.search(rf"^\s+{target}\s", done.stdout, re.MULTILINE), target
