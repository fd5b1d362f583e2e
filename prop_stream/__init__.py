"""prop-stream: a risk engine for prop-trading challenges.

The rules engine lives in Rust (``prop_stream._core``); :mod:`prop_stream.rules` is its
Python face. :func:`backtest` replays ticks through it from a notebook.
"""

# The subpackage prop_stream.backtest is imported here, before the function of
# the same name is bound: importing a submodule sets its name on the parent
# package, so a later first import of the subpackage would hide the function.
from prop_stream.backtest.frames import backtest
from prop_stream.backtest.run import BacktestTables
from prop_stream.exceptions import (
    PropStreamError,
    RuleConfigError,
    SnapshotError,
    TickBatchError,
)
from prop_stream.rules import (
    BREACH_KEY,
    DAILY_KEY,
    DealCounts,
    Evaluation,
    PhaseSpec,
    RuleEngine,
    TickCounts,
    __version__,
    normalize_ticks,
    validate_rules,
)

__all__ = [
    "BREACH_KEY",
    "DAILY_KEY",
    "BacktestTables",
    "DealCounts",
    "Evaluation",
    "PhaseSpec",
    "PropStreamError",
    "RuleConfigError",
    "RuleEngine",
    "SnapshotError",
    "TickBatchError",
    "TickCounts",
    "__version__",
    "backtest",
    "normalize_ticks",
    "validate_rules",
]
