"""A plain-Python reference implementation of the deal rules and the hedge flags.

It transcribes ``shared/spec/rules.md`` (sections "Deal rules" and "Cross-account
hedging") and ``shared/spec/interfaces.md`` §5 literally, one event at a time, on top
of the tick reference in ``tests/reference.py`` (whose tick rules it reuses
unchanged). Where the spec is silent it follows docs/rules.md, "Deal rules:
decisions where rules.md is silent"; each such decision is marked ``Decision:`` in a
comment below. It is meant to be read next to those pages, not to be fast: the Rust
engine will be compared with it on generated streams of ticks and deals.

Timestamps are UTC microseconds since the epoch (``int``), lots are kept as whole
hundredths (``int``) so every sum and comparison is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from reference import (
    BreachRow,
    Counts,
    Outcome,
    Output,
    PhaseLike,
    ReferenceEngine,
    ReferenceRuleError,
    Tick,
    _Phase,
    day_of,
    from_micros,
    to_micros,
)

US_PER_SECOND = 1_000_000
WEEKDAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")
SIDES = ("buy", "sell")
ENTRIES = ("in", "out")
DEAL_RULE_DEFAULTS: dict[str, object] = {
    "trading_day_basis": "activity",
    "max_open_lots": None,
    "min_hold_seconds": None,
    "weekend_close": None,
    "deal_violation_action": "fail",
}
DEFAULT_HEDGE_WINDOW_SECONDS = 60


@dataclass(frozen=True, slots=True)
class Deal:
    """One deal event (rules.md, Deal events)."""

    account_id: int
    ts: int
    deal_id: int
    position_id: int
    symbol: str
    side: str
    volume: float
    price: float
    entry: str


#: One event of an account's stream: a tick tuple or a :class:`Deal`.
Event = Tick | Deal


def hundredths(volume: float) -> int:
    """``round_half_even(volume * 100)`` in binary64: lots as whole hundredths."""
    return round(volume * 100)


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class DealRules:
    """The deal rules of a phase, validated, with defaults filled in."""

    trading_day_basis: str
    max_open_lots: float | None
    min_hold_seconds: int | None
    weekend_close: str | None
    deal_violation_action: str

    @property
    def max_open_hundredths(self) -> int | None:
        """``max_open_lots`` converted like a deal's volume."""
        return None if self.max_open_lots is None else hundredths(self.max_open_lots)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _valid_weekend_close(value: object) -> bool:
    if not isinstance(value, str) or len(value) != 9 or value[3] != " ":
        return False
    hh, colon, mm = value[4:6], value[6], value[7:9]
    return (
        value[:3] in WEEKDAYS
        and colon == ":"
        and hh.isdigit()
        and mm.isdigit()
        and int(hh) < 24
        and int(mm) < 60
    )


def split_rules(rules: Mapping[str, Any]) -> tuple[dict[str, Any], DealRules]:
    """Separate the deal rules from the tick rules and validate them.

    Returns:
        The tick rules (for :func:`reference.parse_rules`) and the deal rules.

    Raises:
        ReferenceRuleError: A deal rule has a bad value (the tick rules are
            validated by the tick reference when the phase is registered).
    """
    tick_rules = {k: v for k, v in rules.items() if k not in DEAL_RULE_DEFAULTS}
    values: dict[str, Any] = {
        **DEAL_RULE_DEFAULTS,
        **{k: v for k, v in rules.items() if k in DEAL_RULE_DEFAULTS},
    }
    if values["trading_day_basis"] not in ("activity", "deals"):
        raise ReferenceRuleError("trading_day_basis", "must be activity or deals")
    lots = values["max_open_lots"]
    if lots is not None:
        if not _is_number(lots) or not math.isfinite(lots) or lots <= 0:
            raise ReferenceRuleError("max_open_lots", "must be a number > 0 or null")
        # Decision: a limit that rounds to 0 hundredths is refused, like a volume.
        if hundredths(lots) < 1:
            raise ReferenceRuleError("max_open_lots", "must be at least 0.01 lots")
        values["max_open_lots"] = float(lots)
    hold = values["min_hold_seconds"]
    if hold is not None and (
        not isinstance(hold, int) or isinstance(hold, bool) or hold <= 0
    ):
        raise ReferenceRuleError("min_hold_seconds", "must be an integer > 0 or null")
    close = values["weekend_close"]
    if close is not None and not _valid_weekend_close(close):
        raise ReferenceRuleError("weekend_close", 'must be "DDD HH:MM" or null')
    if values["deal_violation_action"] not in ("fail", "flag"):
        raise ReferenceRuleError("deal_violation_action", "must be fail or flag")
    return tick_rules, DealRules(**values)


