"""`scripts/pg-local`: a throwaway PostgreSQL for development and tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PG_LOCAL = Path(__file__).resolve().parents[2] / "scripts" / "pg-local"


def _run(command: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own script, fixed arguments
        [str(PG_LOCAL), command],
        capture_output=True,
        text=True,
        env={**os.environ, "PROP_STREAM_PG_HOME": str(home)},
        timeout=120,
        check=False,
    )


@pytest.fixture
def pg_home() -> Iterator[Path]:
    # Not under pytest's tmp_path: as root the server runs as `postgres`, which
    # can't enter root's private pytest folders.
    home = Path(tempfile.mkdtemp(prefix="pg-local-", dir="/tmp"))
    home.chmod(0o755)
    try:
        yield home
    finally:
        _run("stop", home)
        shutil.rmtree(home, ignore_errors=True)


def _psql(url: str, sql: str) -> str:
    out = subprocess.run(  # noqa: S603 - the machine's psql, fixed arguments
        ["psql", "-X", "-At", url, "-c", sql],  # noqa: S607 - the machine's psql
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def test_pg_local_starts_once_prints_a_url_and_stops(pg_home: Path) -> None:
    if shutil.which("psql") is None:
        pytest.fail("psql (Debian's postgresql-client) is needed")
    assert _run("status", pg_home).returncode == 3
    first = _run("start", pg_home)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert len(lines) == 1
    url = lines[0]
    assert url.startswith("postgresql://prop_stream:prop_stream@127.0.0.1:")
    assert url.endswith("/prop_stream")
    # Idempotent: a second start finds it running and prints the same URL.
    again = _run("start", pg_home)
    assert again.returncode == 0
    assert again.stdout.strip() == url
    assert _run("status", pg_home).returncode == 0
    assert _psql(url, "SELECT current_user") == "prop_stream"
    # The role may create databases (each test of the scale-out suite makes one).
    _psql(url, "CREATE DATABASE pg_local_check")
    assert (
        _psql(url, "SELECT count(*) FROM pg_database WHERE datname = 'pg_local_check'")
        == "1"
    )
    assert _run("stop", pg_home).returncode == 0
    assert _run("status", pg_home).returncode == 3
    # It starts again on the same data.
    restarted = _run("start", pg_home)
    assert restarted.returncode == 0, restarted.stderr
    restarted_url = restarted.stdout.strip()
    assert (
        _psql(
            restarted_url, "SELECT 1 FROM pg_database WHERE datname = 'pg_local_check'"
        )
        == "1"
    )
