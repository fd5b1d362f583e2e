"""The DuckDB store: migrations, demo data, programs, sessions, phase lifecycle."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from prop_stream.cli import main
from prop_stream.rules import validate_rules
from prop_stream.store import (
    CHALLENGE_ACTIVE,
    CHALLENGE_FAILED,
    CHALLENGE_PASSED,
    LATEST_VERSION,
    MIGRATIONS,
    Connection,
    InvalidProgramError,
    NotFoundError,
    ProgramIn,
    ProgramPhaseIn,
    active_phase_specs,
    advance_phase,
    apply_transition,
    apply_transitions,
    connect,
    create_program,
    create_session,
    customer_id_by_email,
    fail_phase,
    hash_token,
    init_database,
    open_account,
    query_frame,
    session_customer,
    start_challenge,
    transaction,
)
from prop_stream.store.demo import ONE_STEP, TWO_STEP

START = datetime(2026, 1, 5, tzinfo=UTC)
RULES: dict[str, Any] = {
    "initial_balance": 10_000,
    "profit_target": 0.1,
    "max_total_loss": 0.1,
}


@pytest.fixture
def db(store_db: Path | str) -> Iterator[Connection]:
    init_database(store_db, demo=True, now=START)
    conn = connect(store_db)
    yield conn
    conn.close()


def _tables(conn: Connection) -> dict[str, str]:
    rows = conn.execute(
        "SELECT table_name, table_type FROM information_schema.tables "
        "WHERE table_schema = current_schema()"
    ).fetchall()
    return {str(name): str(kind) for name, kind in rows}


# ------------------------------------------------------------------ migrations


def test_migrations_create_every_table_and_view(
    store_db: Path | str, tmp_path: Path
) -> None:
    db = tmp_path / "a" / "prop.duckdb" if isinstance(store_db, Path) else store_db
    result = init_database(db)
    assert result.applied == tuple(m.version for m in MIGRATIONS)
    assert result.version == LATEST_VERSION
    conn = connect(result.path)
    tables = _tables(conn)
    conn.close()
    expected = {
        "schema_migrations",
        "account_groups",
        "customers",
        "sessions",
        "trading_accounts",
        "programs",
        "program_phases",
        "purchases",
        "challenges",
        "challenge_phases",
        "prop_daily_snapshots",
        "metrics_latest",
        "metric_history",
        "breaches",
        "source_offsets",
        "engine_checkpoints",
        "deal_opens",
        "flags",
    }
    assert expected <= {n for n, k in tables.items() if k == "BASE TABLE"}
    assert {n for n, k in tables.items() if k == "VIEW"} == {
        "risk_breaches_by_day_rule",
        "risk_challenges_by_status",
        "risk_phases_near_floor",
        "risk_flags_by_customer_day",
        "risk_flags",
    }


def _sorted(conn: Connection, table: str) -> pl.DataFrame:
    frame = query_frame(conn, f"SELECT * FROM {table}")  # noqa: S608 - catalog names
    return frame.sort(frame.columns) if frame.height else frame


def test_migrations_rerun_is_a_noop(store_db: Path | str) -> None:
    path = store_db
    first = init_database(path, demo=True, now=START)
    conn = connect(path)
    before = {t: _sorted(conn, t) for t in _tables(conn)}
    conn.close()
    second = init_database(path, demo=True, now=START + timedelta(days=1))
    assert first.seeded
    assert (second.applied, second.seeded) == ((), False)
    conn = connect(path)
    for table, frame in before.items():
        assert _sorted(conn, table).equals(frame), table
    conn.close()


def test_migrations_upgrade_an_older_database(store_db: Path | str) -> None:
    path = store_db
    conn = connect(path)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
        "name VARCHAR NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    with transaction(conn):
        for statement in MIGRATIONS[0].statements_for(conn):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (1, 'v1')")
    conn.close()
    result = init_database(path)
    assert result.applied == tuple(m.version for m in MIGRATIONS[1:])
    assert result.version == LATEST_VERSION


def test_init_cli_is_idempotent(
    store_db: Path | str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = store_db
    assert main(["init", "--db", str(path), "--demo"]) == 0
    assert "demo data added" in capsys.readouterr().err
    assert main(["init", "--db", str(path), "--demo"]) == 0
    err = capsys.readouterr().err
    assert "already up to date" in err
    assert "demo data already there" in err


# ------------------------------------------------------------------ demo data


def test_demo_data_has_groups_programs_customers_and_challenges(
    db: Connection,
) -> None:
    groups = dict(db.execute("SELECT name, kind FROM account_groups").fetchall())
    assert groups == {"DEMO": "DEMO", "REAL": "REAL"}
    assert {
        c for (c,) in db.execute("SELECT currency FROM account_groups").fetchall()
    } == {"USD"}
    payers = query_frame(
        db,
        "SELECT c.email, a.balance, a.currency, g.kind, a.enabled "
        "FROM trading_accounts a JOIN customers c ON c.id = a.customer_id "
        "JOIN account_groups g ON g.name = a.account_group WHERE g.kind = 'REAL' "
        "ORDER BY c.email",
    )
    assert payers["email"].to_list() == ["alice@example.com", "bob@example.com"]
    assert all(b > 0 for b in payers["balance"].to_list())
    assert set(payers["currency"]) == {"USD"}
    assert all(payers["enabled"])
    assert isinstance(payers["balance"][0], Decimal)

    programs = query_frame(
        db,
        "SELECT p.id, count(*) AS phases, max(ph.profit_split) AS split "
        "FROM programs p JOIN program_phases ph ON ph.program_id = p.id "
        "GROUP BY p.id ORDER BY p.id",
    )
    # Two-step, one-step, then the FTMO and Topstep presets (docs/presets.md).
    assert programs["phases"].to_list() == [3, 1, 3, 2]
    assert programs["split"].to_list() == [
        Decimal("0.8"),
        None,
        Decimal("0.8"),
        Decimal("0.9"),
    ]

    specs = active_phase_specs(db)
    assert len(specs) >= 3
    kinds = db.execute(
        "SELECT DISTINCT g.kind FROM challenge_phases ph "
        "JOIN trading_accounts a ON a.account_id = ph.account_id "
        "JOIN account_groups g ON g.name = a.account_group "
        "WHERE ph.status = 'active'"
    ).fetchall()
    assert kinds == [("DEMO",)]
    for spec in specs:
        validate_rules(spec.rules)
        assert spec.started_at == START


def test_demo_programs_pass_validation(db: Connection) -> None:
    for program in (TWO_STEP, ONE_STEP):
        with transaction(db):
            assert create_program(db, program=program) > 0


# ------------------------------------------------------------------- programs


def _phase(
    phase_type: int = 0,
    group: str = "DEMO",
    rules: dict[str, Any] | None = None,
    split: Decimal | None = None,
) -> ProgramPhaseIn:
    if rules is None:
        rules = RULES if phase_type == 0 else {"initial_balance": 10_000}
    return ProgramPhaseIn("p", phase_type, group, rules, split)


FUNDED_OK = _phase(1, "REAL", split=Decimal("0.8"))


@pytest.mark.parametrize(
    ("phases", "code", "field"),
    [
        ((), "no_phases", "phases"),
        ((FUNDED_OK,), "no_evaluation_phase", "phases"),
        (
            (_phase(), FUNDED_OK, FUNDED_OK),
            "too_many_funded_phases",
            "phases[2].phase_type",
        ),
        ((FUNDED_OK, _phase()), "funded_phase_not_last", "phases[0].phase_type"),
        (
            (_phase(), _phase(1, "DEMO", split=Decimal("0.8"))),
            "funded_phase_not_real",
            "phases[1].account_group",
        ),
        (
            (_phase(), _phase(1, "REAL")),
            "invalid_profit_split",
            "phases[1].profit_split",
        ),
        (
            (_phase(rules={**RULES, "profit_target": 1.5}),),
            "invalid_rules",
            "phases[0].rules.profit_target",
        ),
        (
            (_phase(rules={**RULES, "bogus": 1}),),
            "invalid_rules",
            "phases[0].rules.bogus",
        ),
        ((_phase(group="NOPE"),), "unknown_account_group", "phases[0].account_group"),
        (
            (_phase(rules={"initial_balance": 10_000}),),
            "evaluation_phase_without_target",
            "phases[0].rules.profit_target",
        ),
        ((_phase(2),), "invalid_phase_type", "phases[0].phase_type"),
        (
            (_phase(), _phase(1, "REAL", rules=RULES, split=Decimal("0.8"))),
            "funded_phase_with_target",
            "phases[1].rules.profit_target",
        ),
    ],
)
def test_program_invalid_is_refused_with_reason(
    db: Connection, phases: tuple[ProgramPhaseIn, ...], code: str, field: str
) -> None:
    count = db.execute("SELECT count(*) FROM programs").fetchone()
    program = ProgramIn("bad", Decimal("10.00"), "USD", phases)
    with pytest.raises(InvalidProgramError) as info, transaction(db):
        create_program(db, program=program)
    assert info.value.code == code
    assert info.value.field is not None
    assert info.value.field.startswith(field)
    assert str(info.value)
    assert db.execute("SELECT count(*) FROM programs").fetchone() == count


def test_program_with_bad_price_is_refused(db: Connection) -> None:
    program = ProgramIn("bad", Decimal("10.001"), "USD", (_phase(),))
    with pytest.raises(InvalidProgramError, match="price") as info:
        create_program(db, program=program)
    assert info.value.code == "invalid_price"


def test_program_valid_is_saved_with_its_phases(db: Connection) -> None:
    program = ProgramIn("ok", Decimal("99.90"), "USD", (_phase(), _phase(), FUNDED_OK))
    with transaction(db):
        program_id = create_program(db, program=program)
    rows = db.execute(
        "SELECT phase_index, phase_type, account_group, rules, profit_split "
        "FROM program_phases WHERE program_id = ? ORDER BY phase_index",
        [program_id],
    ).fetchall()
    assert [r[0] for r in rows] == [0, 1, 2]
    assert json.loads(rows[0][3]) == RULES
    assert rows[2][4] == Decimal("0.8")
    price = db.execute("SELECT price FROM programs WHERE id = ?", [program_id])
    assert price.fetchone() == (Decimal("99.90"),)


# ------------------------------------------------------------------- sessions


def test_session_token_is_random_and_stored_hashed(db: Connection) -> None:
    tokens = {create_session(db, email="alice@example.com") for _ in range(5)}
    assert len(tokens) == 5
    for token in tokens:
        assert len(token) >= 22  # >= 128 bits of URL-safe base64
    stored = {h for (h,) in db.execute("SELECT token_hash FROM sessions").fetchall()}
    assert stored == {hash_token(t) for t in tokens}
    assert not stored & tokens
    alice = customer_id_by_email(db, email="alice@example.com")
    assert all(session_customer(db, token=t) == alice for t in tokens)


def test_session_expires(db: Connection) -> None:
    now = datetime(2026, 3, 1, tzinfo=UTC)
    token = create_session(db, email="Bob@Example.com", ttl=timedelta(hours=1), now=now)
    bob = customer_id_by_email(db, email="bob@example.com")
    assert session_customer(db, token=token, now=now + timedelta(minutes=59)) == bob
    assert session_customer(db, token=token, now=now + timedelta(hours=1)) is None
    assert session_customer(db, token="x" * 43, now=now) is None


def test_session_for_unknown_customer_is_refused(db: Connection) -> None:
    with pytest.raises(NotFoundError, match="nobody"):
        create_session(db, email="nobody@example.com")


def test_session_cli_prints_only_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "prop.duckdb"
    init_database(path, demo=True, now=START)
    capsys.readouterr()
    assert main(["session", "alice@example.com", "--db", str(path)]) == 0
    out, _ = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n"
    conn = connect(path)
    assert session_customer(conn, token=token) == customer_id_by_email(
        conn, email="alice@example.com"
    )
    conn.close()
    assert main(["session", "nobody@example.com", "--db", str(path)]) == 2
    assert "nobody@example.com" in capsys.readouterr().err


def test_session_cli_without_database_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["session", "a@b.c", "--db", str(tmp_path / "none.duckdb")]) == 2
    assert "database not found" in capsys.readouterr().err


# ------------------------------------------------------------------ lifecycle


def _challenge(db: Connection, program: ProgramIn) -> tuple[int, int]:
    with transaction(db):
        program_id = create_program(db, program=program)
        alice = customer_id_by_email(db, email="alice@example.com")
        account = open_account(db, customer_id=alice, account_group="DEMO")
        challenge = start_challenge(
            db,
            customer_id=alice,
            program_id=program_id,
            account_id=account,
            started_at=START,
        )
    return challenge, account


def _state(db: Connection, challenge: int) -> tuple[int, int, list[str]]:
    row = db.execute(
        "SELECT status, current_phase_index FROM challenges WHERE id = ?", [challenge]
    ).fetchone()
    assert row is not None
    phases = db.execute(
        "SELECT status FROM challenge_phases WHERE challenge_id = ? "
        "ORDER BY phase_index",
        [challenge],
    ).fetchall()
    return int(row[0]), int(row[1]), [p for (p,) in phases]


def test_challenge_start_snapshots_rules_and_activates_first_phase(
    db: Connection,
) -> None:
    challenge, account = _challenge(db, TWO_STEP)
    assert _state(db, challenge) == (
        CHALLENGE_ACTIVE,
        0,
        ["active", "pending", "pending"],
    )
    rows = db.execute(
        "SELECT account_id, started_at, rules FROM challenge_phases "
        "WHERE challenge_id = ? ORDER BY phase_index",
        [challenge],
    ).fetchall()
    assert rows[0][0] == account
    assert rows[0][1] == START
    assert rows[1][0] is None
    assert json.loads(rows[0][2]) == validate_rules(TWO_STEP.phases[0].rules)


def test_advance_phase_moves_through_a_two_step_challenge(db: Connection) -> None:
    challenge, _ = _challenge(db, TWO_STEP)
    ts = START + timedelta(days=3)
    first = advance_phase(db, challenge_id=challenge, phase_index=0, ts=ts)
    assert (first.changed, first.next_phase_index, first.challenge_passed) == (
        True,
        1,
        False,
    )
    # Issue 4: the pass opens the next phase on a new DEMO account at once.
    assert _state(db, challenge) == (
        CHALLENGE_ACTIVE,
        1,
        ["passed", "active", "pending"],
    )
    assert first.opened_account is not None
    opened = db.execute(
        "SELECT a.account_group, a.balance, ph.started_at FROM challenge_phases AS ph "
        "JOIN trading_accounts AS a ON a.account_id = ph.account_id "
        "WHERE ph.challenge_id = ? AND ph.phase_index = 1",
        [challenge],
    ).fetchone()
    assert opened == ("DEMO", Decimal("0.00"), ts)
    deposit = db.execute(
        "SELECT kind, account_id, amount, status FROM jobs WHERE challenge_id = ? "
        "AND phase_index = 1",
        [challenge],
    ).fetchall()
    assert deposit == [
        ("initial_deposit", first.opened_account, Decimal("100000.00"), "pending")
    ]
    second = advance_phase(db, challenge_id=challenge, phase_index=1, ts=ts)
    assert (second.changed, second.next_phase_index, second.challenge_passed) == (
        True,
        2,
        True,
    )
    assert second.opened_account is not None
    assert _state(db, challenge) == (
        CHALLENGE_PASSED,
        2,
        ["passed", "passed", "active"],
    )
    funded = db.execute(
        "SELECT g.kind FROM trading_accounts AS a JOIN account_groups AS g "
        "ON g.name = a.account_group WHERE a.account_id = ?",
        [second.opened_account],
    ).fetchone()
    assert funded == ("REAL",)
    ended = db.execute("SELECT ended_at FROM challenges WHERE id = ?", [challenge])
    assert ended.fetchone() == (None,)  # the funded phase keeps it running
    # A replayed pass opens nothing more.
    again = advance_phase(db, challenge_id=challenge, phase_index=1, ts=ts)
    assert (again.changed, again.opened_account) == (False, None)
    count = db.execute("SELECT count(*) FROM jobs").fetchone()
    assert count == (2,)


def test_advance_phase_of_a_last_phase_passes_and_ends_the_challenge(
    db: Connection,
) -> None:
    program = ProgramIn("one", Decimal("1.00"), "USD", (_phase(),))
    challenge, _ = _challenge(db, program)
    ts = START + timedelta(days=1)
    assert apply_transition(
        db, challenge_id=challenge, phase_index=0, status="passed", ts=ts
    )
    assert _state(db, challenge) == (CHALLENGE_PASSED, 0, ["passed"])
    ended = db.execute("SELECT ended_at FROM challenges WHERE id = ?", [challenge])
    assert ended.fetchone() == (ts,)


def test_transition_replayed_changes_nothing(db: Connection) -> None:
    challenge, _ = _challenge(db, TWO_STEP)
    ts = START + timedelta(days=1)
    assert fail_phase(db, challenge_id=challenge, phase_index=0, ts=ts)
    before = _state(db, challenge)
    later = ts + timedelta(hours=1)
    assert not fail_phase(db, challenge_id=challenge, phase_index=0, ts=later)
    assert not apply_transition(
        db, challenge_id=challenge, phase_index=0, status="passed", ts=later
    )
    assert (
        _state(db, challenge)
        == before
        == (
            CHALLENGE_FAILED,
            0,
            ["failed", "pending", "pending"],
        )
    )
    row = db.execute(
        "SELECT ended_at FROM challenge_phases WHERE challenge_id = ? "
        "AND phase_index = 0",
        [challenge],
    ).fetchone()
    assert row == (ts,)


def test_funded_phase_failure_fails_a_passed_challenge(db: Connection) -> None:
    program = ProgramIn("two", Decimal("1.00"), "USD", (_phase(), FUNDED_OK))
    challenge, _ = _challenge(db, program)
    ts = START + timedelta(days=1)
    advance_phase(db, challenge_id=challenge, phase_index=0, ts=ts)
    assert _state(db, challenge)[0] == CHALLENGE_PASSED
    db.execute(
        "UPDATE challenge_phases SET status = 'active', account_id = 43, "
        "started_at = ? WHERE challenge_id = ? AND phase_index = 1",
        [ts, challenge],
    )
    assert fail_phase(db, challenge_id=challenge, phase_index=1, ts=ts)
    assert _state(db, challenge) == (CHALLENGE_FAILED, 1, ["passed", "failed"])


def test_transition_with_unknown_status_is_refused(db: Connection) -> None:
    with pytest.raises(ValueError, match="paused"):
        apply_transition(db, challenge_id=1, phase_index=0, status="paused", ts=START)


# ---------------------------------------------------------------------- views


def test_risk_views_answer(db: Connection) -> None:
    by_status = query_frame(db, "SELECT * FROM risk_challenges_by_status")
    assert set(by_status["status_name"]) == {"active"}
    assert by_status["challenges"].sum() == len(active_phase_specs(db))
    assert query_frame(db, "SELECT * FROM risk_breaches_by_day_rule").height == 0
    assert query_frame(db, "SELECT * FROM risk_phases_near_floor").height == 0


def test_apply_transitions_in_bulk_equals_one_by_one(tmp_path: Path) -> None:
    """Failures alone in a batch go in one statement; the outcome is the same."""
    ts = START + timedelta(days=1)
    later = ts + timedelta(hours=1)
    states = []
    for name, bulk in (("one.duckdb", False), ("bulk.duckdb", True)):
        init_database(tmp_path / name, demo=True, now=START)
        conn = connect(tmp_path / name)
        ids = [_challenge(conn, TWO_STEP)[0] for _ in range(5)]
        with transaction(conn):
            fail_phase(conn, challenge_id=ids[4], phase_index=0, ts=ts)
        rows = [
            (ids[0], 0, "failed", ts),  # alone: bulk
            (ids[1], 0, "passed", ts),  # a pass: one by one
            (ids[2], 0, "passed", ts),  # a pass then a failure of the next phase
            (ids[2], 1, "failed", later),
            (ids[3], 1, "failed", ts),  # a phase that is not active
            (ids[4], 0, "failed", later),  # replayed: already failed
            (999_999, 0, "failed", ts),  # no such challenge
        ]
        frame = pl.DataFrame(
            [(str(c), p, s, t) for c, p, s, t in rows],
            schema={
                "challenge_id": pl.String,
                "phase_index": pl.Int32,
                "status": pl.String,
                "ts": pl.Datetime("us", "UTC"),
            },
            orient="row",
        )
        with transaction(conn):
            if bulk:
                changed = apply_transitions(conn, frame)
            else:
                changed = sum(
                    apply_transition(
                        conn, challenge_id=int(c), phase_index=p, status=s, ts=t
                    )
                    for c, p, s, t in frame.iter_rows()
                )
        states.append(
            (
                changed,
                [_state(conn, c) for c in ids],
                conn.execute(
                    "SELECT challenge_id - ?, phase_index, status, ended_at "
                    "FROM challenge_phases WHERE challenge_id >= ? ORDER BY ALL",
                    [ids[0], ids[0]],
                ).fetchall(),
                conn.execute(
                    "SELECT id - ?, status, ended_at FROM challenges "
                    "WHERE id >= ? ORDER BY id",
                    [ids[0], ids[0]],
                ).fetchall(),
            )
        )
        conn.close()
    assert states[0] == states[1]
    changed, challenges, _, _ = states[1]
    assert changed == 4  # ids[0], both of ids[2], ids[1]
    assert challenges[0] == (CHALLENGE_FAILED, 0, ["failed", "pending", "pending"])
