"""A plain-Python reference implementation of the challenge rules.

It follows ``shared/spec/rules.md`` and ``docs/rules.md`` literally, one tick at a
time, with no caching beyond memoized day boundaries: it is meant to be read next to
those pages, not to be fast. The hypothesis tests in ``tests/core`` compare the Rust
engine with it.

Timestamps are UTC microseconds since the epoch (``int``), as in the engine. Days are
``datetime.date`` values. Time zones come from :mod:`zoneinfo`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from functools import cache
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: One equity tick: ``(account_id, ts in UTC microseconds, equity, balance)``.
Tick = tuple[int, int, float, float]

US_PER_DAY = 86_400_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

RULE_DEFAULTS: dict[str, object] = {
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
}
RATIO_RULES = (
    "profit_target",
    "max_daily_loss",
    "max_total_loss",
    "max_best_day_share",
    "warning_level",
)
CHOICE_RULES: dict[str, tuple[str, ...]] = {
    "daily_reference": ("day_start_equity", "day_start_balance", "day_start_max"),
    "daily_loss_base": ("initial_balance", "day_start"),
    "daily_loss_action": ("fail", "pause"),
    "total_loss_mode": ("static", "trailing", "trailing_eod"),
}


class PhaseLike(Protocol):
    """What the reference needs of a phase: ``prop_stream.PhaseSpec`` fits."""

    @property
    def account_id(self) -> int: ...
    @property
    def challenge_id(self) -> str: ...
    @property
    def phase_index(self) -> int: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def rules(self) -> Mapping[str, Any]: ...


class ReferenceRuleError(ValueError):
    """A rule set the reference refuses; ``field`` names the rule."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# --------------------------------------------------------------------------- numbers


def cent(x: float) -> float:
    """``round_half_even(x * 100) / 100`` in binary64 (docs/rules.md, Numbers)."""
    return round(x * 100) / 100


def to_micros(value: datetime) -> int:
    """UTC microseconds since the epoch of an aware datetime."""
    delta = value.astimezone(UTC) - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(ts: int) -> datetime:
    """The aware UTC datetime of ``ts`` microseconds since the epoch."""
    return EPOCH + timedelta(microseconds=ts)


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Rules:
    """A validated rule set with every default filled in."""

    initial_balance: float
    profit_target: float | None
    max_daily_loss: float | None
    daily_reference: str
    daily_loss_base: str
    daily_loss_action: str
    max_total_loss: float | None
    total_loss_mode: str
    min_trading_days: int
    max_days: int | None
    max_best_day_share: float | None
    warning_level: float | None
    timezone: str
    day_rollover: str

    @property
    def rollover_minutes(self) -> int:
        """``day_rollover`` as minutes after local midnight."""
        hours, minutes = self.day_rollover.split(":")
        return int(hours) * 60 + int(minutes)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_rules(rules: Mapping[str, Any]) -> Rules:
    """Validate a rule mapping as docs/rules.md (Registration) says.

    Raises:
        ReferenceRuleError: A rule is unknown, missing or has a bad value.
    """
    for name in rules:
        if name != "initial_balance" and name not in RULE_DEFAULTS:
            raise ReferenceRuleError(name, "unknown rule")
    values: dict[str, Any] = {**RULE_DEFAULTS, **rules}
    if "initial_balance" not in rules:
        raise ReferenceRuleError("initial_balance", "required")
    ib = values["initial_balance"]
    if not _is_number(ib) or not math.isfinite(ib) or ib <= 0:
        raise ReferenceRuleError("initial_balance", "must be a finite number > 0")
    values["initial_balance"] = float(ib)
    for name in RATIO_RULES:
        value = values[name]
        if value is None:
            continue
        if not _is_number(value) or not 0 < value < 1:
            raise ReferenceRuleError(name, "must be a ratio in (0, 1) or null")
        values[name] = float(value)
    for name, choices in CHOICE_RULES.items():
        if values[name] not in choices:
            raise ReferenceRuleError(name, f"must be one of {choices}")
    mtd = values["min_trading_days"]
    if not isinstance(mtd, int) or isinstance(mtd, bool) or mtd < 0:
        raise ReferenceRuleError("min_trading_days", "must be an integer >= 0")
    max_days = values["max_days"]
    if max_days is not None and (
        not isinstance(max_days, int) or isinstance(max_days, bool) or max_days <= 0
    ):
        raise ReferenceRuleError("max_days", "must be an integer > 0 or null")
    tz = values["timezone"]
    try:
        if not isinstance(tz, str):
            raise ReferenceRuleError("timezone", "must be an IANA name")
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ReferenceRuleError("timezone", "unknown time zone") from exc
    rollover = values["day_rollover"]
    if not (
        isinstance(rollover, str)
        and len(rollover) == 5
        and rollover[2] == ":"
        and rollover[:2].isdigit()
        and rollover[3:].isdigit()
        and int(rollover[:2]) < 24
        and int(rollover[3:]) < 60
    ):
        raise ReferenceRuleError("day_rollover", "must be HH:MM")
    return Rules(**values)


