"""Challenges and their runtime phases: start, fail, pass.

Like the rest of the store, these functions run in the caller's transaction. The
evaluator's sink calls :func:`apply_transition` for every phase the engine passed or
failed, in the same transaction as the batch's outputs, so a phase's status and the
breach that failed it are committed together. Each function is idempotent: a replayed
batch after a restart finds the phase already moved and changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Final, Literal, Protocol

import polars as pl

from prop_stream.rules import PhaseSpec, validate_rules
from prop_stream.store.catalog import open_account
from prop_stream.store.db import Connection, frame_table
from prop_stream.store.exceptions import NotFoundError
from prop_stream.store.jobs import INITIAL_DEPOSIT, enqueue

#: ``challenges.status`` values (``api.md``).
CHALLENGE_PENDING: Final = 0
CHALLENGE_ACTIVE: Final = 1
CHALLENGE_PASSED: Final = 2
CHALLENGE_FAILED: Final = 3
CHALLENGE_CANCELLED: Final = 4

#: ``challenges.status`` to its name.
CHALLENGE_STATUS_NAMES: Final = {
    CHALLENGE_PENDING: "pending",
    CHALLENGE_ACTIVE: "active",
    CHALLENGE_PASSED: "passed",
    CHALLENGE_FAILED: "failed",
    CHALLENGE_CANCELLED: "cancelled",
}

PhaseStatus = Literal["pending", "active", "passed", "failed", "cancelled"]


class PhaseRegistry(Protocol):
    """What judges running phases: the evaluator loop (``EvaluatorLoop``).

    Both methods are thread-safe and take effect between batches; call them after
    the transaction that changed the phase has committed.
    """

    def register_phase(self, spec: PhaseSpec) -> None:
        """Start judging a phase."""

    def remove_phase(self, account_id: int) -> None:
        """Stop judging a phase's account."""


@dataclass(frozen=True, slots=True)
class PhaseAdvance:
    """What :func:`advance_phase` did.

    Attributes:
        challenge_id: The challenge.
        phase_index: The phase that passed.
        changed: False when the pass had already been recorded (a replay).
        next_phase_index: The phase that comes next, or None after the last one.
        challenge_passed: Whether this pass passed the challenge (it was the last
            evaluation phase).
        opened_account: The next phase's new account, started now (None when no
            phase follows, or on a replay).
    """

    challenge_id: int
    phase_index: int
    changed: bool
    next_phase_index: int | None
    challenge_passed: bool
    opened_account: int | None = None


def start_challenge(
    conn: Connection,
    *,
    customer_id: int,
    program_id: int,
    account_id: int,
    started_at: datetime,
    purchase_id: int | None = None,
) -> int:
    """Create an active challenge whose first phase runs on ``account_id``.

    Every program phase becomes a runtime phase, ``pending`` but the first, with
    a snapshot of its rules (defaults filled in), so later edits of the program
    never change a running challenge.

    Args:
        conn: The connection; wrap the call in a transaction.
        customer_id: The trader.
        program_id: The program bought.
        account_id: The trading account of the first phase.
        started_at: When the first phase starts; earlier ticks are late.
        purchase_id: The purchase that paid for it, if any.

    Returns:
        The challenge's id.

    Raises:
        NotFoundError: The program has no phases (or does not exist).
    """
    phases = conn.execute(
        "SELECT phase_index, name, phase_type, account_group, rules, profit_split "
        "FROM program_phases WHERE program_id = ? ORDER BY phase_index",
        [program_id],
    ).fetchall()
    if not phases:
        raise NotFoundError(f"no program {program_id} with phases")
    row = conn.execute(
        "INSERT INTO challenges (customer_id, program_id, purchase_id, status, "
        "current_phase_index, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, 0, ?, ?) RETURNING id",
        [
            customer_id,
            program_id,
            purchase_id,
            CHALLENGE_ACTIVE,
            started_at,
            started_at,
        ],
    ).fetchone()
    assert row is not None  # noqa: S101 - INSERT ... RETURNING returns the row
    challenge_id = int(row[0])
    for index, name, phase_type, group, rules, split in phases:
        first = index == 0
        conn.execute(
            "INSERT INTO challenge_phases (challenge_id, phase_index, name, "
            "phase_type, account_group, account_id, status, started_at, rules, "
            "profit_split) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                challenge_id,
                index,
                name,
                phase_type,
                group,
                account_id if first else None,
                "active" if first else "pending",
                started_at if first else None,
                json.dumps(validate_rules(json.loads(rules))),
                split,
            ],
        )
    return challenge_id


_SPEC_QUERY: Final = """
    SELECT account_id, challenge_id, phase_index, started_at, rules
    FROM challenge_phases
    WHERE status = 'active' AND account_id IS NOT NULL
"""


