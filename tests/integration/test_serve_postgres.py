"""A real `prop-stream serve` process on PostgreSQL: init, session, serve, stop."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psycopg
import pytest
from service_process import ServiceProcess, run_prop_stream

from prop_stream.dburl import redact

pytestmark = pytest.mark.integration


def _count(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def test_serve_on_postgres_judges_serves_and_stops(pg_url: str, tmp_path: Path) -> None:
    init = run_prop_stream(["init", "--db", pg_url, "--demo"], cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    session = run_prop_stream(
        ["session", "alice@example.com", "--db", pg_url], cwd=tmp_path
    )
    assert session.returncode == 0, session.stderr
    token = session.stdout.strip()
    proc = ServiceProcess(
        ["serve", "--db", pg_url, "--source", "demo", "--port", "0"],
        tmp_path,
        env={"PROP_STREAM_DEMO_RATE": "200"},
    )
    try:
        url = proc.wait_ready()
        ready_line = next(
            line for line in proc.lines() if line.startswith("prop-stream: ready")
        )
        assert redact(pg_url) in ready_line
        assert ":prop_stream@" not in "".join(proc.lines())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if _count(pg_url, "SELECT count(*) FROM metrics_latest") > 0:
                break
            time.sleep(0.2)
        assert _count(pg_url, "SELECT count(*) FROM source_offsets") > 0
        assert _count(pg_url, "SELECT count(*) FROM metrics_latest") > 0
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        challenges = httpx.get(
            f"{url}/prop/challenges",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert challenges.status_code == 200, challenges.text
        assert challenges.json()["items"]
        assert httpx.get(f"{url}/prop/challenges", timeout=10).status_code == 401
        assert proc.stop() == 0
    finally:
        proc.kill()
    # Nothing written beside a "file": PostgreSQL has no admin, mirror or archive.
    assert not list(tmp_path.iterdir())
    stopped = _count(pg_url, "SELECT count(*) FROM engine_checkpoints")
    assert stopped >= 1  # the graceful stop's checkpoint