# ------------------------------------------------------------------------------ days


@cache
def day_end(timezone: str, rollover_minutes: int, day: date) -> int:
    """The boundary instant of ``day``: when the next trading day starts.

    Day ``d`` ends at the local wall time ``(d + 1) 00:00 - (1440 - R) mod 1440``
    minutes; its boundary is the first UTC instant whose local wall time is at or
    after that end (docs/rules.md, Days). Found by stepping a minute at a time
    through a window that must contain it: UTC offsets lie within ±14 h, and every
    offset and transition of the zones in use is a whole minute, so the first
    instant is on a minute.
    """
    zone = ZoneInfo(timezone)
    end_wall = datetime.combine(day + timedelta(days=1), time()) - timedelta(
        minutes=(1440 - rollover_minutes) % 1440
    )
    instant = end_wall.replace(tzinfo=UTC) - timedelta(hours=15)
    last = end_wall.replace(tzinfo=UTC) + timedelta(hours=15)
    while instant.astimezone(zone).replace(tzinfo=None) < end_wall:
        instant += timedelta(minutes=1)
        if instant > last:
            raise AssertionError(f"no boundary for {day} in {timezone}")
    return to_micros(instant)


def day_of(timezone: str, rollover_minutes: int, ts: int) -> date:
    """The trading day of ``ts``: ``d`` with ``boundary(d - 1) <= ts < boundary(d)``."""
    local = from_micros(ts).astimezone(ZoneInfo(timezone)).date()
    found = [
        d
        for d in (local + timedelta(days=k) for k in range(-2, 3))
        if day_end(timezone, rollover_minutes, d - timedelta(days=1))
        <= ts
        < day_end(timezone, rollover_minutes, d)
    ]
    if len(found) != 1:
        raise AssertionError(f"ts {ts} is in days {found} of {timezone}")
    return found[0]


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True, slots=True)
class BreachRow:
    """One row of the ``breaches`` output (key ``account_id, breach_seq``)."""

    account_id: int
    challenge_id: str
    phase_index: int
    breach_seq: int
    rule: str
    severity: str
    threshold: float
    actual: float
    action: str
    ts: int
    resolved: bool
    resolved_ts: int | None


@dataclass(frozen=True, slots=True)
class DailyRow:
    """One row of the ``daily`` output (key ``account_id, day``)."""

    account_id: int
    day: date
    daily_start_equity: float
    daily_start_balance: float
    min_equity: float
    close_equity: float


@dataclass(frozen=True, slots=True)
class TransitionRow:
    """A phase that passed or failed."""

    account_id: int
    challenge_id: str
    phase_index: int
    status: str
    ts: int


@dataclass(frozen=True, slots=True)
class PhaseRow:
    """The state of one registered phase (``RuleEngine.phases()``)."""

    account_id: int
    challenge_id: str
    phase_index: int
    status: str
    status_ts: int | None
    equity: float | None
    balance: float | None
    hwm: float
    daily_start_equity: float | None
    trading_days: int
    ticks: int
    late_ticks: int


@dataclass(frozen=True, slots=True)
class MetricRow:
    """The latest ``metrics`` row of a phase (docs/rules.md, Outputs)."""

    account_id: int
    challenge_id: str
    phase_index: int
    ts: int
    status: str
    day: date
    equity: float
    balance: float
    profit: float
    daily_start_equity: float
    daily_start_balance: float
    daily_pnl: float
    daily_loss_limit: float | None
    daily_floor: float | None
    daily_room: float | None
    daily_paused: bool
    max_loss_limit: float | None
    overall_floor: float | None
    overall_room: float | None
    hwm: float
    trading_days: int
    days_elapsed: int
    best_day_profit: float
    profit_target_level: float | None
    profit_progress: float | None
    trading_days_progress: float


