"""The Python face of the Rust rules engine.

This is the only module that imports :mod:`prop_stream._core` (with
``exceptions.py``). It normalizes tick batches to the engine's Arrow schema and turns
the engine's Arrow outputs into polars frames.

Examples:
    >>> from datetime import datetime, UTC
    >>> engine = RuleEngine()
    >>> engine.register(PhaseSpec(
    ...     account_id=1001, challenge_id="c-1", phase_index=0,
    ...     started_at=datetime(2026, 1, 5, tzinfo=UTC),
    ...     rules={"initial_balance": 100_000, "max_total_loss": 0.1}))
    >>> ticks = pl.DataFrame({"account_id": [1001],
    ...     "ts": [datetime(2026, 1, 5, 9, tzinfo=UTC)],
    ...     "equity": [95_000.0], "balance": [100_000.0]})
    >>> engine.process(ticks).counts.evaluated
    1
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import polars as pl
import pyarrow as pa

from prop_stream import _core
from prop_stream.exceptions import TickBatchError

__version__: Final[str] = _core.__version__

Grouping = Literal["auto", "always", "never"]

#: Columns that identify a breach across calls: later rows for the same key win.
BREACH_KEY: Final = ("account_id", "breach_seq")
#: Columns that identify a daily snapshot row.
DAILY_KEY: Final = ("account_id", "day")

TICK_SCHEMA: Final[dict[str, pl.DataType]] = {
    "account_id": pl.Int64(),
    "ts": pl.Datetime("us", "UTC"),
    "equity": pl.Float64(),
    "balance": pl.Float64(),
}

#: The columns of a deal (``rules.md``, "Deal events"; ``interfaces.md`` §5), as
#: the engine takes them. ``Evaluator.process`` also needs ``before_tick``
#: (int64): the tick row of the same call the deal was delivered before.
DEAL_SCHEMA: Final[pa.Schema] = pa.schema(
    [
        pa.field("account_id", pa.int64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("deal_id", pa.int64(), nullable=False),
        pa.field("position_id", pa.int64(), nullable=False),
        pa.field("symbol", pa.utf8(), nullable=False),
        pa.field("side", pa.utf8(), nullable=False),
        pa.field("volume", pa.float64(), nullable=False),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("entry", pa.utf8(), nullable=False),
    ]
)
#: The names of :data:`DEAL_SCHEMA`, in order.
DEAL_COLUMNS: Final[tuple[str, ...]] = tuple(DEAL_SCHEMA.names)
#: The column that places each deal among the ticks of one ``process`` call.
BEFORE_TICK: Final = "before_tick"

RULE_DEFAULTS: Final[dict[str, object]] = dict(_core.rule_defaults())


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    """One challenge phase to judge: its trading account, identity and rules.

    Attributes:
        account_id: The phase's trading account login.
        challenge_id: The challenge it belongs to.
        phase_index: Position of the phase in its program (0-based).
        started_at: When the phase started; earlier ticks are late.
        rules: Rule names of ``rules.md`` to values; omitted rules take defaults.
    """

    account_id: int
    challenge_id: str
    phase_index: int
    started_at: datetime
    rules: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class TickCounts:
    """How the ticks of one call were handled.

    Attributes:
        evaluated: Ticks judged by a phase.
        late: Ticks older than their account's last tick or its phase start.
        unknown: Ticks for accounts with no registered phase.
        inactive: Ticks for phases that had already passed or failed.
        invalid: Ticks whose equity or balance is NaN or infinite.
    """

    evaluated: int
    late: int
    unknown: int
    inactive: int
    invalid: int


@dataclass(frozen=True, slots=True)
class DealCounts:
    """How the deals of one call were handled.

    Attributes:
        processed: Deals judged by a phase (positions updated), unmatched ones
            included.
        late: Deals older than their account's last processed event (tick or
            deal) or its phase start.
        duplicate: Deals whose ``deal_id`` the account already processed.
        unmatched: Processed ``out`` deals for a position that was not open.
        unknown: Deals for accounts with no registered phase.
        inactive: Deals for phases that had already passed or failed, or that
            revealed a ``weekend_hold`` failure.
        invalid: Deals with a null or bad value (side, entry, volume, price,
            symbol).
    """

    processed: int = 0
    late: int = 0
    duplicate: int = 0
    unmatched: int = 0
    unknown: int = 0
    inactive: int = 0
    invalid: int = 0


#: The columns of ``Evaluation.deal_opens``: the processed ``in`` deals.
DEAL_OPEN_COLUMNS: Final = ("account_id", "deal_id", "ts", "symbol", "side")


def _empty_deal_opens() -> pa.Table:
    return pa.table(
        {name: pa.array([], DEAL_SCHEMA.field(name).type) for name in DEAL_OPEN_COLUMNS}
    )


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Everything one ``process`` call produced.

    ``breaches`` (key :data:`BREACH_KEY`) and ``daily`` (key :data:`DAILY_KEY`) are
    upserts: a later row for the same key replaces an earlier one. ``metrics`` has
    the latest state of every phase whose state the call changed (once it has
    evaluated a tick); ``transitions`` the phases that passed or failed.
    ``deal_opens`` (a pyarrow table, :data:`DEAL_OPEN_COLUMNS`) holds the call's
    processed ``in`` deals, the input of the hedge-flag join.
    """

    breaches: pl.DataFrame
    metrics: pl.DataFrame
    daily: pl.DataFrame
    transitions: pl.DataFrame
    counts: TickCounts
    deal_counts: DealCounts = field(default_factory=DealCounts)
    deal_opens: pa.Table = field(default_factory=_empty_deal_opens)


