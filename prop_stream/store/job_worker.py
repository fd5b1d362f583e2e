"""The job worker's store half: carrying out one outbox job and what follows.

:mod:`prop_stream.store.jobs` holds the queue and the ledger primitives;
:mod:`prop_stream.jobs` runs the loop that calls :func:`apply_job` and
:func:`activate_purchases`. A purchase moves on here: ``pending`` → ``paid`` (the
fee was withdrawn) → ``account_created`` (the first phase's balance was
deposited) → ``active``. A withdrawal that finds no money fails the purchase
(``failure_reason``) and cancels its challenge.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prop_stream.store.catalog import account_enabled
from prop_stream.store.db import Connection
from prop_stream.store.jobs import (
    FEE_WITHDRAWAL,
    INITIAL_DEPOSIT,
    REFUND,
    Job,
    JobOutcome,
    cancel_jobs,
    credit,
    debit,
    get_job,
    is_applied,
    mark_job,
    pending_summary,
    record_withdrawal,
    set_last_error,
)
from prop_stream.store.lifecycle import phase_status
from prop_stream.store.purchases.actions import end_challenges
from prop_stream.store.purchases.records import (
    funded_purchases,
    purchase_status,
    set_status,
    status_counts,
)
from prop_stream.store.purchases.status import (
    CANCELLED,
    INSUFFICIENT_FUNDS,
    PAYER_DISABLED,
    PAYER_UNAVAILABLE,
    PURCHASE_ACCOUNT_CREATED,
    PURCHASE_ACTIVE,
    PURCHASE_FAILED,
    PURCHASE_PAID,
    PURCHASE_PENDING,
    PURCHASE_REFUNDED,
    PURCHASE_STATUS_NAMES,
)


def apply_job(conn: Connection, *, job_id: int, now: datetime) -> JobOutcome:
    """Carry out one pending outbox job, in the caller's transaction.

    The money movement, its ledger row (keyed by the job id), the job's mark and
    the purchase's new status commit together or not at all; a job whose ledger
    row exists is only marked, never applied again.

    Args:
        conn: The connection; wrap the call in a transaction.
        job_id: The job.
        now: The time recorded.

    Returns:
        What happened.

    Raises:
        ValueError: A job of an unknown kind.
    """
    # PostgreSQL: the job's row stays locked until this transaction ends; another
    # worker skips it (and finds it done afterwards), so it is applied once.
    job = get_job(conn, job_id=job_id, claim=True)
    if job is None or job.status != "pending":
        return JobOutcome(job_id, "skipped")
    if is_applied(conn, job_id=job_id):
        mark_job(conn, job_id=job_id, status="done", now=now)
        return JobOutcome(job_id, "already_applied")
    if job.kind == FEE_WITHDRAWAL:
        return _withdraw_fee(conn, job, now)
    if job.kind == INITIAL_DEPOSIT:
        return _deposit(conn, job, now)
    if job.kind == REFUND:
        if not credit(conn, job=job, now=now):
            mark_job(conn, job_id=job_id, status="failed", now=now)
            return JobOutcome(job_id, "failed")
        mark_job(conn, job_id=job_id, status="done", now=now)
        if job.purchase_id is not None:
            set_status(
                conn,
                job.purchase_id,
                PURCHASE_REFUNDED,
                now,
                reason=CANCELLED,
                when=(PURCHASE_FAILED,),
            )
        return JobOutcome(job_id, "applied")
    raise ValueError(f"unknown job kind {job.kind!r}")


def _withdraw_fee(conn: Connection, job: Job, now: datetime) -> JobOutcome:
    if job.purchase_id is not None and (
        purchase_status(conn, job.purchase_id) != PURCHASE_PENDING
    ):
        mark_job(conn, job_id=job.id, status="cancelled", now=now)
        return JobOutcome(job.id, "cancelled")
    if debit(conn, account_id=job.account_id, amount=job.amount):
        record_withdrawal(conn, job=job, now=now)
        if job.purchase_id is not None:
            set_status(
                conn, job.purchase_id, PURCHASE_PAID, now, when=(PURCHASE_PENDING,)
            )
        return JobOutcome(job.id, "applied")
    enabled = account_enabled(conn, account_id=job.account_id)
    if enabled is None:
        reason = PAYER_UNAVAILABLE
    elif not enabled:
        reason = PAYER_DISABLED
    else:
        reason = INSUFFICIENT_FUNDS
    mark_job(conn, job_id=job.id, status="failed", now=now)
    set_last_error(conn, job_id=job.id, error=reason)
    if job.purchase_id is None:
        return JobOutcome(job.id, "failed")
    cancel_jobs(conn, purchase_id=job.purchase_id, kinds=(INITIAL_DEPOSIT,), now=now)
    challenges, removed = end_challenges(conn, job.purchase_id, now)
    set_status(
        conn,
        job.purchase_id,
        PURCHASE_FAILED,
        now,
        reason=reason,
        when=(PURCHASE_PENDING,),
    )
    return JobOutcome(job.id, "failed", challenges, removed)


def _deposit(conn: Connection, job: Job, now: datetime) -> JobOutcome:
    phase = (
        None
        if job.challenge_id is None or job.phase_index is None
        else phase_status(
            conn, challenge_id=job.challenge_id, phase_index=job.phase_index
        )
    )
    if phase == "cancelled":
        mark_job(conn, job_id=job.id, status="cancelled", now=now)
        return JobOutcome(job.id, "cancelled")
    status = None if job.purchase_id is None else purchase_status(conn, job.purchase_id)
    if status == PURCHASE_PENDING:
        # The fee comes first: its job is older and the worker takes it next.
        return JobOutcome(job.id, "deferred")
    if status in (PURCHASE_FAILED, PURCHASE_REFUNDED):
        mark_job(conn, job_id=job.id, status="cancelled", now=now)
        return JobOutcome(job.id, "cancelled")
    if not credit(conn, job=job, now=now):
        mark_job(conn, job_id=job.id, status="failed", now=now)
        return JobOutcome(job.id, "failed")
    mark_job(conn, job_id=job.id, status="done", now=now)
    changed: tuple[int, ...] = ()
    if job.purchase_id is not None and set_status(
        conn, job.purchase_id, PURCHASE_ACCOUNT_CREATED, now, when=(PURCHASE_PAID,)
    ):
        changed = () if job.challenge_id is None else (job.challenge_id,)
    return JobOutcome(job.id, "applied", changed)


def activate_purchases(conn: Connection, *, now: datetime) -> list[int]:
    """Move funded purchases whose challenge runs to ``active``.

    Returns:
        The purchases activated.
    """
    funded = funded_purchases(conn)
    for purchase_id in funded:
        # No RETURNING: challenges reference purchases (see jobs.updated_rows).
        set_status(
            conn, purchase_id, PURCHASE_ACTIVE, now, when=(PURCHASE_ACCOUNT_CREATED,)
        )
    return funded


def outbox_summary(conn: Connection, *, now: datetime) -> dict[str, Any]:
    """What ``/metrics`` shows of the store: purchases by status and the outbox.

    Args:
        conn: A store cursor.
        now: The clock the oldest pending job's age is measured with.

    Returns:
        ``{"purchases": {status_name: n}, "outbox_pending": n,
        "outbox_oldest_age_s": seconds}`` (0 when no job waits).
    """
    purchases = {
        PURCHASE_STATUS_NAMES.get(status, str(status)): n
        for status, n in status_counts(conn).items()
    }
    pending, oldest = pending_summary(conn)
    age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
    return {
        "purchases": purchases,
        "outbox_pending": pending,
        "outbox_oldest_age_s": age,
    }


__all__ = ["activate_purchases", "apply_job", "outbox_summary"]