@dataclass(frozen=True, slots=True)
class Counts:
    """How ticks were handled."""

    evaluated: int = 0
    late: int = 0
    unknown: int = 0
    inactive: int = 0
    invalid: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.evaluated + other.evaluated,
            self.late + other.late,
            self.unknown + other.unknown,
            self.inactive + other.inactive,
            self.invalid + other.invalid,
        )


@dataclass(slots=True)
class Output:
    """What one ``process`` call emitted, in emission order."""

    breaches: list[BreachRow] = field(default_factory=list)
    daily: dict[tuple[int, date], DailyRow] = field(default_factory=dict)
    metrics: dict[int, MetricRow] = field(default_factory=dict)
    transitions: list[TransitionRow] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)


@dataclass(slots=True)
class Outcome:
    """The final tables of a run, after applying every call's upserts in order.

    The reference produces one; the engine's outputs are folded into one the same
    way (``tests/conftest.py``), so the two compare with ``==``.
    """

    breaches: dict[tuple[int, int], BreachRow] = field(default_factory=dict)
    daily: dict[tuple[int, date], DailyRow] = field(default_factory=dict)
    metrics: dict[int, MetricRow] = field(default_factory=dict)
    transitions: list[TransitionRow] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    phases: dict[int, PhaseRow] = field(default_factory=dict)

    def apply(self, out: Output) -> None:
        """Fold one call's outputs in: upserts by key, transitions and counts add."""
        for row in out.breaches:
            self.breaches[(row.account_id, row.breach_seq)] = row
        self.daily.update(out.daily)
        self.metrics.update(out.metrics)
        self.transitions.extend(out.transitions)
        self.counts = self.counts + out.counts


# ----------------------------------------------------------------------------- engine


@dataclass(frozen=True, slots=True)
class Levels:
    """The rule levels of a phase at its current state (tick generators use them)."""

    target: float | None
    overall_floor: float | None
    overall_warning: float | None
    daily_floor: float | None
    daily_warning: float | None
    daily_reference: float | None
    hwm: float
    next_boundary: int | None
    time_limit: int | None


@dataclass(slots=True)
class _Phase:
    account_id: int
    challenge_id: str
    phase_index: int
    started_at: int
    rules: Rules
    hwm: float
    prev_balance: float
    status: str = "active"
    status_ts: int | None = None
    last_ts: int | None = None
    equity: float | None = None
    balance: float | None = None
    day: date | None = None
    daily_start_equity: float = math.nan
    daily_start_balance: float = math.nan
    min_equity: float = math.nan
    close_equity: float = math.nan
    day_paused: bool = False
    daily_warning_fired_today: bool = False
    day_is_trading_day: bool = False
    trading_days: int = 0
    best_closed_day: float | None = None
    ticks: int = 0
    late_ticks: int = 0
    breaches: dict[int, BreachRow] = field(default_factory=dict)
    max_warning: int | None = None
    #: The active daily warning's breach_seq and the W_d of the day it fired on.
    daily_warning: tuple[int, float] | None = None

    # The levels, computed from the current state exactly as docs/rules.md writes.

    def overall_limit(self) -> float | None:
        mtl = self.rules.max_total_loss
        return None if mtl is None else mtl * self.rules.initial_balance

    def overall_reference(self) -> float:
        ib = self.rules.initial_balance
        limit = self.overall_limit()
        if self.rules.total_loss_mode == "static" or limit is None:
            return ib
        return min(self.hwm, ib + limit)

    def daily_reference(self) -> float:
        if self.rules.daily_reference == "day_start_equity":
            return self.daily_start_equity
        if self.rules.daily_reference == "day_start_balance":
            return self.daily_start_balance
        return max(self.daily_start_equity, self.daily_start_balance)

    def daily_limit(self) -> float | None:
        mdl = self.rules.max_daily_loss
        if mdl is None:
            return None
        if self.rules.daily_loss_base == "initial_balance":
            return mdl * self.rules.initial_balance
        return mdl * self.daily_reference()

    def target(self) -> float | None:
        pt = self.rules.profit_target
        return None if pt is None else cent(self.rules.initial_balance * (1 + pt))

    def best_day(self, equity: float) -> float:
        today = equity - self.daily_start_equity
        if self.best_closed_day is None:
            return today
        return max(self.best_closed_day, today)

    def next_boundary(self) -> int | None:
        if self.day is None:
            return None
        return day_end(self.rules.timezone, self.rules.rollover_minutes, self.day)


