"""BuyPropChallenge: a new purchase, and each attempt to pay for it.

:func:`buy_prop_challenge` runs in the caller's transaction: it validates the
payer and the program, creates the purchase, writes the fee withdrawal to the
outbox, opens the first phase's account, writes its initial deposit and creates
the active challenge. :func:`purchase_once` wraps it with the
``Idempotency-Key`` in transactions of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from prop_stream.store.catalog import open_account
from prop_stream.store.db import Connection, run_in_transaction
from prop_stream.store.exceptions import StoreError
from prop_stream.store.jobs import FEE_WITHDRAWAL, INITIAL_DEPOSIT, enqueue
from prop_stream.store.lifecycle import start_challenge
from prop_stream.store.purchases.exceptions import PurchaseError
from prop_stream.store.purchases.locks import lock_payer, payer_lock
from prop_stream.store.purchases.payers import check_payer, ensure_eligible
from prop_stream.store.purchases.programs import (
    ProgramInfo,
    ensure_sellable,
    program_info,
)
from prop_stream.store.purchases.records import insert_purchase, purchase_by_key


class _AlreadyBought(Exception):
    """The purchase's key was committed by another request: roll back, answer it."""

    def __init__(self, purchase_id: int) -> None:
        super().__init__(purchase_id)
        self.purchase_id = purchase_id


@dataclass(frozen=True, slots=True)
class Bought:
    """What :func:`buy_prop_challenge` (or a retry) created.

    Attributes:
        purchase_id: The purchase.
        challenge_id: The new challenge.
        account_id: Its first phase's account (register it with the engine).
    """

    purchase_id: int
    challenge_id: int
    account_id: int


def find_by_idempotency_key(
    conn: Connection, *, customer_id: int, key: str, request_hash: str
) -> int | None:
    """The purchase a customer made earlier with an ``Idempotency-Key``.

    Returns:
        Its id, or None when the key is new.

    Raises:
        PurchaseError: ``idempotency_mismatch``: the key came with another body.
    """
    row = purchase_by_key(conn, customer_id=customer_id, key=key)
    if row is None:
        return None
    if row[1] != request_hash:
        raise PurchaseError(
            "idempotency_mismatch",
            "this Idempotency-Key was used with another request body",
            field="Idempotency-Key",
            conflict=True,
            details={"purchase_id": int(row[0])},
        )
    return int(row[0])


def start_attempt(
    conn: Connection,
    *,
    purchase_id: int,
    attempt: int,
    customer_id: int,
    program: ProgramInfo,
    payer_account_id: int,
    now: datetime,
) -> Bought:
    """One attempt to pay for a purchase, in the caller's transaction.

    Writes the fee withdrawal (keyed by the attempt), opens the first phase's
    account, starts its challenge and writes its initial deposit: a purchase
    and each retry of it.

    Args:
        conn: The connection.
        purchase_id: The purchase.
        attempt: Its attempt number, from 1 (the withdrawal's ``dedupe_key``).
        customer_id: The buyer.
        program: The program bought.
        payer_account_id: The account that pays the fee.
        now: The attempt's time; the first phase starts then.

    Returns:
        The purchase, its new challenge and the first phase's account.
    """
    enqueue(
        conn,
        kind=FEE_WITHDRAWAL,
        dedupe_key=f"fee:{purchase_id}:{attempt}",
        account_id=payer_account_id,
        amount=program.price,
        now=now,
        purchase_id=purchase_id,
    )
    first = program.phases[0]
    account_id = open_account(
        conn, customer_id=customer_id, account_group=first.account_group
    )
    challenge_id = start_challenge(
        conn,
        customer_id=customer_id,
        program_id=program.id,
        account_id=account_id,
        started_at=now,
        purchase_id=purchase_id,
    )
    enqueue(
        conn,
        kind=INITIAL_DEPOSIT,
        dedupe_key=f"deposit:{challenge_id}:0",
        account_id=account_id,
        amount=first.initial_balance,
        now=now,
        purchase_id=purchase_id,
        challenge_id=challenge_id,
        phase_index=0,
    )
    return Bought(purchase_id, challenge_id, account_id)


