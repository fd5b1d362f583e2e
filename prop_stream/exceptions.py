"""The exception hierarchy of prop-stream.

Every error the package raises derives from :class:`PropStreamError`. The classes
defined by the Rust core are re-exported here, as polars does in its
``exceptions.py``.
"""

from prop_stream._core import (
    PropStreamError,
    RuleConfigError,
    SnapshotError,
    TickBatchError,
)


class InputFileError(PropStreamError):
    """A tick or rules file can't be read as the backtest command expects."""


__all__ = [
    "InputFileError",
    "PropStreamError",
    "RuleConfigError",
    "SnapshotError",
    "TickBatchError",
]
