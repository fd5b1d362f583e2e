"""Generated backtest inputs: a rules document and random-walk ticks.

Every rule that moves a floor is varied across the accounts (static and trailing
overall floors, each daily reference and base, pause and fail, time zones with a
rollover), and the walks are wide enough that some accounts pass, some fail on
each rule and some stay active.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

START = datetime(2026, 3, 2, tzinfo=UTC)

_VARIANTS: list[dict[str, Any]] = [
    {"max_total_loss": 0.08, "total_loss_mode": "static", "max_daily_loss": 0.04},
    {"max_total_loss": 0.06, "total_loss_mode": "trailing"},
    {
        "max_total_loss": 0.07,
        "total_loss_mode": "trailing_eod",
        "max_daily_loss": 0.03,
        "daily_reference": "day_start_balance",
    },
    {
        "max_daily_loss": 0.02,
        "daily_reference": "day_start_max",
        "daily_loss_base": "day_start",
        "daily_loss_action": "pause",
        "timezone": "America/New_York",
        "day_rollover": "17:00",
    },
    {
        "max_total_loss": 0.1,
        "total_loss_mode": "trailing",
        "max_daily_loss": 0.05,
        "timezone": "Europe/Prague",
        "warning_level": 0.5,
    },
]


def generate(
    accounts: int, ticks_per_account: int, seed: int = 7, days: int = 6
) -> tuple[dict[str, Any], pl.DataFrame]:
    """A rules document and a shuffled tick frame (with a few unknown accounts)."""
    rng = np.random.default_rng(seed)
    docs: list[dict[str, Any]] = []
    for i in range(accounts):
        ib = float(rng.choice([10_000, 25_000, 100_000]))
        rules: dict[str, Any] = {"initial_balance": ib, **_VARIANTS[i % len(_VARIANTS)]}
        if i % 3 != 2:
            rules["profit_target"] = 0.04
            rules["min_trading_days"] = int(i % 3)
        docs.append(
            {
                "account_id": 5000 + i,
                "challenge_id": f"c-{i}",
                "phase_index": i % 2,
                "started_at": (START + timedelta(hours=i % 5)).isoformat(),
                "rules": rules,
            }
        )
    span_us = days * 86_400_000_000
    ids: list[npt.NDArray[np.int64]] = []
    stamps: list[npt.NDArray[np.int64]] = []
    equity: list[npt.NDArray[np.float64]] = []
    balance: list[npt.NDArray[np.float64]] = []
    for i, doc in enumerate(docs):
        ib = doc["rules"]["initial_balance"]
        # Ticks start an hour before the phase: the first few are late.
        offsets = np.sort(rng.integers(0, span_us, ticks_per_account))
        ts0 = int((START - timedelta(hours=1)).timestamp() * 1_000_000)
        steps = rng.normal(0.0, ib * (0.002 + 0.001 * (i % 4)), ticks_per_account)
        eq = ib + np.cumsum(steps)
        # Balance follows equity in coarse steps (closed trades), so days trade.
        bal = np.round(eq[(np.arange(ticks_per_account) // 7) * 7], 2)
        ids.append(np.full(ticks_per_account, doc["account_id"], dtype=np.int64))
        stamps.append(ts0 + offsets)
        equity.append(np.round(eq, 2))
        balance.append(bal)
        if i % 4 == 0:  # repeated timestamps: ties keep input order
            stamps[-1][1::9] = stamps[-1][0:-1:9][: len(stamps[-1][1::9])]
            stamps[-1].sort()
    frame = pl.DataFrame(
        {
            "account_id": np.concatenate([*ids, np.full(3, 999, dtype=np.int64)]),
            "ts": np.concatenate([*stamps, np.full(3, stamps[0][0])]),
            "equity": np.concatenate([*equity, np.ones(3)]),
            "balance": np.concatenate([*balance, np.ones(3)]),
        }
    ).with_columns(pl.from_epoch("ts", time_unit="us").dt.replace_time_zone("UTC"))
    order = rng.permutation(frame.height)
    return {"accounts": docs}, frame[order.tolist()]
