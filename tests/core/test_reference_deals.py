"""Worked examples of the deal rules and hedge flags, computed by hand from rules.md.

Every example runs through the plain-Python deal reference
(``tests/reference_deals.py``); ``test_deal_agreement.py`` runs the Rust engine
on the same table and holds the two equal. The property tests at the end check
the reference against itself: batching, redelivered deals and input order change
nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import BreachRow, Counts, Tick, TransitionRow
from reference_deals import (
    Deal,
    DealCounts,
    DealReferenceEngine,
    Event,
    FlagRow,
    breach_list,
    hedge_flags,
    hundredths,
    merge_events,
    run_deal_reference,
    split_rules,
)

from prop_stream import PhaseSpec

ACCOUNT = 1001
OTHER = 1002
CHALLENGE = "c-1"
START = "2026-01-05 00:00"  # a Monday
#: The week New York springs forward (Sunday 2026-03-08): Friday 03-06 17:00 EST is
#: 22:00 UTC, Friday 03-13 17:00 EDT is 21:00 UTC.
NY_START = "2026-03-02 00:00"
IB = 100_000.0


def at(text: str) -> int:
    """UTC microseconds of ``YYYY-MM-DD HH:MM[:SS[.ffffff]]``."""
    moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def phase(
    start: str = START, account: int = ACCOUNT, challenge: str = CHALLENGE, **rules: Any
) -> PhaseSpec:
    return PhaseSpec(
        account_id=account,
        challenge_id=challenge,
        phase_index=0,
        started_at=datetime.fromisoformat(start).replace(tzinfo=UTC),
        rules={"initial_balance": 100_000, **rules},
    )


def tick(when: str, equity: float = IB, balance: float = IB) -> Tick:
    return (ACCOUNT, at(when), equity, balance)


def deal(
    when: str,
    deal_id: int,
    position_id: int,
    entry: str = "in",
    volume: float = 1.0,
    side: str = "buy",
    symbol: str = "EURUSD",
    account: int = ACCOUNT,
) -> Deal:
    return Deal(
        account_id=account,
        ts=at(when),
        deal_id=deal_id,
        position_id=position_id,
        symbol=symbol,
        side=side,
        volume=volume,
        price=1.0843,
        entry=entry,
    )


#: An expected breach: (rule, action, threshold, actual, when).
Expected = tuple[str, str, float, float, str]


def breach_row(seq: int, expected: Expected) -> BreachRow:
    rule, action, threshold, actual, when = expected
    return BreachRow(
        account_id=ACCOUNT,
        challenge_id=CHALLENGE,
        phase_index=0,
        breach_seq=seq,
        rule=rule,
        severity="warning" if action == "notify" else "critical",
        threshold=threshold,
        actual=actual,
        action=action,
        ts=at(when),
        resolved=False,
        resolved_ts=None,
    )


@dataclass
class Case:
    """One hand-computed example of one account."""

    events: list[Event]
    rules: dict[str, Any] = field(default_factory=dict)
    breaches: list[Expected] = field(default_factory=list)
    #: The phase's transition, if any: (status, when).
    ends: tuple[str, str] | None = None
    start: str = START
    #: Expected values of some fields of the account's DealPhaseRow.
    deal_row: dict[str, Any] = field(default_factory=dict)
    #: Expected values of some fields of the account's PhaseRow.
    phase_row: dict[str, Any] = field(default_factory=dict)
    #: Expected values of some fields of the run's DealCounts / tick Counts.
    deal_counts: dict[str, Any] = field(default_factory=dict)
    tick_counts: dict[str, Any] = field(default_factory=dict)


NY = {"timezone": "America/New_York", "weekend_close": "FRI 17:00"}

CASES: dict[str, Case] = {
    # ----------------------------------------------------------- max_position_size
    "lots exactly at the limit": Case(
        rules={"max_open_lots": 1.5},
        events=[
            deal("2026-01-05 10:00", 1, 1),
            deal("2026-01-05 10:01", 2, 2, volume=0.5),
        ],
        deal_row={"open_lots": 1.5, "open_positions": 2, "deals": 2},
    ),
    "lots one hundredth over the limit fails": Case(
        rules={"max_open_lots": 1.5},
        events=[
            deal("2026-01-05 10:00", 1, 1),
            deal("2026-01-05 10:01", 2, 2, volume=0.51),
            deal("2026-01-05 10:02", 3, 3),  # after the end: not processed
        ],
        breaches=[("max_position_size", "phase_failed", 1.5, 1.51, "2026-01-05 10:01")],
        ends=("failed", "2026-01-05 10:01"),
        deal_row={"open_lots": 1.51, "deals": 2},
        deal_counts={"processed": 2, "inactive": 1},
    ),
    "lots over the limit under flag: once per position, the phase goes on": Case(
        rules={"max_open_lots": 1.5, "deal_violation_action": "flag"},
        events=[
            deal("2026-01-05 10:00", 1, 1, volume=2.0),
            deal("2026-01-05 10:01", 2, 1, volume=0.5),  # same position: once
            deal("2026-01-05 10:02", 3, 2, volume=0.01),  # another position: again
        ],
        breaches=[
            ("max_position_size", "notify", 1.5, 2.0, "2026-01-05 10:00"),
            ("max_position_size", "notify", 1.5, 2.51, "2026-01-05 10:02"),
        ],
        deal_row={"open_lots": 2.51, "open_positions": 2},
    ),
    "volume rounds in binary64: 1.005 lots are 100 hundredths, at the limit": Case(
        rules={"max_open_lots": 1.0},
        events=[deal("2026-01-05 10:00", 1, 1, volume=1.005)],
        deal_row={"open_lots": 1.0},
    ),
    "volume rounds half even: 0.125 lots are 12 hundredths": Case(
        rules={"max_open_lots": 0.12},
        events=[deal("2026-01-05 10:00", 1, 1, volume=0.125)],
        deal_row={"open_lots": 0.12},
    ),
    "a reduced position frees room under the limit": Case(
        rules={"max_open_lots": 1.0},
        events=[
            deal("2026-01-05 10:00", 1, 1),
            deal("2026-01-05 10:01", 2, 1, entry="out", volume=0.3, side="sell"),
            deal("2026-01-05 10:02", 3, 2, volume=0.3),
        ],
        deal_row={"open_lots": 1.0, "open_positions": 2},
    ),
    "an in deal adds to the open position whatever its side and symbol": Case(
        rules={"max_open_lots": 1.5},
        events=[
            deal("2026-01-05 10:00", 1, 1),
            deal("2026-01-05 10:01", 2, 1, side="sell", symbol="GBPUSD"),
        ],
        breaches=[("max_position_size", "phase_failed", 1.5, 2.0, "2026-01-05 10:01")],
        ends=("failed", "2026-01-05 10:01"),
        deal_row={"open_positions": 1},
    ),
    # ------------------------------------------------------------------ short_hold
    "held exactly the minimum": Case(
        rules={"min_hold_seconds": 60},
        events=[
            deal("2026-01-05 10:00", 1, 1),
            deal("2026-01-05 10:01", 2, 1, entry="out", side="sell"),
        ],
        deal_row={"open_lots": 0.0, "open_positions": 0, "deals": 2},
    ),
    "held one microsecond less than the minimum fails": Case(
        rules={"min_hold_seconds": 60},
        events=[
            deal("2026-01-05 10:00", 1, 1),
            deal("2026-01-05 10:00:59.999999", 2, 1, entry="out", side="sell"),
        ],
        breaches=[
            (
                "short_hold",
                "phase_failed",
                60.0,
                59.999999,
                "2026-01-05 10:00:59.999999",
            )
        ],
        ends=("failed", "2026-01-05 10:00:59.999999"),
    ),
    "short hold under flag: a warning, the phase goes on": Case(
        rules={"min_hold_seconds": 60, "deal_violation_action": "flag"},
        events=[
            deal("2026-01-05 10:00", 1, 1),
            deal("2026-01-05 10:00:05", 2, 1, entry="out", side="sell"),
        ],
        breaches=[("short_hold", "notify", 60.0, 5.0, "2026-01-05 10:00:05")],
    ),
    "a partial close is not a close; the last out is": Case(
        rules={"min_hold_seconds": 60},
        events=[
            deal("2026-01-05 10:00", 1, 1),
            deal("2026-01-05 10:00:10", 2, 1, entry="out", volume=0.4),
            deal("2026-01-05 10:00:30", 3, 1, entry="out", volume=0.6),
        ],
        breaches=[("short_hold", "phase_failed", 60.0, 30.0, "2026-01-05 10:00:30")],
        ends=("failed", "2026-01-05 10:00:30"),
    ),
    "an out larger than the position closes it (never below zero)": Case(
        rules={"min_hold_seconds": 60},
        events=[
            deal("2026-01-05 10:00", 1, 1),
            deal("2026-01-05 10:05", 2, 1, entry="out", volume=5.0),
        ],
        deal_row={"open_lots": 0.0, "open_positions": 0, "unmatched_deals": 0},
    ),
    "adding keeps opened_at at the first in deal": Case(
        rules={"min_hold_seconds": 60},
        events=[
            deal("2026-01-05 10:00", 1, 1),
            deal("2026-01-05 10:00:50", 2, 1),
            deal("2026-01-05 10:01", 3, 1, entry="out", volume=2.0),
        ],
    ),
    "a reopened position is new: its own opened_at, its own breach": Case(
        rules={"min_hold_seconds": 60, "deal_violation_action": "flag"},
        events=[
            deal("2026-01-05 10:00", 1, 7),
            deal("2026-01-05 10:05", 2, 7, entry="out"),
            deal("2026-01-05 10:05:10", 3, 7),
            deal("2026-01-05 10:05:20", 4, 7, entry="out"),
            deal("2026-01-05 10:06", 5, 7),
            deal("2026-01-05 10:06:01", 6, 7, entry="out"),
        ],
        breaches=[
            ("short_hold", "notify", 60.0, 10.0, "2026-01-05 10:05:20"),
            ("short_hold", "notify", 60.0, 1.0, "2026-01-05 10:06:01"),
        ],
        deal_row={"deals": 6, "open_positions": 0},
    ),
    # ------------------------------------------------------------- unmatched outs
    "out deals for positions not open are unmatched but processed": Case(
        events=[
            deal("2026-01-05 10:00", 1, 9, entry="out"),
            deal("2026-01-05 10:01", 2, 1),
            deal("2026-01-05 10:02", 3, 1, entry="out"),
            deal("2026-01-05 10:03", 4, 1, entry="out"),  # closed: unmatched
            tick("2026-01-05 10:02:30"),  # older than the unmatched out: late
        ],
        deal_row={"deals": 4, "unmatched_deals": 2, "open_positions": 0},
        phase_row={"ticks": 0, "late_ticks": 1},
        deal_counts={"processed": 4, "unmatched": 2},
    ),
    # ------------------------------------------------------- duplicates and lateness
    "a repeated deal_id changes nothing, not even the last event time": Case(
        rules={"max_open_lots": 1.5},
        events=[
            deal("2026-01-05 10:00", 1, 1),
            tick("2026-01-05 10:01"),
            deal("2026-01-05 09:00", 1, 1),  # duplicate, never late
            deal("2026-01-05 11:00", 1, 1),  # duplicate, though newer
            tick("2026-01-05 10:30"),  # not late: the duplicates moved nothing
        ],
        deal_row={"deals": 1, "duplicate_deals": 2, "late_deals": 0, "open_lots": 1.0},
        phase_row={"ticks": 2, "late_ticks": 0},
        deal_counts={"processed": 1, "duplicate": 2, "late": 0},
    ),
    "a deal older than the last event, or before the start, is late": Case(
        start="2026-01-05 09:00",
        events=[
            deal("2026-01-05 08:59", 1, 1),  # before the phase start
            tick("2026-01-05 10:00"),
            deal("2026-01-05 09:59:59.999999", 2, 2),  # older than the tick
            deal("2026-01-05 10:00", 3, 3),  # same ts as the last event: processed
            deal("2026-01-05 09:00", 2, 2),  # deal 2 was never processed: late again
        ],
        deal_row={"deals": 1, "late_deals": 3, "duplicate_deals": 0, "open_lots": 1.0},
        deal_counts={"processed": 1, "late": 3},
    ),
    "a late deal's deal_id is not taken": Case(
        events=[
            tick("2026-01-05 10:00"),
            deal("2026-01-05 09:00", 1, 1),
            deal("2026-01-05 10:01", 1, 1),
        ],
        deal_row={"deals": 1, "late_deals": 1, "duplicate_deals": 0, "open_lots": 1.0},
    ),
    # --------------------------------------------------------------- weekend_hold
    "weekend close in New York's DST week: W is 21:00 UTC, not 22:00": Case(
        start=NY_START,
        rules=NY,
        events=[
            deal("2026-03-13 20:00", 1, 1),
            deal("2026-03-13 21:30", 2, 1, entry="out"),
        ],
        breaches=[("weekend_hold", "phase_failed", 0.0, 1.0, "2026-03-13 21:00")],
        ends=("failed", "2026-03-13 21:00"),
        # The revealing out deal comes after the end: not processed.
        deal_row={"deals": 1, "open_lots": 1.0},
        deal_counts={"processed": 1, "inactive": 1},
    ),
    "a close exactly at W was still held": Case(
        start=NY_START,
        rules=NY,
        events=[
            deal("2026-03-13 20:00", 1, 1),
            deal("2026-03-13 21:00", 2, 1, entry="out"),
        ],
        breaches=[("weekend_hold", "phase_failed", 0.0, 1.0, "2026-03-13 21:00")],
        ends=("failed", "2026-03-13 21:00"),
        deal_row={"deals": 1, "open_lots": 1.0},
    ),
    "a close one microsecond before W is not held": Case(
        start=NY_START,
        rules=NY,
        events=[
            deal("2026-03-13 20:00", 1, 1),
            deal("2026-03-13 20:59:59.999999", 2, 1, entry="out"),
            tick("2026-03-16 14:00"),
        ],
        deal_row={"deals": 2, "open_lots": 0.0},
        phase_row={"ticks": 1},
    ),
    "a position opened exactly at W was not held over it": Case(
        start=NY_START,
        rules=NY,
        events=[
            deal("2026-03-13 21:00", 1, 1),
            tick("2026-03-16 14:00"),
        ],
        phase_row={"ticks": 1},
    ),
    "the week before the change: W is 22:00 UTC (EST)": Case(
        start=NY_START,
        rules=NY,
        events=[
            deal("2026-03-06 21:30", 1, 1),
            deal("2026-03-06 21:59:59.999999", 2, 1, entry="out"),
        ],
        deal_row={"deals": 2, "open_lots": 0.0},
    ),
    "weekend fail revealed by a tick: the tick is not processed": Case(
        start=NY_START,
        rules={**NY, "max_open_lots": 5},
        events=[
            deal("2026-03-13 20:00", 1, 1, volume=0.25),
            deal("2026-03-13 20:10", 2, 2, volume=0.5),
            tick("2026-03-16 13:00"),
            tick("2026-03-16 13:01"),
        ],
        breaches=[("weekend_hold", "phase_failed", 0.0, 0.75, "2026-03-13 21:00")],
        ends=("failed", "2026-03-13 21:00"),
        phase_row={"ticks": 0, "late_ticks": 0, "status_ts": at("2026-03-13 21:00")},
        tick_counts={"evaluated": 0, "inactive": 2},
    ),
    "weekend under flag: a warning at W, the tick is processed": Case(
        start=NY_START,
        rules={**NY, "deal_violation_action": "flag"},
        events=[
            deal("2026-03-13 20:00", 1, 1),
            tick("2026-03-16 13:00"),
            deal("2026-03-16 13:05", 2, 1, entry="out"),
        ],
        breaches=[("weekend_hold", "notify", 0.0, 1.0, "2026-03-13 21:00")],
        phase_row={"ticks": 1},
        deal_row={"deals": 2, "open_lots": 0.0},
    ),
    "weekend under flag comes before the tick's own rules": Case(
        start=NY_START,
        rules={**NY, "deal_violation_action": "flag", "max_days": 7},
        events=[
            deal("2026-03-05 20:00", 1, 1),
            tick("2026-03-05 20:01"),
            tick("2026-03-16 13:00"),
        ],
        breaches=[
            ("weekend_hold", "notify", 0.0, 1.0, "2026-03-13 21:00"),
            ("time_limit", "phase_failed", 7.0, 1_256_400 / 86_400, "2026-03-16 13:00"),
        ],
        ends=("failed", "2026-03-16 13:00"),
        phase_row={"ticks": 2},
    ),
    "weekend under fail ends the phase at W, before the time limit": Case(
        start=NY_START,
        rules={**NY, "max_days": 7},
        events=[
            deal("2026-03-05 20:00", 1, 1),
            tick("2026-03-05 20:01"),
            tick("2026-03-16 13:00"),
        ],
        breaches=[("weekend_hold", "phase_failed", 0.0, 1.0, "2026-03-13 21:00")],
        ends=("failed", "2026-03-13 21:00"),
        phase_row={"ticks": 1},
    ),
    "several weekly closes between two events: only the latest W": Case(
        start=NY_START,
        rules={**NY, "deal_violation_action": "flag"},
        events=[
            deal("2026-03-06 20:00", 1, 1),
            deal("2026-03-16 13:00", 2, 1, entry="out"),
        ],
        breaches=[("weekend_hold", "notify", 0.0, 1.0, "2026-03-13 21:00")],
    ),
    "a weekly close inside New York's DST gap is the end of the gap": Case(
        start=NY_START,
        rules={"timezone": "America/New_York", "weekend_close": "SUN 02:30"},
        events=[
            deal("2026-03-08 06:00", 1, 1),  # Sunday 01:00 EST
            deal("2026-03-08 07:00", 2, 1, entry="out"),  # 03:00 EDT, the gap's end
        ],
        breaches=[("weekend_hold", "phase_failed", 0.0, 1.0, "2026-03-08 07:00")],
        ends=("failed", "2026-03-08 07:00"),
    ),
    "Prague's fall-back week: FRI 22:00 is 20:00 UTC (still CEST)": Case(
        start="2026-10-19 00:00",
        rules={"timezone": "Europe/Prague", "weekend_close": "FRI 22:00"},
        events=[
            deal("2026-10-23 19:00", 1, 1),
            deal("2026-10-23 20:00", 2, 1, entry="out"),
        ],
        breaches=[("weekend_hold", "phase_failed", 0.0, 1.0, "2026-10-23 20:00")],
        ends=("failed", "2026-10-23 20:00"),
    ),
    "Prague's fold: SUN 02:30 is the first of the two (00:30 UTC)": Case(
        start="2026-10-19 00:00",
        rules={"timezone": "Europe/Prague", "weekend_close": "SUN 02:30"},
        events=[
            deal("2026-10-25 00:00", 1, 1),
            deal("2026-10-25 00:30", 2, 1, entry="out"),
        ],
        breaches=[("weekend_hold", "phase_failed", 0.0, 1.0, "2026-10-25 00:30")],
        ends=("failed", "2026-10-25 00:30"),
    ),
    # ---------------------------------------------------- trading days and the pass
    "deals basis: the pass waits for a deal day, then the next tick passes": Case(
        rules={
            "profit_target": 0.1,
            "min_trading_days": 2,
            "trading_day_basis": "deals",
        },
        events=[
            deal("2026-01-05 10:00", 1, 1),
            deal("2026-01-05 10:01", 2, 1, entry="out"),
            tick("2026-01-05 11:00", 110_000, 110_000),  # target, 1 day of 2
            tick("2026-01-06 11:00", 110_000, 110_000),  # no deal today: 1 day
            deal("2026-01-06 12:00", 3, 2),  # the second day
            tick("2026-01-06 12:01", 110_000, 110_000),  # passes here
        ],
        ends=("passed", "2026-01-06 12:01"),
        phase_row={"trading_days": 2},
    ),
    "deals basis: at an equal ts the deal comes first and the tick passes": Case(
        rules={
            "profit_target": 0.1,
            "min_trading_days": 1,
            "trading_day_basis": "deals",
        },
        events=merge_events(
            [tick("2026-01-05 10:00", 110_000, 110_000)],
            [deal("2026-01-05 10:00", 1, 1)],
        ),
        ends=("passed", "2026-01-05 10:00"),
    ),
    "deals basis: delivered tick-then-deal at one ts, the next tick passes": Case(
        rules={
            "profit_target": 0.1,
            "min_trading_days": 1,
            "trading_day_basis": "deals",
        },
        events=[
            tick("2026-01-05 10:00", 110_000, 110_000),
            deal("2026-01-05 10:00", 1, 1),
            tick("2026-01-05 10:00", 110_000, 110_000),  # same tick, after a deal
        ],
        ends=("passed", "2026-01-05 10:00"),
        phase_row={"ticks": 2, "trading_days": 1},
    ),
    "deals basis: active ticks and out deals are no trading days": Case(
        rules={"trading_day_basis": "deals"},
        events=[
            tick("2026-01-05 10:00", 100_500, 100_000),
            deal("2026-01-06 10:00", 1, 1, entry="out"),
            tick("2026-01-07 10:00", 100_500, 100_200),
        ],
        phase_row={"trading_days": 0},
    ),
    "deals basis: a deal's day follows day_rollover and timezone": Case(
        rules={
            "trading_day_basis": "deals",
            "timezone": "America/New_York",
            "day_rollover": "17:00",
        },
        events=[
            deal("2026-01-05 21:59", 1, 1),  # Mon 16:59 EST: Monday
            deal("2026-01-05 22:00", 2, 2),  # Mon 17:00 EST: Tuesday
            deal("2026-01-06 21:00", 3, 3),  # Tue 16:00 EST: Tuesday
        ],
        phase_row={"trading_days": 2},
    ),
    "activity basis: deals do not make trading days": Case(
        events=[
            tick("2026-01-05 10:00"),
            deal("2026-01-05 10:01", 1, 1),
            tick("2026-01-05 10:02"),
        ],
        phase_row={"trading_days": 0, "ticks": 2},
    ),
    "time_limit stays a tick rule: a deal past max_days is processed": Case(
        rules={"max_days": 1},
        events=[
            tick("2026-01-05 10:00"),
            deal("2026-01-07 10:00", 1, 1),
            tick("2026-01-07 10:01"),
        ],
        breaches=[
            ("time_limit", "phase_failed", 1.0, 208_860 / 86_400, "2026-01-07 10:01")
        ],
        ends=("failed", "2026-01-07 10:01"),
        deal_row={"deals": 1},
    ),
    # ------------------------------------------------------------------ bad input
    "a deal of less than half a hundredth, or with a bad side, is invalid": Case(
        events=[
            deal("2026-01-05 10:00", 1, 1, volume=0.004),
            deal("2026-01-05 10:01", 2, 1, side="long"),
            deal("2026-01-05 10:02", 3, 1, entry="close"),
            replace(deal("2026-01-05 10:03", 4, 1), price=float("nan")),
            deal("2026-01-05 10:04", 1, 1),  # deal_id 1 was not taken
        ],
        deal_row={"deals": 1, "open_lots": 1.0},
        deal_counts={"invalid": 4, "processed": 1},
    ),
    "a deal of an unknown account is counted and skipped": Case(
        events=[deal("2026-01-05 10:00", 1, 1, account=9999)],
        deal_row={"deals": 0},
        deal_counts={"unknown": 1, "processed": 0},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_deal_rule_examples(name: str) -> None:
    case = CASES[name]
    outcome = run_deal_reference([phase(case.start, **case.rules)], case.events)
    expected = [breach_row(i + 1, b) for i, b in enumerate(case.breaches)]
    assert breach_list(outcome) == expected
    transitions = []
    if case.ends is not None:
        status, when = case.ends
        transitions = [TransitionRow(ACCOUNT, CHALLENGE, 0, status, at(when))]
    assert outcome.transitions == transitions
    assert outcome.phases[ACCOUNT].status == (
        "active" if case.ends is None else case.ends[0]
    )
    deal_row = outcome.deal_phases[ACCOUNT]
    for name_, value in case.deal_row.items():
        assert getattr(deal_row, name_) == value, name_
    phase_row = outcome.phases[ACCOUNT]
    for name_, value in case.phase_row.items():
        assert getattr(phase_row, name_) == value, name_
    for name_, value in case.deal_counts.items():
        assert getattr(outcome.deal_counts, name_) == value, name_
    for name_, value in case.tick_counts.items():
        assert getattr(outcome.counts, name_) == value, name_
    assert all(not row.resolved for row in outcome.breaches.values())


def test_every_example_also_holds_event_by_event() -> None:
    """Batch invariance on the table itself: one event per call, same tables."""
    for case in CASES.values():
        phases = [phase(case.start, **case.rules)]
        whole = run_deal_reference(phases, case.events)
        single = run_deal_reference(phases, case.events, batches=[1] * len(case.events))
        assert whole == single


def test_a_call_with_only_deals_updates_the_metric_of_a_phase_with_ticks() -> None:
    engine = DealReferenceEngine()
    engine.register(phase(trading_day_basis="deals"))
    engine.register(phase(account=OTHER, challenge="c-2", trading_day_basis="deals"))
    first = engine.process([tick("2026-01-05 10:00")])
    assert first.metrics[ACCOUNT].trading_days == 0
    second = engine.process(
        [deal("2026-01-05 10:01", 1, 1), deal("2026-01-05 10:01", 1, 1, account=OTHER)]
    )
    assert second.metrics[ACCOUNT].trading_days == 1
    assert second.metrics[ACCOUNT].ts == at("2026-01-05 10:00")
    # The other account has no evaluated tick, so no equity and no metric row.
    assert OTHER not in second.metrics
    assert engine.phases()[OTHER].trading_days == 1


def test_merge_events_puts_a_deal_before_a_tick_at_an_equal_ts() -> None:
    t1 = tick("2026-01-05 10:00")
    t2 = (OTHER, at("2026-01-05 09:00"), IB, IB)
    d1 = deal("2026-01-05 10:00", 1, 1)
    d2 = deal("2026-01-05 10:00", 2, 1)
    d3 = deal("2026-01-05 09:59", 3, 1)
    assert merge_events([t1, t2], [d1, d2, d3]) == [d3, d1, d2, t1, t2]


def test_hundredths_round_half_even_in_binary64() -> None:
    assert [hundredths(v) for v in (1.005, 0.125, 0.335, 2.675, 0.015, 0.005)] == [
        100,
        12,
        34,
        268,
        2,
        0,
    ]


@pytest.mark.parametrize(
    ("rule", "value"),
    [
        ("trading_day_basis", "ticks"),
        ("max_open_lots", 0),
        ("max_open_lots", 0.004),
        ("max_open_lots", float("inf")),
        ("max_open_lots", True),
        ("min_hold_seconds", 0),
        ("min_hold_seconds", 1.5),
        ("weekend_close", "FRIDAY 22:00"),
        ("weekend_close", "FRI 24:00"),
        ("weekend_close", "fri 22:00"),
        ("deal_violation_action", "pause"),
    ],
)
def test_bad_deal_rules_are_refused_naming_the_rule(rule: str, value: object) -> None:
    with pytest.raises(ValueError, match=rule):
        split_rules({"initial_balance": 100_000, rule: value})


def test_deal_rules_are_no_tick_rules() -> None:
    engine = DealReferenceEngine()
    engine.register(phase(max_open_lots=2, weekend_close="FRI 22:00"))
    with pytest.raises(ValueError, match="unknown rule"):
        engine.register(phase(account=OTHER, max_open_lot=2))


# ------------------------------------------------------------------- hedge flags

CUSTOMERS = {ACCOUNT: "cust-a", OTHER: "cust-a", 1003: "cust-b", 1004: "cust-a"}
HEDGE_PHASES = [
    phase(account=a, challenge=f"c-{a}") for a in (ACCOUNT, OTHER, 1003, 1004)
]


def flag(first: Deal, second: Deal, customer: str = "cust-a") -> FlagRow:
    one, two = sorted((first, second), key=lambda d: d.account_id)
    return FlagRow(
        customer_id=customer,
        symbol=one.symbol,
        account_id_1=one.account_id,
        deal_id_1=one.deal_id,
        ts_1=one.ts,
        side_1=one.side,
        account_id_2=two.account_id,
        deal_id_2=two.deal_id,
        ts_2=two.ts,
        side_2=two.side,
        gap_seconds=abs(one.ts - two.ts) / 1_000_000,
    )


BUY = deal("2026-01-05 10:00", 1, 1, account=OTHER)
SELL_60 = deal("2026-01-05 10:01", 7, 3, side="sell")
SELL_LATE = deal("2026-01-05 10:01:00.000001", 8, 4, side="sell")
HEDGE_CASES: dict[str, tuple[list[Event], list[tuple[Deal, Deal]]]] = {
    "opposite sides exactly the window apart": ([BUY, SELL_60], [(BUY, SELL_60)]),
    "one microsecond beyond the window": ([BUY, SELL_LATE], []),
    "the other account's deal processed first": ([SELL_60, BUY], [(BUY, SELL_60)]),
    "same side": ([BUY, deal("2026-01-05 10:00", 2, 2)], []),
    "other symbol": (
        [BUY, deal("2026-01-05 10:00", 2, 2, side="sell", symbol="GOLD")],
        [],
    ),
    "another customer": (
        [BUY, deal("2026-01-05 10:00", 2, 2, side="sell", account=1003)],
        [],
    ),
    "one account with itself": (
        [BUY, deal("2026-01-05 10:00", 2, 2, side="sell", account=OTHER)],
        [],
    ),
    "out deals never pair": (
        [BUY, deal("2026-01-05 10:00", 2, 2, entry="out", side="sell")],
        [],
    ),
    "a late deal was skipped and never pairs": (
        [
            tick("2026-01-05 10:00:30"),
            BUY,
            deal("2026-01-05 10:00:10", 2, 2, side="sell"),
        ],
        [],
    ),
    "three accounts: every opposite pair": (
        [
            BUY,
            SELL_60,
            deal("2026-01-05 10:00:30", 3, 3, side="sell", account=1004),
        ],
        [
            (BUY, SELL_60),
            (BUY, deal("2026-01-05 10:00:30", 3, 3, side="sell", account=1004)),
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(HEDGE_CASES))
def test_hedge_flag_examples(name: str) -> None:
    events, pairs = HEDGE_CASES[name]
    expected = sorted(
        (flag(a, b) for a, b in pairs),
        key=lambda f: (f.account_id_1, f.deal_id_1, f.account_id_2, f.deal_id_2),
    )
    outcome = run_deal_reference(HEDGE_PHASES, events, customers=CUSTOMERS)
    assert outcome.flags == expected
    for row in outcome.flags:
        assert row.account_id_1 < row.account_id_2


def test_hedge_flags_across_batches_and_in_any_feed_order() -> None:
    events: list[Event] = [BUY, tick("2026-01-05 10:00:30"), SELL_60]
    for sizes in ([1, 1], [2], [1], []):
        outcome = run_deal_reference(HEDGE_PHASES, events, sizes, customers=CUSTOMERS)
        assert outcome.flags == [flag(BUY, SELL_60)]
    engine = DealReferenceEngine()
    for spec in HEDGE_PHASES:
        engine.register(spec)
    first = engine.process([BUY]).in_deals
    second = engine.process([SELL_60]).in_deals
    assert hedge_flags(second + first, CUSTOMERS) == [flag(BUY, SELL_60)]
    # Fed again (a redelivered batch), the same deals give the same rows.
    assert hedge_flags(first + second + first, CUSTOMERS) == [flag(BUY, SELL_60)]


def test_hedge_window_setting() -> None:
    far = deal("2026-01-05 10:05", 7, 3, side="sell")
    events: list[Event] = [BUY, far]
    assert run_deal_reference(HEDGE_PHASES, events, customers=CUSTOMERS).flags == []
    wide = run_deal_reference(
        HEDGE_PHASES, events, customers=CUSTOMERS, hedge_window_seconds=300
    )
    assert wide.flags == [flag(BUY, far)]
    off = run_deal_reference(
        HEDGE_PHASES, [BUY, SELL_60], customers=CUSTOMERS, hedge_window_seconds=None
    )
    assert off.flags == []
    with pytest.raises(ValueError, match="hedge_window_seconds"):
        hedge_flags([BUY], CUSTOMERS, -1)


def test_a_deal_that_fails_its_phase_still_pairs() -> None:
    phases = [
        phase(account=ACCOUNT, max_open_lots=0.5),
        phase(account=OTHER, challenge="c-2"),
    ]
    outcome = run_deal_reference(phases, [BUY, SELL_60], customers=CUSTOMERS)
    assert outcome.phases[ACCOUNT].status == "failed"
    assert outcome.flags == [flag(BUY, SELL_60)]


def test_a_deal_that_revealed_a_weekend_fail_never_pairs() -> None:
    phases = [
        phase(NY_START, account=ACCOUNT, **NY),
        phase(NY_START, account=OTHER, challenge="c-2"),
    ]
    held = deal("2026-03-13 20:00", 1, 1, side="sell")
    revealing = deal("2026-03-16 13:00", 2, 2, side="sell")
    partner = deal("2026-03-16 13:00:30", 3, 3, account=OTHER)
    outcome = run_deal_reference(
        phases, [held, revealing, partner], customers=CUSTOMERS
    )
    assert outcome.phases[ACCOUNT].status == "failed"
    assert outcome.flags == []


# ------------------------------------------------------------- property tests

STREAM_START = datetime(2026, 3, 5, tzinfo=UTC)  # a Thursday before NY's DST night


@st.composite
def rule_sets(draw: st.DrawFn) -> dict[str, Any]:
    rules: dict[str, Any] = {"initial_balance": 100_000}
    if draw(st.booleans()):
        rules["max_open_lots"] = draw(st.sampled_from((1.0, 1.5, 2.005, 0.5)))
    if draw(st.booleans()):
        rules["min_hold_seconds"] = draw(st.sampled_from((1, 60, 3_600)))
    if draw(st.booleans()):
        rules["weekend_close"] = draw(st.sampled_from(("FRI 17:00", "SAT 00:00")))
    rules["deal_violation_action"] = draw(st.sampled_from(("fail", "flag")))
    rules["trading_day_basis"] = draw(st.sampled_from(("activity", "deals")))
    rules["timezone"] = draw(st.sampled_from(("UTC", "America/New_York")))
    if draw(st.booleans()):
        rules["profit_target"] = 0.01
        rules["min_trading_days"] = draw(st.integers(0, 3))
    return rules


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[PhaseSpec], list[Event]]:
    """Two accounts of one customer; ticks and deals with steps back (late)."""
    start = datetime(2026, 3, 5, tzinfo=UTC)
    phases = [
        PhaseSpec(ACCOUNT, "c-1", 0, start, draw(rule_sets())),
        PhaseSpec(OTHER, "c-2", 0, start, draw(rule_sets())),
    ]
    now = {ACCOUNT: at("2026-03-05 00:00"), OTHER: at("2026-03-05 00:00")}
    events: list[Event] = []
    next_deal = 1
    for _ in range(draw(st.integers(1, 40))):
        account = draw(st.sampled_from((ACCOUNT, OTHER)))
        step = draw(
            st.sampled_from(
                (0, 1, 30_000_000, 60_000_000, 3_600_000_000, 86_400_000_000)
            )
        )
        now[account] += step
        ts = now[account] - draw(st.sampled_from((0, 0, 0, 0, 1, 60_000_000)))
        if draw(st.booleans()):
            equity = draw(st.sampled_from((100_000.0, 101_000.0, 99_000.0)))
            events.append(
                (account, ts, equity, draw(st.sampled_from((100_000.0, equity))))
            )
            continue
        deal_id = draw(st.sampled_from((next_deal, next_deal, max(1, next_deal - 1))))
        next_deal += 1
        events.append(
            Deal(
                account_id=account,
                ts=ts,
                deal_id=deal_id,
                position_id=draw(st.integers(1, 3)),
                symbol=draw(st.sampled_from(("EURUSD", "GOLD"))),
                side=draw(st.sampled_from(("buy", "sell"))),
                volume=draw(st.sampled_from((0.01, 0.5, 1.0, 1.005, 0.125))),
                price=1.1,
                entry=draw(st.sampled_from(("in", "in", "out"))),
            )
        )
    return phases, events


CUSTOMERS_AB = {ACCOUNT: "cust-a", OTHER: "cust-a"}


@settings(max_examples=150, deadline=None)
@given(streams(), st.lists(st.integers(0, 10), max_size=6))
def test_batching_changes_nothing(
    stream: tuple[list[PhaseSpec], list[Event]], sizes: list[int]
) -> None:
    phases, events = stream
    whole = run_deal_reference(phases, events, customers=CUSTOMERS_AB)
    split = run_deal_reference(phases, events, sizes, customers=CUSTOMERS_AB)
    assert whole == split


@settings(max_examples=150, deadline=None)
@given(streams(), st.randoms(use_true_random=False))
def test_redelivered_deals_change_nothing_but_the_duplicate_count(
    stream: tuple[list[PhaseSpec], list[Event]], rnd: random.Random
) -> None:
    phases, events = stream
    whole = run_deal_reference(phases, events, customers=CUSTOMERS_AB)
    # Repeat some processed deals later in the stream (a redelivery): they are
    # duplicates whatever their ts.
    repeated: list[Event] = []
    extra = 0
    processed = set(whole.in_deals)
    for event in events:
        repeated.append(event)
        if isinstance(event, Deal) and event in processed and rnd.random() < 0.5:
            repeated.append(event)
            extra += 1
    again = run_deal_reference(phases, repeated, customers=CUSTOMERS_AB)
    assert breach_list(again) == breach_list(whole)
    assert again.transitions == whole.transitions
    assert again.phases == whole.phases
    assert again.flags == whole.flags
    assert again.in_deals == whole.in_deals
    counted = again.deal_counts.duplicate + again.deal_counts.inactive
    assert counted - whole.deal_counts.duplicate - whole.deal_counts.inactive == extra
    for account, row in whole.deal_phases.items():
        redelivered = again.deal_phases[account]
        assert redelivered.duplicate_deals >= row.duplicate_deals
        assert replace(redelivered, duplicate_deals=row.duplicate_deals) == row


@settings(max_examples=150, deadline=None)
@given(streams())
def test_open_lots_never_negative_and_counters_add_up(
    stream: tuple[list[PhaseSpec], list[Event]],
) -> None:
    phases, events = stream
    engine = DealReferenceEngine()
    for spec in phases:
        engine.register(spec)
    total = DealCounts()
    tick_total = Counts()
    for event in events:
        out = engine.process([event])
        total = total + out.deal_counts
        tick_total = tick_total + out.counts
        for row in engine.deal_phases().values():
            assert row.open_lots >= 0
            assert (row.open_positions == 0) == (row.open_lots == 0)
    deals = sum(isinstance(e, Deal) for e in events)
    assert (
        total.processed
        + total.late
        + total.duplicate
        + total.unknown
        + total.inactive
        + total.invalid
        == deals
    )
    assert sum(not isinstance(e, Deal) for e in events) == (
        tick_total.evaluated
        + tick_total.late
        + tick_total.inactive
        + tick_total.unknown
        + tick_total.invalid
    )
    rows = engine.deal_phases().values()
    assert sum(r.deals for r in rows) == total.processed
    assert sum(r.unmatched_deals for r in rows) == total.unmatched


@settings(max_examples=150, deadline=None)
@given(streams(), st.randoms(use_true_random=False))
def test_flags_do_not_depend_on_input_order(
    stream: tuple[list[PhaseSpec], list[Event]], rnd: random.Random
) -> None:
    phases, events = stream
    outcome = run_deal_reference(phases, events, customers=CUSTOMERS_AB)
    shuffled = list(outcome.in_deals)
    rnd.shuffle(shuffled)
    assert hedge_flags(shuffled, CUSTOMERS_AB) == outcome.flags
    for row in outcome.flags:
        assert row.account_id_1 < row.account_id_2
        assert row.side_1 != row.side_2
        assert 0 <= row.gap_seconds <= 60
        assert row.gap_seconds == abs(row.ts_1 - row.ts_2) / 1_000_000
