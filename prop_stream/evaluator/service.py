"""Wire an evaluator loop from the settings: what ``serve`` runs in a thread.

Examples:
    >>> settings = StreamSettings(db=Path("prop.duckdb"), source="demo")
    >>> conn = connect(settings.db)
    >>> loop = build_loop(settings, conn)
    >>> stop = threading.Event()
    >>> thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    >>> thread.start()   # ... the API reads loop.metrics ...
    >>> stop.set(); thread.join()
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from prop_stream.config import StreamSettings
from prop_stream.dburl import is_url
from prop_stream.evaluator.demo import DemoConfig, DemoSource
from prop_stream.evaluator.group import GroupEvaluatorLoop
from prop_stream.evaluator.loop import EvaluatorLoop, LoopStats
from prop_stream.evaluator.metrics import LatestMetrics
from prop_stream.evaluator.sources import NoneSource, TickSource
from prop_stream.kafka.source import KafkaSource
from prop_stream.rules import Evaluation, PhaseSpec
from prop_stream.sinks.duckdb_sink import DuckDBSink
from prop_stream.store.catalog import account_ids, known_account_ids
from prop_stream.store.db import Connection, cursor


class KafkaTickSource(KafkaSource, TickSource):
    """:class:`~prop_stream.kafka.KafkaSource` as the evaluator's tick source.

    The ``kafka`` layer sits below the evaluator and can't subclass
    :class:`TickSource` itself; every method comes from :class:`KafkaSource`.
    """

    name = "kafka"


def build_source(settings: StreamSettings) -> TickSource:
    """The tick source the settings name.

    Args:
        settings: The service's settings.

    Returns:
        A :class:`DemoSource`, :class:`KafkaTickSource` or :class:`NoneSource`.
    """
    if settings.source == "kafka":
        return KafkaTickSource(
            bootstrap=settings.kafka_bootstrap,
            topic=settings.kafka_topic,
            dlq_topic=settings.kafka_dlq,
            group_id=settings.kafka_group_id,
            fetch_max_bytes=settings.kafka_fetch_max_bytes,
            max_partition_fetch_bytes=settings.kafka_max_partition_fetch_bytes,
            fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
            dlq_unknown_accounts=settings.kafka_dlq_unknown_accounts,
            raw_records=settings.kafka_raw_records,
            max_clock_skew_s=settings.max_clock_skew_s,
            consumer_group=settings.kafka_consumer_group,
            group_instance_id=settings.kafka_group_instance_id,
            consumer_config={
                "session_timeout_ms": settings.kafka_session_timeout_ms,
                "heartbeat_interval_ms": max(
                    300, settings.kafka_session_timeout_ms // 3
                ),
            }
            if settings.kafka_consumer_group
            else None,
        )
    if settings.source == "demo":
        return DemoSource(
            DemoConfig(
                seed=settings.demo_seed,
                rate=settings.demo_rate,
                batch_ms=settings.demo_batch_ms,
                realtime=settings.demo_realtime,
            )
        )
    return NoneSource()


def archives(settings: StreamSettings) -> bool:
    """Whether the evaluator stages what it judged for the archive.

    On PostgreSQL only with ``archive_dir`` (the archive has no file to sit
    beside): without a directory no archiver runs, and staged rows would only
    pile up in the database.
    """
    return settings.archive and (
        not is_url(settings.db) or settings.archive_dir is not None
    )


def _use_directory(source: KafkaSource, conn: Connection) -> None:
    """Give the source the store's accounts, to tell unknown accounts apart.

    Read from the loop's thread only (between batches and in a poll), on a
    cursor of its own.
    """
    directory = cursor(conn)
    source.set_account_directory(
        functools.partial(account_ids, directory),
        functools.partial(known_account_ids, directory),
    )


def build_loop(
    settings: StreamSettings,
    conn: Connection,
    *,
    source: TickSource | None = None,
    metrics: LatestMetrics | None = None,
    stats: LoopStats | None = None,
    on_batch: Callable[[Evaluation, float], object] | None = None,
) -> EvaluatorLoop:
    """An evaluator loop over the service's database.

    The loop and its sink each get their own cursor of ``conn``; between
    batches, for a Kafka source, the loop refreshes the known accounts and
    publishes the committed position to Kafka's group offsets (monitoring only).
    A Kafka source in a consumer group (``kafka_consumer_group``) needs
    :func:`build_group_loop` instead.

    Args:
        settings: The service's settings.
        conn: The service's connection to ``settings.db``.
        source: The tick source (default: the one the settings name).
        metrics: The in-memory latest metrics to keep current.
        stats: The counters to add to (kept over rebuilds).
        on_batch: Called after each committed batch (``/metrics``).

    Returns:
        The loop, not started.
    """
    source = source if source is not None else build_source(settings)
    hooks: list[Callable[[], object]] = []
    if isinstance(source, KafkaSource):
        # Unknown accounts are those the store doesn't have (docs/kafka.md).
        _use_directory(source, conn)
        hooks.append(source.refresh_accounts)
        # Hooks run after a batch's commit, so the position is durable by then.
        hooks.append(source.commit_async)
    return EvaluatorLoop(
        cursor(conn),
        source,
        DuckDBSink(
            cursor(conn),
            source=source.name,
            checkpoints_kept=settings.checkpoints_kept,
            hedge_window_seconds=settings.hedge_window_seconds,
        ),
        max_batch_records=settings.max_batch_records,
        poll_timeout_s=settings.poll_timeout_s,
        checkpoint_every=settings.checkpoint_every,
        metrics=metrics,
        hooks=hooks,
        stats=stats,
        on_batch=on_batch,
        archive=archives(settings),
    )


def build_group_loop(
    settings: StreamSettings,
    conn: Connection,
    *,
    source: KafkaTickSource | None = None,
    metrics: LatestMetrics | None = None,
    stats: LoopStats | None = None,
    on_batch: Callable[[Evaluation, float], object] | None = None,
) -> GroupEvaluatorLoop:
    """A consumer-group member over the service's database (``docs/scale-out.md``).

    State, fencing epoch and checkpoint per assigned partition; each partition's
    sink has the same cursor of ``conn`` (their flushes take turns in the loop's
    thread).

    Args:
        settings: The service's settings (``source`` is ``kafka``).
        conn: The service's connection.
        source: The Kafka source in group mode (default: the settings', with
            ``kafka_consumer_group`` on).
        metrics: The in-memory latest metrics to keep current.
        stats: The counters to add to (kept over rebuilds).
        on_batch: Called after each committed partition batch (``/metrics``).

    Returns:
        The loop, not started.
    """
    if source is None:
        built = build_source(settings.model_copy(update={"kafka_consumer_group": True}))
        assert isinstance(built, KafkaTickSource)  # noqa: S101 - source is kafka
        source = built
    _use_directory(source, conn)
    return GroupEvaluatorLoop(
        cursor(conn),
        source,
        functools.partial(
            DuckDBSink,
            cursor(conn),
            source=source.name,
            checkpoints_kept=settings.checkpoints_kept,
        ),
        max_batch_records=settings.max_batch_records,
        poll_timeout_s=settings.poll_timeout_s,
        checkpoint_every=settings.checkpoint_every,
        metrics=metrics,
        hooks=[source.refresh_accounts, source.commit_async],
        stats=stats,
        on_batch=on_batch,
        archive=archives(settings),
        stall_timeout_s=settings.group_stall_timeout_s,
    )


class SupervisedEvaluator:
    """The evaluator as a supervised component: a fresh loop per (re)start.

    A loop whose batch failed to commit has an engine ahead of the store, so a
    retry never reuses it: :meth:`build` makes a new source and loop, which
    restore the newest checkpoint and replay from its position (the demo source
    regenerates the same ticks from that position; Kafka keeps them in the
    topic). The latest metrics and the counters carry over.

    It is also the service's :class:`~prop_stream.store.PhaseRegistry`: purchases
    and cancels reach the loop running now; one made while no loop runs is read
    from the store by the next loop's start.

    Args:
        settings: The service's settings.
        conn: The service's connection.
        on_batch: Called after each committed batch (``/metrics``).
    """

    def __init__(
        self,
        settings: StreamSettings,
        conn: Connection,
        *,
        on_batch: Callable[[Evaluation, float], object] | None = None,
    ) -> None:
        self._settings = settings
        self._conn = conn
        self._on_batch = on_batch
        self.metrics = LatestMetrics()
        self.stats = LoopStats()
        self.current: EvaluatorLoop | GroupEvaluatorLoop | None = None

    def build(self) -> EvaluatorLoop | GroupEvaluatorLoop:
        """A new loop over a new source (the supervisor's factory)."""
        settings = self._settings
        if settings.source == "kafka" and settings.kafka_consumer_group:
            group = build_group_loop(
                settings,
                self._conn,
                metrics=self.metrics,
                stats=self.stats,
                on_batch=self._on_batch,
            )
            self.current = group
            return group
        loop = build_loop(
            self._settings,
            self._conn,
            metrics=self.metrics,
            stats=self.stats,
            on_batch=self._on_batch,
        )
        self.current = loop
        return loop

    @property
    def source(self) -> TickSource | None:
        """The running loop's source (None before the first build)."""
        loop = self.current
        source = loop.source if loop is not None else None
        return source if isinstance(source, TickSource) else None

    def register_phase(self, spec: PhaseSpec) -> None:
        """Judge a phase from the running loop's next batch on."""
        loop = self.current
        if loop is not None:
            loop.register_phase(spec)

    def remove_phase(self, account_id: int) -> None:
        """Stop judging a phase from the running loop's next batch on."""
        loop = self.current
        if loop is not None:
            loop.remove_phase(account_id)
        else:
            self.metrics.forget(account_id)