class ReferenceEngine:
    """Registered phases and their state; ``process`` judges ticks in order."""

    def __init__(self) -> None:
        self._phases: dict[int, _Phase] = {}

    def register(self, spec: PhaseLike) -> None:
        """Start judging a phase.

        Raises:
            ReferenceRuleError: The rules are invalid or the account is taken.
        """
        rules = parse_rules(spec.rules)
        if spec.account_id in self._phases:
            raise ReferenceRuleError("account_id", "already registered")
        self._phases[spec.account_id] = _Phase(
            account_id=spec.account_id,
            challenge_id=spec.challenge_id,
            phase_index=spec.phase_index,
            started_at=to_micros(spec.started_at),
            rules=rules,
            hwm=rules.initial_balance,
            prev_balance=rules.initial_balance,
        )

    def remove(self, account_id: int) -> bool:
        """Forget a phase; False if it was not registered."""
        return self._phases.pop(account_id, None) is not None

    def process(self, ticks: Iterable[Tick]) -> Output:
        """Judge ticks in the order given; return what the call emitted."""
        out = Output()
        counts = {"evaluated": 0, "late": 0, "unknown": 0, "inactive": 0, "invalid": 0}
        touched: dict[int, _Phase] = {}
        for account_id, ts, equity, balance in ticks:
            if not (math.isfinite(equity) and math.isfinite(balance)):
                counts["invalid"] += 1
                continue
            phase = self._phases.get(account_id)
            if phase is None:
                counts["unknown"] += 1
            elif phase.status != "active":
                counts["inactive"] += 1
            elif ts < phase.started_at or (
                phase.last_ts is not None and ts < phase.last_ts
            ):
                counts["late"] += 1
                phase.late_ticks += 1
            else:
                counts["evaluated"] += 1
                phase.ticks += 1
                touched[account_id] = phase
                if (ts, equity, balance) == (
                    phase.last_ts,
                    phase.equity,
                    phase.balance,
                ):
                    continue  # an exact duplicate changes nothing
                self._evaluate(phase, ts, float(equity), float(balance), out)
        for phase in touched.values():
            out.metrics[phase.account_id] = self._metric(phase)
        out.counts = Counts(**counts)
        return out

    def phases(self) -> dict[int, PhaseRow]:
        """The state of every registered phase."""
        return {
            p.account_id: PhaseRow(
                account_id=p.account_id,
                challenge_id=p.challenge_id,
                phase_index=p.phase_index,
                status=p.status,
                status_ts=p.status_ts,
                equity=p.equity,
                balance=p.balance,
                hwm=p.hwm,
                daily_start_equity=None if p.day is None else p.daily_start_equity,
                trading_days=p.trading_days,
                ticks=p.ticks,
                late_ticks=p.late_ticks,
            )
            for p in self._phases.values()
        }

    def levels(self, account_id: int) -> Levels:
        """The current levels of a phase, before its next tick."""
        p = self._phases[account_id]
        r = p.rules
        overall_floor = overall_warning = None
        limit = p.overall_limit()
        if limit is not None:
            overall_floor = cent(p.overall_reference() - limit)
            if r.warning_level is not None:
                overall_warning = cent(p.overall_reference() - r.warning_level * limit)
        daily_floor = daily_warning = reference = None
        if p.day is not None:
            reference = p.daily_reference()
            daily = p.daily_limit()
            if daily is not None:
                daily_floor = cent(reference - daily)
                if r.warning_level is not None:
                    daily_warning = cent(reference - r.warning_level * daily)
        return Levels(
            target=p.target(),
            overall_floor=overall_floor,
            overall_warning=overall_warning,
            daily_floor=daily_floor,
            daily_warning=daily_warning,
            daily_reference=reference,
            hwm=p.hwm,
            next_boundary=p.next_boundary(),
            time_limit=(
                None if r.max_days is None else p.started_at + r.max_days * US_PER_DAY
            ),
        )

    # ------------------------------------------------------------------ one tick

    def _evaluate(
        self, p: _Phase, ts: int, equity: float, balance: float, out: Output
    ) -> None:
        r = p.rules
        ib = r.initial_balance

        # 1. Day boundary.
        day = day_of(r.timezone, r.rollover_minutes, ts)
        if day != p.day:
            if p.day is not None:
                if r.total_loss_mode == "trailing_eod":
                    p.hwm = max(p.hwm, p.close_equity)
                closed = p.close_equity - p.daily_start_equity
                p.best_closed_day = (
                    closed
                    if p.best_closed_day is None
                    else max(p.best_closed_day, closed)
                )
            p.day = day
            p.daily_start_equity = equity
            p.daily_start_balance = balance
            p.min_equity = equity
            p.close_equity = equity
            p.day_paused = False
            p.daily_warning_fired_today = False
            p.day_is_trading_day = False

        # 2. trailing.
        if r.total_loss_mode == "trailing":
            p.hwm = max(p.hwm, equity)

        # 3. Activity.
        self._count_activity(p, equity, balance)

        # 4. Day and last-tick state.
        p.min_equity = min(p.min_equity, equity)
        p.close_equity = equity
        p.prev_balance = balance
        p.equity = equity
        p.balance = balance
        p.last_ts = ts
        out.daily[(p.account_id, day)] = DailyRow(
            account_id=p.account_id,
            day=day,
            daily_start_equity=p.daily_start_equity,
            daily_start_balance=p.daily_start_balance,
            min_equity=p.min_equity,
            close_equity=p.close_equity,
        )

        # 5. Critical rules.
        failures: list[tuple[str, float, float]] = []
        if r.max_days is not None and ts > p.started_at + r.max_days * US_PER_DAY:
            failures.append(
                ("time_limit", float(r.max_days), (ts - p.started_at) / US_PER_DAY)
            )
        l_m = p.overall_limit()
        r_m = p.overall_reference()
        if l_m is not None and equity < cent(r_m - l_m):
            failures.append(("max_loss", l_m, r_m - equity))
        l_d = p.daily_limit()
        d = p.daily_reference()
        if l_d is not None and not p.day_paused and equity < cent(d - l_d):
            failures.append(("daily_loss", l_d, d - equity))

        paused_now = False
        if [f[0] for f in failures] == [
            "daily_loss"
        ] and r.daily_loss_action == "pause":
            rule, threshold, actual = failures[0]
            self._breach(
                p, rule, "critical", threshold, actual, "trading_paused", ts, out
            )
            p.day_paused = True
            paused_now = True
        elif failures:
            for rule, threshold, actual in failures:
                self._breach(
                    p, rule, "critical", threshold, actual, "phase_failed", ts, out
                )
            self._transition(p, "failed", ts, out)
            return

        # 6. Warnings.
        wl = r.warning_level
        if wl is not None and not paused_now:
            if l_m is not None:
                w_m = cent(r_m - wl * l_m)
                if p.max_warning is not None and equity > w_m:
                    self._resolve(p, p.max_warning, ts, out)
                    p.max_warning = None
                if p.max_warning is None and equity <= w_m:
                    p.max_warning = self._breach(
                        p,
                        "max_loss_warning",
                        "warning",
                        wl * l_m,
                        r_m - equity,
                        "notify",
                        ts,
                        out,
                    )
            if l_d is not None and not p.day_paused:
                w_d = cent(d - wl * l_d)
                # Today's daily loss decides, also for a warning left from an
                # earlier day (docs/rules.md, warnings).
                if p.daily_warning is not None and equity > w_d:
                    self._resolve(p, p.daily_warning[0], ts, out)
                    p.daily_warning = None
                if (
                    p.daily_warning is None
                    and not p.daily_warning_fired_today
                    and equity <= w_d
                ):
                    seq = self._breach(
                        p,
                        "daily_loss_warning",
                        "warning",
                        wl * l_d,
                        d - equity,
                        "notify",
                        ts,
                        out,
                    )
                    p.daily_warning = (seq, w_d)
                    p.daily_warning_fired_today = True

        # 7. Pass.
        target = p.target()
        if target is not None and balance >= target and equity >= target:
            consistent = True
            if r.max_best_day_share is not None:
                share = r.max_best_day_share * (equity - ib)
                consistent = cent(p.best_day(equity)) <= cent(share)
            if p.trading_days >= r.min_trading_days and consistent:
                self._transition(p, "passed", ts, out)

    def _count_activity(self, p: _Phase, equity: float, balance: float) -> None:
        """Step 3: the first active tick of a day adds one trading day.

        A method of its own so that the deal reference (``tests/reference_deals.py``)
        can replace it under ``trading_day_basis = deals``.
        """
        if (
            balance != p.prev_balance or equity != balance
        ) and not p.day_is_trading_day:
            p.day_is_trading_day = True
            p.trading_days += 1

    def _breach(
        self,
        p: _Phase,
        rule: str,
        severity: str,
        threshold: float,
        actual: float,
        action: str,
        ts: int,
        out: Output,
    ) -> int:
        seq = len(p.breaches) + 1
        row = BreachRow(
            account_id=p.account_id,
            challenge_id=p.challenge_id,
            phase_index=p.phase_index,
            breach_seq=seq,
            rule=rule,
            severity=severity,
            threshold=threshold,
            actual=actual,
            action=action,
            ts=ts,
            resolved=False,
            resolved_ts=None,
        )
        p.breaches[seq] = row
        out.breaches.append(row)
        return seq

    def _resolve(self, p: _Phase, seq: int, ts: int, out: Output) -> None:
        row = replace(p.breaches[seq], resolved=True, resolved_ts=ts)
        p.breaches[seq] = row
        out.breaches.append(row)

    def _transition(self, p: _Phase, status: str, ts: int, out: Output) -> None:
        p.status = status
        p.status_ts = ts
        out.transitions.append(
            TransitionRow(p.account_id, p.challenge_id, p.phase_index, status, ts)
        )

    def _metric(self, p: _Phase) -> MetricRow:
        r = p.rules
        ib = r.initial_balance
        assert p.equity is not None
        assert p.balance is not None
        assert p.last_ts is not None
        assert p.day is not None
        equity = p.equity
        l_d = p.daily_limit()
        d = p.daily_reference()
        f_d = None if l_d is None else cent(d - l_d)
        l_m = p.overall_limit()
        f_m = None if l_m is None else cent(p.overall_reference() - l_m)
        target = p.target()
        progress = None
        if target is not None:
            progress = min(max((equity - ib) / (target - ib), 0.0), 1.0)
        if r.min_trading_days == 0:
            days_progress = 1.0
        else:
            days_progress = min(1.0, p.trading_days / r.min_trading_days)
        return MetricRow(
            account_id=p.account_id,
            challenge_id=p.challenge_id,
            phase_index=p.phase_index,
            ts=p.last_ts,
            status=p.status,
            day=p.day,
            equity=equity,
            balance=p.balance,
            profit=equity - ib,
            daily_start_equity=p.daily_start_equity,
            daily_start_balance=p.daily_start_balance,
            daily_pnl=equity - d,
            daily_loss_limit=l_d,
            daily_floor=f_d,
            daily_room=None if f_d is None else equity - f_d,
            daily_paused=p.day_paused,
            max_loss_limit=l_m,
            overall_floor=f_m,
            overall_room=None if f_m is None else equity - f_m,
            hwm=p.hwm,
            trading_days=p.trading_days,
            days_elapsed=(p.last_ts - p.started_at) // US_PER_DAY,
            best_day_profit=p.best_day(equity),
            profit_target_level=target,
            profit_progress=progress,
            trading_days_progress=days_progress,
        )


def run_reference(
    phases: Sequence[PhaseLike],
    ticks: Sequence[Tick],
    batches: Sequence[int] | None = None,
) -> Outcome:
    """Register ``phases``, judge ``ticks`` and return the final tables.

    Args:
        phases: The phases to register, in order.
        ticks: The ticks, in delivery order.
        batches: Optional batch sizes (summing to at most ``len(ticks)``; the rest
            is one last batch). The reference's result does not depend on them.

    Returns:
        The final outcome: upserted breaches, daily rows and metrics, transitions
        in emission order, summed counts, and every phase's state.
    """
    engine = ReferenceEngine()
    for spec in phases:
        engine.register(spec)
    outcome = Outcome()
    for batch in split_batches(ticks, batches or ()):
        outcome.apply(engine.process(batch))
    outcome.phases = engine.phases()
    return outcome


def split_batches(ticks: Sequence[Tick], sizes: Sequence[int]) -> list[list[Tick]]:
    """Cut ``ticks`` into consecutive batches of ``sizes``, plus the rest."""
    batches: list[list[Tick]] = []
    start = 0
    for size in sizes:
        batches.append(list(ticks[start : start + size]))
        start += size
    batches.append(list(ticks[start:]))
    return batches
