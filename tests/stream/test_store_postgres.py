"""What only the PostgreSQL backend has: URLs, the risk team's role, refusals."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import pytest
from pg_support import fresh_database

from prop_stream.cli import main
from prop_stream.dburl import redact
from prop_stream.store import init_database
from prop_stream.store.migrations import MIGRATIONS, postgres_ddl
from prop_stream.store.pg import numbered
from prop_stream.store.roles import RISK_PASSWORD_ENV, RISK_ROLE

RISK_VIEWS = {
    "risk_breaches_by_day_rule",
    "risk_challenges_by_status",
    "risk_flags",
    "risk_flags_by_customer_day",
    "risk_phases_near_floor",
}


def test_placeholders_are_numbered_outside_quotes() -> None:
    assert numbered("SELECT ?, '?', \"a?\", ? -- ?\n, $3") == (
        "SELECT $1, '?', \"a?\", $2 -- ?\n, $3"
    )
    assert numbered("SELECT 'it''s ?', ?") == "SELECT 'it''s ?', $1"


def test_ddl_spells_types_the_postgresql_way() -> None:
    assert postgres_ddl("a DOUBLE NOT NULL, b BLOB, c DOUBLE PRECISION") == (
        "a DOUBLE PRECISION NOT NULL, b BYTEA, c DOUBLE PRECISION"
    )
    # Every migration has PostgreSQL statements, one per DuckDB statement.
    for migration in MIGRATIONS:
        assert migration.postgres is None or len(migration.postgres) == len(
            migration.statements
        )


def test_redact_hides_the_password() -> None:
    assert redact("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact("postgresql://h/db") == "postgresql://h/db"


def test_risk_role_reads_only_the_risk_views(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RISK_PASSWORD_ENV, "risk-secret")
    result = init_database(pg_url, demo=True)
    assert result.risk_role == RISK_ROLE
    risk_url = pg_url.replace("prop_stream:prop_stream@", f"{RISK_ROLE}:risk-secret@")
    with psycopg.connect(risk_url, autocommit=True) as risk:
        for view in RISK_VIEWS:
            risk.execute(f"SELECT * FROM {view}").fetchall()  # noqa: S608 - constants
        rows = risk.execute(
            "SELECT status_name, challenges FROM risk_challenges_by_status"
        ).fetchall()
        assert rows  # the demo's challenges, through the view
        for table in ("purchases", "trading_accounts", "breaches", "sessions"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                risk.execute(f"SELECT * FROM {table}")  # noqa: S608 - constants
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            risk.execute("DELETE FROM customers")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            risk.execute("CREATE TABLE mine (x int)")


def test_init_cli_names_the_url_without_its_password(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--db", pg_url]) == 0
    err = capsys.readouterr().err
    assert "schema version" in err
    assert f"read-only role {RISK_ROLE}" in err
    assert ":prop_stream@" not in err
    assert redact(pg_url) in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_refuses_a_wrong_url_in_one_line(
    pg_server: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base = pg_server.rsplit("/", 1)[0]
    cases = [
        (
            f"postgresql://prop_stream:prop_stream@127.0.0.1:{_closed_port()}/x",
            "can't connect",
        ),
        (base + "/no_such_database", "can't connect"),
        (
            pg_server.replace("prop_stream:prop_stream@", "prop_stream:wrong@"),
            "can't connect",
        ),
    ]
    with fresh_database(pg_server) as bare:
        cases.append((bare, "never initialised"))
        for url, says in cases:
            code = main(["serve", "--db", url, "--port", "0"])
            assert code == 2, url
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1, err
            assert err[0].startswith("prop-stream: error: ")
            assert redact(url) in err[0]
            assert says in err[0]
            assert "wrong" not in err[0]
            assert ":prop_stream@" not in err[0]
        # Refusing never initialised it.
        with psycopg.connect(bare) as check:
            assert check.execute(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_schema = 'public'"
            ).fetchone() == (0,)
    assert not list(tmp_path.iterdir())


def test_two_inits_at_once_migrate_once(pg_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: init_database(pg_url), range(3)))
    applied = sorted(r.applied for r in results)
    assert applied == [(), (), tuple(m.version for m in MIGRATIONS)]
    assert {r.version for r in results} == {MIGRATIONS[-1].version}