@dataclass(frozen=True, slots=True)
class RunOrder:
    """What :meth:`RuleEngine.process_unordered` found about its input's order.

    Attributes:
        runs: Accounts with a registered phase and at least one tick.
        sorted_runs: Of those, accounts whose ticks were out of order and were
            sorted; the others were judged as they came.
    """

    runs: int
    sorted_runs: int


def _to_micros(value: datetime) -> int:
    if value.tzinfo is None:
        msg = "started_at must be timezone-aware"
        raise ValueError(msg)
    delta = value.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


#: A rule set as a hashable value (see :func:`rules_key`).
RulesKey = tuple[tuple[str, ...], tuple[type, ...], tuple[Any, ...]]


def rules_key(rules: Mapping[str, Any]) -> RulesKey | None:
    """A hashable key equal only for equal rule sets, or None if a value is unhashable.

    Names, value types and values in the mapping's order (built without a Python
    loop: it runs once per phase registered). The types keep ``1``, ``1.0`` and
    ``True``, equal in Python but judged differently by the validation, apart.
    Equal rule sets written in another order get another key, which only costs
    a second build.
    """
    values = tuple(rules.values())
    key = (tuple(rules), tuple(map(type, values)), values)
    try:
        hash(values)
    except TypeError:
        return None
    return key


def validate_rules(rules: Mapping[str, Any]) -> dict[str, object]:
    """Validate a rule set and return it with every default filled in.

    Args:
        rules: Rule names of ``rules.md`` to values.

    Returns:
        The complete rule set.

    Raises:
        RuleConfigError: A rule is unknown or has a bad value; ``field`` names it.
    """
    return dict(_core.ChallengeRules(dict(rules)).to_dict())


# ISO 8601 shapes accepted in text timestamps, after the normalization in
# `parse_ts_text` (T separator, `Z` spelled `+00:00`). `%.f` also accepts a
# missing fraction; `%#z` accepts `+01`, `+0100` and `+01:00`.
_TS_AWARE_FORMATS: Final = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M%#z")
_TS_NAIVE_FORMATS: Final = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M")


