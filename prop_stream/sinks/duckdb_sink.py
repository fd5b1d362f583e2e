"""The service's sink: one store transaction per flush (DuckDB or PostgreSQL).

A flush writes, in one transaction, every batch added since the last one:

- ``breaches``: upsert by ``(account_id, breach_seq)``; ``resolved`` only ever goes
  from false to true, so a replayed batch never reopens a resolved warning;
- ``prop_daily_snapshots``: upsert by ``(account_id, day)``;
- ``metrics_latest``: upsert by ``account_id``, only by a row at least as new;
- ``metric_history``: insert by ``(account_id, ts)``, ignoring rows already there;
- the phase transitions (:func:`prop_stream.store.lifecycle.apply_transitions`);
- ``deal_opens`` and ``flags``: the batches' processed ``in`` deals
  (``Evaluation.deal_opens``) and the hedge flags they form with the deals
  recorded before (:func:`prop_stream.store.flags.record_deal_opens`, keyed by
  ``(account_id, deal_id)`` and by the pair);
- ``tick_archive_staging`` and ``deal_archive_staging``: the batches' ticks and
  deals handed to :meth:`DuckDBSink.add`, each numbered on from its stream's
  ``archive_streams`` row (the archive, :mod:`prop_stream.store.archive`);
- the source position after the last batch, and an engine checkpoint if given.

Everything is keyed by the engine's identities, so writing the same
:class:`~prop_stream.rules.Evaluation` twice leaves the same rows. The staged ticks
and deals are not keyed: the loop hands a replayed batch's ticks and deals over
only when the store has not committed them yet
(:meth:`~prop_stream.evaluator.sources.TickSource.unseen`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import polars as pl
import pyarrow as pa

from prop_stream.rules import BREACH_KEY, DAILY_KEY, DEAL_COLUMNS, Evaluation
from prop_stream.sinks.base import BaseSink
from prop_stream.sinks.exceptions import SinkError
from prop_stream.store.changes import record_metric_changes
from prop_stream.store.db import (
    Connection,
    DatabaseError,
    frame_table,
    is_postgres,
    transaction,
)
from prop_stream.store.flags import record_deal_opens
from prop_stream.store.lifecycle import apply_transitions
from prop_stream.store.migrations import LATEST_VERSION, current_version
from prop_stream.store.progress import EngineCheckpoint, Position, save_checkpoint
from prop_stream.store.progress import save_position as _save_position

#: The default window of hedge flags (``PROP_STREAM_HEDGE_WINDOW_SECONDS``).
DEFAULT_HEDGE_WINDOW_SECONDS: Final = 60.0

#: The engine's metric columns, in the order of ``metrics_latest``.
METRIC_COLUMNS: Final = (
    "account_id",
    "challenge_id",
    "phase_index",
    "ts",
    "status",
    "day",
    "equity",
    "balance",
    "profit",
    "daily_start_equity",
    "daily_start_balance",
    "daily_pnl",
    "daily_loss_limit",
    "daily_floor",
    "daily_room",
    "daily_paused",
    "max_loss_limit",
    "overall_floor",
    "overall_room",
    "hwm",
    "trading_days",
    "days_elapsed",
    "best_day_profit",
    "profit_target_level",
    "profit_progress",
    "trading_days_progress",
    # Migration 5: the engine's positions (rules.md, Positions).
    "open_lots",
    "open_positions",
)
BREACH_COLUMNS: Final = (
    "account_id",
    "challenge_id",
    "phase_index",
    "breach_seq",
    "rule",
    "severity",
    "threshold",
    "actual",
    "action",
    "ts",
    "resolved",
    "resolved_ts",
)
DAILY_COLUMNS: Final = (
    "account_id",
    "day",
    "challenge_id",
    "phase_index",
    "daily_start_equity",
    "daily_start_balance",
    "min_equity",
    "close_equity",
)


def _select(columns: Sequence[str], relation: str) -> str:
    exprs = [
        "CAST(challenge_id AS BIGINT)" if name == "challenge_id" else name
        for name in columns
    ]
    # Column and relation names are this module's constants, never input.
    return f"SELECT {', '.join(exprs)} FROM {relation}"  # noqa: S608


_METRIC_UPDATES: Final = ", ".join(
    f"{name} = excluded.{name}" for name in METRIC_COLUMNS if name != "account_id"
)
_UPSERT_BREACHES: Final = (
    f"INSERT INTO breaches ({', '.join(BREACH_COLUMNS)}) "
    f"{_select(BREACH_COLUMNS, '_sink_breaches')} "
    "ON CONFLICT (account_id, breach_seq) DO UPDATE SET "
    "resolved = breaches.resolved OR excluded.resolved, "
    "resolved_ts = coalesce(breaches.resolved_ts, excluded.resolved_ts)"
)
_UPSERT_DAILY: Final = (
    f"INSERT INTO prop_daily_snapshots ({', '.join(DAILY_COLUMNS)}) "
    f"{_select(DAILY_COLUMNS, '_sink_daily')} "
    "ON CONFLICT (account_id, day) DO UPDATE SET "
    + ", ".join(
        f"{name} = excluded.{name}"
        for name in DAILY_COLUMNS
        if name not in ("account_id", "day")
    )
)
_UPSERT_LATEST: Final = (
    f"INSERT INTO metrics_latest ({', '.join(METRIC_COLUMNS)}) "
    f"{_select(METRIC_COLUMNS, '_sink_latest')} "
    f"ON CONFLICT (account_id) DO UPDATE SET {_METRIC_UPDATES} "
    "WHERE excluded.ts >= metrics_latest.ts"
)
_INSERT_HISTORY: Final = (
    f"INSERT INTO metric_history ({', '.join(METRIC_COLUMNS)}) "
    f"{_select(METRIC_COLUMNS, '_sink_history')} "
    "ON CONFLICT (account_id, ts) DO NOTHING"
)
# PostgreSQL loads the metrics once (one COPY, ``_sink_metrics``) for both
# statements: each row carries whether it is its account's latest (``_latest``) and
# the first of its ``(account_id, ts)`` (``_first``), the rows DuckDB's two frames
# hold.
_PG_UPSERT_LATEST: Final = (
    f"INSERT INTO metrics_latest ({', '.join(METRIC_COLUMNS)}) "
    f"{_select(METRIC_COLUMNS, '_sink_metrics')} WHERE _latest "
    f"ON CONFLICT (account_id) DO UPDATE SET {_METRIC_UPDATES} "
    "WHERE excluded.ts >= metrics_latest.ts"
)
_PG_INSERT_HISTORY: Final = (
    f"INSERT INTO metric_history ({', '.join(METRIC_COLUMNS)}) "
    f"{_select(METRIC_COLUMNS, '_sink_metrics')} WHERE _first "
    "ON CONFLICT (account_id, ts) DO NOTHING"
)
_TICK_COLUMNS: Final = ("account_id", "ts", "equity", "balance")
_STAGE_TICKS: Final = (
    "INSERT INTO tick_archive_staging (stream, seq, account_id, ts, equity, balance) "
    "SELECT stream, seq, account_id, ts, equity, balance FROM _sink_ticks"
)
# Column names are the engine's constants, never input.
_STAGE_DEALS: Final = (
    f"INSERT INTO deal_archive_staging (stream, seq, {', '.join(DEAL_COLUMNS)}) "  # noqa: S608
    f"SELECT stream, seq, {', '.join(DEAL_COLUMNS)} FROM _sink_deals"
)
# One statement takes a stream's numbers: the row is created on the stream's
# first batch, and the update's row lock orders two writers of one stream (a
# group member fenced out a moment later) instead of letting both read one value.
_TAKE_SEQS: Final = (
    "INSERT INTO archive_streams (stream, next_tick_seq, next_deal_seq) "
    "VALUES (?, ?, ?) ON CONFLICT (stream) DO UPDATE SET "
    "next_tick_seq = archive_streams.next_tick_seq + excluded.next_tick_seq, "
    "next_deal_seq = archive_streams.next_deal_seq + excluded.next_deal_seq "
    "RETURNING next_tick_seq, next_deal_seq"
)


class DuckDBSink(BaseSink):
    """Writes the engine's outputs to the store, one transaction per flush.

    Args:
        conn: A connection (or cursor) of the store, used only by this sink.
        source: The tick source's name, under which positions are saved.
        checkpoints_kept: Engine checkpoints kept per source.
        hedge_window_seconds: The window of hedge flags (``rules.md``,
            "Cross-account hedging"); None records the deals and flags nothing.
    """

    def __init__(
        self,
        conn: Connection,
        *,
        source: str,
        checkpoints_kept: int = 3,
        hedge_window_seconds: float | None = DEFAULT_HEDGE_WINDOW_SECONDS,
    ) -> None:
        self._conn = conn
        self._source = source
        self._keep = checkpoints_kept
        self._hedge_window = hedge_window_seconds
        self._pending: list[Evaluation] = []
        self._ticks: list[pl.DataFrame] = []
        self._deals: list[pl.DataFrame] = []
        self._stream = ""
        self._position: Position | None = None

    @property
    def source(self) -> str:
        """The source whose positions this sink saves."""
        return self._source

    def setup(self) -> None:
        """Check that the database has the schema this code writes.

        Raises:
            SinkError: The database is not migrated to the latest version.
        """
        version = current_version(self._conn)
        if version != LATEST_VERSION:
            raise SinkError(
                f"database schema is at version {version}, this code needs "
                f"{LATEST_VERSION}: run prop-stream init --db PATH"
            )

    def add(
        self,
        evaluation: Evaluation,
        *,
        position: Position,
        ticks: pl.DataFrame | None = None,
        deals: pl.DataFrame | None = None,
        stream: str = "",
    ) -> None:
        """Buffer one batch's outputs, what to archive and the position after.

        Args:
            evaluation: The engine's result of the batch.
            position: The source position after the batch.
            ticks: The batch's ticks to archive (None: none).
            deals: The batch's deals to archive, with the deal columns (extra
                columns such as ``before_tick`` are dropped; None: none).
            stream: The archive stream the rows are numbered in: '' for the
                single evaluator, the partition key for a group member's
                partition (``docs/store.md``, "The archive").
        """
        self._pending.append(evaluation)
        if ticks is not None and ticks.height:
            self._ticks.append(ticks)
        if deals is not None and deals.height:
            self._deals.append(deals.select(DEAL_COLUMNS))
        self._stream = stream
        self._position = dict(position)

    def flush(
        self,
        *,
        checkpoint: EngineCheckpoint | None = None,
        fence: Callable[[Connection], object] | None = None,
        also: Callable[[Connection], object] | None = None,
    ) -> None:
        """Commit the buffered batches, the position and a checkpoint together.

        Args:
            checkpoint: An engine checkpoint to commit with them.
            fence: Runs first in the transaction and raises to refuse it (the
                scale-out evaluators' epoch check,
                :func:`prop_stream.store.partitions.check_epoch`); its
                exception propagates after the rollback.
            also: Runs last in the transaction (a per-partition checkpoint).

        Raises:
            SinkError: The transaction failed and was rolled back; the buffer is
                kept.
        """
        if (
            not self._pending
            and checkpoint is None
            and self._position is None
            and also is None
        ):
            return
        frames = _merge(self._pending)
        conn = self._conn
        try:
            with transaction(conn):
                postgres = is_postgres(conn)
                if postgres:
                    # Only this transaction: a crash may lose its commit, and
                    # with it the position, so the batch is replayed
                    # (docs/store.md, "The sink's commits"). Purchases and jobs
                    # keep the server's synchronous commit.
                    conn.execute("SET LOCAL synchronous_commit = off")
                if fence is not None:
                    fence(conn)
                for name, frame in frames.items():
                    if not frame.height:
                        continue
                    if not postgres:
                        _write(conn, name, frame)
                    elif name == "metrics":
                        _write_metrics_pg(conn, frame, self._stream)
                    elif name not in ("latest", "history"):
                        _write(conn, name, frame)
                apply_transitions(conn, frames["transitions"])
                opens = [e.deal_opens for e in self._pending if e.deal_opens.num_rows]
                if opens:
                    # The join runs here, not in the engine: a customer's
                    # accounts may sit on other partitions and in other batches.
                    record_deal_opens(
                        conn,
                        pa.concat_tables(opens),
                        self._hedge_window,
                    )
                if self._ticks or self._deals:
                    _stage(conn, self._stream, self._ticks, self._deals)
                position = self._position
                if checkpoint is not None:
                    position = checkpoint.position
                if position is not None:
                    _save_position(conn, source=self._source, position=position)
                if checkpoint is not None:
                    save_checkpoint(conn, checkpoint=checkpoint, keep=self._keep)
                if also is not None:
                    also(conn)
        except DatabaseError as exc:
            raise SinkError(f"could not commit a batch to the store: {exc}") from exc
        self._pending.clear()
        self._ticks.clear()
        self._deals.clear()
        self._position = None


_STATEMENTS: Final = {
    "breaches": _UPSERT_BREACHES,
    "daily": _UPSERT_DAILY,
    "latest": _UPSERT_LATEST,
    "history": _INSERT_HISTORY,
}


def _write(conn: Connection, name: str, frame: pl.DataFrame) -> None:
    if name not in _STATEMENTS:
        return
    with frame_table(conn, f"_sink_{name}", frame):
        conn.execute(_STATEMENTS[name])


def _write_metrics_pg(conn: Connection, metrics: pl.DataFrame, stream: str) -> None:
    """Upsert ``metrics_latest`` and insert ``metric_history`` from one ``COPY``.

    The accounts written are recorded in the stream's metric changes, which the
    ``api`` processes read (:mod:`prop_stream.store.changes`).

    Args:
        conn: A PostgreSQL connection, in the flush's transaction.
        metrics: Every metrics row of the flush, in commit order.
        stream: The sink's stream ('' or the group member's partition key).
    """
    # A materialised row number: inside a window, pl.len() counts the group.
    index = pl.col("_row")
    flagged = (
        metrics.select(list(METRIC_COLUMNS))
        .with_row_index("_row")
        .with_columns(
            # The rows of `_merge`'s unique(keep="last") and unique(keep="first").
            (index == index.max().over("account_id")).alias("_latest"),
            (index == index.min().over("account_id", "ts")).alias("_first"),
        )
        .drop("_row")
    )
    with frame_table(conn, "_sink_metrics", flagged):
        conn.execute(_PG_UPSERT_LATEST)
        conn.execute(_PG_INSERT_HISTORY)
        record_metric_changes(conn, stream=stream, table="_sink_metrics")


def _stage(
    conn: Connection,
    stream: str,
    ticks: Sequence[pl.DataFrame],
    deals: Sequence[pl.DataFrame],
) -> None:
    """Append the batches' ticks and deals to the archive's staging, in order."""
    tick_rows = _concat(ticks)
    deal_rows = _concat(deals)
    n_ticks = 0 if tick_rows is None else tick_rows.height
    n_deals = 0 if deal_rows is None else deal_rows.height
    # The flush's transaction takes the numbers of its stream.
    row = conn.execute(_TAKE_SEQS, [stream, n_ticks, n_deals]).fetchone()
    if row is None:
        raise SinkError(f"archive_streams: no numbers for stream {stream!r}")
    for frame, end, name, statement, columns in (
        (tick_rows, int(row[0]), "_sink_ticks", _STAGE_TICKS, _TICK_COLUMNS),
        (deal_rows, int(row[1]), "_sink_deals", _STAGE_DEALS, DEAL_COLUMNS),
    ):
        if frame is None or not frame.height:
            continue
        staged = frame.select(
            pl.lit(stream, dtype=pl.String).alias("stream"),
            (pl.int_range(pl.len(), dtype=pl.Int64) + (end - frame.height)).alias(
                "seq"
            ),
            *columns,
        )
        with frame_table(conn, name, staged):
            conn.execute(statement)


def _concat(frames: Sequence[pl.DataFrame]) -> pl.DataFrame | None:
    if not frames:
        return None
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")


def _merge(evaluations: Sequence[Evaluation]) -> dict[str, pl.DataFrame]:
    """The buffered batches as one set of rows per table, in commit order."""

    def cat(frames: list[pl.DataFrame]) -> pl.DataFrame:
        frames = [f for f in frames if f.height]
        if not frames:
            return pl.DataFrame()
        return pl.concat(frames, how="vertical_relaxed")

    breaches = cat([e.breaches for e in evaluations])
    daily = cat([e.daily for e in evaluations])
    metrics = cat([e.metrics for e in evaluations])
    transitions = cat([e.transitions for e in evaluations])
    if breaches.height:
        breaches = _merge_breaches(breaches)
    if daily.height:
        daily = daily.unique(list(DAILY_KEY), keep="last", maintain_order=True)
        daily = daily.join(
            metrics.select("account_id", "challenge_id", "phase_index").unique(
                "account_id", keep="last"
            ),
            on="account_id",
            how="left",
        )
    latest = history = metrics
    if metrics.height:
        latest = metrics.unique("account_id", keep="last", maintain_order=True)
        history = metrics.unique(["account_id", "ts"], keep="first")
    if not transitions.height:
        transitions = pl.DataFrame(
            schema={
                "challenge_id": pl.String,
                "phase_index": pl.Int32,
                "status": pl.String,
                "ts": pl.Datetime("us", "UTC"),
            }
        )
    return {
        "breaches": breaches,
        "daily": daily,
        "latest": latest,
        "history": history,
        "transitions": transitions,
        # Every row: PostgreSQL loads these once for "latest" and "history".
        "metrics": metrics,
    }


def _merge_breaches(breaches: pl.DataFrame) -> pl.DataFrame:
    # The last row of a key carries its latest state; `resolved` never goes back.
    return breaches.group_by(list(BREACH_KEY), maintain_order=True).agg(
        pl.all().exclude("resolved", "resolved_ts").last(),
        pl.col("resolved").any(),
        pl.col("resolved_ts").drop_nulls().first(),
    )
