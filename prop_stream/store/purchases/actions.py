"""What a customer can do to a purchase after buying it: retry it, cancel it.

Both run in the caller's transaction and lock the payer's row first
(:func:`lock_payer`); the purchase's lifecycle fields (``can_retry``,
``can_cancel``) say which is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from prop_stream.store.catalog import disable_accounts
from prop_stream.store.db import Connection
from prop_stream.store.exceptions import NotFoundError
from prop_stream.store.jobs import (
    FEE_WITHDRAWAL,
    INITIAL_DEPOSIT,
    REFUND,
    cancel_jobs,
    count_jobs,
    enqueue,
)
from prop_stream.store.lifecycle import cancel_challenge, running_challenges
from prop_stream.store.purchases.buying import Bought, start_attempt
from prop_stream.store.purchases.exceptions import PurchaseError
from prop_stream.store.purchases.locks import lock_payer
from prop_stream.store.purchases.payers import check_payer, ensure_eligible
from prop_stream.store.purchases.programs import ensure_sellable, program_info
from prop_stream.store.purchases.records import PurchaseRecord, get_purchase, set_status
from prop_stream.store.purchases.status import (
    CANCELLED,
    PURCHASE_ACCOUNT_CREATED,
    PURCHASE_FAILED,
    PURCHASE_PAID,
    PURCHASE_PENDING,
    lifecycle_fields,
)


def _owned(conn: Connection, purchase_id: int, customer_id: int) -> PurchaseRecord:
    record = get_purchase(conn, purchase_id=purchase_id, customer_id=customer_id)
    if record is None:
        raise NotFoundError(f"purchase {purchase_id} not found")
    return record


def end_challenges(
    conn: Connection, purchase_id: int, now: datetime
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Cancel a purchase's running challenges; disable their accounts.

    Returns:
        The challenges cancelled and the phase accounts disabled.
    """
    ids = running_challenges(conn, purchase_id=purchase_id)
    removed: list[int] = []
    for challenge_id in ids:
        removed += cancel_challenge(conn, challenge_id=challenge_id, now=now)
    disable_accounts(conn, account_ids=removed)
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
    challenges, removed = end_challenges(conn, purchase_id, now)
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
    attempts = count_jobs(conn, purchase_id=purchase_id, kind=FEE_WITHDRAWAL)
    if not set_status(
        conn, purchase_id, PURCHASE_PENDING, now, when=(PURCHASE_FAILED,)
    ):
        raise PurchaseError(
            "not_retryable", f"purchase {purchase_id} changed; try again", conflict=True
        )
    return start_attempt(
        conn,
        purchase_id=purchase_id,
        attempt=attempts + 1,
        customer_id=customer_id,
        program=program,
        payer_account_id=record.payer_account_id,
        now=now,
    )


__all__ = ["Cancelled", "cancel_purchase", "end_challenges", "retry_purchase"]