def parse_ts_text(text: pl.Expr) -> pl.Expr:
    """A text tick ``ts`` as a UTC timestamp (µs); null when it is neither form.

    The forms of ``interfaces.md`` (Kafka messages and backtest files alike):
    ISO 8601 with ``Z``, an offset, or none (meaning UTC), or integer epoch
    milliseconds.

    Args:
        text: A string expression.

    Returns:
        A ``Datetime("us", "UTC")`` expression.
    """
    iso = text.str.replace(r"^(\d{4}-\d{2}-\d{2})[ tT]", "${1}T").str.replace(
        r"[zZ]$", "+00:00"
    )
    aware = pl.coalesce(
        iso.str.to_datetime(fmt, time_unit="us", time_zone="UTC", strict=False)
        for fmt in _TS_AWARE_FORMATS
    )
    naive = pl.coalesce(
        iso.str.to_datetime(fmt, time_unit="us", strict=False)
        for fmt in _TS_NAIVE_FORMATS
    ).dt.replace_time_zone("UTC")
    return (
        pl.when(text.str.contains(r"^[+-]?\d+$"))
        .then(from_epoch_ms(text))
        .when(iso.str.contains(r"[+-]\d{2}(:?\d{2})?$"))
        .then(aware)
        .otherwise(naive)
    )


def from_epoch_ms(value: pl.Expr) -> pl.Expr:
    """Integer epoch milliseconds (or text of them) as a UTC timestamp (µs)."""
    return pl.from_epoch(
        value.cast(pl.Int64, strict=False), time_unit="ms"
    ).dt.replace_time_zone("UTC")


def normalize_ticks(ticks: Any) -> pa.Table:
    """Cast a tick batch to the engine's schema.

    Args:
        ticks: A polars DataFrame, a pyarrow Table/RecordBatch, or anything with
            ``__arrow_c_stream__``, holding ``account_id, ts, equity, balance``.
            ``ts`` may be a datetime (naive means UTC) or epoch milliseconds.

    Returns:
        A pyarrow table with exactly the four tick columns.

    Raises:
        TickBatchError: A column is missing, has nulls or can't be cast.
    """
    frame = ticks if isinstance(ticks, pl.DataFrame) else pl.DataFrame(ticks)
    missing = [name for name in TICK_SCHEMA if name not in frame.columns]
    if missing:
        raise TickBatchError(f"tick batch is missing column(s): {', '.join(missing)}")
    exprs = []
    for name, dtype in TICK_SCHEMA.items():
        column = pl.col(name)
        current = frame.schema[name]
        if name == "ts":
            if current.is_integer():
                column = pl.from_epoch(column, time_unit="ms")
            elif isinstance(current, pl.Datetime) and current.time_zone is None:
                column = column.dt.replace_time_zone("UTC")
            elif not isinstance(current, pl.Datetime):
                raise TickBatchError(f"column ts has type {current}, not a timestamp")
        exprs.append(column.cast(dtype).alias(name))
    try:
        out = frame.select(exprs)
    except pl.exceptions.PolarsError as exc:
        raise TickBatchError(f"tick batch can't be cast: {exc}") from exc
    nulls = [
        name for name, n in zip(out.columns, out.null_count().row(0), strict=True) if n
    ]
    if nulls:
        raise TickBatchError(f"tick batch has nulls in column(s): {', '.join(nulls)}")
    return out.to_arrow()


def _deal_table(deals: Any) -> Any:
    """Deals as the engine takes them.

    Polars frames go through Arrow as they are (the engine reads every string
    layout); anything else goes to the engine, which names a missing or mistyped
    column.
    """
    if deals is None or not isinstance(deals, pl.DataFrame):
        return deals
    return deals.to_arrow()


def _evaluation(out: _core.BatchResult) -> Evaluation:
    c = out.counts
    return Evaluation(
        breaches=_frame(out.breaches),
        metrics=_frame(out.metrics),
        daily=_frame(out.daily),
        transitions=_frame(out.transitions),
        counts=TickCounts(
            evaluated=c["evaluated"],
            late=c["late"],
            unknown=c["unknown"],
            inactive=c["inactive"],
            invalid=c["invalid"],
        ),
        deal_counts=DealCounts(
            processed=c["deals"],
            late=c["late_deals"],
            duplicate=c["duplicate_deals"],
            unmatched=c["unmatched_deals"],
            unknown=c["unknown_deals"],
            inactive=c["inactive_deals"],
            invalid=c["invalid_deals"],
        ),
        deal_opens=out.deal_opens,
    )


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)  # noqa: S101 - from_arrow of a Table
    return frame