# ---------------------------------------------------------------------- weekly close


@cache
def wall_instant(timezone: str, wall: datetime) -> int:
    """The first UTC instant whose local wall time in ``timezone`` is ≥ ``wall``.

    Found the way ``reference.day_end`` finds a day boundary: a minute at a time
    through a ±15 h window (in a DST gap, the end of the gap; in a fold, the first
    of the two instants).
    """
    zone = ZoneInfo(timezone)
    instant = wall.replace(tzinfo=UTC) - timedelta(hours=15)
    last = wall.replace(tzinfo=UTC) + timedelta(hours=15)
    while instant.astimezone(zone).replace(tzinfo=None) < wall:
        instant += timedelta(minutes=1)
        if instant > last:
            raise AssertionError(f"no instant for {wall} in {timezone}")
    return to_micros(instant)


def weekly_close_between(
    timezone: str, weekend_close: str, previous: int, ts: int
) -> int | None:
    """The latest weekly close W with ``previous < W ≤ ts``, or None.

    W is the instant of ``weekend_close`` ("DDD HH:MM") on some local date. Walking
    the local dates down from the day after ``ts``'s local date, the first W ≤ ts is
    the latest one (W grows with the date); it counts only if it is after
    ``previous``. Decision: when several weekly closes passed between two events,
    only this latest one is judged (rules.md: "the latest weekly instant").
    """
    weekday = WEEKDAYS.index(weekend_close[:3])
    hh, mm = int(weekend_close[4:6]), int(weekend_close[7:9])
    local = from_micros(ts).astimezone(ZoneInfo(timezone)).date()
    for back in range(9):
        day = local + timedelta(days=1 - back)
        if day.weekday() != weekday:
            continue
        w = wall_instant(timezone, datetime.combine(day, time(hh, mm)))
        if w <= ts:
            return w if w > previous else None
    raise AssertionError(f"no weekly close before {ts}")


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class DealCounts:
    """How deals were handled in one call (or a whole run)."""

    processed: int = 0
    late: int = 0
    duplicate: int = 0
    unmatched: int = 0
    unknown: int = 0
    inactive: int = 0
    invalid: int = 0

    def __add__(self, other: DealCounts) -> DealCounts:
        return DealCounts(
            self.processed + other.processed,
            self.late + other.late,
            self.duplicate + other.duplicate,
            self.unmatched + other.unmatched,
            self.unknown + other.unknown,
            self.inactive + other.inactive,
            self.invalid + other.invalid,
        )


@dataclass(frozen=True, slots=True)
class DealPhaseRow:
    """The deal columns of one phase's state (the backtest's ``accounts``)."""

    account_id: int
    deals: int
    late_deals: int
    duplicate_deals: int
    unmatched_deals: int
    open_lots: float
    open_positions: int


@dataclass(frozen=True, slots=True)
class FlagRow:
    """One row of the ``flags`` output (interfaces.md §5)."""

    customer_id: str
    symbol: str
    account_id_1: int
    deal_id_1: int
    ts_1: int
    side_1: str
    account_id_2: int
    deal_id_2: int
    ts_2: int
    side_2: str
    gap_seconds: float


@dataclass(slots=True)
class DealOutput(Output):
    """One call's outputs: the tick reference's, plus deals counted and in-deals."""

    deal_counts: DealCounts = field(default_factory=DealCounts)
    #: The processed ``in`` deals of the call, in processing order (the hedge
    #: join's input).
    in_deals: list[Deal] = field(default_factory=list)


