"""Both store backends for tests: a DuckDB file or a fresh PostgreSQL database.

One PostgreSQL server per test session (``scripts/pg-local``, in a folder under
``/tmp`` the ``postgres`` user can enter); every test that asks for
:func:`store_db` gets a database of its own (``CREATE DATABASE``, dropped after).
``PROP_STREAM_TEST_PG_URL`` points the tests at a server already running instead.
Tests that need PostgreSQL fail (never skip) when it can't be started.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

PG_LOCAL = Path(__file__).resolve().parents[1] / "scripts" / "pg-local"

#: The backends a store test runs on.
BACKENDS = ("duckdb", "postgres")

_names = itertools.count()


def _pg_local(command: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own script, fixed arguments
        [str(PG_LOCAL), command],
        capture_output=True,
        text=True,
        env={**os.environ, "PROP_STREAM_PG_HOME": str(home)},
        timeout=180,
        check=False,
    )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The URL of the session's PostgreSQL server (its database ``prop_stream``)."""
    given = os.environ.get("PROP_STREAM_TEST_PG_URL")
    if given:
        yield given
        return
    home = Path(tempfile.mkdtemp(prefix="prop-stream-pg-", dir="/tmp"))
    home.chmod(0o755)
    try:
        started = _pg_local("start", home)
        if started.returncode != 0:
            pytest.fail(f"scripts/pg-local start failed: {started.stderr.strip()}")
        yield started.stdout.strip()
    finally:
        _pg_local("stop", home)
        shutil.rmtree(home, ignore_errors=True)


def _with_database(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


@contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """A new, empty database on ``server`` (its URL), dropped at the end."""
    name = f"t_{os.getpid()}_{next(_names)}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(
                sql.Identifier(name)
            )
        )
    try:
        yield _with_database(server, name)
    finally:
        _drop_database(server, name)


def _drop_database(server: str, name: str, timeout_s: float = 60.0) -> None:
    """Drop a test's database, waiting out an autovacuum worker in it.

    ``WITH (FORCE)`` ends the test's own sessions, but PostgreSQL 15 refuses to
    end an autovacuum worker's for a role that is not a superuser
    (``InsufficientPrivilege``): the worker finishes in moments, so the drop is
    tried again until it goes through or the deadline passes.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(server, autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(name)
                    )
                )
        except psycopg.errors.InsufficientPrivilege:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # between polls of the condition, not a sync point
        else:
            return


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database of this test's own."""
    with fresh_database(pg_server) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def store_db(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's store lives: a DuckDB path, or a fresh PostgreSQL URL."""
    if request.param == "duckdb":
        return tmp_path / "prop.duckdb"
    url: str = request.getfixturevalue("pg_url")
    return url


__all__ = ["BACKENDS", "fresh_database", "pg_server", "pg_url", "store_db"]
