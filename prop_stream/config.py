"""Settings of the streaming service, read once from the environment.

:class:`StreamSettings` is built in :mod:`prop_stream.cli` and passed down; there is
no module-level instance. Every field can be set with a ``PROP_STREAM_`` variable
(``PROP_STREAM_DEMO_RATE=5000``) and is overridden by the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prop_stream.dburl import parse_db

SourceName = Literal["none", "demo", "kafka"]


#: A settings field holding ``--db`` (:func:`parse_db`).
DbTarget = Annotated[Path | str, BeforeValidator(parse_db)]


class StreamSettings(BaseSettings):
    """How the evaluator loop runs.

    Attributes:
        db: The DuckDB file the service owns, or a ``postgresql://`` URL.
        source: Where ticks come from: ``demo`` (the built-in simulator),
            ``kafka`` (the tick topic) or ``none``.
        max_batch_records: Most ticks handed to the engine per batch.
        poll_timeout_s: Longest a poll waits for ticks before the loop looks at its
            stop flag, new phases and export requests again.
        checkpoint_every: Batches between two engine checkpoints (one is also
            written at start and at a graceful stop).
        checkpoints_kept: Engine checkpoints kept in the database; older ones are
            deleted in the transaction that writes a new one.
        demo_rate: Ticks per second the demo source produces, shared among the
            accounts it simulates when it first starts.
        demo_seed: Seed of the demo source's random walks.
        demo_batch_ms: Demo time one demo batch spans, in milliseconds.
        demo_realtime: Pace the demo source to the wall clock (off: as fast as the
            loop takes batches; tests and replays).
        kafka_bootstrap: ``host:port[,host:port...]`` of the Kafka brokers.
        kafka_topic: The tick topic (``interfaces.md`` section 1).
        kafka_dlq_topic: The dead-letter topic (None: ``<kafka_topic>.dlq``).
        kafka_group_id: The consumer group Kafka offsets are published under,
            for monitoring only (positions live in DuckDB); None publishes none.
        kafka_consumer_group: Join the consumer group ``kafka_group_id`` and
            judge only the partitions Kafka assigns, with per-partition state
            and fencing (the scale-out evaluators, docs/scale-out.md); off,
            the service assigns itself every partition (embedded).
        kafka_group_instance_id: Static group membership (KIP-345): a member
            restarted within the session timeout keeps its partitions.
        kafka_session_timeout_ms: How long the group waits for a silent member
            (paused, cut off) before it gives the member's partitions to
            others; heartbeats go every third of it.
        group_stall_timeout_s: On PostgreSQL, how long a group member's batch
            transaction may stall (a paused process) before the store ends it,
            and how long a member taking over a partition waits for the
            stalled owner's lock before it ends that owner's session
            (docs/scale-out.md, "Fencing").
        kafka_fetch_max_bytes: Most bytes of one fetch response.
        kafka_max_partition_fetch_bytes: Most bytes per partition in one fetch.
        kafka_fetch_max_wait_ms: Longest the broker holds a fetch for more data.
        kafka_dlq_unknown_accounts: Send ticks of accounts the store does not
            have to the DLQ (reason ``unknown_account``; on by default). Off,
            the engine counts them as unknown (docs/kafka.md).
        kafka_raw_records: Read fetched record batches in the Rust core (False:
            one kafka-python ``ConsumerRecord`` per record, the old path).
        risk_mirror_interval_s: Seconds between two refreshes of the risk team's
            copy of the store, ``<db>.risk/risk.duckdb`` (docs/store.md); 0 turns
            it off. Keep it at most 30 so the copy stays within 60 s.
        archive: Keep every judged tick and deal in the archive,
            ``<db>.archive/ticks/`` and ``deals/`` (docs/store.md); off,
            nothing is staged.
        archive_dir: The archive's directory instead of ``<db>.archive``. On
            PostgreSQL the archive needs it (there is no file to sit beside): a
            directory every process of the deployment shares
            (docs/scale-out.md); unset there, nothing is staged.
        archive_interval_s: Seconds between two moves of the staged ticks from
            the database to the archive's Parquet files.
        archive_retention_days: Days of the archive kept before today (UTC); older
            day folders are removed; 0 keeps everything.
        max_clock_skew_s: Ticks whose ``ts`` is more than this many seconds
            ahead of the service's clock are dead-lettered as ``future_ts``
            (``interfaces.md`` section 1); 0 turns the check off. Its variable
            is ``PROP_STREAM_MAX_CLOCK_SKEW``.
        hedge_window_seconds: The firm-wide window of cross-account hedge flags
            (``rules.md``, "Cross-account hedging"): two opposite ``in`` deals
            of one customer's accounts at most this many seconds apart are
            flagged. None (``PROP_STREAM_HEDGE_WINDOW_SECONDS`` empty or
            ``null``) turns flags off; the deals are still recorded.
    """

    # validate_by_name: the one aliased field (max_clock_skew_s) is set by its
    # name in code and by its documented variable in the environment.
    model_config = SettingsConfigDict(
        env_prefix="PROP_STREAM_", frozen=True, extra="forbid", validate_by_name=True
    )

    db: DbTarget = Path("prop-stream.duckdb")
    source: SourceName = "demo"
    max_batch_records: int = Field(default=100_000, gt=0)
    poll_timeout_s: float = Field(default=0.5, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    checkpoints_kept: int = Field(default=3, gt=0)
    demo_rate: float = Field(default=1_000.0, gt=0)
    demo_seed: int = 7
    demo_batch_ms: int = Field(default=200, gt=0)
    demo_realtime: bool = True
    kafka_bootstrap: str = "127.0.0.1:19092"
    kafka_topic: str = Field(default="prop.equity-ticks", min_length=1)
    kafka_dlq_topic: str | None = None
    kafka_group_id: str | None = "prop-stream"
    kafka_consumer_group: bool = False
    kafka_group_instance_id: str | None = None
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1_000)
    group_stall_timeout_s: float = Field(default=10.0, gt=0)
    kafka_fetch_max_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    kafka_max_partition_fetch_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    kafka_fetch_max_wait_ms: int = Field(default=100, ge=0)
    kafka_dlq_unknown_accounts: bool = True
    kafka_raw_records: bool = True
    risk_mirror_interval_s: float = Field(default=30.0, ge=0)
    archive: bool = True
    archive_dir: Path | None = None
    archive_interval_s: float = Field(default=300.0, gt=0)
    archive_retention_days: int = Field(default=0, ge=0)
    max_clock_skew_s: float = Field(
        default=300, ge=0, validation_alias="PROP_STREAM_MAX_CLOCK_SKEW"
    )
    hedge_window_seconds: float | None = Field(default=60.0, ge=0, allow_inf_nan=False)

    @field_validator("hedge_window_seconds", mode="before")
    @classmethod
    def _off_when_empty(cls, value: object) -> object:
        """An empty value or ``null`` (any case) turns hedge flags off."""
        if isinstance(value, str) and value.strip().lower() in ("", "null", "none"):
            return None
        return value

    @property
    def kafka_dlq(self) -> str:
        """The dead-letter topic: ``kafka_dlq_topic`` or ``<kafka_topic>.dlq``."""
        return self.kafka_dlq_topic or f"{self.kafka_topic}.dlq"