@dataclass(slots=True)
class DealOutcome(Outcome):
    """The final tables of a run of ticks and deals."""

    deal_counts: DealCounts = field(default_factory=DealCounts)
    in_deals: list[Deal] = field(default_factory=list)
    deal_phases: dict[int, DealPhaseRow] = field(default_factory=dict)
    flags: list[FlagRow] = field(default_factory=list)

    def apply(self, out: Output) -> None:
        """Fold one call's outputs in (see :meth:`reference.Outcome.apply`)."""
        Outcome.apply(self, out)
        if isinstance(out, DealOutput):
            self.deal_counts = self.deal_counts + out.deal_counts
            self.in_deals.extend(out.in_deals)


# ----------------------------------------------------------------------------- engine


@dataclass(slots=True)
class _Position:
    position_id: int
    #: Which opening of the account this is (1, 2, …): a reopened ``position_id``
    #: is a new position for every rule.
    serial: int
    symbol: str
    side: str
    open_hundredths: int
    opened_at: int


@dataclass(slots=True)
class _DealState:
    rules: DealRules
    last_event_ts: int | None = None
    #: Whether a deal was processed since the last evaluated tick.
    deal_since_tick: bool = False
    deal_ids: set[int] = field(default_factory=set)
    positions: dict[int, _Position] = field(default_factory=dict)
    openings: int = 0
    deal_days: set[date] = field(default_factory=set)
    recorded: set[tuple[str, int]] = field(default_factory=set)
    deals: int = 0
    late_deals: int = 0
    duplicate_deals: int = 0
    unmatched_deals: int = 0

    def open_hundredths(self) -> int:
        return sum(pos.open_hundredths for pos in self.positions.values())


@dataclass(frozen=True, slots=True)
class _TickRulesSpec:
    account_id: int
    challenge_id: str
    phase_index: int
    started_at: datetime
    rules: Mapping[str, Any]


def deal_is_valid(deal: Deal) -> bool:
    """A deal the spec can judge: known side and entry, volume ≥ 0.01 lot, price > 0.

    Decision: the engine never trusts its input; a deal that is not valid is
    counted ``invalid`` and skipped before anything else (it takes no ``deal_id``).
    """
    return (
        isinstance(deal.symbol, str)
        and deal.symbol != ""
        and deal.side in SIDES
        and deal.entry in ENTRIES
        and _is_number(deal.volume)
        and math.isfinite(deal.volume)
        and deal.volume > 0
        and hundredths(deal.volume) >= 1
        and _is_number(deal.price)
        and math.isfinite(deal.price)
        and deal.price > 0
    )


