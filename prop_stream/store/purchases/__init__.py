"""BuyPropChallenge and the purchase lifecycle (``api.md``, "BuyPropChallenge").

:func:`buy_prop_challenge` runs in the caller's transaction: it validates the payer
and the program, creates the purchase, writes the fee withdrawal to the outbox,
opens the first phase's account, writes its initial deposit and creates the active
challenge. The caller commits, then registers the phase with the running engine.

The job worker moves a purchase on (:func:`prop_stream.store.job_worker.apply_job`):
``pending`` → ``paid`` (the fee was withdrawn) → ``account_created`` (the first
phase's balance was deposited) → ``active``
(:func:`prop_stream.store.job_worker.activate_purchases`). A withdrawal that finds
no money fails the purchase (``failure_reason``) and cancels its challenge. Every
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

The modules, by seam (each imports only the ones below it; ``docs/store.md``):

- ``actions``: retry and cancel;
- ``buying``: :func:`buy_prop_challenge`, :func:`purchase_once`;
- ``payers``: a customer's payer accounts, checked against a program;
- ``programs``: a program as a purchase sees it;
- ``records``: the ``purchases`` table, every statement on it;
- ``locks``: the payer locks, the one backend difference;
- ``status``: statuses, failure codes, lifecycle fields;
- ``exceptions``: :class:`PurchaseError`.

This package re-exports their public names; import from here.
"""

from prop_stream.store.purchases.actions import (
    Cancelled,
    cancel_purchase,
    retry_purchase,
)
from prop_stream.store.purchases.buying import (
    Bought,
    buy_prop_challenge,
    find_by_idempotency_key,
    purchase_once,
)
from prop_stream.store.purchases.exceptions import PurchaseError
from prop_stream.store.purchases.locks import lock_payer, payer_lock
from prop_stream.store.purchases.payers import (
    PAYER_REASONS,
    PayerCheck,
    check_payer,
    payer_accounts,
)
from prop_stream.store.purchases.programs import PhaseInfo, ProgramInfo, program_info
from prop_stream.store.purchases.records import (
    PurchaseRecord,
    get_purchase,
    list_purchases,
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
