"""The engine agrees with the plain-Python reference on generated tick streams.

Streams mix several accounts with random rules, cross day boundaries and DST
nights, land equity exactly on floors, warning levels and targets (and one cent
either side), and include duplicate, late, pre-start, unknown-account and invalid
ticks. Floats are compared exactly: both implementations apply the same binary64
formulas of docs/rules.md in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    US_PER_DAY,
    Levels,
    Outcome,
    ReferenceEngine,
    Tick,
    from_micros,
    run_reference,
    to_micros,
)

from prop_stream import PhaseSpec

EngineRunner = Callable[..., Outcome]

US_PER_HOUR = 3_600_000_000
US_PER_MINUTE = 60_000_000
UNKNOWN_ACCOUNT = 9_999

ZONES = (
    "UTC",
    "Europe/Prague",
    "America/New_York",
    "Asia/Tokyo",
    "Australia/Lord_Howe",
)
ROLLOVERS = ("00:00", "17:00", "02:30", "02:00", "01:45", "01:30", "23:45")
#: Evenings before DST nights (and one plain week), in UTC, with the zone that
#: changes its clocks that night.
ANCHORS = (
    # Europe springs forward 03-29 01:00 UTC and falls back 10-25 01:00 UTC.
    (datetime(2026, 3, 28, 18, tzinfo=UTC), "Europe/Prague"),
    (datetime(2026, 10, 24, 18, tzinfo=UTC), "Europe/Prague"),
    # New York springs forward 03-08 07:00 UTC and falls back 11-01 06:00 UTC.
    (datetime(2026, 3, 7, 20, tzinfo=UTC), "America/New_York"),
    (datetime(2026, 10, 31, 20, tzinfo=UTC), "America/New_York"),
    # Lord Howe falls back 30 minutes 04-04 15:00 UTC, springs forward 10-03 15:30.
    (datetime(2026, 4, 4, 6, tzinfo=UTC), "Australia/Lord_Howe"),
    (datetime(2026, 10, 3, 6, tzinfo=UTC), "Australia/Lord_Howe"),
    (datetime(2026, 1, 5, tzinfo=UTC), "Asia/Tokyo"),
)


def ratio(*common: float) -> st.SearchStrategy[float]:
    """Round ratios that put levels on whole cents, and arbitrary ones that don't."""
    return st.one_of(
        st.sampled_from(common),
        st.floats(min_value=0.001, max_value=0.3).map(lambda x: round(x, 4)),
    )


RATIO_RULES: dict[str, st.SearchStrategy[Any]] = {
    "profit_target": ratio(0.1, 0.08, 0.05, 0.03, 0.01, 0.07),
    "max_daily_loss": ratio(0.05, 0.04, 0.03, 0.02, 0.01, 0.045),
    "max_total_loss": ratio(0.1, 0.08, 0.06, 0.05, 0.03, 0.12),
    "max_best_day_share": st.sampled_from((0.5, 0.3, 0.4, 0.8, 0.35, 0.999)),
    "warning_level": st.sampled_from((0.8, 0.5, 0.7, 0.9, 0.75, 0.999)),
    "max_days": st.integers(min_value=1, max_value=10),
}
CHOICE_RULES: dict[str, st.SearchStrategy[Any]] = {
    "daily_reference": st.sampled_from(
        ("day_start_equity", "day_start_balance", "day_start_max")
    ),
    "daily_loss_base": st.sampled_from(("initial_balance", "day_start")),
    "daily_loss_action": st.sampled_from(("fail", "pause")),
    "total_loss_mode": st.sampled_from(("static", "trailing", "trailing_eod")),
    "min_trading_days": st.integers(min_value=0, max_value=4),
    "timezone": st.sampled_from(ZONES),
    "day_rollover": st.sampled_from(ROLLOVERS),
}