class DealReferenceEngine(ReferenceEngine):
    """The tick reference extended to one ordered stream of ticks and deals."""

    def __init__(self) -> None:
        super().__init__()
        self._deal_state: dict[int, _DealState] = {}

    def register(self, spec: PhaseLike) -> None:
        """Start judging a phase whose rules may include deal rules.

        Raises:
            ReferenceRuleError: The rules are invalid or the account is taken.
        """
        tick_rules, deal_rules = split_rules(spec.rules)
        super().register(
            _TickRulesSpec(
                spec.account_id,
                spec.challenge_id,
                spec.phase_index,
                spec.started_at,
                tick_rules,
            )
        )
        self._deal_state[spec.account_id] = _DealState(rules=deal_rules)

    def remove(self, account_id: int) -> bool:
        """Forget a phase and its positions; False if it was not registered."""
        self._deal_state.pop(account_id, None)
        return super().remove(account_id)

    def process(self, events: Iterable[Event]) -> DealOutput:
        """Judge ticks and deals in the order given; return what the call emitted."""
        out = DealOutput()
        ticks = {"evaluated": 0, "late": 0, "unknown": 0, "inactive": 0, "invalid": 0}
        deals = dict.fromkeys(
            ("processed", "late", "duplicate", "unmatched", "unknown", "inactive"), 0
        )
        deals["invalid"] = 0
        touched: dict[int, _Phase] = {}
        for event in events:
            if isinstance(event, Deal):
                self._on_deal(event, out, deals, touched)
            else:
                self._on_tick(event, out, ticks, touched)
        for phase in touched.values():
            # Decision: a metric row needs equity, so a phase with no evaluated
            # tick yet has none; a phase whose state a deal changed (trading days,
            # status) gets one, still dated by its last evaluated tick.
            if phase.equity is not None:
                out.metrics[phase.account_id] = self._metric(phase)
        out.counts = Counts(**ticks)
        out.deal_counts = DealCounts(**deals)
        return out

    def deal_phases(self) -> dict[int, DealPhaseRow]:
        """The deal columns of every registered phase."""
        return {
            account_id: DealPhaseRow(
                account_id=account_id,
                deals=s.deals,
                late_deals=s.late_deals,
                duplicate_deals=s.duplicate_deals,
                unmatched_deals=s.unmatched_deals,
                open_lots=s.open_hundredths() / 100,
                open_positions=len(s.positions),
            )
            for account_id, s in self._deal_state.items()
        }

    # ------------------------------------------------------------------ one tick

    def _on_tick(
        self,
        tick: Tick,
        out: DealOutput,
        counts: dict[str, int],
        touched: dict[int, _Phase],
    ) -> None:
        account_id, ts, equity, balance = tick
        if not (math.isfinite(equity) and math.isfinite(balance)):
            counts["invalid"] += 1
            return
        p = self._phases.get(account_id)
        if p is None:
            counts["unknown"] += 1
            return
        if p.status != "active":
            counts["inactive"] += 1
            return
        s = self._deal_state[account_id]
        # Lateness against the last processed event, tick or deal.
        if ts < p.started_at or (s.last_event_ts is not None and ts < s.last_event_ts):
            counts["late"] += 1
            p.late_ticks += 1
            return
        if self._weekend_hold(p, s, ts, out):
            # The phase failed at W: this tick comes after the end. Decision: it
            # is counted like any tick of an ended phase (``inactive``).
            counts["inactive"] += 1
            touched[account_id] = p
            return
        counts["evaluated"] += 1
        p.ticks += 1
        touched[account_id] = p
        s.last_event_ts = ts
        # Decision: the tick reference's "exact duplicate changes nothing" holds
        # only while no deal came in between: after a deal, the same tick is a
        # new observation and is judged (the deal may have completed a trading
        # day under the deals basis, and this tick may pass the phase).
        duplicate = not s.deal_since_tick and (ts, equity, balance) == (
            p.last_ts,
            p.equity,
            p.balance,
        )
        s.deal_since_tick = False
        if duplicate:
            return
        self._evaluate(p, ts, float(equity), float(balance), out)

    def _count_activity(self, p: _Phase, equity: float, balance: float) -> None:
        # Under the deals basis ticks no longer count toward trading days (their
        # count is kept by ``_on_deal``); under the activity basis the tick rule.
        if self._deal_state[p.account_id].rules.trading_day_basis == "deals":
            return
        super()._count_activity(p, equity, balance)

    # ------------------------------------------------------------------ one deal

    def _on_deal(
        self,
        deal: Deal,
        out: DealOutput,
        counts: dict[str, int],
        touched: dict[int, _Phase],
    ) -> None:
        if not deal_is_valid(deal):
            counts["invalid"] += 1
            return
        p = self._phases.get(deal.account_id)
        if p is None:
            # Decision: counted ``unknown`` in the call's counts; no account owns it.
            counts["unknown"] += 1
            return
        if p.status != "active":
            # Decision: an ended phase is checked before duplicates, so the
            # account's counters stop at the end like ``ticks``/``late_ticks``.
            counts["inactive"] += 1
            return
        s = self._deal_state[deal.account_id]
        r = s.rules
        if deal.deal_id in s.deal_ids:
            # Changes nothing, not even the last event time; never late.
            counts["duplicate"] += 1
            s.duplicate_deals += 1
            return
        if deal.ts < p.started_at or (
            s.last_event_ts is not None and deal.ts < s.last_event_ts
        ):
            counts["late"] += 1
            s.late_deals += 1
            return
        if self._weekend_hold(p, s, deal.ts, out):
            counts["inactive"] += 1
            touched[deal.account_id] = p
            return

        # Processed: counted, its deal_id taken, the last event time moves.
        counts["processed"] += 1
        s.deals += 1
        s.deal_ids.add(deal.deal_id)
        s.last_event_ts = deal.ts
        s.deal_since_tick = True
        touched[deal.account_id] = p
        if deal.entry == "in":
            # The hedge join's input: a deal that goes on to fail its phase was
            # processed and still pairs.
            out.in_deals.append(deal)

        # 1. Trading day under the deals basis (a deal never opens a day).
        if r.trading_day_basis == "deals" and deal.entry == "in":
            timezone = p.rules.timezone
            s.deal_days.add(day_of(timezone, p.rules.rollover_minutes, deal.ts))
            p.trading_days = len(s.deal_days)

        # 2. The position update (weekend_hold was checked above).
        volume = hundredths(deal.volume)
        position = s.positions.get(deal.position_id)
        if deal.entry == "in":
            if position is None:
                s.openings += 1
                position = _Position(
                    position_id=deal.position_id,
                    serial=s.openings,
                    symbol=deal.symbol,
                    side=deal.side,
                    open_hundredths=0,
                    opened_at=deal.ts,
                )
                s.positions[deal.position_id] = position
            # An add keeps the first in deal's side, symbol and opened_at.
            position.open_hundredths += volume
        elif position is None:
            counts["unmatched"] += 1
            s.unmatched_deals += 1
            return
        else:
            # Decision: like an in deal, an out deal's own side and symbol are not
            # checked: the platform's position id is the authority.
            position.open_hundredths = max(0, position.open_hundredths - volume)

        # 3. max_position_size after an in deal.
        limit = r.max_open_hundredths
        if deal.entry == "in" and limit is not None:
            open_now = s.open_hundredths()
            if open_now > limit:
                failed = self._deal_violation(
                    p,
                    s,
                    "max_position_size",
                    position.serial,
                    limit / 100,
                    open_now / 100,
                    deal.ts,
                    out,
                )
                if failed:
                    return

        # 4. short_hold after an out deal that closes the position.
        if deal.entry == "out" and position.open_hundredths == 0:
            del s.positions[deal.position_id]
            held_us = deal.ts - position.opened_at
            if (
                r.min_hold_seconds is not None
                and held_us < r.min_hold_seconds * US_PER_SECOND
            ):
                self._deal_violation(
                    p,
                    s,
                    "short_hold",
                    position.serial,
                    float(r.min_hold_seconds),
                    held_us / US_PER_SECOND,
                    deal.ts,
                    out,
                )

    # ------------------------------------------------------------- deal rules

    def _weekend_hold(self, p: _Phase, s: _DealState, ts: int, out: Output) -> bool:
        """Check ``weekend_hold`` for the event at ``ts``; True if the phase failed.

        Positions open now (before the event) were opened at or before the previous
        processed event, so before W, and were not closed before W: exactly the
        positions held at W (a close at W is the current event, not yet applied).
        """
        close = s.rules.weekend_close
        if close is None or s.last_event_ts is None or not s.positions:
            return False
        w = weekly_close_between(p.rules.timezone, close, s.last_event_ts, ts)
        if w is None:
            return False
        lots = s.open_hundredths() / 100
        return self._deal_violation(p, s, "weekend_hold", w, 0.0, lots, w, out)

    def _deal_violation(
        self,
        p: _Phase,
        s: _DealState,
        rule: str,
        key: int,
        threshold: float,
        actual: float,
        ts: int,
        out: Output,
    ) -> bool:
        """Record a deal-rule violation once per (rule, key); True if it failed.

        ``key`` is the position's serial, or W for ``weekend_hold``. Deal-rule
        breaches are never resolved.
        """
        if (rule, key) in s.recorded:
            return False
        s.recorded.add((rule, key))
        if s.rules.deal_violation_action == "flag":
            self._breach(p, rule, "warning", threshold, actual, "notify", ts, out)
            return False
        self._breach(p, rule, "critical", threshold, actual, "phase_failed", ts, out)
        self._transition(p, "failed", ts, out)
        return True