def active_phase_specs(conn: Connection) -> list[PhaseSpec]:
    """Every active runtime phase with an account, as the engine registers it.

    Args:
        conn: The connection.

    Returns:
        The phases, ordered by account.
    """
    rows = conn.execute(_SPEC_QUERY + " ORDER BY account_id").fetchall()
    return [_spec(row) for row in rows]


def phase_spec(conn: Connection, *, challenge_id: int, phase_index: int) -> PhaseSpec:
    """One active runtime phase, as the engine registers it.

    Raises:
        NotFoundError: The phase does not exist, is not active or has no account.
    """
    row = conn.execute(
        _SPEC_QUERY + " AND challenge_id = ? AND phase_index = ?",
        [challenge_id, phase_index],
    ).fetchone()
    if row is None:
        raise NotFoundError(
            f"challenge {challenge_id} has no active phase {phase_index} "
            "with an account"
        )
    return _spec(row)


def phase_spec_by_account(conn: Connection, *, account_id: int) -> PhaseSpec:
    """The runtime phase of a trading account, whatever its status.

    Raises:
        NotFoundError: No phase runs on that account.
    """
    rows = conn.execute(
        "SELECT account_id, challenge_id, phase_index, started_at, rules "
        "FROM challenge_phases WHERE account_id = ? AND started_at IS NOT NULL",
        [account_id],
    ).fetchall()
    # fetchall: DuckDB 2.0 refuses the next conn.sql() while a result is unread.
    row = rows[0] if rows else None
    if row is None:
        raise NotFoundError(f"no started phase runs on account {account_id}")
    return _spec(row)


def _spec(row: tuple[object, ...]) -> PhaseSpec:
    account_id, challenge_id, phase_index, started_at, rules = row
    assert isinstance(started_at, datetime)  # noqa: S101 - NOT NULL when active
    return PhaseSpec(
        account_id=int(str(account_id)),
        challenge_id=str(challenge_id),
        phase_index=int(str(phase_index)),
        started_at=started_at,
        rules=json.loads(str(rules)),
    )


def fail_phase(
    conn: Connection, *, challenge_id: int, phase_index: int, ts: datetime
) -> bool:
    """Record that a phase failed: the phase and its challenge are ``failed``.

    A failure of the funded phase fails a challenge that had passed too.

    Args:
        conn: The connection; the sink's transaction.
        challenge_id: The challenge.
        phase_index: The phase.
        ts: The tick that failed it.

    Returns:
        False when nothing changed (already recorded, or the phase isn't active).
    """
    row = conn.execute(
        "UPDATE challenge_phases SET status = 'failed', ended_at = ? "
        "WHERE challenge_id = ? AND phase_index = ? AND status = 'active' "
        "RETURNING phase_index",
        [ts, challenge_id, phase_index],
    ).fetchone()
    if row is None:
        return False
    conn.execute(
        "UPDATE challenges SET status = ?, ended_at = ?, updated_at = ? "
        "WHERE id = ? AND status IN (?, ?, ?)",
        [
            CHALLENGE_FAILED,
            ts,
            ts,
            challenge_id,
            CHALLENGE_PENDING,
            CHALLENGE_ACTIVE,
            CHALLENGE_PASSED,
        ],
    )
    return True


def advance_phase(
    conn: Connection, *, challenge_id: int, phase_index: int, ts: datetime
) -> PhaseAdvance:
    """Record that a phase passed, and open the next one.

    The phase becomes ``passed``. If it was the last evaluation phase the challenge
    is ``passed`` (and keeps running its funded phase, if it has one). The
    challenge's ``current_phase_index`` moves to the next phase, which is started
    at once (:func:`open_phase`): a new account in its group (``DEMO`` for an
    evaluation phase, ``REAL`` for the funded one), its ``initial_balance``
    deposit in the outbox, the phase ``active`` from ``ts``. The evaluator loop
    registers it with the engine after the batch commits.

    Args:
        conn: The connection; the sink's transaction.
        challenge_id: The challenge.
        phase_index: The phase that passed.
        ts: The tick that passed it.

    Returns:
        What changed and which phase comes next.
    """
    row = conn.execute(
        "UPDATE challenge_phases SET status = 'passed', ended_at = ? "
        "WHERE challenge_id = ? AND phase_index = ? AND status = 'active' "
        "RETURNING phase_index",
        [ts, challenge_id, phase_index],
    ).fetchone()
    later = conn.execute(
        "SELECT phase_index, phase_type FROM challenge_phases "
        "WHERE challenge_id = ? AND phase_index > ? ORDER BY phase_index",
        [challenge_id, phase_index],
    ).fetchall()
    next_index = int(later[0][0]) if later else None
    last_evaluation = all(int(phase_type) == 1 for _, phase_type in later)
    if row is None:
        return PhaseAdvance(
            challenge_id, phase_index, False, next_index, challenge_passed=False
        )
    if last_evaluation:
        conn.execute(
            "UPDATE challenges SET status = ?, updated_at = ?, "
            "current_phase_index = coalesce(?, current_phase_index), "
            "ended_at = CASE WHEN ? THEN ? ELSE ended_at END "
            "WHERE id = ? AND status IN (?, ?)",
            [
                CHALLENGE_PASSED,
                ts,
                next_index,
                next_index is None,
                ts,
                challenge_id,
                CHALLENGE_PENDING,
                CHALLENGE_ACTIVE,
            ],
        )
    elif next_index is not None:
        conn.execute(
            "UPDATE challenges SET current_phase_index = ?, updated_at = ? "
            "WHERE id = ?",
            [next_index, ts, challenge_id],
        )
    opened = None
    if next_index is not None:
        opened = open_phase(
            conn, challenge_id=challenge_id, phase_index=next_index, started_at=ts
        )
    return PhaseAdvance(
        challenge_id,
        phase_index,
        True,
        next_index,
        challenge_passed=last_evaluation,
        opened_account=opened,
    )


