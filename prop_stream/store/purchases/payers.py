"""A customer's payer accounts, each checked against the program it would pay for."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from prop_stream.store.db import Connection
from prop_stream.store.exceptions import NotFoundError
from prop_stream.store.purchases.exceptions import PurchaseError
from prop_stream.store.purchases.programs import ProgramInfo

#: Why a payer account can't pay for a program (``GET /prop/payer-accounts``).
PAYER_REASONS: Final = (
    "disabled",
    "not_real",
    "wrong_currency",
    "insufficient_balance",
)


@dataclass(frozen=True, slots=True)
class PayerCheck:
    """A customer's account and whether it can pay for a program.

    Attributes:
        account_id: The login.
        account_group: Its group.
        kind: ``DEMO`` or ``REAL``.
        currency: Its currency.
        balance: Its balance.
        available: The balance less the fees already queued against it.
        enabled: Whether it is enabled.
        eligible: Whether it can pay.
        reason: Why not (one of :data:`PAYER_REASONS`), None when eligible.
    """

    account_id: int
    account_group: str
    kind: str
    currency: str
    balance: Decimal
    available: Decimal
    enabled: bool
    eligible: bool
    reason: str | None


_PAYER_SQL: Final = """
    SELECT a.account_id, a.account_group, g.kind, a.currency, a.balance, a.enabled,
        a.balance - coalesce((
            SELECT sum(j.amount) FROM jobs AS j
            WHERE j.account_id = a.account_id AND j.kind = 'fee_withdrawal'
                AND j.status = 'pending'
        ), 0) AS available
    FROM trading_accounts AS a JOIN account_groups AS g ON g.name = a.account_group
    WHERE a.customer_id = ?
        AND a.account_id NOT IN (
            SELECT account_id FROM challenge_phases WHERE account_id IS NOT NULL
        )
"""


def _check(row: tuple[Any, ...], program: ProgramInfo) -> PayerCheck:
    account_id, group, kind, currency, balance, enabled, available = row
    reason = None
    if not enabled:
        reason = "disabled"
    elif kind != "REAL":
        reason = "not_real"
    elif currency != program.currency:
        reason = "wrong_currency"
    elif Decimal(str(available)) < program.price:
        reason = "insufficient_balance"
    return PayerCheck(
        account_id=int(account_id),
        account_group=str(group),
        kind=str(kind),
        currency=str(currency),
        balance=Decimal(str(balance)),
        available=Decimal(str(available)),
        enabled=bool(enabled),
        eligible=reason is None,
        reason=reason,
    )


def payer_accounts(
    conn: Connection, *, customer_id: int, program: ProgramInfo
) -> list[PayerCheck]:
    """The customer's own accounts (not challenge accounts), eligible or not.

    Args:
        conn: The connection.
        customer_id: The customer.
        program: The program to pay for.

    Returns:
        The accounts by login, each with ``eligible`` and ``reason``.
    """
    rows = conn.execute(_PAYER_SQL + " ORDER BY a.account_id", [customer_id]).fetchall()
    return [_check(r, program) for r in rows]


def check_payer(
    conn: Connection, *, customer_id: int, account_id: int, program: ProgramInfo
) -> PayerCheck:
    """One of the customer's accounts, checked against a program.

    Raises:
        NotFoundError: Not the customer's account (or a challenge account, or
            none at all): the same answer.
    """
    row = conn.execute(
        _PAYER_SQL + " AND a.account_id = ?", [customer_id, account_id]
    ).fetchone()
    if row is None:
        raise NotFoundError(f"payer account {account_id} not found")
    return _check(row, program)


def ensure_eligible(check: PayerCheck, *, conflict: bool = False) -> None:
    """Refuse a payer that can't pay.

    Args:
        check: The payer, checked.
        conflict: Answer 409 (a retry) rather than 400 (a purchase).

    Raises:
        PurchaseError: ``payer_not_eligible`` (field ``payer_account_id``).
    """
    if not check.eligible:
        raise PurchaseError(
            "payer_not_eligible",
            f"account {check.account_id} can't pay: {check.reason}",
            field="payer_account_id",
            conflict=conflict,
            details={"reason": check.reason, "account_id": check.account_id},
        )


__all__ = [
    "PAYER_REASONS",
    "PayerCheck",
    "check_payer",
    "ensure_eligible",
    "payer_accounts",
]
