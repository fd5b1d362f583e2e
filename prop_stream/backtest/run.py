"""Run a backtest: replay tick files through the rules engine, write the results.

The run has two halves, and the first never evaluates a tick:

1. **Check.** Read and validate the rules file, resolve the tick (and deal) files,
   check each file's columns and types, check that ``--out`` can be written, count
   the rows, read the ticks and deals and refuse any null, unparseable,
   non-finite or out-of-range value. Any problem raises
   :class:`~prop_stream.exceptions.InputFileError` and nothing is written.
2. **Evaluate.** Judge the events with one :class:`~prop_stream.rules.RuleEngine`,
   keep the last row per key of the engine's upserts, join the hedge flags
   (:mod:`prop_stream.backtest.flags`), and write ``breaches``, ``accounts``,
   ``daily`` and ``flags`` as Parquet and CSV.

Order: the result is that of the events stably sorted by (``account_id``, ``ts``)
over the files concatenated in path order (ties keep file order, then row order;
a deal before a tick at an equal ``ts``, ``rules.md`` Deal events), judged in
that order. Without deals nothing sorts the table: the Rust core
(:meth:`~prop_stream.rules.RuleEngine.process_unordered`) partitions the rows by
account with a stable counting sort, checks each account's ticks for order and
sorts only the accounts whose ticks are out of order. With deals the ticks and
deals are sorted in polars and each engine call gets its ticks and its deals,
each deal with ``before_tick``, the tick row it comes before.

Memory: the engine's state is bounded by the number of accounts; the events are
not. Up to ``max_rows_in_memory`` rows (ticks plus deals) are read whole (about
32 bytes a tick row, plus about 28 bytes a row while the core groups them, or
the sort's working copy with deals). Above that the ticks and the deals are
hash-partitioned by ``account_id`` into temporary Parquet files by polars'
streaming engine, each row with its input position (file, row), and each
partition is then read and judged on its own in the same way: an account's
events all land in one partition, and accounts are independent (hedge flags are
joined afterwards, across partitions), so the result is the same. The bound is
then the largest partition, so one account's events must fit in memory.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import polars as pl
import pyarrow as pa
from tqdm import tqdm

from prop_stream.backtest.files import (
    DEAL_COLUMNS,
    DEAL_SCHEMA,
    DEFAULT_HEDGE_WINDOW_SECONDS,
    TICK_COLUMNS,
    TickFile,
    check_deals,
    check_ticks,
    count_rows,
    diagnose_deal_file,
    diagnose_tick_file,
    first_bad_deal_index,
    raise_first_bad_deal_file,
    raise_first_bad_file,
    read_rules_config,
    resolve_tick_files,
    scan_deals,
    scan_ticks,
)
from prop_stream.backtest.flags import DEAL_OPENS_COLUMNS, hedge_flags
from prop_stream.exceptions import InputFileError, RuleConfigError
from prop_stream.rules import (
    BEFORE_TICK,
    BREACH_KEY,
    DAILY_KEY,
    Evaluation,
    PhaseSpec,
    RuleEngine,
)
from prop_stream.rules import DEAL_SCHEMA as ENGINE_DEAL_SCHEMA

#: Inputs with more rows than this are sorted through temporary partitions.
DEFAULT_MAX_ROWS_IN_MEMORY: Final = 20_000_000
#: Formerly the rows handed to the engine per call; kept for callers that pass
#: ``chunk_rows``, which no longer changes anything: the engine takes each table
#: or partition whole (it must see all of an account's ticks to order them).
DEFAULT_CHUNK_ROWS: Final = 1_000_000
_MAX_PARTITIONS: Final = 4096

_UTC_US: Final = pl.Datetime("us", "UTC")

#: Output tables, their columns and types (``interfaces.md`` section 2).
BREACHES_SCHEMA: Final = pl.Schema(
    {
        "account_id": pl.Int64(),
        "challenge_id": pl.String(),
        "phase_index": pl.Int64(),
        "rule": pl.String(),
        "severity": pl.String(),
        "threshold": pl.Float64(),
        "actual": pl.Float64(),
        "action": pl.String(),
        "ts": _UTC_US,
        "resolved": pl.Boolean(),
    }
)
ACCOUNTS_SCHEMA: Final = pl.Schema(
    {
        "account_id": pl.Int64(),
        "challenge_id": pl.String(),
        "phase_index": pl.Int64(),
        "status": pl.String(),
        "status_ts": _UTC_US,
        "equity": pl.Float64(),
        "balance": pl.Float64(),
        "hwm": pl.Float64(),
        "daily_start_equity": pl.Float64(),
        "trading_days": pl.Int64(),
        "ticks": pl.Int64(),
        "late_ticks": pl.Int64(),
        "deals": pl.Int64(),
        "late_deals": pl.Int64(),
        "duplicate_deals": pl.Int64(),
        "unmatched_deals": pl.Int64(),
        "open_lots": pl.Float64(),
        "open_positions": pl.Int64(),
    }
)
DAILY_SCHEMA: Final = pl.Schema(
    {
        "account_id": pl.Int64(),
        "day": pl.Date(),
        "daily_start_equity": pl.Float64(),
        "daily_start_balance": pl.Float64(),
        "min_equity": pl.Float64(),
        "close_equity": pl.Float64(),
    }
)
OUTPUT_TABLES: Final = ("breaches", "accounts", "daily", "flags")
#: The file ``--report`` writes in the output directory.
REPORT_FILE: Final = "report.html"

_CSV_TS_FORMAT: Final = "%Y-%m-%dT%H:%M:%S%.6fZ"
#: The deal batch the engine takes: the deal columns and ``before_tick``.
_DEAL_ARROW: Final = pa.schema(
    [field.with_nullable(True) for field in ENGINE_DEAL_SCHEMA]
    + [pa.field(BEFORE_TICK, pa.int64())]
)
# Columns only set once an account has evaluated a tick.
_STATE_COLUMNS: Final = ("equity", "balance", "daily_start_equity")


@dataclass(frozen=True, slots=True)
class BacktestTables:
    """The outputs of a backtest as polars frames.

    Attributes:
        breaches: One row per breach (:data:`BREACHES_SCHEMA`).
        accounts: One row per phase of the rules (:data:`ACCOUNTS_SCHEMA`).
        daily: One row per account and local day (:data:`DAILY_SCHEMA`).
        flags: One row per hedge pair (:data:`FLAGS_SCHEMA`); empty without deals.
    """

    breaches: pl.DataFrame
    accounts: pl.DataFrame
    daily: pl.DataFrame
    flags: pl.DataFrame

    def as_dict(self) -> dict[str, pl.DataFrame]:
        """The tables by name, in :data:`OUTPUT_TABLES` order."""
        return {
            "breaches": self.breaches,
            "accounts": self.accounts,
            "daily": self.daily,
            "flags": self.flags,
        }


@dataclass(frozen=True, slots=True)
class BacktestResult:
    """What a backtest did.

    Attributes:
        accounts: Phases in the rules file.
        rows: Tick rows read.
        evaluated: Ticks judged by a phase.
        late: Ticks skipped as late or before their phase's start.
        unknown: Ticks for accounts not in the rules file.
        inactive: Ticks after their phase had passed or failed.
        deal_rows: Deal rows read.
        deals: Deals processed by a phase.
        flags: Rows in the ``flags`` output.
        breaches: Rows in the ``breaches`` output.
        passed: Phases that passed.
        failed: Phases that failed.
        partitions: Temporary partitions used to sort (0: sorted in memory).
        seconds: Wall time of the whole run.
        outputs: The files written.
    """

    accounts: int
    rows: int
    evaluated: int
    late: int
    unknown: int
    inactive: int
    deal_rows: int
    deals: int
    flags: int
    breaches: int
    passed: int
    failed: int
    partitions: int
    seconds: float
    outputs: tuple[Path, ...]


def run_backtest(
    rules: str | Path,
    ticks: str | Path,
    out_dir: str | Path,
    *,
    max_rows_in_memory: int = DEFAULT_MAX_ROWS_IN_MEMORY,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    tmp_dir: str | Path | None = None,
    progress: bool = False,
    report: bool = False,
    deals: str | Path | None = None,
    threads: int | None = None,
) -> BacktestResult:
    """Replay tick (and deal) files through the rules engine and write the results.

    Args:
        rules: The ``RULES.json`` file.
        ticks: A Parquet or CSV file, a directory or a glob of them.
        out_dir: Receives ``breaches``, ``accounts``, ``daily`` and ``flags`` as
            ``.parquet`` and ``.csv``; created if missing, existing files of those
            names are replaced.
        max_rows_in_memory: Above this many tick rows, judge through temporary
            partitions on disk instead of in memory.
        chunk_rows: Ignored (kept for compatibility; see
            :data:`DEFAULT_CHUNK_ROWS`); must be positive.
        tmp_dir: Where the temporary partitions go (default: the system's temp
            directory, ``TMPDIR``).
        progress: Show a progress bar on stderr.
        report: Also write ``report.html`` (:mod:`prop_stream.backtest.report`).
        deals: Deal files (``--deals``): a Parquet or CSV file, a directory or a
            glob, with the deal columns of ``rules.md``.
        threads: Most threads the engine judges on (``--threads``); None: one
            per core. The outputs are the same on any number.

    Returns:
        Counts and timings of the run.

    Raises:
        InputFileError: An input is missing or invalid; nothing was written.
    """
    if max_rows_in_memory < 1 or chunk_rows < 1:
        raise ValueError("max_rows_in_memory and chunk_rows must be positive")
    started = time.perf_counter()
    config = read_rules_config(rules)
    specs = config.specs
    files = resolve_tick_files(ticks)
    lazies = [scan_ticks(file) for file in files]
    deal_files = [] if deals is None else resolve_tick_files(deals, "deal")
    deal_input = DealInput(
        files=deal_files,
        lazies=[scan_deals(file) for file in deal_files],
        rows=count_rows(deal_files),
        customers=config.customers,
        hedge_window_seconds=config.hedge_window_seconds,
    )
    out = _check_out_dir(Path(out_dir))
    if tmp_dir is not None and not Path(tmp_dir).is_dir():
        raise InputFileError(f"--tmp-dir {tmp_dir}: not a directory")
    total = count_rows(files)
    tables, upserts, partitions = judge(
        specs,
        files,
        lazies,
        total,
        max_rows_in_memory=max_rows_in_memory,
        tmp_dir=tmp_dir,
        progress=progress,
        deals=deal_input,
        threads=threads,
    )
    outputs = write_outputs(out, tables.as_dict())
    if report:
        # Imported here: the report's template and numpy work are only needed
        # with --report.
        from prop_stream.backtest.report import write_report

        outputs += (
            write_report(
                out / REPORT_FILE,
                specs,
                lazies,
                tables,
                max_rows_in_memory=max_rows_in_memory,
            ),
        )
    status = tables.accounts["status"]
    return BacktestResult(
        accounts=len(specs),
        rows=total,
        evaluated=upserts.evaluated,
        late=upserts.late,
        unknown=upserts.unknown,
        inactive=upserts.inactive,
        deal_rows=deal_input.rows,
        deals=upserts.deals,
        flags=tables.flags.height,
        breaches=tables.breaches.height,
        passed=int((status == "passed").sum()),
        failed=int((status == "failed").sum()),
        partitions=partitions,
        seconds=time.perf_counter() - started,
        outputs=outputs,
    )


@dataclass(frozen=True, slots=True)
class DealInput:
    """The deals of a run and what the hedge join needs.

    Attributes:
        files: The deal files behind ``lazies`` (empty for an in-memory table),
            used only to name a bad value in an error.
        lazies: The deals as :func:`~prop_stream.backtest.files.scan_deals`
            returns them, in input order.
        rows: Rows in ``lazies``.
        customers: ``customer_id`` per account (the rules file's).
        hedge_window_seconds: The window of hedge flags; None turns them off.
    """

    files: Sequence[TickFile] = ()
    lazies: Sequence[pl.LazyFrame] = ()
    rows: int = 0
    customers: Mapping[int, str] | None = None
    hedge_window_seconds: float | None = DEFAULT_HEDGE_WINDOW_SECONDS


def judge(
    specs: Sequence[PhaseSpec],
    files: Sequence[TickFile],
    lazies: Sequence[pl.LazyFrame],
    total: int,
    *,
    max_rows_in_memory: int,
    tmp_dir: str | Path | None,
    progress: bool,
    deals: DealInput | None = None,
    threads: int | None = None,
) -> tuple[BacktestTables, _Upserts, int]:
    """Judge the ticks and deals and build the output tables, writing nothing.

    Args:
        specs: The phases, one per account.
        files: The tick files behind ``lazies``, used only to name a bad value in
            an error; empty for in-memory frames, which are checked before.
        lazies: The ticks as :func:`~prop_stream.backtest.files.scan_ticks`
            returns them, in input order (ties in ``ts`` keep it).
        total: Rows in ``lazies``.
        max_rows_in_memory: Above this many rows, judge through temporary
            partitions.
        tmp_dir: Where the temporary partitions go.
        progress: Show a progress bar on stderr.
        deals: The deals of the run, if any.
        threads: Most threads the engine judges on; None: one per core.

    Returns:
        The tables, the engine's counts and the number of partitions used.

    Raises:
        InputFileError: A phase is refused by the engine or a tick or deal value
            is bad.
    """
    deals = deals if deals is not None else DealInput()
    engine = _engine(specs)
    upserts = _Upserts()
    events = total + deals.rows
    bar = tqdm(
        total=total,
        unit="tick",
        unit_scale=True,
        desc="backtest",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    with bar:
        if events <= max_rows_in_memory:
            partitions = 0
            bar.set_description("reading")
            frame = _read_all(files, lazies)
            if deals.rows:
                deal_frame = _read_sorted_deals(deals.files, deals.lazies)
                frame = frame.sort(["account_id", "ts"], maintain_order=True)
                bar.set_description("backtest")
                _evaluate_with_deals(engine, frame, deal_frame, upserts, bar)
                del deal_frame
            else:
                bar.set_description("backtest")
                _evaluate(engine, frame, None, upserts, bar, threads)
            del frame
        else:
            partitions = min(
                _MAX_PARTITIONS, max(2, math.ceil(2 * events / max_rows_in_memory))
            )
            with tempfile.TemporaryDirectory(
                prefix="prop-stream-backtest-", dir=tmp_dir
            ) as tmp:
                bar.set_description("partitioning")
                parts = _partition(files, lazies, Path(tmp) / "ticks", partitions)
                deal_parts = _partition_deals(
                    deals.files, deals.lazies, Path(tmp) / "deals", partitions
                )
                bar.set_description("backtest")
                for part in range(partitions):
                    frame = _read_partition(parts, part)
                    if deal_parts:
                        # With deals: the partition sorted by (account, ts, input
                        # position), its deals merged in (see _deal_positions).
                        frame = frame.sort(["account_id", "ts", _SEQ]).drop(_SEQ)
                        deal_frame = _read_deal_partition(deal_parts, part)
                        _evaluate_with_deals(engine, frame, deal_frame, upserts, bar)
                        del deal_frame
                    else:
                        _evaluate(engine, frame, _SEQ, upserts, bar, threads)
                    del frame

    try:
        flags = hedge_flags(
            upserts.deal_opens(), deals.customers or {}, deals.hedge_window_seconds
        )
    except ValueError as exc:
        raise InputFileError(str(exc)) from exc
    tables = BacktestTables(
        breaches=_breaches_table(upserts.breaches()),
        accounts=_accounts_table(engine.phases()),
        daily=_daily_table(upserts.daily()),
        flags=flags,
    )
    return tables, upserts, partitions


def _check_out_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise InputFileError(f"--out {out}: exists and is not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputFileError(f"--out {out}: can't write in {existing}")
    return out


def _engine(specs: Sequence[PhaseSpec]) -> RuleEngine:
    engine = RuleEngine()
    for spec in specs:
        try:
            engine.register(spec)
        except RuleConfigError as exc:
            raise InputFileError(f"account {spec.account_id}: {exc}") from exc
    return engine


def _read_all(
    files: Sequence[TickFile], lazies: Sequence[pl.LazyFrame]
) -> pl.DataFrame:
    # The files concatenated in path order, rows in file order: that order is the
    # tiebreak for equal timestamps, and the engine keeps it (no sort here).
    query = pl.concat(lazies, how="vertical")
    try:
        frame = query.collect(engine="in-memory")
    except pl.exceptions.PolarsError as exc:
        raise_first_bad_file(files)
        raise InputFileError(f"can't read ticks: {exc}") from exc
    if not check_ticks(frame):
        raise_first_bad_file(files)
        raise InputFileError("ticks contain nulls or non-finite values")
    return frame


def _read_sorted_deals(
    files: Sequence[TickFile], lazies: Sequence[pl.LazyFrame]
) -> pl.DataFrame:
    # Stable, like the ticks: deals of one account at one ts keep file order.
    if not lazies:
        return pl.DataFrame(schema=DEAL_SCHEMA)
    query = pl.concat(lazies, how="vertical").sort(
        ["account_id", "ts"], maintain_order=True
    )
    try:
        frame = query.collect(engine="in-memory")
    except pl.exceptions.PolarsError as exc:
        raise_first_bad_deal_file(files)
        raise InputFileError(f"can't read deals: {exc}") from exc
    if not check_deals(frame):
        raise_first_bad_deal_file(files)
        raise InputFileError("deals contain missing or invalid values")
    return frame


def _partition_deals(
    files: Sequence[TickFile],
    lazies: Sequence[pl.LazyFrame],
    tmp: Path,
    partitions: int,
) -> list[Path]:
    if not lazies:
        return []
    # The same hash as the ticks': an account's deals land in its ticks' partition.
    query = _tagged(files, lazies, partitions)
    try:
        query.sink_parquet(
            pl.PartitionBy(tmp, key="_part", include_key=True), mkdir=True
        )
    except pl.exceptions.PolarsError as exc:
        raise_first_bad_deal_file(files)
        raise InputFileError(f"can't read deals: {exc}") from exc
    parts = sorted(tmp.rglob("*.parquet"))
    if parts:
        first = first_bad_deal_index(pl.scan_parquet(parts))
        if first is not None:
            diagnose_deal_file(files[first])
            raise InputFileError("deals contain missing or invalid values")
    return parts


def _read_deal_partition(parts: Sequence[Path], part: int) -> pl.DataFrame:
    if not parts:
        return pl.DataFrame(schema=DEAL_SCHEMA)
    return (
        pl.scan_parquet(list(parts), hive_partitioning=False)
        .filter(pl.col("_part") == part)
        .sort(["account_id", "ts", "_file", "_row"])
        .select(DEAL_COLUMNS)
        .collect(engine="in-memory")
    )


#: The input position (file index, row) of a partitioned row, as one UInt64.
_SEQ: Final = "_seq"


def _tagged(
    files: Sequence[TickFile], lazies: Sequence[pl.LazyFrame], partitions: int
) -> pl.LazyFrame:
    """The rows with their input position and their partition.

    ``_file`` and ``_row`` keep the tiebreak through the partitions; ``_part`` is a
    hash of the account, so an account's ticks and deals land in the same one.
    """
    return pl.concat(
        [
            lazy.with_row_index("_row").with_columns(
                _file=pl.lit(file.index, dtype=pl.UInt32)
            )
            for file, lazy in zip(files, lazies, strict=True)
        ],
        how="vertical",
    ).with_columns(
        _part=(pl.col("account_id").hash(seed=0) % partitions).cast(pl.UInt32)
    )


def _partition(
    files: Sequence[TickFile],
    lazies: Sequence[pl.LazyFrame],
    tmp: Path,
    partitions: int,
) -> list[Path]:
    query = _tagged(files, lazies, partitions)
    try:
        query.sink_parquet(
            pl.PartitionBy(tmp, key="_part", include_key=True), mkdir=True
        )
    except pl.exceptions.PolarsError as exc:
        raise_first_bad_file(files)
        raise InputFileError(f"can't read ticks: {exc}") from exc
    parts = sorted(tmp.rglob("*.parquet"))
    if parts and not check_ticks(pl.scan_parquet(parts)):
        first = (
            pl.scan_parquet(parts)
            .filter(
                pl.any_horizontal(
                    *(pl.col(n).is_null() for n in TICK_COLUMNS),
                    *(~pl.col(n).is_finite() for n in ("equity", "balance")),
                )
            )
            .select(pl.col("_file").min())
            .collect()
            .item()
        )
        diagnose_tick_file(files[first])
        raise InputFileError("ticks contain nulls or non-finite values")
    return parts


def _read_partition(parts: Sequence[Path], part: int) -> pl.DataFrame:
    seq = pl.col("_file").cast(pl.UInt64) * (1 << 32) + pl.col("_row").cast(pl.UInt64)
    if not parts:
        return pl.DataFrame(schema={**dict.fromkeys(TICK_COLUMNS), _SEQ: pl.UInt64})
    # The partition's rows in whatever order they were written: the engine orders
    # each account's ticks by (ts, input position) itself.
    return (
        pl.scan_parquet(list(parts), hive_partitioning=False)
        .filter(pl.col("_part") == part)
        .select(*TICK_COLUMNS, seq.alias(_SEQ))
        .collect(engine="in-memory")
    )


def _evaluate(
    engine: RuleEngine,
    frame: pl.DataFrame,
    seq_column: str | None,
    upserts: _Upserts,
    bar: tqdm,
    threads: int | None,
) -> None:
    if frame.height:
        evaluation, _ = engine.process_unordered(
            frame, seq_column=seq_column, threads=threads
        )
        upserts.add(evaluation)
    bar.update(frame.height)


def _evaluate_with_deals(
    engine: RuleEngine,
    frame: pl.DataFrame,
    deals: pl.DataFrame,
    upserts: _Upserts,
    bar: tqdm,
) -> None:
    """Feed sorted ticks, and the deals merged into them, in chunks of ticks."""
    chunk_rows = DEFAULT_CHUNK_ROWS
    deals = deals.with_columns(_at=_deal_positions(frame, deals))
    offsets = list(range(0, frame.height, chunk_rows)) or [0]
    for number, offset in enumerate(offsets):
        chunk = frame.slice(offset, chunk_rows)
        last = number == len(offsets) - 1
        # The deals delivered before a tick of this chunk, and after the last
        # chunk the deals after every tick.
        in_chunk = pl.col("_at") >= offset
        if not last:
            in_chunk &= pl.col("_at") < offset + chunk.height
        batch = deals.filter(in_chunk).with_columns(
            (pl.col("_at") - offset).alias(BEFORE_TICK)
        )
        upserts.add(engine.process(chunk, _deal_table(batch)))
        bar.update(chunk.height)


def _deal_positions(ticks: pl.DataFrame, deals: pl.DataFrame) -> pl.Series:
    """Per deal, the index of the first sorted tick it comes before.

    Both frames are sorted by (``account_id``, ``ts``), stably. In the merged
    order a deal precedes every tick of its account at its ``ts`` or later, so
    its position is the number of ticks whose (``account_id``, ``ts``) is
    smaller: one stable sort of the keys, deals first at equal keys.
    """
    keys = pl.concat(
        [
            deals.select("account_id", "ts", _tick=pl.lit(0, dtype=pl.Int64)),
            ticks.select("account_id", "ts", _tick=pl.lit(1, dtype=pl.Int64)),
        ],
        how="vertical",
    ).with_row_index("_i")
    merged = keys.sort(["account_id", "ts", "_tick"], maintain_order=True)
    before = merged.with_columns(_at=pl.col("_tick").cum_sum() - pl.col("_tick"))
    # Back to the deals' own order (their row indices come first in ``keys``).
    return before.filter(pl.col("_tick") == 0).sort("_i")["_at"]


def _deal_table(deals: pl.DataFrame) -> pa.Table:
    table = deals.select(_DEAL_ARROW.names).to_arrow()
    return table.cast(_DEAL_ARROW)


class _Upserts:
    """The engine's outputs across calls: counts, and the last row per key."""

    # Concatenate and dedupe once this many frames have piled up, so a long run
    # keeps about one row per key rather than one per call.
    _COMPACT_AFTER: Final = 64

    def __init__(self) -> None:
        self.evaluated = self.late = self.unknown = self.inactive = 0
        self.deals = 0
        self._breaches: list[pl.DataFrame] = []
        self._daily: list[pl.DataFrame] = []
        self._opens: list[pl.DataFrame] = []

    def add(self, evaluation: Evaluation) -> None:
        counts = evaluation.counts
        self.evaluated += counts.evaluated
        self.late += counts.late
        self.unknown += counts.unknown
        self.inactive += counts.inactive
        self.deals += evaluation.deal_counts.processed
        self._push(self._breaches, evaluation.breaches, BREACH_KEY)
        self._push(self._daily, evaluation.daily, DAILY_KEY)
        if evaluation.deal_opens.num_rows:
            opens = pl.from_arrow(evaluation.deal_opens.select(DEAL_OPENS_COLUMNS))
            assert isinstance(opens, pl.DataFrame)  # noqa: S101 - from a Table
            self._opens.append(opens)

    def deal_opens(self) -> pl.DataFrame:
        """Every processed ``in`` deal of the run (each deal once)."""
        if not self._opens:
            return pl.DataFrame(
                schema={name: DEAL_SCHEMA[name] for name in DEAL_OPENS_COLUMNS}
            )
        return pl.concat(self._opens, how="vertical_relaxed")

    def breaches(self) -> pl.DataFrame | None:
        return _last_per_key(self._breaches, BREACH_KEY)

    def daily(self) -> pl.DataFrame | None:
        return _last_per_key(self._daily, DAILY_KEY)

    def _push(
        self, frames: list[pl.DataFrame], frame: pl.DataFrame, key: Sequence[str]
    ) -> None:
        if frame.height:
            frames.append(frame)
        if len(frames) >= self._COMPACT_AFTER:
            merged = _last_per_key(frames, key)
            frames.clear()
            if merged is not None:
                frames.append(merged)


def _last_per_key(
    frames: Sequence[pl.DataFrame], key: Sequence[str]
) -> pl.DataFrame | None:
    if not frames:
        return None
    return pl.concat(frames, how="vertical_relaxed").unique(
        subset=list(key), keep="last", maintain_order=True
    )


def _conform(frame: pl.DataFrame | None, schema: pl.Schema) -> pl.DataFrame:
    if frame is None:
        return pl.DataFrame(schema=schema)
    return frame.select(pl.col(name).cast(dtype) for name, dtype in schema.items())


def _breaches_table(frame: pl.DataFrame | None) -> pl.DataFrame:
    if frame is not None:
        frame = frame.sort(["account_id", "ts", "breach_seq"])
    return _conform(frame, BREACHES_SCHEMA)


def _daily_table(frame: pl.DataFrame | None) -> pl.DataFrame:
    if frame is not None:
        frame = frame.sort(["account_id", "day"])
    return _conform(frame, DAILY_SCHEMA)


def _accounts_table(phases: pl.DataFrame) -> pl.DataFrame:
    # An account without an evaluated tick has no equity, balance or day yet.
    frame = _conform(phases.sort("account_id"), ACCOUNTS_SCHEMA)
    return frame.with_columns(
        pl.when(pl.col("ticks") > 0).then(pl.col(name)).alias(name)
        for name in _STATE_COLUMNS
    )


def write_outputs(
    out_dir: Path, tables: Mapping[str, pl.DataFrame]
) -> tuple[Path, ...]:
    """Write each table as ``NAME.parquet`` and ``NAME.csv`` in ``out_dir``.

    CSV timestamps are ISO 8601 UTC with a ``Z`` and six fraction digits; floats
    are written in polars' shortest round-trip form, so they read back exactly.
    Each file is written under a temporary name and renamed into place.

    Args:
        out_dir: The output directory (created if missing).
        tables: Table name to frame.

    Returns:
        The files written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, frame in tables.items():
        parquet = out_dir / f"{name}.parquet"
        csv = out_dir / f"{name}.csv"
        _replace(parquet, frame.write_parquet)
        _replace(csv, _csv_frame(frame).write_csv)
        written += [parquet, csv]
    return tuple(written)


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _csv_frame(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(
        pl.col(name).dt.convert_time_zone("UTC").dt.strftime(_CSV_TS_FORMAT)
        for name, dtype in frame.schema.items()
        if isinstance(dtype, pl.Datetime)
    )
