"""Replay tick files through the rules engine: the ``prop-stream backtest`` command.

:func:`run_backtest` is the whole command; :mod:`prop_stream.backtest.files` reads
and checks its inputs.
"""

from prop_stream.backtest.files import (
    TickFile,
    parse_rules,
    read_rules,
    resolve_tick_files,
    scan_tick_frame,
    scan_ticks,
)
from prop_stream.backtest.run import (
    ACCOUNTS_SCHEMA,
    BREACHES_SCHEMA,
    DAILY_SCHEMA,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_MAX_ROWS_IN_MEMORY,
    OUTPUT_TABLES,
    REPORT_FILE,
    BacktestResult,
    BacktestTables,
    judge,
    run_backtest,
    write_outputs,
)

__all__ = [
    "ACCOUNTS_SCHEMA",
    "BREACHES_SCHEMA",
    "DAILY_SCHEMA",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_MAX_ROWS_IN_MEMORY",
    "OUTPUT_TABLES",
    "REPORT_FILE",
    "BacktestResult",
    "BacktestTables",
    "TickFile",
    "judge",
    "parse_rules",
    "read_rules",
    "resolve_tick_files",
    "run_backtest",
    "scan_tick_frame",
    "scan_ticks",
    "write_outputs",
]
