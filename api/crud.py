"""Reads of the store that the cold routes make (one request, one cursor).

Functions take keyword-only arguments and return JSON-ready dicts (money as
decimal strings); the hot challenge reads live in :mod:`api.cache` instead.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Final

from api.serialize import iso, metric_public, money, ratio
from prop_stream.store import Connection

_PROGRAM_SQL: Final = """
    SELECT id, name, description, price, currency, active FROM programs
"""
_PROGRAM_PHASES_SQL: Final = """
    SELECT program_id, phase_index, name, phase_type, account_group, rules,
        profit_split
    FROM program_phases WHERE program_id IN (SELECT unnest(?))
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
    profit_progress, trading_days_progress
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


def _figure(rule: str, value: float) -> str:
    # time_limit measures days: keep every digit; the others are money.
    if rule == "time_limit":
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
