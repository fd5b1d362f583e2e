"""prop-stream: a risk engine for prop-trading challenges.

The rules engine lives in Rust (``prop_stream._core``); :mod:`prop_stream.rules` is its
Python face.
"""

from prop_stream.exceptions import (
    PropStreamError,
    RuleConfigError,
    SnapshotError,
    TickBatchError,
)
from prop_stream.rules import (
    BREACH_KEY,
    DAILY_KEY,
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
    "Evaluation",
    "PhaseSpec",
    "PropStreamError",
    "RuleConfigError",
    "RuleEngine",
    "SnapshotError",
    "TickBatchError",
    "TickCounts",
    "__version__",
    "normalize_ticks",
    "validate_rules",
]