def open_phase(
    conn: Connection, *, challenge_id: int, phase_index: int, started_at: datetime
) -> int | None:
    """Start a pending phase: its account, its initial balance, ``active``.

    The account is opened for the challenge's owner in the phase's group with a
    zero balance; the phase's ``initial_balance`` (from its rules snapshot) is
    written to the outbox as an ``initial_deposit`` job, which the job worker
    credits.

    Args:
        conn: The connection; the caller's transaction.
        challenge_id: The challenge.
        phase_index: The phase to start.
        started_at: When it starts; earlier ticks are late.

    Returns:
        The new account, or None when the phase isn't pending (already started,
        or ended).
    """
    row = conn.execute(
        "SELECT ph.account_group, ph.rules, c.customer_id, c.purchase_id "
        "FROM challenge_phases AS ph JOIN challenges AS c ON c.id = ph.challenge_id "
        "WHERE ph.challenge_id = ? AND ph.phase_index = ? AND ph.status = 'pending' "
        "AND ph.account_id IS NULL",
        [challenge_id, phase_index],
    ).fetchone()
    if row is None:
        return None
    group, rules, customer_id, purchase_id = row
    account_id = open_account(
        conn, customer_id=int(customer_id), account_group=str(group)
    )
    conn.execute(
        "UPDATE challenge_phases SET account_id = ?, status = 'active', "
        "started_at = ? WHERE challenge_id = ? AND phase_index = ?",
        [account_id, started_at, challenge_id, phase_index],
    )
    initial = Decimal(str(json.loads(str(rules))["initial_balance"]))
    enqueue(
        conn,
        kind=INITIAL_DEPOSIT,
        dedupe_key=f"deposit:{challenge_id}:{phase_index}",
        account_id=account_id,
        amount=initial,
        now=started_at,
        purchase_id=None if purchase_id is None else int(purchase_id),
        challenge_id=challenge_id,
        phase_index=phase_index,
    )
    return account_id


def cancel_challenge(
    conn: Connection, *, challenge_id: int, now: datetime
) -> list[int]:
    """Cancel a challenge and its pending or active phases.

    Args:
        conn: The connection; the caller's transaction.
        challenge_id: The challenge.
        now: When.

    Returns:
        The accounts of the phases that were active (the engine must drop them).
    """
    active = conn.execute(
        "UPDATE challenge_phases SET status = 'cancelled', "
        "ended_at = CASE WHEN status = 'active' THEN ? ELSE ended_at END "
        "WHERE challenge_id = ? AND status IN ('pending', 'active') "
        "RETURNING account_id",
        [now, challenge_id],
    ).fetchall()
    conn.execute(
        "UPDATE challenges SET status = ?, ended_at = ?, updated_at = ? "
        "WHERE id = ? AND status IN (?, ?)",
        [
            CHALLENGE_CANCELLED,
            now,
            now,
            challenge_id,
            CHALLENGE_PENDING,
            CHALLENGE_ACTIVE,
        ],
    )
    return [int(a) for (a,) in active if a is not None]


def running_challenges(conn: Connection, *, purchase_id: int) -> list[int]:
    """A purchase's challenges that still run (active or passed), by id."""
    rows = conn.execute(
        "SELECT id FROM challenges WHERE purchase_id = ? AND status IN (?, ?)",
        [purchase_id, CHALLENGE_ACTIVE, CHALLENGE_PASSED],
    ).fetchall()
    return [int(c) for (c,) in rows]