@st.composite
def rule_sets(draw: st.DrawFn, zone: str = "UTC") -> dict[str, Any]:
    """Every rule, each omitted (default), explicitly null where allowed, or set.

    ``zone`` is the time zone that changes its clocks near the stream; half the
    rule sets use it.
    """
    rules: dict[str, Any] = {
        "initial_balance": draw(
            st.sampled_from((100_000, 50_000, 10_000, 25_000.5, 200_000.0, 5_000))
        )
    }
    for name, values in RATIO_RULES.items():
        how = draw(st.sampled_from(("omit", "null", "set", "set", "set")))
        if how == "null":
            rules[name] = None
        elif how == "set":
            rules[name] = draw(values)
    for name, values in CHOICE_RULES.items():
        if draw(st.booleans()):
            rules[name] = draw(values)
    if draw(st.booleans()):
        rules["timezone"] = zone
    return rules


@dataclass(frozen=True)
class Scenario:
    """Phases to register and the ticks to deliver, in order."""

    phases: list[PhaseSpec]
    ticks: list[Tick]


LEVEL_NAMES = (
    "overall_floor",
    "overall_warning",
    "daily_floor",
    "daily_warning",
    "target",
    "daily_reference",
    "hwm",
)


def level(levels: Levels, name: str) -> float | None:
    value: float | None = getattr(levels, name)
    return value


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """Phases and a tick stream; equity and times aim at the rules' edges.

    A reference engine follows the stream as it is drawn so that ticks can land
    exactly on the current floors, warning levels, target, day boundary or time
    limit. The test then runs both implementations on the finished stream.
    """
    anchor, zone = draw(st.sampled_from(ANCHORS))
    phases: list[PhaseSpec] = []
    for index in range(draw(st.integers(min_value=1, max_value=3))):
        offset = draw(st.integers(min_value=0, max_value=36 * 60)) * US_PER_MINUTE
        phases.append(
            PhaseSpec(
                account_id=1_001 + index,
                challenge_id=f"c-{index}",
                phase_index=draw(st.integers(min_value=0, max_value=2)),
                started_at=from_micros(to_micros(anchor) - offset),
                rules=draw(rule_sets(zone)),
            )
        )
    follower = ReferenceEngine()
    for spec in phases:
        follower.register(spec)

    accounts = {spec.account_id: spec for spec in phases}
    cursor = {a: to_micros(s.started_at) for a, s in accounts.items()}
    last: dict[int, Tick] = {}
    balance = {a: float(s.rules["initial_balance"]) for a, s in accounts.items()}
    equity = dict(balance)
    ticks: list[Tick] = []

    for _ in range(draw(st.integers(min_value=0, max_value=60))):
        states = follower.phases()
        active = [a for a in accounts if states[a].status == "active"]
        pick = draw(st.integers(min_value=0, max_value=19))
        if pick == 0:
            ticks.append((UNKNOWN_ACCOUNT, ticks[-1][1] if ticks else 0, 1.0, 1.0))
            continue
        if not active and draw(st.booleans()):
            break
        # Mostly active phases; now and then one that already passed or failed.
        account = draw(st.sampled_from(active if active and pick > 2 else [*accounts]))
        kind = draw(
            st.sampled_from(
                ("step",) * 8 + ("boundary", "time_limit", "repeat", "late", "early")
            )
        )
        if kind == "repeat" and account in last:
            tick = last[account]
        else:
            ts = next_ts(draw, kind, cursor[account], follower, account, accounts)
            eq, bal = next_values(
                draw, follower.levels(account), equity[account], balance[account]
            )
            if draw(st.integers(min_value=0, max_value=60)) == 0:
                eq = draw(st.sampled_from((math.nan, math.inf, -math.inf)))
            tick = (account, ts, eq, bal)
            if kind not in ("late", "early") and math.isfinite(eq):
                cursor[account] = ts
                equity[account], balance[account] = eq, bal
                last[account] = tick
        ticks.append(tick)
        follower.process([tick])
    return Scenario(phases, ticks)


