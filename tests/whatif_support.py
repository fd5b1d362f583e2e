"""What a tighter daily limit must do, worked out from the store alone.

Used by the what-if tests: under the demo's rules (``daily_reference`` =
``day_start_equity``, ``daily_loss_base`` = ``initial_balance``), a phase fails
the daily limit ``L`` on a day iff a tick's equity falls below
``cent(D - L * initial_balance)``, i.e. iff the day's loss ``(D - min_equity) /
initial_balance`` exceeds ``L`` (up to a cent). The store's daily snapshots hold
``D`` and ``min_equity`` of every evaluated day, so the accounts a tighter limit
fails follow from them without the engine or the what-if code.
"""

from __future__ import annotations

import json
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import duckdb
import polars as pl

from prop_stream.store.db import query_frame


def worst_daily_loss(db: Path) -> dict[int, tuple[str, float]]:
    """Per started phase's account: its recorded status and worst day's loss ratio.

    Args:
        db: The store (not held by a running service).

    Returns:
        ``{account_id: (status, ratio)}``; ratio 0 for a phase without a day.
    """
    conn = duckdb.connect(str(db), read_only=True)
    try:
        phases = conn.execute(
            "SELECT account_id, status, rules FROM challenge_phases "
            "WHERE account_id IS NOT NULL AND status <> 'pending'"
        ).fetchall()
        days = conn.execute(
            "SELECT account_id, daily_start_equity, min_equity "
            "FROM prop_daily_snapshots"
        ).fetchall()
    finally:
        conn.close()
    out: dict[int, tuple[str, float]] = {}
    for account_id, status, rules_text in phases:
        rules = json.loads(rules_text)
        assert rules["daily_reference"] == "day_start_equity"
        assert rules["daily_loss_base"] == "initial_balance"
        ib = float(rules["initial_balance"])
        worst = max(
            [(d - low) / ib for a, d, low in days if a == account_id], default=0.0
        )
        out[int(account_id)] = (str(status), worst)
    return out


def limit_failing(
    worst: dict[int, tuple[str, float]], min_gap: float = 1e-6
) -> tuple[float, set[int]]:
    """A daily limit that fails some, not all, of the phases not yet failed.

    It lies halfway across the widest gap between two consecutive worst days,
    so a cent of rounding can't move a phase across it.

    Args:
        worst: From :func:`worst_daily_loss`.
        min_gap: The smallest gap accepted (1e-6 of 50,000 is 5 cents).

    Returns:
        The limit and the accounts it fails (those whose worst day is above it).
    """
    ratios = sorted(
        (
            (ratio, account)
            for account, (status, ratio) in worst.items()
            if status != "failed"
        ),
        reverse=True,
    )
    assert len(ratios) >= 2, ratios
    gap, count = max(
        (ratios[i - 1][0] - ratios[i][0], i) for i in range(1, len(ratios))
    )
    assert gap > min_gap, ratios
    limit = (ratios[count - 1][0] + ratios[count][0]) / 2
    return limit, {account for _, account in ratios[:count]}


def peak_open_lots(db: Path, archive: Path) -> dict[int, tuple[str, float]]:
    """Per started phase's account: its status and the most lots it held open.

    Worked out from the deals alone (archived in ``archive/deals`` and still
    staged in the store), as ``rules.md`` defines open lots: the deals from the
    phase's start in ``ts`` order (ties in archive order, staged rows last),
    a repeated ``deal_id`` skipped, each volume in whole hundredths (half to
    even), an ``in`` deal adding to its position, an ``out`` deal taking off it
    down to 0.

    Args:
        db: The store (not held by a running service).
        archive: The archive's root (``DB.archive``).

    Returns:
        ``{account_id: (status, peak lots)}``; 0 for an account without deals.
    """
    conn = duckdb.connect(str(db), read_only=True)
    try:
        phases = conn.execute(
            "SELECT account_id, status, started_at FROM challenge_phases "
            "WHERE account_id IS NOT NULL AND status <> 'pending'"
        ).fetchall()
        staged = query_frame(
            conn,
            "SELECT account_id, ts, deal_id, position_id, volume, entry "
            "FROM deal_archive_staging ORDER BY stream, seq",
        )
    finally:
        conn.close()
    files = sorted((archive / "deals").rglob("*.parquet"))
    frames = [
        pl.read_parquet(f).select(
            "account_id", "ts", "deal_id", "position_id", "volume", "entry"
        )
        for f in files
    ]
    staged = staged.with_columns(
        pl.col("ts").dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    )
    deals = pl.concat([*frames, staged.cast(frames[0].schema)]).sort(
        "account_id", "ts", maintain_order=True
    )
    out: dict[int, tuple[str, float]] = {}
    for account_id, status, started_at in phases:
        mine = deals.filter(
            (pl.col("account_id") == account_id)
            & (pl.col("ts") >= pl.lit(started_at).dt.convert_time_zone("UTC"))
        )
        seen: set[int] = set()
        held: dict[int, int] = {}
        peak = 0
        for deal_id, position, volume, entry in mine.select(
            "deal_id", "position_id", "volume", "entry"
        ).iter_rows():
            if deal_id in seen:
                continue
            seen.add(deal_id)
            lots = int(
                (Decimal(volume) * 100).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
            )
            if entry == "in":
                held[position] = held.get(position, 0) + lots
            else:
                held[position] = max(0, held.get(position, 0) - lots)
            peak = max(peak, sum(held.values()))
        out[int(account_id)] = (str(status), peak / 100)
    return out
