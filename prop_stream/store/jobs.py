"""The outbox: durable money movements, and applying each exactly once.

The purchase flow and phase advancement write jobs (``jobs``) in their own
transaction; the job worker (:mod:`prop_stream.jobs`) carries them out. A job is
applied in one transaction that moves the money, writes the
job's row in ``ledger_entries`` (primary key: the job id) and marks the job, so a
job id can never move money twice: a worker that dies before the commit leaves
nothing behind, and a ledger row that exists already means "applied" whatever the
job's own status says.

Kinds:

- ``fee_withdrawal``: the program's price from the payer account, with a
  conditional update that can never take the balance below zero; no rows updated
  means the payment failed (the purchase fails, its challenge is cancelled);
- ``initial_deposit``: a phase's ``initial_balance`` into its challenge account
  (after the purchase's fee was paid);
- ``refund``: the fee back to the payer, the compensation of a cancelled paid
  purchase; one per purchase (``dedupe_key``).

:func:`prop_stream.store.job_worker.apply_job` carries out one job; this module
holds the queue and the ledger primitives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Final, Literal

from prop_stream.store.db import Connection, is_postgres

JobKind = Literal["fee_withdrawal", "initial_deposit", "refund"]
JobStatus = Literal["pending", "done", "failed", "cancelled"]

FEE_WITHDRAWAL: Final = "fee_withdrawal"
INITIAL_DEPOSIT: Final = "initial_deposit"
REFUND: Final = "refund"

_CENT: Final = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class Job:
    """One outbox job.

    Attributes:
        id: The job id (the ledger's key).
        kind: ``fee_withdrawal``, ``initial_deposit`` or ``refund``.
        account_id: The account debited or credited.
        amount: How much, positive.
        purchase_id: The purchase it belongs to (None for demo challenges).
        challenge_id: The challenge (deposits).
        phase_index: The phase whose account it funds (deposits).
        status: ``pending``, ``done``, ``failed`` or ``cancelled``.
        attempts: Failed attempts so far.
    """

    id: int
    kind: str
    account_id: int
    amount: Decimal
    purchase_id: int | None
    challenge_id: int | None
    phase_index: int | None
    status: str
    attempts: int


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What :func:`apply_job` did.

    Attributes:
        job_id: The job.
        result: ``applied`` (money moved now), ``already_applied`` (the ledger had
            it: only the mark was missing), ``failed`` (a withdrawal found no
            money), ``cancelled`` (its purchase or challenge had ended),
            ``deferred`` (not yet: a deposit whose fee is unpaid) or ``skipped``
            (not pending any more).
        challenge_ids: Challenges whose state changed (refresh the API's cache).
        removed_accounts: Phase accounts the engine must stop judging.
    """

    job_id: int
    result: str
    challenge_ids: tuple[int, ...] = ()
    removed_accounts: tuple[int, ...] = field(default=())


_JOB_COLUMNS: Final = (
    "id, kind, account_id, amount, purchase_id, challenge_id, phase_index, "
    "status, attempts"
)


def _job(row: tuple[object, ...]) -> Job:
    jid, kind, account, amount, purchase, challenge, phase, status, attempts = row
    return Job(
        id=int(str(jid)),
        kind=str(kind),
        account_id=int(str(account)),
        amount=Decimal(str(amount)),
        purchase_id=None if purchase is None else int(str(purchase)),
        challenge_id=None if challenge is None else int(str(challenge)),
        phase_index=None if phase is None else int(str(phase)),
        status=str(status),
        attempts=int(str(attempts)),
    )


def enqueue(
    conn: Connection,
    *,
    kind: JobKind,
    dedupe_key: str,
    account_id: int,
    amount: Decimal,
    now: datetime,
    purchase_id: int | None = None,
    challenge_id: int | None = None,
    phase_index: int | None = None,
) -> int:
    """Write a job to the outbox, once per ``dedupe_key``.

    Args:
        conn: The connection; the caller's transaction.
        kind: What to do.
        dedupe_key: Unique per intended movement (``refund:7``): enqueueing the
            same key again returns the first job.
        account_id: The account to debit or credit.
        amount: How much (rounded to the cent), positive.
        now: The job's creation time.
        purchase_id: Its purchase.
        challenge_id: Its challenge.
        phase_index: Its phase.

    Returns:
        The job's id.
    """
    existing = conn.execute(
        "SELECT id FROM jobs WHERE dedupe_key = ?", [dedupe_key]
    ).fetchone()
    if existing is not None:
        return int(existing[0])
    row = conn.execute(
        "INSERT INTO jobs (kind, dedupe_key, purchase_id, challenge_id, phase_index, "
        "account_id, amount, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        [
            kind,
            dedupe_key,
            purchase_id,
            challenge_id,
            phase_index,
            account_id,
            amount.quantize(_CENT),
            now,
            now,
        ],
    ).fetchone()
    assert row is not None  # noqa: S101 - INSERT ... RETURNING returns the row
    return int(row[0])


def pending_jobs(conn: Connection, *, limit: int = 100) -> list[Job]:
    """The oldest pending jobs, in the order they were written.

    Args:
        conn: The connection.
        limit: At most this many.

    Returns:
        The jobs.
    """
    rows = conn.execute(
        f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = 'pending' "  # noqa: S608 - fixed columns
        "ORDER BY id LIMIT ?",
        [limit],
    ).fetchall()
    return [_job(r) for r in rows]