# ---------------------------------------------------------------------- hedge flags


def hedge_flags(
    in_deals: Iterable[Deal],
    customers: Mapping[int, str],
    window_seconds: float | None = DEFAULT_HEDGE_WINDOW_SECONDS,
) -> list[FlagRow]:
    """Every hedge flag among processed ``in`` deals, sorted; any input order.

    A pair flags when both deals are ``in`` deals, on two different accounts of
    the same customer, on the same symbol, of opposite sides, with
    ``|ts1 - ts2| <= window``. Decision: an account without a ``customer_id``
    never pairs; the same deal fed twice is one deal.

    Raises:
        ValueError: The window is negative or not finite, or two different deals
            carry the same (account_id, deal_id).
    """
    if window_seconds is None:
        return []
    if not math.isfinite(window_seconds) or window_seconds < 0:
        raise ValueError("hedge_window_seconds: must be a number >= 0 or null")
    window_us = window_seconds * US_PER_SECOND
    unique: dict[tuple[int, int], Deal] = {}
    for deal in in_deals:
        key = (deal.account_id, deal.deal_id)
        if key in unique and unique[key] != deal:
            raise ValueError(f"deal_id {deal.deal_id} of {deal.account_id} differs")
        if deal.entry == "in":
            unique[key] = deal
    deals = sorted(unique.values(), key=lambda d: (d.account_id, d.deal_id))
    rows: list[FlagRow] = []
    for i, first in enumerate(deals):
        for second in deals[i + 1 :]:
            if first.account_id == second.account_id:
                continue
            customer = customers.get(first.account_id)
            if customer is None or customers.get(second.account_id) != customer:
                continue
            if first.symbol != second.symbol or first.side == second.side:
                continue
            gap_us = abs(first.ts - second.ts)
            if gap_us > window_us:
                continue
            # ``deals`` is sorted by account, so ``first`` has the smaller one.
            rows.append(
                FlagRow(
                    customer_id=customer,
                    symbol=first.symbol,
                    account_id_1=first.account_id,
                    deal_id_1=first.deal_id,
                    ts_1=first.ts,
                    side_1=first.side,
                    account_id_2=second.account_id,
                    deal_id_2=second.deal_id,
                    ts_2=second.ts,
                    side_2=second.side,
                    gap_seconds=gap_us / US_PER_SECOND,
                )
            )
    rows.sort(
        key=lambda f: (
            f.customer_id,
            f.symbol,
            f.account_id_1,
            f.deal_id_1,
            f.account_id_2,
            f.deal_id_2,
        )
    )
    return rows