#: Distinct rule sets a :class:`RuleEngine` keeps built (a bound on memory).
_RULES_CACHE_SIZE: Final = 4_096


class RuleEngine:
    """Judges challenge phases on batches of equity ticks.

    Thin wrapper over the Rust ``Evaluator``: phases are registered and removed at
    run time, ticks go in as Arrow batches, results come out as polars frames, and
    the whole state can be snapshotted to bytes and restored.
    """

    __slots__ = ("_ev", "_rules")

    def __init__(
        self,
        *,
        grouping: Grouping = "auto",
        _evaluator: _core.Evaluator | None = None,
    ) -> None:
        """Create an engine with no phases.

        Args:
            grouping: Whether a batch is grouped by phase before it is judged
                (``auto`` decides by the number of phases). Outputs are identical
                either way; tests use ``always``/``never`` to prove it.
        """
        self._ev = (
            _evaluator if _evaluator is not None else _core.Evaluator(grouping=grouping)
        )
        # Built rule sets by :func:`rules_key`: thousands of phases usually share
        # a few programs' rules, and building one costs more than registering.
        self._rules: dict[RulesKey, _core.ChallengeRules] = {}

    def __len__(self) -> int:
        return len(self._ev)

    def __contains__(self, account_id: object) -> bool:
        return isinstance(account_id, int) and self._ev.contains(account_id)

    def register(self, spec: PhaseSpec) -> None:
        """Start judging a phase.

        Raises:
            RuleConfigError: The rules are invalid or the account is taken.
        """
        key = rules_key(spec.rules)
        rules = None if key is None else self._rules.get(key)
        if rules is None:
            rules = _core.ChallengeRules(dict(spec.rules))
            if key is not None and len(self._rules) < _RULES_CACHE_SIZE:
                self._rules[key] = rules
        self._ev.register(
            spec.account_id,
            challenge_id=spec.challenge_id,
            phase_index=spec.phase_index,
            started_at_us=_to_micros(spec.started_at),
            rules=rules,
        )

    def remove(self, account_id: int) -> bool:
        """Forget a phase and its state; False if the account was not registered."""
        return self._ev.remove(account_id)

    def process(self, ticks: Any, deals: Any = None) -> Evaluation:
        """Evaluate one batch of ticks and deals.

        Within an account events are taken in the order given; the GIL is released
        while the engine works.

        Args:
            ticks: See :func:`normalize_ticks`.
            deals: None, or a polars DataFrame, pyarrow Table or anything with
                ``__arrow_c_stream__`` holding :data:`DEAL_COLUMNS` and
                ``before_tick``: the deal was delivered before tick row
                ``before_tick`` of ``ticks`` (0 to ``len(ticks)``, non-decreasing
                down the table; equal values keep the table's order).

        Raises:
            TickBatchError: A tick or deal column is missing or has another type,
                or ``before_tick`` is null, decreasing or out of range. Deals with
                a bad value are counted ``invalid`` and skipped instead.
        """
        table = normalize_ticks(ticks)
        return self.process_arrow(table, _deal_table(deals))

    def process_arrow(self, table: Any, deals: Any = None) -> Evaluation:
        """Evaluate a batch already in the engine's exact Arrow schema."""
        return _evaluation(self._ev.process(table, deals))

    def process_unordered(
        self, table: Any, *, seq_column: str | None = None, threads: int | None = None
    ) -> tuple[Evaluation, RunOrder]:
        """Judge a whole table in any row order, as if stably sorted first.

        The outputs are those of one :meth:`process_arrow` call over the table
        stably sorted by (``account_id``, ``ts``), or by (``account_id``, ``ts``,
        ``seq_column``) when given; but nothing is sorted except the accounts
        whose ticks are out of order (``rules::order`` in the Rust core: a
        counting sort of the rows by phase, an order check per phase). The GIL
        is released while the engine works. Memory: about 28 bytes a row (36
        with ``seq_column``) besides the table.

        Args:
            table: The ticks in the engine's exact Arrow schema (a polars frame
                or anything with ``__arrow_c_stream__``); other columns are
                ignored.
            seq_column: A ``UInt64`` column holding each row's position in the
                original input, for rows that were reordered on the way (e.g.
                through hash partitions).
            threads: Most threads to judge on; None: one per core. A large
                table's phases are split among them (``rules::order``); the
                outputs are the same on any number.

        Returns:
            The evaluation, and how many accounts had ticks and had to be sorted.

        Raises:
            TickBatchError: A column is missing, has nulls or another type.
        """
        out = self._ev.process_unordered(table, seq_column=seq_column, threads=threads)
        c = out.counts
        return _evaluation(out), RunOrder(runs=c["runs"], sorted_runs=c["sorted_runs"])

    def phases(self) -> pl.DataFrame:
        """The state of every registered phase, one row each."""
        return _frame(self._ev.phases())

    def snapshot(self) -> bytes:
        """Serialize the whole engine state."""
        return self._ev.snapshot()

    @classmethod
    def restore(cls, data: bytes, *, grouping: Grouping = "auto") -> RuleEngine:
        """Rebuild an engine from :meth:`snapshot` bytes.

        Raises:
            SnapshotError: The bytes are not a snapshot of this engine version.
        """
        return cls(_evaluator=_core.Evaluator.restore(data, grouping=grouping))


