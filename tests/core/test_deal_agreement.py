"""The engine agrees with the plain-Python deal reference on ticks and deals.

Streams mix several accounts with random deal rules (and tick rules), and aim at
the deal rules' edges while they are drawn: open lots exactly at the limit and
one hundredth over, a close exactly at ``min_hold_seconds`` (and a microsecond
either side), events exactly at a weekly ``weekend_close`` instant (and a
microsecond either side) in DST weeks of New York and London, duplicate, late,
unknown-account and invalid deals, and a tick repeated after a deal. The engine
gets each call's events as a tick table plus a deal table placed among the ticks
by ``before_tick``, in random batchings, with snapshot/restore between calls.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from conftest import _rows, engine_output, ticks_frame
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import PhaseRow, Tick, to_micros
from reference_deals import (
    Deal,
    DealCounts,
    DealOutcome,
    DealOutput,
    DealPhaseRow,
    DealReferenceEngine,
    Event,
    hundredths,
    run_deal_reference,
    split_events,
    weekly_close_between,
)
from test_reference_agreement import assert_same, batch_sizes, rule_sets, show
from test_reference_deals import CASES, phase

from prop_stream import PhaseSpec, RuleEngine, TickBatchError
from prop_stream.exceptions import RuleConfigError
from prop_stream.rules import DEAL_COLUMNS, DEAL_SCHEMA, Grouping, validate_rules

US = 1_000_000
US_PER_MINUTE = 60 * US
US_PER_HOUR = 60 * US_PER_MINUTE
US_PER_DAY = 24 * US_PER_HOUR
UNKNOWN_ACCOUNT = 9_999

#: Thursdays before DST weekends (and one plain week), with the zone that changes
#: its clocks that weekend.
ANCHORS = (
    (datetime(2026, 3, 5, tzinfo=UTC), "America/New_York"),  # NY springs 03-08
    (datetime(2026, 3, 26, tzinfo=UTC), "Europe/London"),  # London springs 03-29
    (datetime(2026, 10, 22, tzinfo=UTC), "Europe/London"),  # London falls 10-25
    (datetime(2026, 10, 29, tzinfo=UTC), "America/New_York"),  # NY falls 11-01
    (datetime(2026, 1, 8, tzinfo=UTC), "UTC"),
)
#: Weekly closes; "SUN 01:30" falls in London's spring gap and fold.
WEEKEND_CLOSES = ("FRI 17:00", "FRI 22:00", "SAT 00:00", "SUN 01:30", "FRI 21:59")
LOT_LIMITS = (1.0, 1.5, 2.005, 0.5, 0.03)
HOLDS = (1, 60, 3_600)
VOLUMES = (0.01, 0.5, 1.0, 1.005, 0.125, 0.3)


# ------------------------------------------------------------------ the engine side


def deal_table(placed: Sequence[tuple[Deal, int]]) -> pa.Table:
    """Deals with their ``before_tick``, in :data:`DEAL_SCHEMA` plus the column."""
    columns: dict[str, Any] = {
        name: [getattr(d, name) for d, _ in placed] for name in DEAL_COLUMNS
    }
    columns["before_tick"] = [k for _, k in placed]
    schema = DEAL_SCHEMA.append(pa.field("before_tick", pa.int64()))
    return pa.table(columns, schema=schema)


def engine_call(
    engine: RuleEngine, events: Sequence[Event]
) -> tuple[DealOutput, list[tuple[Any, ...]]]:
    """One ``process`` call of ``events`` in delivery order.

    Ticks go as a table, deals placed among them by ``before_tick``. Returns the
    call's outputs as the reference's :class:`DealOutput` and its ``deal_opens``
    rows.
    """
    ticks: list[Tick] = []
    placed: list[tuple[Deal, int]] = []
    for event in events:
        if isinstance(event, Deal):
            placed.append((event, len(ticks)))
        else:
            ticks.append(event)
    ev = engine.process(ticks_frame(ticks), deal_table(placed) if placed else None)
    base = engine_output(ev)
    out = DealOutput(
        breaches=base.breaches,
        daily=base.daily,
        metrics=base.metrics,
        transitions=base.transitions,
        counts=base.counts,
        deal_counts=DealCounts(**dataclasses.asdict(ev.deal_counts)),
    )
    opens = pl.from_arrow(ev.deal_opens)
    assert isinstance(opens, pl.DataFrame)
    rows = opens.with_columns(pl.col("ts").dt.epoch("us")).rows()
    return out, rows


@dataclass
class EngineRun:
    """The engine's final tables, as the reference's, plus its deal opens."""

    outcome: DealOutcome
    opens: list[tuple[Any, ...]]


def run_engine_deals(
    phases: Sequence[PhaseSpec],
    events: Sequence[Event],
    batches: Sequence[int] | None = None,
    restore_before: Collection[int] = (),
    grouping: Grouping = "auto",
) -> EngineRun:
    """Run the engine over ``events`` (cut like :func:`split_events`)."""
    engine = RuleEngine(grouping=grouping)
    for spec in phases:
        engine.register(spec)
    outcome = DealOutcome()
    opens: list[tuple[Any, ...]] = []
    for index, batch in enumerate(split_events(events, batches or ())):
        if index in restore_before:
            engine = RuleEngine.restore(engine.snapshot(), grouping=grouping)
        out, rows = engine_call(engine, batch)
        outcome.apply(out)
        opens.extend(rows)
    frame = engine.phases()
    outcome.phases = {r.account_id: r for r in _rows(frame, PhaseRow)}
    outcome.deal_phases = {r.account_id: r for r in _rows(frame, DealPhaseRow)}
    return EngineRun(outcome, opens)


def assert_agree(
    got: EngineRun,
    want: DealOutcome,
    labels: tuple[str, str] = ("engine", "reference"),
    want_opens: list[tuple[Any, ...]] | None = None,
) -> None:
    """Every table, the deal counts, the deal columns of phases and the opens
    (``want_opens``, else the reference's ``in_deals``)."""
    assert_same(got.outcome, want, labels)
    problems = []
    if got.outcome.deal_counts != want.deal_counts:
        problems.append(
            show("deal_counts", got.outcome.deal_counts, want.deal_counts, labels)
        )
    if got.outcome.deal_phases != want.deal_phases:
        problems.append(
            show("deal_phases", got.outcome.deal_phases, want.deal_phases, labels)
        )
    if want_opens is None:
        want_opens = [
            (d.account_id, d.deal_id, d.ts, d.symbol, d.side) for d in want.in_deals
        ]
    if got.opens != want_opens:
        problems.append(show("deal_opens", got.opens, want_opens, labels))
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------- the streams


@st.composite
def deal_rule_sets(draw: st.DrawFn, zone: str) -> dict[str, Any]:
    """Deal rules, each omitted or set, over tick rules (sometimes)."""
    rules: dict[str, Any] = (
        draw(rule_sets(zone)) if draw(st.booleans()) else {"initial_balance": 100_000}
    )
    rules["timezone"] = draw(st.sampled_from((zone, zone, "UTC")))
    if draw(st.booleans()):
        rules["max_open_lots"] = draw(st.sampled_from(LOT_LIMITS))
    if draw(st.booleans()):
        rules["min_hold_seconds"] = draw(st.sampled_from(HOLDS))
    if draw(st.integers(0, 3)):
        rules["weekend_close"] = draw(st.sampled_from(WEEKEND_CLOSES))
    rules["deal_violation_action"] = draw(st.sampled_from(("fail", "flag")))
    if draw(st.booleans()):
        rules["trading_day_basis"] = draw(st.sampled_from(("activity", "deals")))
    if draw(st.booleans()):
        # A target reachable in the stream, so deals can complete the last day.
        rules["profit_target"] = 0.01
        rules["min_trading_days"] = draw(st.integers(0, 3))
    return rules


@dataclass(frozen=True)
class Scenario:
    """Phases to register and the events to deliver, in order."""

    phases: list[PhaseSpec]
    events: list[Event]


def first_close_after(timezone: str, close: str, ts: int) -> int:
    """The first weekly close W > ts (the reference's own instants)."""
    for days in range(1, 9):
        w = weekly_close_between(timezone, close, ts, ts + days * US_PER_DAY)
        if w is not None:
            # The latest in (ts, ts + days]: with days growing, the first found
            # is the first after ts.
            return w
    raise AssertionError("no weekly close within 8 days")


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """Phases and a stream of ticks and deals aimed at the deal rules' edges.

    A reference engine follows the stream as it is drawn, so that deals can put
    open lots exactly at the limit, close a position exactly at the minimum hold
    and land events exactly on the weekly close.
    """
    anchor, zone = draw(st.sampled_from(ANCHORS))
    phases = [
        PhaseSpec(
            account_id=1_001 + i,
            challenge_id=f"c-{i}",
            phase_index=0,
            started_at=anchor - timedelta(minutes=draw(st.integers(0, 600))),
            rules=draw(deal_rule_sets(zone)),
        )
        for i in range(draw(st.integers(1, 3)))
    ]
    follower = DealReferenceEngine()
    for spec in phases:
        follower.register(spec)
    specs = {s.account_id: s for s in phases}
    now = {a: to_micros(s.started_at) for a, s in specs.items()}
    equity = {a: float(s.rules["initial_balance"]) for a, s in specs.items()}
    events: list[Event] = []
    sent: list[Deal] = []
    last_tick: dict[int, Tick] = {}
    next_id = 1

    def new_deal(
        account: int, ts: int, position: int, entry: str, volume: float
    ) -> Deal:
        nonlocal next_id
        next_id += 1
        return Deal(
            account_id=account,
            ts=ts,
            deal_id=next_id if draw(st.integers(0, 9)) else next_id - 2,
            position_id=position,
            symbol=draw(st.sampled_from(("EURUSD", "XAUUSD"))),
            side=draw(st.sampled_from(("buy", "sell"))),
            volume=volume,
            price=1.1,
            entry=entry,
        )

    for _ in range(draw(st.integers(0, 45))):
        account = draw(st.sampled_from(sorted(specs)))
        rules = specs[account].rules
        state = follower._deal_state[account]
        kind = draw(
            st.sampled_from(
                ("tick",) * 5
                + ("in",) * 3
                + ("out",) * 3
                + ("weekend", "hold", "limit", "repeat", "redeliver", "late")
                + ("unknown", "invalid", "same_ts")
            )
        )
        step = draw(
            st.sampled_from(
                (0, 1, US, 30 * US, US_PER_MINUTE, US_PER_HOUR, 6 * US_PER_HOUR)
            )
        )
        ts = now[account] + step
        event: Event
        if kind == "tick" or (kind == "repeat" and account not in last_tick):
            choice = draw(st.sampled_from(("flat", "open", "target", "loss")))
            ib = float(rules["initial_balance"])
            value = {
                "flat": equity[account],
                "open": equity[account] + 250.0,
                "target": round(ib * 1.02, 2),
                "loss": round(ib * 0.93, 2),
            }[choice]
            balance = value if draw(st.booleans()) else equity[account]
            event = (account, ts, value, balance)
            equity[account] = balance
            last_tick[account] = event
        elif kind == "repeat":
            event = last_tick[account]
        elif kind == "in":
            position = draw(st.integers(1, 4))
            event = new_deal(
                account, ts, position, "in", draw(st.sampled_from(VOLUMES))
            )
        elif kind == "limit":
            # Open lots exactly at the limit, or one hundredth over.
            limit = rules.get("max_open_lots") or 1.0
            room = hundredths(limit) - state.open_hundredths()
            room += draw(st.sampled_from((0, 1)))
            if room < 1:
                continue
            position = draw(st.integers(1, 4))
            event = new_deal(account, ts, position, "in", room / 100)
        elif kind in ("out", "hold"):
            if state.positions and draw(st.integers(0, 5)) > 0:
                pos = draw(
                    st.sampled_from(
                        sorted(state.positions.values(), key=lambda p: p.position_id)
                    )
                )
                volume = draw(
                    st.sampled_from(
                        (
                            pos.open_hundredths / 100,
                            pos.open_hundredths / 100,
                            0.01,
                            9.0,
                        )
                    )
                )
                if kind == "hold":
                    # A close exactly at the minimum hold (or a µs either side).
                    hold = rules.get("min_hold_seconds") or 60
                    at_min = (
                        pos.opened_at + hold * US + draw(st.sampled_from((-1, 0, 1)))
                    )
                    ts = max(ts, at_min) if draw(st.booleans()) else at_min
                event = new_deal(account, ts, pos.position_id, "out", volume)
            else:
                event = new_deal(account, ts, draw(st.integers(1, 9)), "out", 0.5)
        elif kind == "weekend":
            close = rules.get("weekend_close") or "FRI 22:00"
            w = first_close_after(rules["timezone"], close, now[account])
            ts = w + draw(st.sampled_from((-1, 0, 0, 1)))
            if draw(st.booleans()) and state.positions:
                pos = draw(
                    st.sampled_from(
                        sorted(state.positions.values(), key=lambda p: p.position_id)
                    )
                )
                event = new_deal(
                    account, ts, pos.position_id, "out", pos.open_hundredths / 100
                )
            elif draw(st.booleans()):
                event = (account, ts, equity[account], equity[account])
                last_tick[account] = event
            else:
                event = new_deal(account, ts, draw(st.integers(1, 4)), "in", 0.5)
        elif kind == "redeliver" and sent:
            event = draw(st.sampled_from(sent))
        elif kind == "late":
            back = draw(st.sampled_from((1, US, US_PER_HOUR)))
            if draw(st.booleans()):
                event = new_deal(account, now[account] - back, 1, "in", 0.5)
            else:
                event = (account, now[account] - back, equity[account], equity[account])
        elif kind == "unknown":
            event = new_deal(UNKNOWN_ACCOUNT, ts, 1, "in", 0.5)
        elif kind == "invalid":
            good = new_deal(account, ts, 1, "in", 0.5)
            spoil: dict[str, Any] = draw(
                st.sampled_from(
                    (
                        {"side": "short"},
                        {"entry": "inout"},
                        {"volume": 0.004},
                        {"volume": -1.0},
                        {"volume": math.nan},
                        {"price": 0.0},
                        {"price": math.inf},
                        {"symbol": ""},
                    )
                )
            )
            event = dataclasses.replace(good, **spoil)
        else:  # same_ts, or redeliver with nothing sent yet
            event = new_deal(account, now[account], draw(st.integers(1, 4)), "in", 0.01)
        events.append(event)
        if isinstance(event, Deal):
            sent.append(event)
        follower.process([event])
        ts_of = event.ts if isinstance(event, Deal) else event[1]
        if event_account(event) in now:
            now[event_account(event)] = max(now[event_account(event)], ts_of)
    return Scenario(phases, events)


def event_account(event: Event) -> int:
    return event.account_id if isinstance(event, Deal) else event[0]


# --------------------------------------------------------------------------- tests
# max_examples and the rest come from the hypothesis profile loaded in conftest.py.

GROUPINGS = st.sampled_from(("auto", "always", "never"))


@settings(deadline=None)
@given(scenario=scenarios(), grouping=GROUPINGS)
def test_engine_agrees_with_deal_reference(
    scenario: Scenario, grouping: Grouping
) -> None:
    want = run_deal_reference(scenario.phases, scenario.events)
    got = run_engine_deals(scenario.phases, scenario.events, grouping=grouping)
    assert_agree(got, want)


@settings(deadline=None)
@given(data=st.data(), scenario=scenarios(), grouping=GROUPINGS)
def test_engine_deal_batches_give_identical_outputs(
    data: st.DataObject, scenario: Scenario, grouping: Grouping
) -> None:
    sizes = data.draw(batch_sizes(len(scenario.events)), label="batch sizes")
    want = run_deal_reference(scenario.phases, scenario.events)
    got = run_engine_deals(scenario.phases, scenario.events, sizes, grouping=grouping)
    assert_agree(got, want, ("batches", "reference"))


@settings(deadline=None)
@given(data=st.data(), scenario=scenarios(), grouping=GROUPINGS)
def test_engine_snapshot_restore_mid_position_changes_nothing(
    data: st.DataObject, scenario: Scenario, grouping: Grouping
) -> None:
    sizes = data.draw(batch_sizes(len(scenario.events)), label="batch sizes")
    restores = data.draw(
        st.sets(st.integers(min_value=0, max_value=len(sizes))), label="restore before"
    )
    whole = run_engine_deals(scenario.phases, scenario.events)
    restored = run_engine_deals(
        scenario.phases, scenario.events, sizes, restores, grouping=grouping
    )
    assert_agree(restored, whole.outcome, ("restored", "one run"), whole.opens)


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_agrees_on_the_worked_examples(name: str) -> None:
    case = CASES[name]
    phases = [phase(case.start, **case.rules)]
    want = run_deal_reference(phases, case.events)
    assert_agree(run_engine_deals(phases, case.events), want)
    one_by_one = [1] * len(case.events)
    assert_agree(run_engine_deals(phases, case.events, one_by_one, {2, 3}), want)


# ------------------------------------------------------------ boundaries by hand


def at(text: str) -> int:
    return to_micros(datetime.fromisoformat(text).replace(tzinfo=UTC))


def deal(
    when: str, deal_id: int, position: int, entry: str = "in", volume: float = 1.0
) -> Deal:
    return Deal(1001, at(when), deal_id, position, "EURUSD", "buy", volume, 1.1, entry)


def only(**rules: Any) -> list[PhaseSpec]:
    start = datetime(2026, 3, 2, tzinfo=UTC)
    return [PhaseSpec(1001, "c-1", 0, start, {"initial_balance": 100_000, **rules})]


def test_weekend_close_in_new_york_dst_week_fails_at_w() -> None:
    """Friday 17:00 New York after the spring change is 21:00 UTC, not 22:00."""
    phases = only(timezone="America/New_York", weekend_close="FRI 17:00")
    events: list[Event] = [
        deal("2026-03-09 10:00", 1, 1),
        (1001, at("2026-03-13 20:59"), 100_000.0, 100_000.0),
        (1001, at("2026-03-13 21:00"), 100_000.0, 100_000.0),
    ]
    got = run_engine_deals(phases, events)
    assert_agree(got, run_deal_reference(phases, events))
    [row] = got.outcome.breaches.values()
    assert (row.rule, row.ts, row.actual) == (
        "weekend_hold",
        at("2026-03-13 21:00"),
        1.0,
    )
    assert got.outcome.counts.inactive == 1


def test_a_close_exactly_at_the_weekly_instant_was_still_held() -> None:
    phases = only(weekend_close="FRI 22:00", deal_violation_action="flag")
    events: list[Event] = [
        deal("2026-03-06 10:00", 1, 1),
        deal("2026-03-06 22:00", 2, 1, "out"),
    ]
    got = run_engine_deals(phases, events)
    assert_agree(got, run_deal_reference(phases, events))
    [row] = got.outcome.breaches.values()
    assert (row.rule, row.severity, row.action) == ("weekend_hold", "warning", "notify")
    assert got.outcome.deal_phases[1001].open_positions == 0


def test_deal_validation_errors_name_the_column() -> None:
    engine = RuleEngine()
    engine.register(only()[0])
    ticks = ticks_frame([(1001, at("2026-03-02 10:00"), 1.0, 1.0)])
    good = deal_table([(deal("2026-03-02 09:00", 1, 1), 0)])
    with pytest.raises(TickBatchError, match="symbol"):
        engine.process(ticks, good.drop_columns(["symbol"]))
    with pytest.raises(TickBatchError, match="before_tick"):
        engine.process(ticks, good.drop_columns(["before_tick"]))
    with pytest.raises(TickBatchError, match="volume"):
        engine.process(ticks, good.set_column(6, "volume", pa.array(["1"])))
    with pytest.raises(TickBatchError, match="before_tick"):
        engine.process(ticks, good.set_column(9, "before_tick", pa.array([2])))
    two = deal_table(
        [(deal("2026-03-02 09:00", 1, 1), 1), (deal("2026-03-02 09:01", 2, 1), 0)]
    )
    with pytest.raises(TickBatchError, match="before_tick"):
        engine.process(ticks, two)
    # Nothing was judged by the refused calls.
    assert engine.phases()["ticks"].to_list() == [0]
    nulls = good.set_column(4, "symbol", pa.array([None], pa.utf8()))
    ev = engine.process(ticks, pl.from_arrow(nulls))
    assert ev.deal_counts.invalid == 1
    assert ev.counts.evaluated == 1


def test_deal_rules_are_validated_naming_the_field() -> None:
    complete = validate_rules({"initial_balance": 1})
    assert complete["trading_day_basis"] == "activity"
    assert complete["deal_violation_action"] == "fail"
    assert complete["max_open_lots"] is None
    for field, value in (
        ("trading_day_basis", "ticks"),
        ("max_open_lots", 0.004),
        ("max_open_lots", -1),
        ("min_hold_seconds", 0),
        ("min_hold_seconds", True),
        ("weekend_close", "fri 22:00"),
        ("weekend_close", "FRI 24:00"),
        ("deal_violation_action", "warn"),
    ):
        with pytest.raises(RuleConfigError) as info:
            validate_rules({"initial_balance": 1, field: value})
        assert info.value.field == field
    rules = {
        "initial_balance": 1,
        "trading_day_basis": "deals",
        "max_open_lots": 2.5,
        "min_hold_seconds": 60,
        "weekend_close": "FRI 22:00",
        "deal_violation_action": "flag",
    }
    assert {k: validate_rules(rules)[k] for k in rules} == {
        **rules,
        "initial_balance": 1.0,
    }


def _snapshot_v1() -> ModuleType:
    path = Path(__file__).with_name("data") / "snapshot_v1.py"
    spec = importlib.util.spec_from_file_location("snapshot_v1", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_snapshot_written_before_deals_still_restores() -> None:
    v1 = _snapshot_v1()
    data = (Path(__file__).with_name("data") / "snapshot_v1.bin").read_bytes()
    assert data.startswith(b"PSENG\x00\x01\x00")
    restored = RuleEngine.restore(data)
    fresh = v1.engine_before()
    assert restored.phases().equals(fresh.phases())
    after = v1.ticks_table(v1.TICKS_AFTER)
    got, want = restored.process(after), fresh.process(after)
    for name in ("breaches", "metrics", "daily", "transitions"):
        assert getattr(got, name).equals(getattr(want, name)), name
    assert got.counts == want.counts
    assert restored.phases().equals(fresh.phases())
    assert restored.phases()["open_positions"].to_list() == [0, 0]
    # Restored old phases take deals from then on, and snapshot in today's format.
    ev = restored.process(
        v1.ticks_table(()),
        deal_table(
            [(Deal(7002, at("2026-01-08 00:00"), 1, 1, "X", "buy", 1.0, 1.0, "in"), 0)]
        ),
    )
    assert ev.deal_counts.processed == 1
    again = RuleEngine.restore(restored.snapshot())
    assert again.snapshot().startswith(b"PSENG\x00\x02\x00")
    assert again.phases().equals(restored.phases())
