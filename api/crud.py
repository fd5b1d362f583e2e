"""Reads of the store that the cold routes make (one request, one cursor).

Functions take keyword-only arguments and return JSON-ready dicts (money as
decimal strings); the hot challenge reads live in :mod:`api.cache` instead.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Final

from api.models import PurchaseCreate, PurchasePreviewCreate
from api.serialize import iso, metric_public, money, ratio
from prop_stream.rules import PhaseSpec
from prop_stream.store import (
    Bought,
    Connection,
    NotFoundError,
    PurchaseRecord,
    phase_spec,
    run_in_transaction,
)
from prop_stream.store import purchases as store_purchases

_PROGRAM_SQL: Final = """
    SELECT id, name, description, price, currency, active FROM programs
"""
_PROGRAM_PHASES_SQL: Final = """
    SELECT program_id, phase_index, name, phase_type, account_group, rules,
        profit_split
    FROM program_phases WHERE program_id IN (SELECT unnest(?::BIGINT[]))
    ORDER BY program_id, phase_index
"""


def _programs(conn: Connection, rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    ids = [int(r[0]) for r in rows]
    phases: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    funded_split: dict[int, str | None] = dict.fromkeys(ids)
    if ids:
        for pid, index, name, phase_type, group, rules, split in conn.execute(
            _PROGRAM_PHASES_SQL, [ids]
        ).fetchall():
            phases[int(pid)].append(
                {
                    "phase_index": int(index),
                    "name": name,
                    "phase_type": int(phase_type),
                    "account_group": group,
                    "rules": json.loads(rules),
                    "profit_split": ratio(split),
                }
            )
            if int(phase_type) == 1:
                funded_split[int(pid)] = ratio(split)
    return [
        {
            "id": int(pid),
            "name": name,
            "description": description,
            "price": money(price),
            "currency": currency,
            "active": bool(active),
            "profit_split": funded_split[int(pid)],
            "phases": phases[int(pid)],
        }
        for pid, name, description, price, currency, active in rows
    ]


def list_programs(
    *, session: Connection, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """A page of the active programs, by id.

    Args:
        session: A store cursor.
        limit: Page size.
        offset: Programs skipped.

    Returns:
        The programs (with phases and the computed ``profit_split``) and the total.
    """
    total_row = session.execute("SELECT count(*) FROM programs WHERE active").fetchone()
    rows = session.execute(
        _PROGRAM_SQL + " WHERE active ORDER BY id LIMIT ? OFFSET ?", [limit, offset]
    ).fetchall()
    return _programs(session, rows), int(total_row[0]) if total_row else 0


def get_program(*, session: Connection, program_id: int) -> dict[str, Any] | None:
    """One program with its phases, active or not.

    Args:
        session: A store cursor.
        program_id: The program.

    Returns:
        The program, or None.
    """
    rows = session.execute(_PROGRAM_SQL + " WHERE id = ?", [program_id]).fetchall()
    found = _programs(session, rows)
    return found[0] if found else None


_METRIC_COLUMNS: Final = """
    account_id, phase_index, ts, status, day, equity, balance, profit,
    daily_start_equity, daily_start_balance, daily_pnl, daily_loss_limit, daily_floor,
    daily_room, daily_paused, max_loss_limit, overall_floor, overall_room, hwm,
    trading_days, days_elapsed, best_day_profit, profit_target_level,
    profit_progress, trading_days_progress, open_lots, open_positions
