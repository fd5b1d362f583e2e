"""Worked examples of every rule, computed by hand from rules.md and docs/rules.md.

Each example runs through the engine and through the reference (the ``run``
fixture), so a wrong expectation here shows up on both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import polars as pl
import pytest
from reference import BreachRow, Counts, Outcome, Tick, TransitionRow

from prop_stream import PhaseSpec, RuleConfigError, RuleEngine, validate_rules

ACCOUNT = 1001
CHALLENGE = "c-1"
START = "2026-01-05 00:00"  # a Monday
IB = 100_000.0

Run = Callable[[list[PhaseSpec], list[Tick]], Outcome]


def at(text: str) -> int:
    """UTC microseconds of ``YYYY-MM-DD HH:MM[:SS[.ffffff]]``."""
    moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def phase(start: str = START, **rules: Any) -> PhaseSpec:
    return PhaseSpec(
        account_id=ACCOUNT,
        challenge_id=CHALLENGE,
        phase_index=0,
        started_at=datetime.fromisoformat(start).replace(tzinfo=UTC),
        rules={"initial_balance": 100_000, **rules},
    )


def tick(when: str, equity: float, balance: float = IB) -> Tick:
    return (ACCOUNT, at(when), equity, balance)


def breach(
    seq: int,
    rule: str,
    threshold: float,
    actual: float,
    action: str,
    when: str,
    resolved_at: str | None = None,
) -> BreachRow:
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
        resolved=resolved_at is not None,
        resolved_ts=None if resolved_at is None else at(resolved_at),
    )


def transition(status: str, when: str) -> TransitionRow:
    return TransitionRow(ACCOUNT, CHALLENGE, 0, status, at(when))


def breaches(outcome: Outcome) -> list[BreachRow]:
    return [outcome.breaches[key] for key in sorted(outcome.breaches)]


def rules_fired(outcome: Outcome) -> list[tuple[str, str]]:
    return [(b.rule, b.action) for b in breaches(outcome)]


# ------------------------------------------------------------------------- max_loss

FAIL = "phase_failed"


@pytest.mark.parametrize(
    ("equity", "expected"),
    [
        (90_000.00, []),
        (89_999.99, [
            breach(1, "max_loss", 10_000.0, IB - 89_999.99, FAIL, "2026-01-05 09:00"),
        ]),
    ],
)  # fmt: skip
def test_max_loss_static_floor_is_inclusive(
    run: Run, equity: float, expected: list[BreachRow]
) -> None:
    out = run([phase(max_total_loss=0.1)], [tick("2026-01-05 09:00", equity)])
    assert breaches(out) == expected
    assert out.transitions == (
        [transition("failed", "2026-01-05 09:00")] if expected else []
    )


@pytest.mark.parametrize(
    ("high", "equity", "expected_actual"),
    [
        # hwm 103 000: R_m = 103 000, F_m = 93 000.
        (103_000.0, 93_000.00, None),
        (103_000.0, 92_999.99, 103_000.0 - 92_999.99),
        # hwm 115 000 is capped: R_m = min(115 000, 110 000), F_m = 100 000.
        (115_000.0, 100_000.00, None),
        (115_000.0, 99_999.99, 110_000.0 - 99_999.99),
    ],
)
def test_max_loss_trailing_floor_follows_equity_up_to_initial_balance(
    run: Run, high: float, equity: float, expected_actual: float | None
) -> None:
    out = run(
        [phase(max_total_loss=0.1, total_loss_mode="trailing")],
        [tick("2026-01-05 09:00", high), tick("2026-01-05 10:00", equity)],
    )
    expected = []
    if expected_actual is not None:
        expected = [
            breach(1, "max_loss", 10_000.0, expected_actual, FAIL, "2026-01-05 10:00")
        ]
    assert breaches(out) == expected


@pytest.mark.parametrize(
    ("equity", "expected_actual"),
    [(93_000.00, None), (92_999.99, 103_000.0 - 92_999.99)],
)
def test_max_loss_trailing_eod_moves_at_the_day_boundary(
    run: Run, equity: float, expected_actual: float | None
) -> None:
    # Monday closes at 103 000 (after a 104 000 high): Tuesday's first tick raises
    # hwm to 103 000 before it is judged, so F_m = 93 000.
    ticks = [
        tick("2026-01-05 09:00", 104_000.0),
        tick("2026-01-05 15:00", 103_000.0),
        tick("2026-01-06 09:00", equity),
    ]
    out = run([phase(max_total_loss=0.1, total_loss_mode="trailing_eod")], ticks)
    expected = []
    if expected_actual is not None:
        expected = [
            breach(1, "max_loss", 10_000.0, expected_actual, FAIL, "2026-01-06 09:00")
        ]
    assert breaches(out) == expected
    assert out.phases[ACCOUNT].hwm == 103_000.0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("static", []),  # F_m = 90 000
        ("trailing_eod", []),  # hwm moves only at the day's end: F_m = 90 000
        ("trailing", [("max_loss", FAIL)]),  # hwm 104 000: F_m = 94 000
    ],
)
def test_max_loss_intraday_high_moves_only_trailing(
    run: Run, mode: str, expected: list[tuple[str, str]]
) -> None:
    ticks = [tick("2026-01-05 09:00", 104_000.0), tick("2026-01-05 10:00", 90_000.0)]
    out = run([phase(max_total_loss=0.1, total_loss_mode=mode)], ticks)
    assert rules_fired(out) == expected


# ----------------------------------------------------------------------- daily_loss


@pytest.mark.parametrize(
    ("reference", "base", "start_equity", "start_balance", "equity", "expected"),
    [
        # D = day-start equity 102 000, L_d = 5 000: F_d = 97 000.
        ("day_start_equity", "initial_balance", 102_000.0, IB, 97_000.00, None),
        ("day_start_equity", "initial_balance", 102_000.0, IB, 96_999.99,
         (5_000.0, 102_000.0 - 96_999.99)),
        # D = day-start balance 100 000: F_d = 95 000.
        ("day_start_balance", "initial_balance", 102_000.0, IB, 96_999.99, None),
        ("day_start_balance", "initial_balance", 102_000.0, IB, 95_000.00, None),
        ("day_start_balance", "initial_balance", 102_000.0, IB, 94_999.99,
         (5_000.0, IB - 94_999.99)),
        # D = the larger of the two.
        ("day_start_max", "initial_balance", 99_000.0, IB, 95_000.00, None),
        ("day_start_max", "initial_balance", 99_000.0, IB, 94_999.99,
         (5_000.0, IB - 94_999.99)),
        ("day_start_max", "initial_balance", 102_000.0, IB, 96_999.99,
         (5_000.0, 102_000.0 - 96_999.99)),
        # base day_start: L_d = 0.05 * 102 000 = 5 100, F_d = 96 900.
        ("day_start_equity", "day_start", 102_000.0, IB, 96_900.00, None),
        ("day_start_equity", "day_start", 102_000.0, IB, 96_899.99,
         (0.05 * 102_000.0, 102_000.0 - 96_899.99)),
        # base day_start with D = balance 100 000: L_d = 5 000, F_d = 95 000.
        ("day_start_balance", "day_start", 102_000.0, IB, 95_000.00, None),
        ("day_start_balance", "day_start", 102_000.0, IB, 94_999.99,
         (0.05 * IB, IB - 94_999.99)),
    ],
)  # fmt: skip
def test_daily_loss_floor_from_reference_and_base(
    run: Run,
    reference: str,
    base: str,
    start_equity: float,
    start_balance: float,
    equity: float,
    expected: tuple[float, float] | None,
) -> None:
    rules: dict[str, Any] = {
        "max_daily_loss": 0.05,
        "daily_reference": reference,
        "daily_loss_base": base,
    }
    ticks = [
        tick("2026-01-05 09:00", start_equity, start_balance),
        tick("2026-01-05 10:00", equity, start_balance),
    ]
    out = run([phase(**rules)], ticks)
    want = []
    if expected is not None:
        threshold, actual = expected
        want = [breach(1, "daily_loss", threshold, actual, FAIL, "2026-01-05 10:00")]
    assert breaches(out) == want


def test_daily_loss_each_day_has_its_own_reference(run: Run) -> None:
    # Monday: D = 100 000, F_d = 95 000. Tuesday: D = 96 000, F_d = 91 000.
    ticks = [
        tick("2026-01-05 09:00", 100_000.0),
        tick("2026-01-05 10:00", 96_000.0),
        tick("2026-01-06 09:00", 96_000.0),
        tick("2026-01-06 10:00", 91_000.0),
        tick("2026-01-06 11:00", 90_999.99),
    ]
    out = run([phase(max_daily_loss=0.05)], ticks)
    assert breaches(out) == [
        breach(1, "daily_loss", 5_000.0, 96_000.0 - 90_999.99, FAIL, "2026-01-06 11:00")
    ]


@pytest.mark.parametrize(
    ("action", "expected_rules", "expected_status", "inactive"),
    [
        (
            "pause",
            [("daily_loss", "trading_paused"), ("daily_loss", "trading_paused")],
            "active",
            0,
        ),
        ("fail", [("daily_loss", FAIL)], "failed", 3),
    ],
)
def test_daily_loss_pause_locks_the_day_and_fail_ends_the_phase(
    run: Run,
    action: str,
    expected_rules: list[tuple[str, str]],
    expected_status: str,
    inactive: int,
) -> None:
    ticks = [
        tick("2026-01-05 09:00", 100_000.0),  # D = 100 000, F_d = 95 000
        tick("2026-01-05 10:00", 94_999.99),  # breach
        tick("2026-01-05 11:00", 90_000.0),  # paused day: not judged again
        tick("2026-01-06 09:00", 90_000.0),  # new day: D = 90 000, F_d = 85 000
        tick("2026-01-06 10:00", 84_999.99),  # breach again
    ]
    out = run([phase(max_daily_loss=0.05, daily_loss_action=action)], ticks)
    assert rules_fired(out) == expected_rules
    assert out.phases[ACCOUNT].status == expected_status
    assert out.counts == Counts(evaluated=5 - inactive, inactive=inactive)
    if action == "pause":
        assert [b.ts for b in breaches(out)] == [
            at("2026-01-05 10:00"),
            at("2026-01-06 10:00"),
        ]
        assert out.transitions == []


def test_daily_loss_pause_with_max_loss_fails_both(run: Run) -> None:
    rules: dict[str, Any] = {
        "max_daily_loss": 0.05,
        "max_total_loss": 0.05,
        "daily_loss_action": "pause",
    }
    ticks = [tick("2026-01-05 09:00", 100_000.0), tick("2026-01-05 10:00", 94_999.99)]
    out = run([phase(**rules)], ticks)
    when = "2026-01-05 10:00"
    assert breaches(out) == [
        breach(1, "max_loss", 5_000.0, IB - 94_999.99, FAIL, when),
        breach(2, "daily_loss", 5_000.0, IB - 94_999.99, FAIL, when),
    ]
    assert out.transitions == [transition("failed", when)]


def test_daily_loss_pause_with_time_limit_fails_both(run: Run) -> None:
    rules: dict[str, Any] = {
        "max_daily_loss": 0.05,
        "max_days": 1,
        "daily_loss_action": "pause",
    }
    ticks = [tick("2026-01-06 09:00", 100_000.0), tick("2026-01-06 13:00", 94_000.0)]
    out = run([phase(start="2026-01-05 12:00", **rules)], ticks)
    assert rules_fired(out) == [("time_limit", FAIL), ("daily_loss", FAIL)]


def test_daily_loss_paused_day_still_fails_on_max_loss(run: Run) -> None:
    rules: dict[str, Any] = {
        "max_daily_loss": 0.03,
        "max_total_loss": 0.1,
        "daily_loss_action": "pause",
    }
    ticks = [
        tick("2026-01-05 09:00", 100_000.0),
        tick("2026-01-05 10:00", 96_999.99),  # F_d = 97 000: paused
        tick("2026-01-05 11:00", 89_999.99),  # F_m = 90 000: fails, daily not judged
    ]
    out = run([phase(**rules)], ticks)
    assert rules_fired(out) == [("daily_loss", "trading_paused"), ("max_loss", FAIL)]
    assert out.transitions == [transition("failed", "2026-01-05 11:00")]


def test_daily_loss_pause_does_not_prevent_a_pass(run: Run) -> None:
    rules: dict[str, Any] = {
        "max_daily_loss": 0.05,
        "daily_loss_action": "pause",
        "profit_target": 0.1,
    }
    ticks = [
        tick("2026-01-05 09:00", 100_000.0),
        tick("2026-01-05 10:00", 94_000.0),
        tick("2026-01-05 11:00", 110_000.0, 110_000.0),
    ]
    out = run([phase(**rules)], ticks)
    assert rules_fired(out) == [("daily_loss", "trading_paused")]
    assert out.transitions == [transition("passed", "2026-01-05 11:00")]


# ------------------------------------------------------------------------- warnings

NOTIFY = "notify"


def test_max_loss_warning_fires_resolves_and_fires_again(run: Run) -> None:
    # L_m = 10 000, W_m = cent(100 000 - 0.8 * 10 000) = 92 000.
    ticks = [
        tick("2026-01-05 09:00", 92_000.01),  # above W_m
        tick("2026-01-05 10:00", 92_000.00),  # fires
        tick("2026-01-05 11:00", 91_000.00),  # still active: nothing
        tick("2026-01-05 12:00", 92_000.01),  # resolved
        tick("2026-01-05 13:00", 92_000.00),  # fires again
    ]
    out = run([phase(max_total_loss=0.1, warning_level=0.8)], ticks)
    threshold = 0.8 * 10_000.0
    assert breaches(out) == [
        breach(1, "max_loss_warning", threshold, 8_000.0, NOTIFY,
               "2026-01-05 10:00", resolved_at="2026-01-05 12:00"),
        breach(2, "max_loss_warning", threshold, 8_000.0, NOTIFY, "2026-01-05 13:00"),
    ]  # fmt: skip


def test_daily_loss_warning_fires_once_per_day(run: Run) -> None:
    # L_d = 5 000, W_d = cent(D - 0.8 * 5 000) = D - 4 000.
    ticks = [
        tick("2026-01-05 09:00", 100_000.0),  # D = 100 000, W_d = 96 000
        tick("2026-01-05 10:00", 96_000.0),  # fires
        tick("2026-01-05 11:00", 96_500.0),  # resolved
        tick("2026-01-05 12:00", 95_500.0),  # already fired today: nothing
        tick("2026-01-06 09:00", 100_000.0),  # D = 100 000 again
        tick("2026-01-06 10:00", 95_900.0),  # fires on the new day
    ]
    out = run([phase(max_daily_loss=0.05, warning_level=0.8)], ticks)
    threshold = 0.8 * 5_000.0
    assert breaches(out) == [
        breach(1, "daily_loss_warning", threshold, 4_000.0, NOTIFY,
               "2026-01-05 10:00", resolved_at="2026-01-05 11:00"),
        breach(2, "daily_loss_warning", threshold, 4_100.0, NOTIFY,
               "2026-01-06 10:00"),
    ]  # fmt: skip


def test_daily_loss_warning_resolves_on_the_next_day_by_its_loss(run: Run) -> None:
    # The loss that resolves a warning is the tick's own daily loss: on a new day it
    # is measured from the new D (docs/rules.md, warnings).
    ticks = [
        tick("2026-01-05 09:00", 100_000.0),  # W_d = 96 000
        tick("2026-01-05 10:00", 96_000.0),  # fires
        tick("2026-01-06 09:00", 95_000.0),  # new day, D = 95 000: loss 0, resolved
        tick("2026-01-06 10:00", 91_000.0),  # at the new W_d = 91 000: fires again
    ]
    out = run([phase(max_daily_loss=0.05, warning_level=0.8)], ticks)
    assert breaches(out) == [
        breach(1, "daily_loss_warning", 0.8 * 5_000.0, 4_000.0, NOTIFY,
               "2026-01-05 10:00", resolved_at="2026-01-06 09:00"),
        breach(2, "daily_loss_warning", 0.8 * 5_000.0, 4_000.0, NOTIFY,
               "2026-01-06 10:00"),
    ]  # fmt: skip


def test_daily_loss_warning_stays_open_while_todays_loss_is_high(run: Run) -> None:
    # day_start_balance reference: the new day starts at D = balance 100 000 while
    # equity is still 96 000, so the warning stays open and no second one fires.
    ticks = [
        tick("2026-01-05 09:00", 100_000.0),
        tick("2026-01-05 10:00", 96_000.0),  # fires (W_d = 96 000)
        tick("2026-01-06 09:00", 96_000.0),  # D = 100 000 again: still at W_d
        tick("2026-01-06 10:00", 96_000.01),  # above: resolved
    ]
    rules: dict[str, Any] = {
        "max_daily_loss": 0.05,
        "warning_level": 0.8,
        "daily_reference": "day_start_balance",
    }
    out = run([phase(**rules)], ticks)
    assert breaches(out) == [
        breach(1, "daily_loss_warning", 0.8 * 5_000.0, 4_000.0, NOTIFY,
               "2026-01-05 10:00", resolved_at="2026-01-06 10:00"),
    ]  # fmt: skip


def test_exact_duplicate_of_a_pausing_tick_changes_nothing(run: Run) -> None:
    rules: dict[str, Any] = {
        "max_total_loss": 0.06,
        "max_daily_loss": 0.05,
        "daily_loss_action": "pause",
        "warning_level": 0.8,
    }
    pausing = tick("2026-01-05 10:00", 94_999.99)
    once = run([phase(**rules)], [tick("2026-01-05 09:00", 100_000.0), pausing])
    twice = run(
        [phase(**rules)], [tick("2026-01-05 09:00", 100_000.0), pausing, pausing]
    )
    assert breaches(twice) == breaches(once)
    assert [b.rule for b in breaches(once)] == ["daily_loss"]


def test_warnings_skipped_on_the_pausing_tick(run: Run) -> None:
    # L_m = 6 000: F_m = 94 000, W_m = cent(100 000 - 4 800) = 95 200. F_d = 95 000.
    rules: dict[str, Any] = {
        "max_total_loss": 0.06,
        "max_daily_loss": 0.05,
        "daily_loss_action": "pause",
        "warning_level": 0.8,
    }
    ticks = [
        tick("2026-01-05 09:00", 100_000.0),
        tick("2026-01-05 10:00", 94_999.99),  # pauses; no warning on this tick
        tick("2026-01-05 11:00", 94_999.99),  # max-loss warning fires now
    ]
    out = run([phase(**rules)], ticks)
    assert breaches(out) == [
        breach(1, "daily_loss", 5_000.0, IB - 94_999.99, "trading_paused",
               "2026-01-05 10:00"),
        breach(2, "max_loss_warning", 0.8 * (0.06 * IB), IB - 94_999.99, NOTIFY,
               "2026-01-05 11:00"),
    ]  # fmt: skip


# ------------------------------------------------------------------------ time_limit


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        ("2026-01-07 00:00:00", []),  # exactly started_at + 2 * 24 h
        ("2026-01-07 00:00:00.000001", [
            breach(1, "time_limit", 2.0, (2 * 86_400_000_000 + 1) / 86_400_000_000,
                   FAIL, "2026-01-07 00:00:00.000001"),
        ]),
    ],
)  # fmt: skip
def test_time_limit_after_max_days(
    run: Run, when: str, expected: list[BreachRow]
) -> None:
    out = run([phase(max_days=2)], [tick(when, 100_000.0)])
    assert breaches(out) == expected


# --------------------------------------------------------------------------- passing


@pytest.mark.parametrize(
    ("equity", "balance", "passes"),
    [
        (110_000.00, 110_000.00, True),  # T = cent(100 000 * 1.1) = 110 000.00
        (110_000.00, 109_999.99, False),
        (109_999.99, 110_000.00, False),
        (110_500.00, 110_000.00, True),
    ],
)
def test_profit_target_reached_exactly(
    run: Run, equity: float, balance: float, passes: bool
) -> None:
    out = run([phase(profit_target=0.1)], [tick("2026-01-05 09:00", equity, balance)])
    assert out.transitions == (
        [transition("passed", "2026-01-05 09:00")] if passes else []
    )


def test_min_trading_days_blocks_then_allows_a_pass(run: Run) -> None:
    ticks = [
        tick("2026-01-05 09:00", 110_000.0, 110_000.0),  # balance moved: day 1
        tick("2026-01-06 09:00", 110_000.0, 110_000.0),  # no activity: still 1
        tick("2026-01-06 10:00", 110_000.5, 110_000.0),  # open position: day 2
    ]
    out = run([phase(profit_target=0.1, min_trading_days=2)], ticks)
    assert out.transitions == [transition("passed", "2026-01-06 10:00")]
    assert out.phases[ACCOUNT].trading_days == 2


def test_max_best_day_share_blocks_then_allows_a_pass(run: Run) -> None:
    ticks = [
        tick("2026-01-05 09:00", 100_000.0, 100_000.0),
        tick("2026-01-05 15:00", 106_000.0, 106_000.0),  # Monday: +6 000
        tick("2026-01-06 09:00", 106_000.0, 106_000.0),
        # Tuesday +4 000: best 6 000 > 0.5 * total 10 000 = 5 000: no pass.
        tick("2026-01-06 15:00", 110_000.0, 110_000.0),
        tick("2026-01-07 09:00", 110_000.0, 110_000.0),
        # Wednesday +2 000: best 6 000 <= 0.5 * 12 000 = 6 000: passes.
        tick("2026-01-07 15:00", 112_000.0, 112_000.0),
    ]
    out = run([phase(profit_target=0.1, max_best_day_share=0.5)], ticks)
    assert out.transitions == [transition("passed", "2026-01-07 15:00")]


def test_trading_days_count_balance_changes_and_open_positions(run: Run) -> None:
    ticks = [
        tick("2026-01-05 09:00", 100_000.0, 100_000.0),  # = initial balance: idle
        tick("2026-01-06 09:00", 100_000.5, 100_000.0),  # open position: day 1
        tick("2026-01-06 10:00", 100_001.0, 100_000.0),  # same day: still 1
        tick("2026-01-07 09:00", 100_000.0, 100_000.0),  # idle
        tick("2026-01-08 09:00", 101_000.0, 101_000.0),  # balance moved: day 2
    ]
    out = run([phase()], ticks)
    assert out.phases[ACCOUNT].trading_days == 2


def test_metrics_report_levels_and_progress(run: Run) -> None:
    rules: dict[str, Any] = {
        "profit_target": 0.1,
        "min_trading_days": 4,
        "max_total_loss": 0.1,
        "max_daily_loss": 0.05,
    }
    ticks = [
        tick("2026-01-05 09:00", 100_000.0),
        tick("2026-01-07 10:00", 105_000.0, 104_000.0),
    ]
    m = run([phase(**rules)], ticks).metrics[ACCOUNT]
    assert (m.day, m.status, m.profit) == (date(2026, 1, 7), "active", 5_000.0)
    assert (m.daily_start_equity, m.daily_start_balance, m.daily_pnl) == (
        105_000.0,
        104_000.0,
        0.0,
    )
    assert (m.daily_loss_limit, m.daily_floor, m.daily_room) == (
        5_000.0,
        100_000.0,
        5_000.0,
    )
    assert (m.max_loss_limit, m.overall_floor, m.overall_room) == (
        10_000.0,
        90_000.0,
        15_000.0,
    )
    assert (m.hwm, m.trading_days, m.days_elapsed, m.best_day_profit) == (
        100_000.0,
        1,
        2,
        0.0,
    )
    assert (m.profit_target_level, m.profit_progress, m.trading_days_progress) == (
        110_000.0,
        0.5,
        0.25,
    )


# ------------------------------------------------------------------------------ days


@pytest.mark.parametrize(
    ("timezone", "rollover", "when", "day"),
    [
        ("UTC", "00:00", "2026-01-05 23:59:59.999999", date(2026, 1, 5)),
        ("UTC", "00:00", "2026-01-06 00:00", date(2026, 1, 6)),
        ("UTC", "02:30", "2026-01-05 02:29:59", date(2026, 1, 5)),
        ("UTC", "02:30", "2026-01-05 02:30", date(2026, 1, 6)),
        # Sunday 16:59:59 EST is Sunday's day; Sunday 17:00 EST starts Monday's.
        ("America/New_York", "17:00", "2026-01-04 21:59:59", date(2026, 1, 4)),
        ("America/New_York", "17:00", "2026-01-04 22:00", date(2026, 1, 5)),
        ("Asia/Tokyo", "00:00", "2026-01-05 14:59:59", date(2026, 1, 5)),
        ("Asia/Tokyo", "00:00", "2026-01-05 15:00", date(2026, 1, 6)),
        # Prague, 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
        ("Europe/Prague", "00:00", "2026-03-28 22:59:59", date(2026, 3, 28)),
        ("Europe/Prague", "00:00", "2026-03-28 23:00", date(2026, 3, 29)),
        ("Europe/Prague", "00:00", "2026-03-29 21:59:59", date(2026, 3, 29)),
        ("Europe/Prague", "00:00", "2026-03-29 22:00", date(2026, 3, 30)),
        # A 02:30 rollover falls in the gap: the day ends when the gap does.
        ("Europe/Prague", "02:30", "2026-03-29 00:59:59", date(2026, 3, 29)),
        ("Europe/Prague", "02:30", "2026-03-29 01:00", date(2026, 3, 30)),
        # Prague, 2026-10-25: 03:00 CEST falls back to 02:00 CET (01:00 UTC). The
        # day ends at the first 02:30; the second 02:10 stays in the new day.
        ("Europe/Prague", "02:30", "2026-10-25 00:29:59", date(2026, 10, 25)),
        ("Europe/Prague", "02:30", "2026-10-25 00:30", date(2026, 10, 26)),
        ("Europe/Prague", "02:30", "2026-10-25 01:10", date(2026, 10, 26)),
        # New York, 2026-03-08 (gap 02:00-03:00 EST/EDT) and 2026-11-01 (fold).
        ("America/New_York", "02:30", "2026-03-08 06:59:59", date(2026, 3, 8)),
        ("America/New_York", "02:30", "2026-03-08 07:00", date(2026, 3, 9)),
        ("America/New_York", "01:30", "2026-11-01 05:29:59", date(2026, 11, 1)),
        ("America/New_York", "01:30", "2026-11-01 05:30", date(2026, 11, 2)),
        ("America/New_York", "01:30", "2026-11-01 06:10", date(2026, 11, 2)),
        # Lord Howe moves by 30 minutes: +11 until 2026-04-05 02:00, then +10:30.
        ("Australia/Lord_Howe", "00:00", "2026-04-04 12:59:59", date(2026, 4, 4)),
        ("Australia/Lord_Howe", "00:00", "2026-04-04 13:00", date(2026, 4, 5)),
        ("Australia/Lord_Howe", "00:00", "2026-04-05 13:29:59", date(2026, 4, 5)),
        ("Australia/Lord_Howe", "00:00", "2026-04-05 13:30", date(2026, 4, 6)),
    ],
)
def test_day_named_by_rollover_and_time_zone(
    run: Run, timezone: str, rollover: str, when: str, day: date
) -> None:
    spec = phase(start="2026-01-01 00:00", timezone=timezone, day_rollover=rollover)
    out = run([spec], [tick(when, 100_000.0)])
    assert list(out.daily) == [(ACCOUNT, day)]


def test_day_dst_night_in_prague_has_one_snapshot_per_day(run: Run) -> None:
    ticks = [
        tick("2026-03-28 22:30", 100_100.0),  # 23:30 CET, Saturday
        tick("2026-03-28 23:00", 100_200.0),  # 00:00 CET, Sunday's first tick
        tick("2026-03-29 01:30", 100_050.0),  # 03:30 CEST, after the gap
        tick("2026-03-29 21:59", 100_400.0),  # 23:59 CEST
        tick("2026-03-29 22:00", 100_500.0),  # 00:00 CEST, Monday
    ]
    out = run([phase(start="2026-03-01 00:00", timezone="Europe/Prague")], ticks)
    rows = {day: (r.daily_start_equity, r.min_equity, r.close_equity)
            for (_, day), r in out.daily.items()}  # fmt: skip
    assert rows == {
        date(2026, 3, 28): (100_100.0, 100_100.0, 100_100.0),
        date(2026, 3, 29): (100_200.0, 100_050.0, 100_400.0),
        date(2026, 3, 30): (100_500.0, 100_500.0, 100_500.0),
    }
    assert out.daily[(ACCOUNT, date(2026, 3, 29))].daily_start_balance == IB


def test_day_trailing_eod_across_a_dst_night(run: Run) -> None:
    # Sunday 2026-03-29 in Prague is 23 hours long; its close 104 000 moves hwm.
    rules: dict[str, Any] = {"max_total_loss": 0.1, "total_loss_mode": "trailing_eod"}
    ticks = [
        tick("2026-03-28 23:30", 104_000.0),
        tick("2026-03-29 21:59", 104_000.0),
        tick("2026-03-29 22:00", 94_000.0),  # Monday: F_m = 94 000, not a breach
        tick("2026-03-29 22:01", 93_999.99),
    ]
    spec = phase(start="2026-03-01 00:00", timezone="Europe/Prague", **rules)
    out = run([spec], ticks)
    assert breaches(out) == [
        breach(1, "max_loss", 10_000.0, 104_000.0 - 93_999.99, FAIL, "2026-03-29 22:01")
    ]


# ---------------------------------------------------------------------- tick handling


def test_late_ticks_and_ticks_before_start_counted_and_skipped(run: Run) -> None:
    ticks = [
        tick("2026-01-04 23:59:59", 50_000.0),  # before started_at
        tick("2026-01-05 10:00", 100_000.0),
        tick("2026-01-05 09:00", 50_000.0),  # late
        tick("2026-01-05 10:00", 100_000.0),  # same ts: evaluated again
    ]
    out = run([phase(max_total_loss=0.1)], ticks)
    assert out.breaches == {}
    assert out.counts == Counts(evaluated=2, late=2)
    state = out.phases[ACCOUNT]
    assert (state.ticks, state.late_ticks, state.equity) == (2, 2, 100_000.0)


def test_ticks_after_failure_counted_inactive(run: Run) -> None:
    ticks = [
        tick("2026-01-05 09:00", 89_999.99),
        tick("2026-01-05 10:00", 100_000.0),
        tick("2026-01-05 08:00", 100_000.0),  # would be late, but the phase is over
    ]
    out = run([phase(max_total_loss=0.1)], ticks)
    assert out.counts == Counts(evaluated=1, inactive=2)
    state = out.phases[ACCOUNT]
    assert (state.status, state.status_ts) == ("failed", at("2026-01-05 09:00"))
    assert (state.ticks, state.late_ticks, state.equity) == (1, 0, 89_999.99)


def test_duplicate_ticks_change_nothing(run: Run) -> None:
    rules: dict[str, Any] = {
        "max_total_loss": 0.1,
        "max_daily_loss": 0.05,
        "warning_level": 0.8,
        "profit_target": 0.1,
    }
    ticks = [
        tick("2026-01-05 09:00", 100_000.0),
        tick("2026-01-05 10:00", 95_900.0),  # daily warning
        tick("2026-01-05 11:00", 97_000.0, 97_000.0),  # resolved
        tick("2026-01-06 09:00", 97_000.0, 97_000.0),
        tick("2026-01-06 10:00", 111_000.0, 110_000.0),  # passes
    ]
    once = run([phase(**rules)], ticks)
    twice = run([phase(**rules)], [t for t in ticks for _ in range(2)])
    assert twice.counts == Counts(evaluated=9, inactive=1)
    assert (twice.breaches, twice.daily, twice.transitions, twice.metrics) == (
        once.breaches,
        once.daily,
        once.transitions,
        once.metrics,
    )
    assert len(once.breaches) == 1
    assert once.transitions == [transition("passed", "2026-01-06 10:00")]


def test_unknown_account_counted(run: Run) -> None:
    out = run([phase()], [(9_999, at("2026-01-05 09:00"), 1.0, 1.0)])
    assert out.counts == Counts(unknown=1)
    assert (out.breaches, out.daily, out.metrics) == ({}, {}, {})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_invalid_tick_counted(run: Run, bad: float) -> None:
    ticks = [tick("2026-01-05 09:00", bad), tick("2026-01-05 10:00", 100_000.0, bad)]
    out = run([phase(max_total_loss=0.1)], ticks)
    assert out.counts == Counts(invalid=2)
    assert out.phases[ACCOUNT].ticks == 0


# ------------------------------------------------------------------------ validation

BASE = {"initial_balance": 100_000}


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        ({}, "initial_balance"),
        ({"initial_balance": 0}, "initial_balance"),
        ({"initial_balance": -5}, "initial_balance"),
        ({"initial_balance": math.inf}, "initial_balance"),
        ({"initial_balance": math.nan}, "initial_balance"),
        ({"initial_balance": "100000"}, "initial_balance"),
        ({**BASE, "max_loss": 0.1}, "max_loss"),
        ({**BASE, "profit_target": 10}, "profit_target"),
        ({**BASE, "profit_target": "0.1"}, "profit_target"),
        ({**BASE, "max_daily_loss": 0}, "max_daily_loss"),
        ({**BASE, "max_total_loss": 1.0}, "max_total_loss"),
        ({**BASE, "max_best_day_share": 1.5}, "max_best_day_share"),
        ({**BASE, "warning_level": -0.5}, "warning_level"),
        ({**BASE, "daily_reference": "day_start"}, "daily_reference"),
        ({**BASE, "daily_loss_base": "balance"}, "daily_loss_base"),
        ({**BASE, "daily_loss_action": "stop"}, "daily_loss_action"),
        ({**BASE, "total_loss_mode": "eod"}, "total_loss_mode"),
        ({**BASE, "min_trading_days": -1}, "min_trading_days"),
        ({**BASE, "min_trading_days": "3"}, "min_trading_days"),
        ({**BASE, "max_days": 0}, "max_days"),
        ({**BASE, "timezone": "Mars/Olympus_Mons"}, "timezone"),
        ({**BASE, "day_rollover": "24:00"}, "day_rollover"),
        ({**BASE, "day_rollover": "17:60"}, "day_rollover"),
        ({**BASE, "day_rollover": "5pm"}, "day_rollover"),
    ],
)
def test_rules_validation_names_the_field(rules: dict[str, Any], field: str) -> None:
    with pytest.raises(RuleConfigError) as info:
        validate_rules(rules)
    assert info.value.field == field
    engine = RuleEngine()
    spec = PhaseSpec(ACCOUNT, CHALLENGE, 0, datetime(2026, 1, 5, tzinfo=UTC), rules)
    with pytest.raises(RuleConfigError) as info:
        engine.register(spec)
    assert info.value.field == field
    assert len(engine) == 0


def test_rules_validation_fills_defaults() -> None:
    assert validate_rules({"initial_balance": 100_000}) == {
        "initial_balance": 100_000.0,
        "profit_target": None,
        "max_daily_loss": None,
        "daily_reference": "day_start_equity",
        "daily_loss_base": "initial_balance",
        "daily_loss_action": "fail",
        "max_total_loss": None,
        "total_loss_mode": "static",
        "min_trading_days": 0,
        "max_days": None,
        "max_best_day_share": None,
        "warning_level": None,
        "timezone": "UTC",
        "day_rollover": "00:00",
        "trading_day_basis": "activity",
        "max_open_lots": None,
        "min_hold_seconds": None,
        "weekend_close": None,
        "deal_violation_action": "fail",
    }


def test_register_same_account_twice_refused() -> None:
    engine = RuleEngine()
    engine.register(phase())
    with pytest.raises(RuleConfigError):
        engine.register(phase())
    assert len(engine) == 1


def test_remove_forgets_the_phase() -> None:
    def frame(when: str, equity: float) -> pl.DataFrame:
        moment = datetime.fromisoformat(when).replace(tzinfo=UTC)
        return pl.DataFrame(
            {
                "account_id": [ACCOUNT],
                "ts": [moment],
                "equity": [equity],
                "balance": [IB],
            }
        )

    engine = RuleEngine()
    engine.register(phase(max_total_loss=0.1))
    assert engine.process(frame("2026-01-05 09:00", 89_999.99)).transitions.height == 1
    assert engine.remove(ACCOUNT)
    assert ACCOUNT not in engine
    assert not engine.remove(ACCOUNT)
    assert engine.process(frame("2026-01-05 10:00", 100_000.0)).counts.unknown == 1
    engine.register(phase(max_total_loss=0.1))  # a fresh phase: no failed state left
    evaluation = engine.process(frame("2026-01-05 11:00", 100_000.0))
    assert (evaluation.counts.evaluated, evaluation.transitions.height) == (1, 0)
