"""The scenario behind ``snapshot_v1.bin``, an engine snapshot from before deals.

``snapshot_v1.bin`` was written by the engine build of main before issue 11 (snapshot
format v1, magic ``PSENG\\x00\\x01\\x00``) with::

    cp /work/main/prop_stream/_core*.so /tmp/v1/prop_stream/   # a pre-deals build
    PYTHONPATH=/tmp/v1:$PWD python tests/core/data/snapshot_v1.py

It holds :data:`PHASES` after :data:`TICKS_BEFORE`; ``test_deal_agreement.py``
restores it with today's build and checks that going on with :data:`TICKS_AFTER`
gives what an uninterrupted run of today's build gives.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from prop_stream import PhaseSpec, RuleEngine

START = datetime(2026, 1, 5, tzinfo=UTC)
US_PER_HOUR = 3_600_000_000
T0 = 1_767_571_200_000_000  # 2026-01-05 00:00 UTC

PHASES = (
    PhaseSpec(
        account_id=7001,
        challenge_id="c-v1-a",
        phase_index=0,
        started_at=START,
        rules={
            "initial_balance": 100_000,
            "profit_target": 0.1,
            "max_daily_loss": 0.05,
            "max_total_loss": 0.1,
            "total_loss_mode": "trailing",
            "warning_level": 0.8,
            "min_trading_days": 2,
            "timezone": "Europe/Prague",
            "day_rollover": "17:00",
        },
    ),
    PhaseSpec(
        account_id=7002,
        challenge_id="c-v1-b",
        phase_index=1,
        started_at=START,
        rules={
            "initial_balance": 50_000,
            "max_daily_loss": 0.04,
            "daily_loss_action": "pause",
            "max_days": 30,
        },
    ),
)

#: ``(account_id, ts µs, equity, balance)``.
TICKS_BEFORE = (
    (7001, T0 + 1 * US_PER_HOUR, 100_500.0, 100_000.0),
    (7002, T0 + 1 * US_PER_HOUR, 49_000.0, 50_000.0),
    (7001, T0 + 20 * US_PER_HOUR, 101_000.0, 101_000.0),
    (7002, T0 + 21 * US_PER_HOUR, 47_900.0, 50_000.0),
    (7001, T0 + 30 * US_PER_HOUR, 93_200.0, 101_000.0),
)
TICKS_AFTER = (
    (7001, T0 + 31 * US_PER_HOUR, 104_000.0, 104_000.0),
    (7002, T0 + 30 * US_PER_HOUR, 48_500.0, 48_500.0),
    (7001, T0 + 50 * US_PER_HOUR, 110_000.0, 110_000.0),
    (7002, T0 + 50 * US_PER_HOUR, 51_000.0, 51_000.0),
)


def ticks_table(ticks: tuple[tuple[int, int, float, float], ...]) -> pl.DataFrame:
    """The ticks as a batch in the engine's schema."""
    return pl.DataFrame(
        {
            "account_id": [t[0] for t in ticks],
            "ts": [t[1] for t in ticks],
            "equity": [t[2] for t in ticks],
            "balance": [t[3] for t in ticks],
        },
        schema={
            "account_id": pl.Int64,
            "ts": pl.Int64,
            "equity": pl.Float64,
            "balance": pl.Float64,
        },
    ).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))


def engine_before() -> RuleEngine:
    """A fresh engine with :data:`PHASES` after :data:`TICKS_BEFORE`."""
    engine = RuleEngine()
    for spec in PHASES:
        engine.register(spec)
    engine.process(ticks_table(TICKS_BEFORE))
    return engine


if __name__ == "__main__":
    out = Path(__file__).with_name("snapshot_v1.bin")
    out.write_bytes(engine_before().snapshot())
    print(f"wrote {out}")