"""


def list_metrics(
    *,
    session: Connection,
    challenge_id: int,
    limit: int,
    offset: int,
    from_: datetime | None = None,
    to: datetime | None = None,
    phase_index: int | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """A page of a challenge's metric history, newest first.

    Args:
        session: A store cursor.
        challenge_id: The challenge.
        limit: Page size.
        offset: Rows skipped.
        from_: Only rows with ``ts >= from_``.
        to: Only rows with ``ts < to``.
        phase_index: Only this phase's rows.

    Returns:
        The rows and the total count that match.
    """
    where = ["challenge_id = ?"]
    params: list[Any] = [challenge_id]
    if from_ is not None:
        where.append("ts >= ?")
        params.append(from_)
    if to is not None:
        where.append("ts < ?")
        params.append(to)
    if phase_index is not None:
        where.append("phase_index = ?")
        params.append(phase_index)
    clause = " AND ".join(where)
    total_row = session.execute(
        f"SELECT count(*) FROM metric_history WHERE {clause}",  # noqa: S608 - fixed clauses, values bound
        params,
    ).fetchone()
    cur = session.execute(
        f"SELECT {_METRIC_COLUMNS} FROM metric_history WHERE {clause} "  # noqa: S608 - fixed clauses, values bound
        "ORDER BY ts DESC, phase_index DESC, account_id DESC LIMIT ? OFFSET ?",
        [*params, limit, offset],
    )
    names = [d[0] for d in cur.description or ()]
    items = []
    for values in cur.fetchall():
        row = dict(zip(names, values, strict=True))
        item = {
            "phase_index": int(row["phase_index"]),
            "account_id": int(row["account_id"]),
        }
        item.update(metric_public(row))
        items.append(item)
    return items, int(total_row[0]) if total_row else 0


#: Rules whose threshold and actual are not money: days, lots or seconds.
_NOT_MONEY: Final = frozenset(
    {"time_limit", "max_position_size", "short_hold", "weekend_hold"}
)


def _figure(rule: str, value: float) -> str:
    # time_limit measures days, the deal rules lots or seconds: keep every digit;
    # the others are money.
    if rule in _NOT_MONEY:
        return repr(float(value))
    text = money(value)
    return text if text is not None else "0.00"


def list_breaches(
    *,
    session: Connection,
    challenge_id: int,
    limit: int,
    offset: int,
    phase_index: int | None = None,
    rule: str | None = None,
    severity: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """A page of a challenge's breaches, newest first.

    Args:
        session: A store cursor.
        challenge_id: The challenge.
        limit: Page size.
        offset: Rows skipped.
        phase_index: Only this phase's breaches.
        rule: Only this rule's.
        severity: Only ``warning`` or ``critical`` ones.

    Returns:
        The breaches and the total count that match.
    """
    where = ["challenge_id = ?"]
    params: list[Any] = [challenge_id]
    for column, value in (
        ("phase_index", phase_index),
        ("rule", rule),
        ("severity", severity),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    clause = " AND ".join(where)
    total_row = session.execute(
        f"SELECT count(*) FROM breaches WHERE {clause}",  # noqa: S608 - fixed clauses, values bound
        params,
    ).fetchone()
    rows = session.execute(
        "SELECT id, challenge_id, phase_index, account_id, breach_seq, rule, "  # noqa: S608 - fixed clauses, values bound
        "severity, threshold, actual, action, ts, resolved, resolved_ts "
        f"FROM breaches WHERE {clause} "
        "ORDER BY ts DESC, breach_seq DESC, account_id DESC LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    items = [
        {
            "id": int(bid),
            "challenge_id": int(cid),
            "phase_index": int(pidx),
            "account_id": int(account),
            "breach_seq": int(seq),
            "rule": rule_name,
            "severity": sev,
            "threshold": _figure(rule_name, threshold),
            "actual": _figure(rule_name, actual),
            "action": action,
            "ts": iso(ts),
            "resolved": bool(resolved),
            "resolved_ts": iso(resolved_ts),
        }
        for (
            bid,
            cid,
            pidx,
            account,
            seq,
            rule_name,
            sev,
            threshold,
            actual,
            action,
            ts,
            resolved,
            resolved_ts,
        ) in rows
    ]
    return items, int(total_row[0]) if total_row else 0


# ----------------------------------------------------------------- purchases


def purchase_public(record: PurchaseRecord) -> dict[str, Any]:
    """A purchase as JSON, with its lifecycle fields.

    Args:
        record: The purchase.

    Returns:
        The ``PurchasePublic`` object.
    """
    fields = store_purchases.lifecycle_fields(
        record.status, record.failure_reason, record.refund_status
    )
    return {
        "id": record.id,
        "program_id": record.program_id,
        "program_name": record.program_name,
        "payer_account_id": record.payer_account_id,
        "challenge_id": record.challenge_id,
        "price": money(record.price),
        "currency": record.currency,
        "status": record.status,
        "status_name": fields.status_name,
        "next_action": fields.next_action,
        "payment_status": fields.payment_status,
        "activation_status": fields.activation_status,
        "failure_reason": fields.failure_reason,
        "can_retry": fields.can_retry,
        "can_cancel": fields.can_cancel,
        "created_at": iso(record.created_at),
        "updated_at": iso(record.updated_at),
    }


def request_hash(body: PurchaseCreate) -> str:
    """The hash kept with an ``Idempotency-Key``: the body's canonical JSON."""
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_purchase(
    *,
    session: Connection,
    customer_id: int,
    purchase_in: PurchaseCreate,
    idempotency_key: str | None,
) -> tuple[dict[str, Any], Bought | None]:
    """BuyPropChallenge (idempotent per customer and key).

    Args:
        session: A store cursor, not in a transaction.
        customer_id: The buyer.
        purchase_in: The request body.
        idempotency_key: The ``Idempotency-Key`` header, if any.

    Returns:
        The purchase as JSON, and what was created (None when the key repeated
        an earlier request).
    """
    purchase_id, bought = store_purchases.purchase_once(
        session,
        customer_id=customer_id,
        program_id=purchase_in.program_id,
        payer_account_id=purchase_in.payer_account_id,
        now=datetime.now(UTC),
        idempotency_key=idempotency_key,
        request_hash=request_hash(purchase_in),
    )
    return read_purchase(
        session=session, customer_id=customer_id, purchase_id=purchase_id
    ), bought


