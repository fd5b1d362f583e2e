"""BuyPropChallenge and the purchase lifecycle (``api.md``, "BuyPropChallenge").

:func:`buy_prop_challenge` runs in the caller's transaction: it validates the payer
and the program, creates the purchase, writes the fee withdrawal to the outbox,
opens the first phase's account, writes its initial deposit and creates the active
challenge. The caller commits, then registers the phase with the running engine.

The job worker moves a purchase on (:func:`apply_job`): ``pending`` → ``paid``
(the fee was withdrawn) → ``account_created`` (the first phase's balance was
deposited) → ``active`` (:func:`activate_purchases`). A withdrawal that finds no
money fails the purchase (``failure_reason``) and cancels its challenge. Every
purchase object carries lifecycle fields computed by :func:`lifecycle_fields`
(the table is in ``docs/api.md``).

**Races.** Purchases on one payer account are serialized in the process
(:func:`payer_lock`: the service is the only process that can open the DuckDB
file), so each sees the fees the others reserved (pending withdrawals count
against the balance). On PostgreSQL, where many processes buy at once, the
transaction also locks the payer's row first (:func:`lock_payer`, ``SELECT ...
FOR UPDATE``); at READ COMMITTED every later statement sees what the previous
holder committed. The worker's conditional debit is the last word: a balance
can never go below zero, whatever happened in between.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prop_stream.store.db import Connection
from prop_stream.store.exceptions import NotFoundError
from prop_stream.store.jobs import (
    FEE_WITHDRAWAL,
    INITIAL_DEPOSIT,
    REFUND,
    Job,
    JobOutcome,
    cancel_jobs,
    credit,
    debit,
    enqueue,
    get_job,
    is_applied,
    mark_job,
    record_withdrawal,
)
from prop_stream.store.lifecycle import (
    CHALLENGE_ACTIVE,
    CHALLENGE_PASSED,
    cancel_challenge,
)
from prop_stream.store.purchases.buying import (
    Bought,
    buy_prop_challenge,
    find_by_idempotency_key,
    purchase_once,
    start_attempt,
)
from prop_stream.store.purchases.exceptions import PurchaseError
from prop_stream.store.purchases.locks import lock_payer, payer_lock
from prop_stream.store.purchases.payers import (
    PAYER_REASONS,
    PayerCheck,
    check_payer,
    ensure_eligible,
    payer_accounts,
)
from prop_stream.store.purchases.programs import (
    PhaseInfo,
    ProgramInfo,
    ensure_sellable,
    program_info,
)
from prop_stream.store.purchases.records import (
    PurchaseRecord,
    funded_purchases,
    get_purchase,
    list_purchases,
    purchase_status,
    set_status,
    status_counts,
)
from prop_stream.store.purchases.status import (
    CANCELLED,
    INSUFFICIENT_FUNDS,
    PAYER_DISABLED,
    PAYER_UNAVAILABLE,
    PAYMENT_FAILURES,
    PURCHASE_ACCOUNT_CREATED,
    PURCHASE_ACTIVE,
    PURCHASE_FAILED,
    PURCHASE_PAID,
    PURCHASE_PENDING,
    PURCHASE_REFUNDED,
    PURCHASE_STATUS_NAMES,
    Lifecycle,
    lifecycle_fields,
)

# ------------------------------------------------------------ retry, cancel


def _owned(conn: Connection, purchase_id: int, customer_id: int) -> PurchaseRecord:
    record = get_purchase(conn, purchase_id=purchase_id, customer_id=customer_id)
    if record is None:
        raise NotFoundError(f"purchase {purchase_id} not found")
    return record


def _end_challenges(
    conn: Connection, purchase_id: int, now: datetime
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Cancel a purchase's running challenges; disable their accounts."""
    ids = [
        int(c)
        for (c,) in conn.execute(
            "SELECT id FROM challenges WHERE purchase_id = ? AND status IN (?, ?)",
            [purchase_id, CHALLENGE_ACTIVE, CHALLENGE_PASSED],
        ).fetchall()
    ]
    removed: list[int] = []
    for challenge_id in ids:
        removed += cancel_challenge(conn, challenge_id=challenge_id, now=now)
    if removed:
        conn.execute(
            "UPDATE trading_accounts SET enabled = false "
            "WHERE account_id IN (SELECT unnest(?::BIGINT[]))",
            [removed],
        )
    return tuple(ids), tuple(removed)


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What :func:`cancel_purchase` changed.

    Attributes:
        challenge_ids: Challenges cancelled (refresh the cache).
        removed_accounts: Phase accounts the engine must stop judging.
        refund_job_id: The refund written to the outbox, if the fee was paid.
    """

    challenge_ids: tuple[int, ...]
    removed_accounts: tuple[int, ...]
    refund_job_id: int | None


def cancel_purchase(
    conn: Connection, *, customer_id: int, purchase_id: int, now: datetime
) -> Cancelled:
    """Cancel a purchase that allows it (``can_cancel``), in the caller's transaction.

    Before the fee is withdrawn (or after the withdrawal failed) nothing is owed:
    the jobs are cancelled. After it, a ``refund`` job is written (once per
    purchase) and the purchase becomes ``refunded`` when the worker applied it.
    Either way the challenge is cancelled and the purchase ``failed`` with
    ``failure_reason`` ``cancelled`` until a refund lands.

    Raises:
        NotFoundError: Not the customer's purchase.
        PurchaseError: ``not_cancellable`` (409).
    """
    record = _owned(conn, purchase_id, customer_id)
    lock_payer(conn, record.payer_account_id)
    fields = lifecycle_fields(
        record.status, record.failure_reason, record.refund_status
    )
    if not fields.can_cancel:
        raise PurchaseError(
            "not_cancellable",
            f"purchase {purchase_id} is {record.status_name} and can't be cancelled",
            conflict=True,
            details={"status": record.status, "status_name": record.status_name},
        )
    cancel_jobs(
        conn,
        purchase_id=purchase_id,
        kinds=(FEE_WITHDRAWAL, INITIAL_DEPOSIT),
        now=now,
    )
    challenges, removed = _end_challenges(conn, purchase_id, now)
    refund = None
    if record.status in (PURCHASE_PAID, PURCHASE_ACCOUNT_CREATED):
        refund = enqueue(
            conn,
            kind=REFUND,
            dedupe_key=f"refund:{purchase_id}",
            account_id=record.payer_account_id,
            amount=record.price,
            now=now,
            purchase_id=purchase_id,
        )
    if not set_status(
        conn,
        purchase_id,
        PURCHASE_FAILED,
        now,
        reason=CANCELLED,
        when=(record.status,),
    ):
        raise PurchaseError(
            "not_cancellable",
            f"purchase {purchase_id} changed; try again",
            conflict=True,
        )
    return Cancelled(challenges, removed, refund)


def retry_purchase(
    conn: Connection, *, customer_id: int, purchase_id: int, now: datetime
) -> Bought:
    """Retry a purchase whose payment failed (``can_retry``), in the caller's txn.

    A new fee withdrawal, a new first-phase account and a new challenge, as in
    BuyPropChallenge; the purchase is ``pending`` again. Hold :func:`payer_lock`.

    Raises:
        NotFoundError: Not the customer's purchase.
        PurchaseError: ``not_retryable`` (409), or the payer still can't pay
            (``payer_not_eligible``, 409), or the program is no longer sold.
    """
    record = _owned(conn, purchase_id, customer_id)
    lock_payer(conn, record.payer_account_id)
    fields = lifecycle_fields(
        record.status, record.failure_reason, record.refund_status
    )
    if not fields.can_retry:
        raise PurchaseError(
            "not_retryable",
            f"purchase {purchase_id} is {record.status_name} and can't be retried",
            conflict=True,
            details={"status": record.status, "status_name": record.status_name},
        )
    program = program_info(conn, program_id=record.program_id)
    try:
        ensure_sellable(program)
    except PurchaseError as exc:
        exc.conflict = True
        raise
    ensure_eligible(
        check_payer(
            conn,
            customer_id=customer_id,
            account_id=record.payer_account_id,
            program=program,
        ),
        conflict=True,
    )
    attempts = conn.execute(
        "SELECT count(*) FROM jobs WHERE purchase_id = ? AND kind = ?",
        [purchase_id, FEE_WITHDRAWAL],
    ).fetchone()
    if not set_status(
        conn, purchase_id, PURCHASE_PENDING, now, when=(PURCHASE_FAILED,)
    ):
        raise PurchaseError(
            "not_retryable", f"purchase {purchase_id} changed; try again", conflict=True
        )
    return start_attempt(
        conn,
        purchase_id=purchase_id,
        attempt=int(attempts[0]) + 1 if attempts else 1,
        customer_id=customer_id,
        program=program,
        payer_account_id=record.payer_account_id,
        now=now,
    )


# ------------------------------------------------------------- the worker


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
    account = conn.execute(
        "SELECT enabled FROM trading_accounts WHERE account_id = ?", [job.account_id]
    ).fetchone()
    if account is None:
        reason = PAYER_UNAVAILABLE
    elif not account[0]:
        reason = PAYER_DISABLED
    else:
        reason = INSUFFICIENT_FUNDS
    mark_job(conn, job_id=job.id, status="failed", now=now)
    conn.execute("UPDATE jobs SET last_error = ? WHERE id = ?", [reason, job.id])
    if job.purchase_id is None:
        return JobOutcome(job.id, "failed")
    cancel_jobs(conn, purchase_id=job.purchase_id, kinds=(INITIAL_DEPOSIT,), now=now)
    challenges, removed = _end_challenges(conn, job.purchase_id, now)
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
    phase = conn.execute(
        "SELECT status FROM challenge_phases "
        "WHERE challenge_id = ? AND phase_index = ?",
        [job.challenge_id, job.phase_index],
    ).fetchone()
    if phase is not None and phase[0] == "cancelled":
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


__all__ = [
    "CANCELLED",
    "INSUFFICIENT_FUNDS",
    "PAYER_DISABLED",
    "PAYER_REASONS",
    "PAYER_UNAVAILABLE",
    "PAYMENT_FAILURES",
    "PURCHASE_ACCOUNT_CREATED",
    "PURCHASE_ACTIVE",
    "PURCHASE_FAILED",
    "PURCHASE_PAID",
    "PURCHASE_PENDING",
    "PURCHASE_REFUNDED",
    "PURCHASE_STATUS_NAMES",
    "Bought",
    "Cancelled",
    "Lifecycle",
    "PayerCheck",
    "PhaseInfo",
    "ProgramInfo",
    "PurchaseError",
    "PurchaseRecord",
    "activate_purchases",
    "apply_job",
    "buy_prop_challenge",
    "cancel_purchase",
    "check_payer",
    "find_by_idempotency_key",
    "get_purchase",
    "lifecycle_fields",
    "list_purchases",
    "lock_payer",
    "payer_accounts",
    "payer_lock",
    "program_info",
    "purchase_once",
    "retry_purchase",
]


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
    row = conn.execute(
        "SELECT count(*), min(created_at) FROM jobs WHERE status = 'pending'"
    ).fetchone()
    pending = int(row[0]) if row else 0
    oldest = row[1] if row else None
    age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
    return {
        "purchases": purchases,
        "outbox_pending": pending,
        "outbox_oldest_age_s": age,
    }
