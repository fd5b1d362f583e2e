"""A purchase's statuses and failure codes, and the lifecycle fields shown of them.

No SQL here: :func:`lifecycle_fields` maps a state to what the UI shows
(``docs/api.md``, "Purchase lifecycle fields").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: ``purchases.status`` values (``api.md``).
PURCHASE_PENDING: Final = 0
PURCHASE_PAID: Final = 1
PURCHASE_ACCOUNT_CREATED: Final = 2
PURCHASE_ACTIVE: Final = 3
PURCHASE_FAILED: Final = 4
PURCHASE_REFUNDED: Final = 5

PURCHASE_STATUS_NAMES: Final = {
    PURCHASE_PENDING: "pending",
    PURCHASE_PAID: "paid",
    PURCHASE_ACCOUNT_CREATED: "account_created",
    PURCHASE_ACTIVE: "active",
    PURCHASE_FAILED: "failed",
    PURCHASE_REFUNDED: "refunded",
}

#: ``failure_reason`` codes.
INSUFFICIENT_FUNDS: Final = "insufficient_funds"
PAYER_DISABLED: Final = "payer_disabled"
PAYER_UNAVAILABLE: Final = "payer_unavailable"
CANCELLED: Final = "cancelled"
#: Failures of the payment, which a retry may fix.
PAYMENT_FAILURES: Final = frozenset(
    {INSUFFICIENT_FUNDS, PAYER_DISABLED, PAYER_UNAVAILABLE}
)


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """The UI fields of a purchase (``api.md``, "Purchase lifecycle fields")."""

    status_name: str
    next_action: str
    payment_status: str
    activation_status: str
    failure_reason: str | None
    can_retry: bool
    can_cancel: bool


def lifecycle_fields(
    status: int, failure_reason: str | None, refund_status: str | None = None
) -> Lifecycle:
    """The lifecycle fields of a purchase in a state (``docs/api.md`` table).

    Args:
        status: ``purchases.status``.
        failure_reason: Its failure reason.
        refund_status: Its refund job's status, if it has one.

    Returns:
        The fields.
    """
    name = PURCHASE_STATUS_NAMES[status]
    if status == PURCHASE_PENDING:
        return Lifecycle(
            name, "wait_for_payment", "pending", "pending", None, False, True
        )
    if status == PURCHASE_PAID:
        return Lifecycle(
            name, "wait_for_activation", "paid", "pending", None, False, True
        )
    if status == PURCHASE_ACCOUNT_CREATED:
        return Lifecycle(
            name, "wait_for_activation", "paid", "account_created", None, False, True
        )
    if status == PURCHASE_ACTIVE:
        return Lifecycle(name, "open_challenge", "paid", "active", None, False, False)
    if status == PURCHASE_REFUNDED:
        return Lifecycle(
            name, "none", "refunded", "cancelled", failure_reason, False, False
        )
    # failed
    if failure_reason in PAYMENT_FAILURES:
        action = "top_up_and_retry" if failure_reason == INSUFFICIENT_FUNDS else "retry"
        return Lifecycle(
            name, action, "failed", "cancelled", failure_reason, True, True
        )
    if refund_status is not None:
        return Lifecycle(
            name,
            "wait_for_refund",
            "refund_pending",
            "cancelled",
            failure_reason,
            False,
            False,
        )
    return Lifecycle(
        name, "none", "cancelled", "cancelled", failure_reason, False, False
    )


__all__ = [
    "CANCELLED",
    "INSUFFICIENT_FUNDS",
    "PAYER_DISABLED",
    "PAYER_UNAVAILABLE",
    "PAYMENT_FAILURES",
    "PURCHASE_ACCOUNT_CREATED",
    "PURCHASE_ACTIVE",
    "PURCHASE_FAILED",
    "PURCHASE_PAID",
    "PURCHASE_PENDING",
    "PURCHASE_REFUNDED",
    "PURCHASE_STATUS_NAMES",
    "Lifecycle",
    "lifecycle_fields",
]
