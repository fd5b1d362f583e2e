"""Replay tick and deal files through the rules engine: ``prop-stream backtest``.

:func:`run_backtest` is the whole command; :mod:`prop_stream.backtest.files` reads
and checks its inputs.
"""

from prop_stream.backtest.files import (
    DEAL_COLUMNS,
    RulesConfig,
    TickFile,
    parse_rules,
    parse_rules_config,
    read_rules,
    read_rules_config,
    resolve_tick_files,
    scan_deal_frame,
    scan_deals,
    scan_tick_frame,
    scan_ticks,
)
from prop_stream.backtest.flags import FLAGS_SCHEMA, hedge_flags
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
    DealInput,
    judge,
    run_backtest,
    write_outputs,
)

__all__ = [
    "ACCOUNTS_SCHEMA",
    "BREACHES_SCHEMA",
    "DAILY_SCHEMA",
    "DEAL_COLUMNS",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_MAX_ROWS_IN_MEMORY",
    "FLAGS_SCHEMA",
    "OUTPUT_TABLES",
    "REPORT_FILE",
    "BacktestResult",
    "BacktestTables",
    "DealInput",
    "RulesConfig",
    "TickFile",
    "hedge_flags",
    "judge",
    "parse_rules",
    "parse_rules_config",
    "read_rules",
    "read_rules_config",
    "resolve_tick_files",
    "run_backtest",
    "scan_deal_frame",
    "scan_deals",
    "scan_tick_frame",
    "scan_ticks",
    "write_outputs",
]