def next_ts(
    draw: st.DrawFn,
    kind: str,
    cursor: int,
    follower: ReferenceEngine,
    account: int,
    accounts: Mapping[int, PhaseSpec],
) -> int:
    levels = follower.levels(account)
    nudge = draw(st.sampled_from((-1, 0, 0, 1, US_PER_MINUTE)))
    if kind == "boundary" and levels.next_boundary is not None:
        return max(cursor, levels.next_boundary + nudge)
    if kind == "time_limit" and levels.time_limit is not None:
        return max(cursor, levels.time_limit + nudge)
    if kind == "late":
        return cursor - draw(st.integers(min_value=1, max_value=6 * US_PER_HOUR))
    if kind == "early":
        started_at = to_micros(accounts[account].started_at)
        return started_at - draw(st.integers(min_value=1, max_value=US_PER_DAY))
    step = draw(
        st.one_of(
            st.sampled_from(
                (0, 1, 1_000_000, US_PER_MINUTE, US_PER_HOUR, 5 * US_PER_HOUR)
            ),
            st.integers(min_value=1, max_value=3 * US_PER_HOUR),
            st.sampled_from((11, 23, 24, 25)).map(lambda h: h * US_PER_HOUR),
        )
    )
    return cursor + step


def next_values(
    draw: st.DrawFn, levels: Levels, equity: float, balance: float
) -> tuple[float, float]:
    how = draw(
        st.sampled_from(("level", "level", "walk", "walk", "walk", "same", "flat"))
    )
    if how == "level":
        value = level(levels, draw(st.sampled_from(LEVEL_NAMES)))
        if value is not None:
            delta = draw(st.sampled_from((0.0, 0.0, -0.01, 0.01, -0.005, 0.005)))
            equity = value + delta
    elif how == "walk":
        move = draw(st.floats(min_value=-0.015, max_value=0.015))
        equity = equity * (1 + move)
        if draw(st.booleans()):
            equity = round(equity, 2)
    elif how == "flat":
        equity = balance
    closing = draw(
        st.sampled_from(("keep", "keep", "keep", "close", "close", "target"))
    )
    if closing == "close":
        balance = equity
    elif closing == "target" and levels.target is not None:
        balance = levels.target
    return equity, balance


# ---------------------------------------------------------------------- comparison


def differences(
    name: str, got: Mapping[Any, Any], want: Mapping[Any, Any], labels: tuple[str, str]
) -> list[str]:
    return [
        show(f"{name}[{key}]", got.get(key), want.get(key), labels)
        for key in sorted(set(got) | set(want), key=repr)
        if got.get(key) != want.get(key)
    ]


def show(name: str, got: object, want: object, labels: tuple[str, str]) -> str:
    width = max(map(len, labels))
    return f"{name}:\n  {labels[0]:{width}} {got}\n  {labels[1]:{width}} {want}"


def assert_same(
    got: Outcome, want: Outcome, labels: tuple[str, str] = ("engine", "reference")
) -> None:
    """Compare two outcomes table by table, listing every differing row."""
    problems = [
        *differences("breaches", got.breaches, want.breaches, labels),
        *differences("daily", got.daily, want.daily, labels),
        *differences("phases", got.phases, want.phases, labels),
        *differences("metrics", got.metrics, want.metrics, labels),
    ]
    got_transitions = sorted(got.transitions, key=repr)
    want_transitions = sorted(want.transitions, key=repr)
    if got_transitions != want_transitions:
        problems.append(show("transitions", got_transitions, want_transitions, labels))
    if got.counts != want.counts:
        problems.append(show("counts", got.counts, want.counts, labels))
    assert not problems, "\n".join(problems)


@st.composite
def batch_sizes(draw: st.DrawFn, total: int) -> list[int]:
    """Random cut points (repeats give empty batches) as batch sizes."""
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=total), max_size=8)))
    return [b - a for a, b in zip([0, *cuts], cuts, strict=False)]