# ------------------------------------------------------------------------ whole runs


def merge_events(ticks: Sequence[Tick], deals: Sequence[Deal]) -> list[Event]:
    """The backtest's order: stable by (account_id, ts), a deal before a tick."""
    events: list[Event] = [*deals, *ticks]

    def key(event: Event) -> tuple[int, int, int]:
        if isinstance(event, Deal):
            return (event.account_id, event.ts, 0)
        return (event[0], event[1], 1)

    return sorted(events, key=key)


def split_events(events: Sequence[Event], sizes: Sequence[int]) -> list[list[Event]]:
    """Cut ``events`` into consecutive batches of ``sizes``, plus the rest."""
    batches: list[list[Event]] = []
    start = 0
    for size in sizes:
        batches.append(list(events[start : start + size]))
        start += size
    batches.append(list(events[start:]))
    return batches


def run_deal_reference(
    phases: Sequence[PhaseLike],
    events: Sequence[Event],
    batches: Sequence[int] | None = None,
    customers: Mapping[int, str] | None = None,
    hedge_window_seconds: float | None = DEFAULT_HEDGE_WINDOW_SECONDS,
) -> DealOutcome:
    """Register ``phases``, judge ``events`` in delivery order, join the flags.

    Args:
        phases: The phases to register, in order.
        events: Ticks and deals, in delivery order (see :func:`merge_events`).
        batches: Optional batch sizes, as :func:`split_events` takes them.
        customers: ``customer_id`` per account, for hedge flags.
        hedge_window_seconds: The firm-wide window; None turns flags off.

    Returns:
        The final outcome, with every phase's tick and deal state and the flags.
    """
    engine = DealReferenceEngine()
    for spec in phases:
        engine.register(spec)
    outcome = DealOutcome()
    for batch in split_events(events, batches or ()):
        outcome.apply(engine.process(batch))
    outcome.phases = engine.phases()
    outcome.deal_phases = engine.deal_phases()
    outcome.flags = hedge_flags(outcome.in_deals, customers or {}, hedge_window_seconds)
    return outcome


def breach_list(outcome: Outcome) -> list[BreachRow]:
    """The outcome's breaches in ``breach_seq`` order."""
    return [outcome.breaches[key] for key in sorted(outcome.breaches)]