def phase_status(
    conn: Connection, *, challenge_id: int, phase_index: int
) -> str | None:
    """A challenge phase's status; None when there is no such phase."""
    row = conn.execute(
        "SELECT status FROM challenge_phases "
        "WHERE challenge_id = ? AND phase_index = ?",
        [challenge_id, phase_index],
    ).fetchone()
    return None if row is None else str(row[0])


def phase_specs_of(conn: Connection, *, challenge_ids: list[int]) -> list[PhaseSpec]:
    """The active phases with an account of some challenges.

    Args:
        conn: The connection.
        challenge_ids: The challenges.

    Returns:
        The phases, ordered by account.
    """
    if not challenge_ids:
        return []
    rows = conn.execute(
        _SPEC_QUERY
        + " AND challenge_id IN (SELECT unnest(?::BIGINT[])) ORDER BY account_id",
        [challenge_ids],
    ).fetchall()
    return [_spec(row) for row in rows]


def apply_transitions(conn: Connection, transitions: pl.DataFrame) -> int:
    """Apply a batch's engine transitions, as :func:`apply_transition` would in order.

    A challenge with one transition in the batch, a failure, is failed with the
    others in two set-based statements (an ``UPDATE`` costs about a millisecond
    however many rows it touches); the rest (passes, several transitions of one
    challenge) go one by one in their order. Challenges are independent, so the
    outcome is that of applying every row in order.

    Args:
        conn: The connection; the sink's transaction.
        transitions: ``challenge_id`` (string or integer), ``phase_index``,
            ``status`` and ``ts``, in the engine's order.

    Returns:
        How many transitions changed something.

    Raises:
        ValueError: A status is neither ``passed`` nor ``failed``.
    """
    if not transitions.height:
        return 0
    rows = transitions.select(
        pl.col("challenge_id").cast(pl.Int64),
        pl.col("phase_index").cast(pl.Int32),
        pl.col("status").cast(pl.String),
        pl.col("ts"),
    )
    alone = pl.col("challenge_id").count().over("challenge_id") == 1
    bulk = rows.filter(alone & (pl.col("status") == "failed"))
    rest = rows.filter(~(alone & (pl.col("status") == "failed")))
    changed = _fail_phases(conn, bulk) if bulk.height else 0
    for challenge_id, phase_index, status, ts in rest.iter_rows():
        changed += apply_transition(
            conn,
            challenge_id=int(challenge_id),
            phase_index=int(phase_index),
            status=str(status),
            ts=ts,
        )
    return changed


def _fail_phases(conn: Connection, failures: pl.DataFrame) -> int:
    """:func:`fail_phase` for many challenges (one row each) at once."""
    rows = failures.select("challenge_id", "phase_index", "ts")
    with frame_table(conn, "_fail_phases", rows):  # named in the statements below
        failed = conn.execute(
            "UPDATE challenge_phases SET status = 'failed', ended_at = f.ts "
            "FROM _fail_phases AS f "
            "WHERE challenge_phases.challenge_id = f.challenge_id "
            "AND challenge_phases.phase_index = f.phase_index "
            "AND challenge_phases.status = 'active' "
            "RETURNING challenge_phases.challenge_id"
        ).fetchall()
        if failed:
            conn.execute(
                "UPDATE challenges SET status = ?, ended_at = f.ts, updated_at = f.ts "
                "FROM _fail_phases AS f WHERE challenges.id = f.challenge_id "
                "AND challenges.id IN (SELECT unnest(?::BIGINT[])) "
                "AND challenges.status IN (?, ?, ?)",
                [
                    CHALLENGE_FAILED,
                    [int(row[0]) for row in failed],
                    CHALLENGE_PENDING,
                    CHALLENGE_ACTIVE,
                    CHALLENGE_PASSED,
                ],
            )
    return len(failed)


def apply_transition(
    conn: Connection,
    *,
    challenge_id: int,
    phase_index: int,
    status: str,
    ts: datetime,
) -> bool:
    """Apply one engine transition (``passed`` or ``failed``) to the store.

    Args:
        conn: The connection; the sink's transaction.
        challenge_id: The challenge.
        phase_index: The phase.
        status: ``passed`` or ``failed``.
        ts: The tick's time.

    Returns:
        Whether anything changed (False for a replayed transition).

    Raises:
        ValueError: ``status`` is neither.
    """
    if status == "failed":
        return fail_phase(
            conn, challenge_id=challenge_id, phase_index=phase_index, ts=ts
        )
    if status == "passed":
        return advance_phase(
            conn, challenge_id=challenge_id, phase_index=phase_index, ts=ts
        ).changed
    raise ValueError(f"unknown transition status {status!r}")