def buy_prop_challenge(
    conn: Connection,
    *,
    customer_id: int,
    program_id: int,
    payer_account_id: int,
    now: datetime,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> Bought:
    """BuyPropChallenge, in the caller's transaction (hold :func:`payer_lock`).

    Args:
        conn: The connection; wrap the call in one transaction.
        customer_id: The buyer.
        program_id: The program.
        payer_account_id: The account that pays the fee.
        now: The purchase's time; the first phase starts then.
        idempotency_key: The request's ``Idempotency-Key`` (unique per customer).
        request_hash: A hash of the request body, kept with the key.

    Returns:
        The purchase, its challenge and the first phase's account.

    Raises:
        NotFoundError: No such program, or no such payer account of the customer.
        PurchaseError: The program can't be sold or the payer can't pay.
    """
    lock_payer(conn, payer_account_id)
    if idempotency_key is not None:
        # Another process may have committed this key while we waited for the
        # payer's row (PostgreSQL: two API processes, one key): answer that
        # purchase rather than judge the payer again after its fee was taken.
        found = find_by_idempotency_key(
            conn,
            customer_id=customer_id,
            key=idempotency_key,
            request_hash=request_hash or "",
        )
        if found is not None:
            raise _AlreadyBought(found)
    program = program_info(conn, program_id=program_id)
    ensure_sellable(program)
    ensure_eligible(
        check_payer(
            conn, customer_id=customer_id, account_id=payer_account_id, program=program
        )
    )
    purchase_id = insert_purchase(
        conn,
        customer_id=customer_id,
        program_id=program_id,
        payer_account_id=payer_account_id,
        price=program.price,
        currency=program.currency,
        now=now,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    return start_attempt(
        conn,
        purchase_id=purchase_id,
        attempt=1,
        customer_id=customer_id,
        program=program,
        payer_account_id=payer_account_id,
        now=now,
    )


def purchase_once(
    conn: Connection,
    *,
    customer_id: int,
    program_id: int,
    payer_account_id: int,
    now: datetime,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> tuple[int, Bought | None]:
    """BuyPropChallenge with its ``Idempotency-Key``, in transactions of its own.

    The same key with the same body answers the first purchase and creates
    nothing; with another body it is ``idempotency_mismatch``. Concurrent requests
    with one key never make two purchases: the unique key ``(customer_id,
    idempotency_key)`` refuses the second commit, and the payer lock makes a
    same-body retry wait for the first and then find it.

    Args:
        conn: A connection not in a transaction (e.g. an API request's cursor).
        customer_id: The buyer.
        program_id: The program.
        payer_account_id: The payer account.
        now: The purchase's time.
        idempotency_key: The request's key, if any.
        request_hash: A hash of the request body (compared on a repeat).

    Returns:
        The purchase's id, and what was created (None for a repeat).

    Raises:
        NotFoundError: No such program or payer account of the customer.
        PurchaseError: Not eligible, not for sale, or an idempotency conflict.
    """

    def existing() -> int | None:
        if idempotency_key is None:
            return None
        return find_by_idempotency_key(
            conn,
            customer_id=customer_id,
            key=idempotency_key,
            request_hash=request_hash or "",
        )

    found = existing()
    if found is not None:
        return found, None
    with payer_lock(payer_account_id):
        found = existing()
        if found is not None:
            return found, None
        try:
            bought = run_in_transaction(
                conn,
                lambda c: buy_prop_challenge(
                    c,
                    customer_id=customer_id,
                    program_id=program_id,
                    payer_account_id=payer_account_id,
                    now=now,
                    idempotency_key=idempotency_key,
                    request_hash=request_hash,
                ),
            )
        except _AlreadyBought as done:
            return done.purchase_id, None
        except StoreError:
            raise
        except Exception as exc:
            if idempotency_key is None or "duplicate key" not in str(exc):
                raise
            # Another request with this key (another payer) committed first.
            found = existing()
            if found is None:
                raise PurchaseError(
                    "idempotency_in_flight",
                    "a request with this Idempotency-Key is in progress",
                    field="Idempotency-Key",
                    conflict=True,
                ) from exc
            return found, None
    return bought.purchase_id, bought


__all__ = [
    "Bought",
    "buy_prop_challenge",
    "find_by_idempotency_key",
    "purchase_once",
    "start_attempt",
]