def read_purchase(
    *, session: Connection, customer_id: int, purchase_id: int
) -> dict[str, Any]:
    """One of the customer's purchases as JSON.

    Raises:
        NotFoundError: Missing or someone else's.
    """
    record = store_purchases.get_purchase(
        session, purchase_id=purchase_id, customer_id=customer_id
    )
    if record is None:
        raise NotFoundError(f"purchase {purchase_id} not found")
    return purchase_public(record)


def list_purchases(
    *, session: Connection, customer_id: int, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """A page of the customer's purchases, newest first, and the total."""
    records, total = store_purchases.list_purchases(
        session, customer_id=customer_id, limit=limit, offset=offset
    )
    return [purchase_public(r) for r in records], total


def retry_purchase(
    *, session: Connection, customer_id: int, purchase_id: int
) -> Bought:
    """Retry a purchase whose payment failed (new fee job, account, challenge)."""
    record = store_purchases.get_purchase(
        session, purchase_id=purchase_id, customer_id=customer_id
    )
    if record is None:
        raise NotFoundError(f"purchase {purchase_id} not found")
    with store_purchases.payer_lock(record.payer_account_id):
        return run_in_transaction(
            session,
            lambda c: store_purchases.retry_purchase(
                c,
                customer_id=customer_id,
                purchase_id=purchase_id,
                now=datetime.now(UTC),
            ),
        )


def cancel_purchase(
    *, session: Connection, customer_id: int, purchase_id: int
) -> store_purchases.Cancelled:
    """Cancel a purchase that allows it."""
    return run_in_transaction(
        session,
        lambda c: store_purchases.cancel_purchase(
            c, customer_id=customer_id, purchase_id=purchase_id, now=datetime.now(UTC)
        ),
    )


def first_phase_spec(*, session: Connection, bought: Bought) -> PhaseSpec:
    """The engine's view of a purchase's first phase (after the commit)."""
    return phase_spec(session, challenge_id=bought.challenge_id, phase_index=0)


def payer_accounts(
    *, session: Connection, customer_id: int, program_id: int
) -> dict[str, Any]:
    """The customer's payer accounts for a program, eligible or with a reason.

    Raises:
        NotFoundError: No such program.
    """
    program = store_purchases.program_info(session, program_id=program_id)
    checks = store_purchases.payer_accounts(
        session, customer_id=customer_id, program=program
    )
    return {
        "program_id": program.id,
        "price": money(program.price),
        "currency": program.currency,
        "items": [_payer_public(c) for c in checks],
    }


def _payer_public(check: store_purchases.PayerCheck) -> dict[str, Any]:
    return {
        "account_id": check.account_id,
        "account_group": check.account_group,
        "kind": check.kind,
        "currency": check.currency,
        "balance": money(check.balance),
        "available": money(check.available),
        "eligible": check.eligible,
        "reason": check.reason,
    }


def preview_purchase(
    *, session: Connection, customer_id: int, preview_in: PurchasePreviewCreate
) -> dict[str, Any]:
    """What a purchase would withdraw, open and deposit, and whether it can.

    Raises:
        NotFoundError: No such program, or a payer that isn't the customer's.
    """
    program = store_purchases.program_info(session, program_id=preview_in.program_id)
    if preview_in.payer_account_id is not None:
        payer: store_purchases.PayerCheck | None = store_purchases.check_payer(
            session,
            customer_id=customer_id,
            account_id=preview_in.payer_account_id,
            program=program,
        )
    else:
        checks = store_purchases.payer_accounts(
            session, customer_id=customer_id, program=program
        )
        payer = next((c for c in checks if c.eligible), None)
    reason: str | None
    if not program.active:
        reason = "program_not_available"
    elif not program.valid:
        reason = "program_invalid"
    elif payer is None:
        reason = "no_eligible_account"
    else:
        reason = payer.reason
    first = program.phases[0].initial_balance if program.phases else None
    return {
        "program_id": program.id,
        "program_name": program.name,
        "price": money(program.price),
        "currency": program.currency,
        "payer_account_id": None if payer is None else payer.account_id,
        "eligible": reason is None,
        "reason": reason,
        "withdrawal": None
        if payer is None
        else {
            "account_id": payer.account_id,
            "amount": money(program.price),
            "currency": program.currency,
            "balance": money(payer.balance),
            "balance_after": money(payer.balance - program.price),
        },
        "initial_balance": money(first) or "0.00",
        "phases": [
            {
                "phase_index": p.phase_index,
                "name": p.name,
                "phase_type": p.phase_type,
                "account_group": p.account_group,
                "initial_balance": money(p.initial_balance),
            }
            for p in program.phases
        ],
    }


def list_flags(
    *,
    session: Connection,
    challenge_id: int,
    limit: int,
    offset: int,
    symbol: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """A page of the hedge flags of a challenge's accounts, newest first.

    A flag belongs to the challenge when either of its accounts is one of the
    challenge's phases' accounts.

    Args:
        session: A store cursor.
        challenge_id: The challenge.
        limit: Page size.
        offset: Rows skipped.
        symbol: Only this symbol's flags.

    Returns:
        The flags and the total count that match.
    """
    where = [
        "(account_id_1 IN (SELECT account_id FROM accounts) "
        "OR account_id_2 IN (SELECT account_id FROM accounts))"
    ]
    params: list[Any] = [challenge_id]
    if symbol is not None:
        where.append("symbol = ?")
        params.append(symbol)
    clause = " AND ".join(where)
    accounts = (
        "WITH accounts AS (SELECT account_id FROM challenge_phases "
        "WHERE challenge_id = ? AND account_id IS NOT NULL) "
    )
    total_row = session.execute(
        f"{accounts}SELECT count(*) FROM flags WHERE {clause}",  # noqa: S608 - fixed clauses, values bound
        params,
    ).fetchone()
    rows = session.execute(
        f"{accounts}SELECT symbol, account_id_1, deal_id_1, ts_1, side_1, "  # noqa: S608 - fixed clauses, values bound
        "account_id_2, deal_id_2, ts_2, side_2, gap_seconds "
        f"FROM flags WHERE {clause} "
        "ORDER BY greatest(ts_1, ts_2) DESC, account_id_1 DESC, deal_id_1 DESC, "
        "account_id_2 DESC, deal_id_2 DESC LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    items = [
        {
            "symbol": sym,
            "account_id_1": int(a1),
            "deal_id_1": int(d1),
            "ts_1": iso(t1),
            "side_1": s1,
            "account_id_2": int(a2),
            "deal_id_2": int(d2),
            "ts_2": iso(t2),
            "side_2": s2,
            "gap_seconds": float(gap),
            "severity": "warning",
            "action": "review",
        }
        for (sym, a1, d1, t1, s1, a2, d2, t2, s2, gap) in rows
    ]
    return items, int(total_row[0]) if total_row else 0
