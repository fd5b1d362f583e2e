"""Type stub for the Rust rules engine (hand-written; checked by stubtest)."""

from typing import Any, Final, Literal, final

import pyarrow as pa

__version__: Final[str]
__all__ = [
    "BatchResult",
    "ChallengeRules",
    "Evaluator",
    "PropStreamError",
    "RecordScan",
    "RuleConfigError",
    "SnapshotError",
    "TickBatchError",
    "__version__",
    "_dense_baseline",
    "rule_defaults",
    "scan_record_batches",
]

class PropStreamError(Exception):
    """Root of every prop-stream error."""

class RuleConfigError(PropStreamError):
    """A rule set or phase registration is invalid; ``field`` names the culprit."""

    field: str

class TickBatchError(PropStreamError):
    """A tick batch does not have the engine's schema."""

class SnapshotError(PropStreamError):
    """Snapshot bytes can't be restored."""

@final
class ChallengeRules:
    """A validated rule set (``rules.md``), built from a mapping of rule names."""

    def __new__(cls, rules: dict[str, Any]) -> ChallengeRules: ...
    def to_dict(self) -> dict[str, object]:
        """Every rule with its value, defaults filled in."""

def rule_defaults() -> dict[str, object]:
    """The defaults of every rule but ``initial_balance``."""

def _dense_baseline(ticks: Any) -> tuple[int, int]:
    """The engine benchmark's yardstick: (ticks judged, breaches seen).

    A dense per-account loop over an Arrow stream of ticks in the order given
    (day start, day low, trailing high-water mark, two floors); not the rules.
    """

@final
class BatchResult:
    """What one ``Evaluator.process`` call produced, as pyarrow tables."""

    @property
    def breaches(self) -> pa.Table:
        """Breaches and warning resolutions (upserts by account_id, breach_seq)."""
    @property
    def metrics(self) -> pa.Table:
        """The latest metric of every phase that evaluated a tick."""
    @property
    def daily(self) -> pa.Table:
        """Daily snapshot rows touched (upserts by account_id, day)."""
    @property
    def transitions(self) -> pa.Table:
        """Phases that passed or failed."""
    @property
    def counts(self) -> dict[str, int]:
        """Tick counts and deal counts.

        evaluated, late, unknown, inactive, invalid; deals, late_deals,
        duplicate_deals, unmatched_deals, unknown_deals, inactive_deals,
        invalid_deals.
        """
    @property
    def deal_opens(self) -> pa.Table:
        """The processed ``in`` deals: account_id, deal_id, ts, symbol, side."""

@final
class Evaluator:
    """The rules engine: registered phases judged on Arrow batches of ticks."""

    def __new__(
        cls, *, grouping: Literal["auto", "always", "never"] = "auto"
    ) -> Evaluator:
        """An evaluator with no phases; ``grouping`` only changes speed."""
    def __len__(self) -> int: ...
    def contains(self, account_id: int) -> bool:
        """Whether the account has a registered phase."""
    def register(
        self,
        account_id: int,
        *,
        challenge_id: str,
        phase_index: int,
        started_at_us: int,
        rules: ChallengeRules,
    ) -> None:
        """Start judging a phase; RuleConfigError if the account is taken."""
    def remove(self, account_id: int) -> bool:
        """Forget a phase; False if the account had none."""
    def process(self, ticks: Any, deals: Any | None = None) -> BatchResult:
        """Judge Arrow ticks and optional deals; releases the GIL while it works.

        Each deal is judged right before tick row ``before_tick`` of the call.
        """
    def process_unordered(
        self,
        ticks: Any,
        *,
        seq_column: str | None = None,
        threads: int | None = None,
    ) -> BatchResult:
        """Judge a table in any order as if stably sorted by (account_id, ts) first.

        With ``seq_column`` (uint64) the order is (account_id, ts, seq_column).
        ``threads``: most threads to judge on (None: one per core; the outputs
        are the same on any number).
        ``counts`` also has ``runs`` (phases with ticks) and ``sorted_runs``
        (those whose ticks were out of order). Releases the GIL while it works.
        """
    def phases(self) -> pa.Table:
        """The state of every registered phase."""
    def snapshot(self) -> bytes:
        """The whole engine state as bytes."""
    @staticmethod
    def restore(
        data: bytes, *, grouping: Literal["auto", "always", "never"] = "auto"
    ) -> Evaluator:
        """Rebuild an evaluator from ``snapshot()`` bytes."""

@final
class RecordScan:
    """The records of one scan of a Kafka fetch buffer, as columns.

    Keys, values and headers are read from the held buffer on demand.
    """

    def __len__(self) -> int: ...
    @property
    def end(self) -> int:
        """Where to scan next in the buffer."""
    @property
    def next_offset(self) -> int:
        """The offset to fetch or scan from next."""
    @property
    def stop(self) -> Literal["end", "limit", "unsupported"]:
        """Why the scan ended."""
    @property
    def leader_epoch(self) -> int:
        """The leader epoch of the last batch read (-1 if none)."""
    @property
    def bytes_read(self) -> int:
        """Bytes of the batches finished."""
    @property
    def json_only(self) -> bool:
        """Whether no record names an encoding other than ``json``."""
    @property
    def last_offset(self) -> int:
        """The offset of the last record (-1 if none)."""
    def offset(self, i: int) -> int: ...
    def timestamp(self, i: int) -> int: ...
    def timestamp_type(self, i: int) -> int: ...
    def key(self, i: int) -> bytes | None: ...
    def value(self, i: int) -> bytes | None: ...
    def encoding(self, i: int) -> str | None:
        """The value of the record's first ``encoding`` header (None: absent/empty)."""
    def headers(self, i: int) -> list[tuple[str, bytes | None]]:
        """The record's headers as ``(key, value)`` pairs."""
    def ndjson(self, lo: int, hi: int) -> bytes | None:
        """Values ``lo..hi`` joined by newlines, or None if one is null."""

def scan_record_batches(
    buffer: bytes,
    start: int,
    fetch_offset: int,
    max_records: int,
    *,
    check_crc: bool = True,
) -> RecordScan:
    """Read the v2 record batches of a fetch buffer from byte ``start``.

    Raises ValueError for a corrupt batch or a failed CRC check.
    """