def dense_baseline(ticks: Any) -> tuple[int, int]:
    """A yardstick for the engine benchmark, not the rules: (ticks, breaches).

    A dense per-account loop over an Arrow stream of ticks in the engine's schema,
    in the order given: per tick, the account's 40-byte state in an array indexed
    by id, the UTC day's start and low, a trailing high-water mark and two floors
    (``rules::baseline`` in the Rust core). ``benchmarks/test_engine_bench.py``
    runs it beside the engine on the same ticks.
    """
    return _core._dense_baseline(ticks)


#: The records of one scan of a Kafka fetch buffer (see :func:`scan_record_batches`).
RecordScan = _core.RecordScan


def scan_record_batches(
    buffer: bytes,
    start: int,
    fetch_offset: int,
    max_records: int,
    *,
    check_crc: bool = True,
) -> _core.RecordScan:
    """Read Kafka record batches (format v2) from a fetch buffer, as columns.

    The Rust core walks the batches from byte ``start``, checks each batch's
    CRC-32C, skips control batches and records below ``fetch_offset``, and keeps
    at most ``max_records`` records: their offsets, timestamps, ``encoding``
    header and the spans of their keys and values in ``buffer``. It stops before
    a compressed or old-format batch (``stop == "unsupported"``).

    Raises:
        ValueError: A batch is corrupt or fails its CRC check.
    """
    return _core.scan_record_batches(
        buffer, start, fetch_offset, max_records, check_crc=check_crc
    )


#: Microseconds in a second (hedge windows are compared in whole microseconds).
_US_PER_SECOND: Final = 1_000_000
_I64_MAX: Final = 2**63 - 1


def window_limit_us(window_seconds: float) -> int:
    """The largest whole gap in microseconds within ``window_seconds``.

    A gap ``g`` (whole microseconds) is within the window when
    ``g <= window_seconds * 1e6`` in real numbers, which for an integer ``g`` is
    ``g <= floor(window_seconds * 1e6)``: comparing integers keeps it exact.

    Raises:
        ValueError: The window is negative or not finite.
    """
    if not math.isfinite(window_seconds) or window_seconds < 0:
        raise ValueError("hedge_window_seconds: must be a number >= 0 or null")
    return min(_I64_MAX, math.floor(window_seconds * _US_PER_SECOND))