def get_job(conn: Connection, *, job_id: int, claim: bool = False) -> Job | None:
    """One job, or None.

    Args:
        conn: The connection.
        job_id: The job.
        claim: Take the job for this transaction: on PostgreSQL a pending job
            whose row another worker holds is skipped (None), and the row stays
            locked until this transaction ends (``FOR UPDATE SKIP LOCKED``).
            DuckDB has one writing process; its conflicts refuse a second writer.
    """
    sql = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?"  # noqa: S608 - fixed columns
    if claim and is_postgres(conn):
        sql += " AND status = 'pending' FOR UPDATE SKIP LOCKED"
    row = conn.execute(sql, [job_id]).fetchone()
    return None if row is None else _job(row)


def record_attempt(conn: Connection, *, job_id: int, error: str, now: datetime) -> None:
    """Count a failed attempt (a conflict, a crash) of a still pending job."""
    conn.execute(
        "UPDATE jobs SET attempts = attempts + 1, last_error = ?, updated_at = ? "
        "WHERE id = ? AND status = 'pending'",
        [error[:500], now, job_id],
    )


def mark_job(
    conn: Connection, *, job_id: int, status: JobStatus, now: datetime
) -> None:
    """Move a pending job to ``status``."""
    conn.execute(
        "UPDATE jobs SET status = ?, updated_at = ?, "
        "applied_at = CASE WHEN ? = 'done' THEN ? ELSE applied_at END "
        "WHERE id = ? AND status = 'pending'",
        [status, now, status, now, job_id],
    )


def set_last_error(conn: Connection, *, job_id: int, error: str) -> None:
    """Record why a job failed (a withdrawal's ``failure_reason``)."""
    conn.execute("UPDATE jobs SET last_error = ? WHERE id = ?", [error, job_id])


def count_jobs(conn: Connection, *, purchase_id: int, kind: str) -> int:
    """How many jobs of a kind a purchase has, in any status (its attempts)."""
    row = conn.execute(
        "SELECT count(*) FROM jobs WHERE purchase_id = ? AND kind = ?",
        [purchase_id, kind],
    ).fetchone()
    return int(row[0]) if row else 0


def pending_summary(conn: Connection) -> tuple[int, datetime | None]:
    """How many jobs wait, and when the oldest of them was written (None: none)."""
    row = conn.execute(
        "SELECT count(*), min(created_at) FROM jobs WHERE status = 'pending'"
    ).fetchone()
    if row is None:
        return 0, None
    return int(row[0]), row[1]


def cancel_jobs(
    conn: Connection, *, purchase_id: int, kinds: tuple[str, ...], now: datetime
) -> int:
    """Cancel a purchase's pending jobs of some kinds.

    Returns:
        How many were cancelled.
    """
    rows = conn.execute(
        "UPDATE jobs SET status = 'cancelled', updated_at = ? "
        "WHERE purchase_id = ? AND status = 'pending' "
        "AND kind IN (SELECT unnest(?::VARCHAR[])) RETURNING id",
        [now, purchase_id, list(kinds)],
    ).fetchall()
    return len(rows)


def is_applied(conn: Connection, *, job_id: int) -> bool:
    """Whether a job's money has moved (its ledger row exists)."""
    row = conn.execute(
        "SELECT count(*) FROM ledger_entries WHERE job_id = ?", [job_id]
    ).fetchone()
    return bool(row and row[0])


def updated_rows(conn: Connection, sql: str, params: list[object]) -> int:
    """Run an ``UPDATE`` and return how many rows it changed.

    DuckDB runs an ``UPDATE ... RETURNING`` on a table that a foreign key
    references as a delete and an insert, which the key refuses; a plain
    ``UPDATE`` answers its row count instead.
    """
    row = conn.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def _updated(conn: Connection, sql: str, params: list[object]) -> bool:
    return updated_rows(conn, sql, params) > 0


def _ledger(conn: Connection, job: Job, amount: Decimal, now: datetime) -> None:
    conn.execute(
        "INSERT INTO ledger_entries (job_id, account_id, amount, kind, purchase_id, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?)",
        [job.id, job.account_id, amount, job.kind, job.purchase_id, now],
    )


def credit(conn: Connection, *, job: Job, now: datetime) -> bool:
    """Add a job's amount to its account and write its ledger row.

    Returns:
        False when the account does not exist (nothing written).
    """
    if not _updated(
        conn,
        "UPDATE trading_accounts SET balance = balance + ? WHERE account_id = ?",
        [job.amount, job.account_id],
    ):
        return False
    _ledger(conn, job, job.amount, now)
    return True


def debit(conn: Connection, *, account_id: int, amount: Decimal) -> bool:
    """Take ``amount`` from an enabled account unless that would go below zero.

    One conditional ``UPDATE``: two concurrent debits can never both pass on the
    same money (DuckDB refuses the second writer of the row, and the condition is
    evaluated on the newest committed balance).

    Returns:
        Whether the money was taken.
    """
    return _updated(
        conn,
        "UPDATE trading_accounts SET balance = balance - ? "
        "WHERE account_id = ? AND enabled AND balance >= ?",
        [amount, account_id, amount],
    )


def record_withdrawal(conn: Connection, *, job: Job, now: datetime) -> None:
    """Write a withdrawal's (negative) ledger row and mark it done."""
    _ledger(conn, job, -job.amount, now)
    mark_job(conn, job_id=job.id, status="done", now=now)


__all__ = [
    "FEE_WITHDRAWAL",
    "INITIAL_DEPOSIT",
    "REFUND",
    "Job",
    "JobKind",
    "JobOutcome",
    "JobStatus",
    "cancel_jobs",
    "count_jobs",
    "credit",
    "debit",
    "enqueue",
    "get_job",
    "is_applied",
    "mark_job",
    "pending_jobs",
    "pending_summary",
    "record_attempt",
    "record_withdrawal",
    "set_last_error",
    "updated_rows",
]
