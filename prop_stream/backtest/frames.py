"""The backtest for notebooks: in-memory inputs and outputs, no files written.

:func:`backtest` is re-exported as ``prop_stream.backtest``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from prop_stream.backtest.files import (
    RulesConfig,
    TickFile,
    count_rows,
    parse_rules_config,
    read_rules_config,
    resolve_tick_files,
    scan_deal_frame,
    scan_deals,
    scan_tick_frame,
    scan_ticks,
)
from prop_stream.backtest.run import (
    DEFAULT_MAX_ROWS_IN_MEMORY,
    BacktestTables,
    DealInput,
    judge,
)
from prop_stream.exceptions import InputFileError


def backtest(
    rules: str | Path | Mapping[str, Any],
    ticks: Any,
    deals: Any = None,
    *,
    max_rows_in_memory: int = DEFAULT_MAX_ROWS_IN_MEMORY,
    tmp_dir: str | Path | None = None,
    threads: int | None = None,
) -> BacktestTables:
    """Replay ticks and deals through the rules engine, return the outputs as frames.

    The same run as ``prop-stream backtest`` (same checks, same tie order, same
    tables, bit for bit), but nothing is written: the four tables come back as
    polars frames.

    Args:
        rules: A ``RULES.json`` path, or a dict of the same shape
            (``{"accounts": [...], "hedge_window_seconds": ...}``); in a dict,
            ``started_at`` may also be a timezone-aware
            :class:`~datetime.datetime`.
        ticks: A path (Parquet or CSV file, directory or glob, as ``--ticks``), or
            a table with ``account_id, ts, equity, balance``: a polars DataFrame
            or LazyFrame, a pyarrow Table, or anything with
            ``__arrow_c_stream__``. ``ts`` may be a timestamp (naive means UTC),
            epoch milliseconds or ISO 8601 text.
        deals: Deal events, or None: a path (as ``--deals``) or a table with the
            deal columns (``account_id, ts, deal_id, position_id, symbol, side,
            volume, price, entry``), of the same kinds as ``ticks``.
        max_rows_in_memory: For path inputs above this many rows, judge through
            temporary partitions (as ``--max-rows-in-memory``). In-memory tables
            are judged in memory.
        tmp_dir: Where those partitions go (default: the system temp directory).
        threads: Most threads the engine judges on (as ``--threads``); None:
            one per core.

    Returns:
        ``breaches``, ``accounts``, ``daily`` and ``flags`` (schemas of
        ``docs/backtest.md``).

    Raises:
        InputFileError: The rules, the ticks or the deals are invalid; the
            message names the account and field, or the column and row.

    Examples:
        >>> import polars as pl
        >>> from datetime import datetime, UTC
        >>> import prop_stream
        >>> rules = {"accounts": [{
        ...     "account_id": 1001, "challenge_id": "c-1",
        ...     "started_at": "2026-01-05T00:00:00Z",
        ...     "rules": {"initial_balance": 100_000, "max_total_loss": 0.1}}]}
        >>> ticks = pl.DataFrame({
        ...     "account_id": [1001, 1001],
        ...     "ts": [datetime(2026, 1, 5, 9, tzinfo=UTC),
        ...            datetime(2026, 1, 5, 10, tzinfo=UTC)],
        ...     "equity": [100_000.0, 89_000.0], "balance": [100_000.0] * 2})
        >>> result = prop_stream.backtest(rules, ticks)
        >>> result.accounts["status"].to_list()
        ['failed']
    """
    if max_rows_in_memory < 1:
        raise ValueError("max_rows_in_memory must be positive")
    config = _config(rules)
    specs = config.specs
    files: list[TickFile] = []
    if isinstance(ticks, str | Path):
        files = resolve_tick_files(ticks)
        lazies = [scan_ticks(file) for file in files]
        total = count_rows(files)
    else:
        lazy = scan_tick_frame(ticks)
        lazies = [lazy]
        total = int(lazy.select(pl.len()).collect().item())
        # The table is in memory already: no partitions.
        max_rows_in_memory = max(max_rows_in_memory, total)
    deal_input = _deals(deals, config)
    if not isinstance(deals, str | Path):
        max_rows_in_memory = max(max_rows_in_memory, total + deal_input.rows)
    if tmp_dir is not None and not Path(tmp_dir).is_dir():
        raise InputFileError(f"tmp_dir {tmp_dir}: not a directory")
    tables, _, _ = judge(
        specs,
        files,
        lazies,
        total,
        max_rows_in_memory=max_rows_in_memory,
        tmp_dir=tmp_dir,
        progress=False,
        deals=deal_input,
        threads=threads,
    )
    return tables


def _deals(deals: Any, config: RulesConfig) -> DealInput:
    files: list[TickFile] = []
    if deals is None:
        lazies: list[pl.LazyFrame] = []
        rows = 0
    elif isinstance(deals, str | Path):
        files = resolve_tick_files(deals, "deal")
        lazies = [scan_deals(file) for file in files]
        rows = count_rows(files)
    else:
        lazy = scan_deal_frame(deals)
        lazies = [lazy]
        rows = int(lazy.select(pl.len()).collect().item())
    return DealInput(
        files=files,
        lazies=lazies,
        rows=rows,
        customers=config.customers,
        hedge_window_seconds=config.hedge_window_seconds,
    )


def _config(rules: str | Path | Mapping[str, Any]) -> RulesConfig:
    if isinstance(rules, str | Path):
        return read_rules_config(rules)
    if isinstance(rules, Mapping):
        try:
            return parse_rules_config(dict(rules))
        except InputFileError as exc:
            raise InputFileError(f"rules: {exc}") from exc
    raise InputFileError(
        f"rules: must be a path or a dict with an 'accounts' list, "
        f"got {type(rules).__name__}"
    )