# --------------------------------------------------------------------------- tests
# max_examples and the rest come from the hypothesis profile loaded in conftest.py.


GROUPINGS = st.sampled_from(("auto", "always", "never"))


@settings(deadline=None)
@given(scenario=scenarios(), grouping=GROUPINGS)
def test_engine_agrees_with_reference(
    engine_runner: EngineRunner, scenario: Scenario, grouping: str
) -> None:
    want = run_reference(scenario.phases, scenario.ticks)
    got = engine_runner(scenario.phases, scenario.ticks, grouping=grouping)
    assert_same(got, want)


@settings(deadline=None)
@given(data=st.data(), scenario=scenarios(), groupings=st.tuples(GROUPINGS, GROUPINGS))
def test_engine_batches_give_identical_outputs(
    engine_runner: EngineRunner,
    data: st.DataObject,
    scenario: Scenario,
    groupings: tuple[str, str],
) -> None:
    sizes = data.draw(batch_sizes(len(scenario.ticks)), label="batch sizes")
    whole = engine_runner(scenario.phases, scenario.ticks, grouping=groupings[0])
    cut = engine_runner(scenario.phases, scenario.ticks, sizes, grouping=groupings[1])
    assert_same(cut, whole, ("batches", "one batch"))
    assert_same(cut, run_reference(scenario.phases, scenario.ticks))


@settings(deadline=None)
@given(data=st.data(), scenario=scenarios(), grouping=GROUPINGS)
def test_engine_snapshot_restore_gives_identical_outputs(
    engine_runner: EngineRunner, data: st.DataObject, scenario: Scenario, grouping: str
) -> None:
    sizes = data.draw(batch_sizes(len(scenario.ticks)), label="batch sizes")
    restores = data.draw(
        st.sets(st.integers(min_value=0, max_value=len(sizes))), label="restore before"
    )
    whole = engine_runner(scenario.phases, scenario.ticks)
    restored = engine_runner(
        scenario.phases, scenario.ticks, sizes, restores, grouping=grouping
    )
    assert_same(restored, whole, ("restored", "one run"))
    assert_same(restored, run_reference(scenario.phases, scenario.ticks))


@settings(deadline=None)
@given(scenario=scenarios(), sizes=st.data())
def test_reference_is_batch_invariant(scenario: Scenario, sizes: st.DataObject) -> None:
    cut = sizes.draw(batch_sizes(len(scenario.ticks)))
    assert_same(
        run_reference(scenario.phases, scenario.ticks, cut),
        run_reference(scenario.phases, scenario.ticks),
        ("batches", "one batch"),
    )


@settings(deadline=None)
@given(
    timezone=st.sampled_from(ZONES),
    rollover=st.sampled_from(ROLLOVERS),
    moment=st.integers(min_value=0, max_value=400 * US_PER_DAY),
)
def test_reference_day_boundaries_fall_on_the_rollover(
    timezone: str, rollover: str, moment: int
) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rules = {"initial_balance": 1.0, "timezone": timezone, "day_rollover": rollover}
    engine = ReferenceEngine()
    engine.register(PhaseSpec(1, "c", 0, start, rules))
    ts = to_micros(start) + moment
    engine.process([(1, ts, 1.0, 1.0)])
    boundary = engine.levels(1).next_boundary
    assert boundary is not None
    assert ts < boundary <= ts + US_PER_DAY + US_PER_HOUR
    zone = ZoneInfo(timezone)
    before = from_micros(boundary - 1).astimezone(zone)
    after = from_micros(boundary).astimezone(zone)
    assert before.replace(tzinfo=None) < after.replace(tzinfo=None)
    if after.utcoffset() == before.utcoffset():
        # Away from a DST gap the day ends exactly at the local rollover time.
        assert after.strftime("%H:%M:%S.%f") == f"{rollover}:00.000000"
