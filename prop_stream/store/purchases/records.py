"""The ``purchases`` table: every statement on it, and the record the API shows.

The rest of the package reads and writes purchases only through these
functions, so the table's SQL is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from prop_stream.store.db import Connection
from prop_stream.store.jobs import updated_rows
from prop_stream.store.lifecycle import CHALLENGE_ACTIVE, CHALLENGE_PASSED
from prop_stream.store.purchases.status import (
    PURCHASE_ACCOUNT_CREATED,
    PURCHASE_PENDING,
    PURCHASE_STATUS_NAMES,
)


@dataclass(frozen=True, slots=True)
class PurchaseRecord:
    """A purchase as the API shows it.

    Attributes:
        refund_status: The status of its refund job, None without one.
    """

    id: int
    customer_id: int
    program_id: int
    program_name: str
    payer_account_id: int
    challenge_id: int | None
    status: int
    price: Decimal
    currency: str
    failure_reason: str | None
    refund_status: str | None
    created_at: datetime
    updated_at: datetime

    @property
    def status_name(self) -> str:
        """The status's name."""
        return PURCHASE_STATUS_NAMES[self.status]


_PURCHASE_SQL: Final = """
    SELECT p.id, p.customer_id, p.program_id, pr.name, p.payer_account_id,
        (SELECT max(c.id) FROM challenges AS c WHERE c.purchase_id = p.id),
        p.status, p.price, p.currency, p.failure_reason,
        (SELECT max(j.status) FROM jobs AS j
            WHERE j.purchase_id = p.id AND j.kind = 'refund'),
        p.created_at, p.updated_at
    FROM purchases AS p JOIN programs AS pr ON pr.id = p.program_id
"""


def _record(row: tuple[Any, ...]) -> PurchaseRecord:
    return PurchaseRecord(
        id=int(row[0]),
        customer_id=int(row[1]),
        program_id=int(row[2]),
        program_name=str(row[3]),
        payer_account_id=int(row[4]),
        challenge_id=None if row[5] is None else int(row[5]),
        status=int(row[6]),
        price=Decimal(str(row[7])),
        currency=str(row[8]),
        failure_reason=row[9],
        refund_status=row[10],
        created_at=row[11],
        updated_at=row[12],
    )


def get_purchase(
    conn: Connection, *, purchase_id: int, customer_id: int | None = None
) -> PurchaseRecord | None:
    """One purchase; None when missing or (with ``customer_id``) someone else's."""
    sql = _PURCHASE_SQL + " WHERE p.id = ?"
    params: list[Any] = [purchase_id]
    if customer_id is not None:
        sql += " AND p.customer_id = ?"
        params.append(customer_id)
    row = conn.execute(sql, params).fetchone()
    return None if row is None else _record(row)


def list_purchases(
    conn: Connection, *, customer_id: int, limit: int, offset: int
) -> tuple[list[PurchaseRecord], int]:
    """A page of a customer's purchases, newest first, and their total."""
    total = conn.execute(
        "SELECT count(*) FROM purchases WHERE customer_id = ?", [customer_id]
    ).fetchone()
    rows = conn.execute(
        _PURCHASE_SQL + " WHERE p.customer_id = ? "
        "ORDER BY p.created_at DESC, p.id DESC LIMIT ? OFFSET ?",
        [customer_id, limit, offset],
    ).fetchall()
    return [_record(r) for r in rows], int(total[0]) if total else 0


def insert_purchase(
    conn: Connection,
    *,
    customer_id: int,
    program_id: int,
    payer_account_id: int,
    price: Decimal,
    currency: str,
    now: datetime,
    idempotency_key: str | None,
    request_hash: str | None,
) -> int:
    """Write a new ``pending`` purchase.

    Returns:
        Its id.
    """
    row = conn.execute(
        "INSERT INTO purchases (customer_id, program_id, payer_account_id, status, "
        "price, currency, idempotency_key, request_hash, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        [
            customer_id,
            program_id,
            payer_account_id,
            PURCHASE_PENDING,
            price,
            currency,
            idempotency_key,
            request_hash,
            now,
            now,
        ],
    ).fetchone()
    assert row is not None  # noqa: S101 - INSERT ... RETURNING returns the row
    return int(row[0])


def purchase_by_key(
    conn: Connection, *, customer_id: int, key: str
) -> tuple[int, str | None] | None:
    """The purchase a customer made with an ``Idempotency-Key``.

    Returns:
        Its id and the request hash kept with the key, or None.
    """
    row = conn.execute(
        "SELECT id, request_hash FROM purchases "
        "WHERE customer_id = ? AND idempotency_key = ?",
        [customer_id, key],
    ).fetchone()
    return None if row is None else (int(row[0]), row[1])


def purchase_status(conn: Connection, purchase_id: int) -> int | None:
    """A purchase's status; None when there is no such purchase."""
    row = conn.execute(
        "SELECT status FROM purchases WHERE id = ?", [purchase_id]
    ).fetchone()
    return None if row is None else int(row[0])


def set_status(
    conn: Connection,
    purchase_id: int,
    status: int,
    now: datetime,
    *,
    reason: str | None = None,
    when: tuple[int, ...] | None = None,
) -> bool:
    """Move a purchase to ``status`` with its ``failure_reason`` (None clears it).

    Args:
        conn: The connection.
        purchase_id: The purchase.
        status: The new status.
        now: Its ``updated_at``.
        reason: The failure reason.
        when: Only from one of these statuses (a compare-and-set); None: always.

    Returns:
        Whether the purchase changed.
    """
    sql = (
        "UPDATE purchases SET status = ?, failure_reason = ?, updated_at = ? "
        "WHERE id = ?"
    )
    params: list[Any] = [status, reason, now, purchase_id]
    if when is not None:
        sql += " AND status IN (SELECT unnest(?::INTEGER[]))"
        params.append(list(when))
    return updated_rows(conn, sql, params) > 0


def funded_purchases(conn: Connection) -> list[int]:
    """Purchases whose first phase is funded and whose challenge runs, by id."""
    rows = conn.execute(
        "SELECT id FROM purchases WHERE status = ? AND id IN ("
        "SELECT purchase_id FROM challenges WHERE status IN (?, ?) "
        "AND purchase_id IS NOT NULL) ORDER BY id",
        [PURCHASE_ACCOUNT_CREATED, CHALLENGE_ACTIVE, CHALLENGE_PASSED],
    ).fetchall()
    return [int(r[0]) for r in rows]


def status_counts(conn: Connection) -> dict[int, int]:
    """How many purchases are in each status (statuses with none are absent)."""
    return {
        int(status): int(n)
        for status, n in conn.execute(
            "SELECT status, count(*) FROM purchases GROUP BY status"
        ).fetchall()
    }


__all__ = [
    "PurchaseRecord",
    "funded_purchases",
    "get_purchase",
    "insert_purchase",
    "list_purchases",
    "purchase_by_key",
    "purchase_status",
    "set_status",
    "status_counts",
]
