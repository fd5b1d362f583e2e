"""JSON for the API: money as decimal strings, UTC timestamps, fast encoding.

Every response body is built here as plain dicts and encoded once with
:func:`dumps` (``orjson`` when it is installed, the standard library otherwise), so
the hot routes can keep encoded bytes and skip FastAPI's response validation.

Conventions (``docs/api.md``):

- money (prices, balances, equity, floors, rooms, limits) is a decimal string
  rounded half-even to the cent: ``"100123.45"``; ``DECIMAL`` columns keep their
  exact value (``"499.00"``);
- the engine's ratios (``profit_progress``, ``trading_days_progress``) are
  numbers in ``[0, 1]``; ``profit_split``, a ``DECIMAL`` in the store, is a
  decimal string (``"0.8"``);
- timestamps are ISO 8601 in UTC with a ``Z``; days are ``YYYY-MM-DD``.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Final

_CENT: Final = Decimal("0.01")


def _stdlib_dumps(obj: object) -> bytes:
    return json.dumps(
        obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    ).encode("utf-8")


def _pick_dumps() -> Callable[[object], bytes]:
    try:
        # Optional accelerator; not a declared dependency (docs/api.md).
        orjson = importlib.import_module("orjson")
    except ImportError:
        return _stdlib_dumps
    encode: Callable[[object], bytes] = orjson.dumps
    return encode


#: Encode a JSON-ready object (dicts, lists, str, int, float, bool, None) to bytes.
dumps: Final = _pick_dumps()


def money(value: float | Decimal | None) -> str | None:
    """A money figure as a decimal string.

    Args:
        value: A float from the engine (rounded half-even to the cent, from its
            shortest decimal form) or a ``Decimal`` from the ledger (kept as is).

    Returns:
        The string, or None.
    """
    if value is None:
        return None
    if isinstance(value, Decimal):
        return str(value)
    if not math.isfinite(value):
        return None
    return str(Decimal(repr(value)).quantize(_CENT, ROUND_HALF_EVEN))


def ratio(value: Decimal | None) -> str | None:
    """A ``DECIMAL`` ratio (``profit_split``) as its shortest decimal string.

    Args:
        value: The ratio.

    Returns:
        ``"0.8"`` for ``Decimal("0.8000")``, or None.
    """
    if value is None:
        return None
    return format(value.normalize(), "f")


def number(value: float | None) -> float | None:
    """A float that JSON can carry (NaN and infinities become null)."""
    if value is None or not math.isfinite(value):
        return None
    return value


def iso(value: datetime | None) -> str | None:
    """A timestamp as ISO 8601 UTC with ``Z``.

    Args:
        value: An aware datetime (naive ones are taken as UTC).

    Returns:
        e.g. ``"2026-11-23T10:00:00.5Z"`` style text, or None.
    """
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat() + "Z"


def day(value: date | None) -> str | None:
    """A local day as ``YYYY-MM-DD``."""
    return None if value is None else value.isoformat()


#: Metric columns that are money, rendered with :func:`money`.
MONEY_METRICS: Final = (
    "equity",
    "balance",
    "profit",
    "daily_start_equity",
    "daily_start_balance",
    "daily_pnl",
    "daily_loss_limit",
    "daily_floor",
    "daily_room",
    "max_loss_limit",
    "overall_floor",
    "overall_room",
    "hwm",
    "best_day_profit",
    "profit_target_level",
)


def metric_public(row: Mapping[str, Any]) -> dict[str, Any]:
    """A metric row of the engine (``metrics_latest`` columns) as JSON.

    Args:
        row: The row.

    Returns:
        ``ts``, ``day``, ``status``, the money figures as decimal strings,
        ``daily_paused``, ``trading_days``, ``days_elapsed``, ``profit_progress``
        and ``trading_days_progress``.
    """
    out: dict[str, Any] = {
        "ts": iso(row["ts"]),
        "day": day(row["day"]),
        "status": row["status"],
    }
    for name in MONEY_METRICS:
        out[name] = money(row[name])
    out["daily_paused"] = bool(row["daily_paused"])
    out["trading_days"] = int(row["trading_days"])
    out["days_elapsed"] = int(row["days_elapsed"])
    out["profit_progress"] = number(row["profit_progress"])
    out["trading_days_progress"] = number(row["trading_days_progress"])
    out["open_lots"] = number(row.get("open_lots"))
    positions = row.get("open_positions")
    out["open_positions"] = None if positions is None else int(positions)
    return out


def _cent(value: float) -> float:
    # rules.md: floors and levels are rounded to the cent in binary64.
    return round(value * 100) / 100


def progress_public(
    rules: Mapping[str, Any], row: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A phase's progress: profit and trading days, daily and overall room left.

    From the latest metric when there is one; before the first tick, from the
    rules (nothing gained, the whole room left; ``days_elapsed`` and a daily room
    measured from the day's reference are unknown, so null).

    Args:
        rules: The phase's rules (defaults filled in).
        row: Its latest metric row, or None.

    Returns:
        ``profit_progress``, ``trading_days_progress``, ``trading_days``,
        ``min_trading_days``, ``profit``, ``profit_target_level``, ``daily_room``,
        ``daily_loss_limit``, ``overall_room``, ``max_loss_limit``,
        ``days_elapsed``, ``max_days``, ``trading_day_basis``, ``open_lots``,
        ``max_open_lots``.
    """
    min_days = int(rules.get("min_trading_days") or 0)
    max_days = rules.get("max_days")
    deals = {
        "trading_day_basis": rules.get("trading_day_basis") or "activity",
        "open_lots": None if row is None else number(row.get("open_lots")),
        "max_open_lots": number(rules.get("max_open_lots")),
    }
    if row is not None:
        return {
            "profit_progress": number(row["profit_progress"]),
            "trading_days_progress": number(row["trading_days_progress"]),
            "trading_days": int(row["trading_days"]),
            "min_trading_days": min_days,
            "profit": money(row["profit"]),
            "profit_target_level": money(row["profit_target_level"]),
            "daily_room": money(row["daily_room"]),
            "daily_loss_limit": money(row["daily_loss_limit"]),
            "overall_room": money(row["overall_room"]),
            "max_loss_limit": money(row["max_loss_limit"]),
            "days_elapsed": int(row["days_elapsed"]),
            "max_days": max_days,
            **deals,
        }
    initial = float(rules["initial_balance"])
    target = rules.get("profit_target")
    daily = rules.get("max_daily_loss")
    total = rules.get("max_total_loss")
    daily_limit = None
    if daily is not None and rules.get("daily_loss_base") == "initial_balance":
        daily_limit = float(daily) * initial
    overall_limit = None if total is None else float(total) * initial
    return {
        "profit_progress": None if target is None else 0.0,
        "trading_days_progress": 1.0 if min_days == 0 else 0.0,
        "trading_days": 0,
        "min_trading_days": min_days,
        "profit": money(0.0),
        "profit_target_level": None
        if target is None
        else money(_cent(initial * (1 + float(target)))),
        "daily_room": money(daily_limit),
        "daily_loss_limit": money(daily_limit),
        "overall_room": money(overall_limit),
        "max_loss_limit": money(overall_limit),
        "days_elapsed": None,
        "max_days": max_days,
        **deals,
    }


def page(items: list[Any], *, total: int, offset: int) -> bytes:
    """An encoded page: ``{"items", "total_count", "has_more"}``.

    Args:
        items: The page's JSON-ready items.
        total: How many match in all.
        offset: How many were skipped.

    Returns:
        JSON bytes.
    """
    return dumps(
        {
            "items": items,
            "total_count": total,
            "has_more": offset + len(items) < total,
        }
    )


def page_of_bodies(bodies: list[bytes], *, total: int, offset: int) -> bytes:
    """An encoded page from items that are already encoded.

    Args:
        bodies: The page's items, each encoded JSON.
        total: How many match in all.
        offset: How many were skipped.

    Returns:
        JSON bytes.
    """
    more = b"true" if offset + len(bodies) < total else b"false"
    return (
        b'{"items":['
        + b",".join(bodies)
        + b'],"total_count":'
        + str(total).encode()
        + b',"has_more":'
        + more
        + b"}"
    )
