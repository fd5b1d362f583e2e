"""Settings of the streaming service, read once from the environment.

:class:`StreamSettings` is built in :mod:`prop_stream.cli` and passed down; there is
no module-level instance. Every field can be set with a ``PROP_STREAM_`` variable
(``PROP_STREAM_DEMO_RATE=5000``) and is overridden by the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SourceName = Literal["none", "demo"]


class StreamSettings(BaseSettings):
    """How the evaluator loop runs.

    Attributes:
        db: The DuckDB file the service owns.
        source: Where ticks come from: ``demo`` (the built-in simulator) or ``none``.
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
    """

    model_config = SettingsConfigDict(
        env_prefix="PROP_STREAM_", frozen=True, extra="forbid"
    )

    db: Path = Path("prop-stream.duckdb")
    source: SourceName = "demo"
    max_batch_records: int = Field(default=100_000, gt=0)
    poll_timeout_s: float = Field(default=0.5, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    checkpoints_kept: int = Field(default=3, gt=0)
    demo_rate: float = Field(default=1_000.0, gt=0)
    demo_seed: int = 7
    demo_batch_ms: int = Field(default=200, gt=0)
    demo_realtime: bool = True
