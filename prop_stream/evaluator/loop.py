"""The evaluator loop: ticks in, rules judged, results committed.

Each batch: poll the source (its ticks and deals) → ``RuleEngine.process`` →
one sink flush (outputs, phase transitions, the deals opened and their hedge
flags, and the source position in one transaction) → the in-memory latest
metrics. Every ``checkpoint_every`` batches, and at start and at a graceful
stop, the flush also carries an engine checkpoint (its snapshot and the position
after the batch).

**Restart.** :meth:`EvaluatorLoop.start` restores the newest checkpoint and moves
the source back to its position; the batches after it are replayed, and since
every output is an upsert keyed by the engine's identities, the replay changes
nothing that was committed (``docs/store.md``, "Checkpoints and replay"). Phases
activated in the store since the checkpoint are registered, phases cancelled since
are removed.

**Archive.** With ``archive`` on, each batch's ticks and deals are staged in its
own flush (:mod:`prop_stream.store.archive`). A replay stages only the ticks and
deals past the position the store had committed when the loop started
(:meth:`~prop_stream.evaluator.sources.TickSource.unseen`,
:meth:`~prop_stream.evaluator.sources.TickSource.unseen_deals`), so a crash never
doubles an archived tick or deal and never loses one.

**Threads.** :meth:`run` blocks; ``serve`` runs it in a background thread beside
the web server. :meth:`register_phase` and :meth:`remove_phase` may be called from
any thread: they take effect between batches. :meth:`stop` (or the ``stop`` event
given to :meth:`run`) lets the current batch finish and commit, writes a checkpoint
and returns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import polars as pl

from prop_stream.evaluator.metrics import LatestMetrics
from prop_stream.evaluator.sources import TickSource, reached
from prop_stream.rules import Evaluation, PhaseSpec, RuleEngine, __version__
from prop_stream.sinks.base import BaseSink
from prop_stream.store.db import Connection, query_frame
from prop_stream.store.lifecycle import (
    active_phase_specs,
    phase_spec_by_account,
    phase_specs_of,
)
from prop_stream.store.progress import (
    EngineCheckpoint,
    Position,
    latest_checkpoint,
    load_position,
)
from prop_stream.telemetry import DEAL_SKIP_REASONS

logger = logging.getLogger(__name__)

#: Seconds between two calls of the between-batch hooks.
DEFAULT_HOOK_INTERVAL_S: Final = 1.0


@dataclass(slots=True)
class LoopStats:
    """Counters of a loop since it started.

    Attributes:
        batches: Batches committed (empty polls are not batches).
        ticks: Ticks polled.
        deals: Deals polled.
        deals_judged: Deals the engine processed (``unmatched`` ones included).
        deals_unmatched: Processed ``out`` deals of a position that was not open.
        deals_skipped: Deals counted and skipped by the engine, by reason
            (:data:`DEAL_SKIP_REASONS`).
        evaluated: Ticks judged.
        late: Late ticks skipped.
        unknown: Ticks for accounts without a registered phase.
        inactive: Ticks for phases that had ended.
        invalid: Ticks with NaN or infinite values.
        breach_rows: Breach rows written (new breaches and resolutions).
        transitions: Phase transitions applied.
        checkpoints: Engine checkpoints written.
        restored_from: The checkpoint id the loop started from, if any.
        batch_seq: Batches processed over the loop's whole history.
    """

    batches: int = 0
    ticks: int = 0
    deals: int = 0
    deals_judged: int = 0
    deals_unmatched: int = 0
    deals_skipped: Counter[str] = field(default_factory=Counter)
    evaluated: int = 0
    late: int = 0
    unknown: int = 0
    inactive: int = 0
    invalid: int = 0
    breach_rows: int = 0
    transitions: int = 0
    checkpoints: int = 0
    restored_from: int | None = None
    batch_seq: int = 0

    def count(self, evaluation: Evaluation, ticks: int, deals: int) -> None:
        """Add one committed batch's figures (both loops, embedded and group).

        Args:
            evaluation: The engine's result of the batch.
            ticks: Ticks polled for it.
            deals: Deals polled for it.
        """
        counts = evaluation.counts
        self.batches += 1
        self.ticks += ticks
        self.deals += deals
        deal_counts = evaluation.deal_counts
        self.deals_judged += deal_counts.processed
        self.deals_unmatched += deal_counts.unmatched
        for reason in DEAL_SKIP_REASONS:
            self.deals_skipped[reason] += getattr(deal_counts, reason)
        self.evaluated += counts.evaluated
        self.late += counts.late
        self.unknown += counts.unknown
        self.inactive += counts.inactive
        self.invalid += counts.invalid
        self.breach_rows += evaluation.breaches.height
        self.transitions += evaluation.transitions.height


@dataclass(frozen=True, slots=True)
class _Register:
    spec: PhaseSpec


@dataclass(frozen=True, slots=True)
class _Remove:
    account_id: int


class BatchDriver:
    """The run loop both evaluator loops share: batches until stopped.

    Subclasses (:class:`EvaluatorLoop`, the group loop) set ``_stop``, ``ready``,
    ``error`` and ``stats`` and give ``start``, ``run_once``, ``checkpoint`` and
    ``_run_hooks``.
    """

    _stop: threading.Event
    ready: threading.Event
    error: BaseException | None
    stats: LoopStats

    def start(self) -> None:
        """Prepare the source and the engine (idempotent)."""
        raise NotImplementedError

    def run_once(self) -> bool:
        """Poll one batch and commit it; whether a batch was processed."""
        raise NotImplementedError

    def checkpoint(self) -> None:
        """Commit the engine's state at the stored position."""
        raise NotImplementedError

    def _run_hooks(self) -> None:
        raise NotImplementedError

    def _closing(self) -> None:
        """Called once when :meth:`run` returns or raises (default: nothing)."""

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        max_batches: int | None = None,
        checkpoint_on_exit: bool = True,
    ) -> LoopStats:
        """Process batches until stopped.

        Args:
            stop: Ends the loop when set (besides :meth:`stop`).
            max_batches: Return after this many batches (tests, replays).
            checkpoint_on_exit: Write a checkpoint when returning normally.

        Returns:
            The loop's counters.
        """
        try:
            self.start()
            self.ready.set()
            done = 0
            while not self._stop.is_set() and not (stop is not None and stop.is_set()):
                if max_batches is not None and done >= max_batches:
                    break
                if self.run_once():
                    done += 1
                self._run_hooks()
            if checkpoint_on_exit:
                self.checkpoint()
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.ready.clear()
            self._closing()
        return self.stats


class EvaluatorLoop(BatchDriver):
    """Runs the rules engine over a tick source into a sink.

    Args:
        conn: A store connection (or cursor) for this loop's reads; the sink has
            its own.
        source: Where ticks come from.
        sink: Where outputs go; its flush is the batch's transaction.
        max_batch_records: Most ticks asked of the source per poll.
        poll_timeout_s: Longest wait of a poll.
        checkpoint_every: Batches between engine checkpoints.
        metrics: The in-memory latest metrics to keep current (a new one if None).
        hooks: Called between batches, at most every ``hook_interval_s`` seconds
            (e.g. refreshing the known accounts); an exception in one is logged.
        hook_interval_s: See ``hooks``.
        stats: The counters to add to (a supervisor hands each rebuilt loop the
            same one, so ``/metrics`` counts over restarts); a new one if None.
        on_batch: Called after each committed batch with its evaluation and the
            seconds from the end of its poll to its commit (``/metrics``).
        archive: Stage each batch's ticks and deals for the archive in its flush.
    """

    def __init__(
        self,
        conn: Connection,
        source: TickSource,
        sink: BaseSink,
        *,
        max_batch_records: int = 100_000,
        poll_timeout_s: float = 0.5,
        checkpoint_every: int = 100,
        metrics: LatestMetrics | None = None,
        hooks: Sequence[Callable[[], object]] = (),
        hook_interval_s: float = DEFAULT_HOOK_INTERVAL_S,
        stats: LoopStats | None = None,
        on_batch: Callable[[Evaluation, float], object] | None = None,
        archive: bool = False,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self._conn = conn
        self._source = source
        self._sink = sink
        self._max_records = max_batch_records
        self._timeout = poll_timeout_s
        self._checkpoint_every = checkpoint_every
        self._hooks = tuple(hooks)
        self._hook_interval = hook_interval_s
        self._next_hooks = 0.0
        self.metrics = metrics if metrics is not None else LatestMetrics()
        self.stats = stats if stats is not None else LoopStats()
        self._on_batch = on_batch
        self._archive = archive
        # While replaying: the position the store had committed at start; the
        # ticks before it are archived already.
        self._archived_to: Position | None = None
        self._engine = RuleEngine()
        self._ops: queue.SimpleQueue[_Register | _Remove] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._started = False
        self._since_checkpoint = 0
        #: Set once the loop has restored its state and is taking batches.
        self.ready = threading.Event()
        #: The exception that ended :meth:`run`, if one did.
        self.error: BaseException | None = None

    @property
    def source(self) -> TickSource:
        """Where the loop's ticks come from."""
        return self._source

    @property
    def engine(self) -> RuleEngine:
        """The engine (read it only from the loop's thread or when stopped)."""
        return self._engine

    # ------------------------------------------------------------ thread-safe API

    def register_phase(self, spec: PhaseSpec) -> None:
        """Start judging a phase from the next batch on; thread-safe.

        Call it after the transaction that made the phase active in the store
        has committed (a restart registers it from the store then).

        Args:
            spec: The phase, as :func:`~prop_stream.store.lifecycle.phase_spec`
                reads it.
        """
        self._source.track(spec)
        self._ops.put(_Register(spec))

    def remove_phase(self, account_id: int) -> None:
        """Stop judging a phase from the next batch on; thread-safe."""
        self._ops.put(_Remove(account_id))

    def stop(self) -> None:
        """Ask :meth:`run` to finish its batch, checkpoint and return."""
        self._stop.set()
        self._source.close()

    def not_ready(self) -> dict[str, str]:
        """What keeps the loop from judging ticks now (``/readyz``); thread-safe.

        Returns:
            ``{"evaluator": "starting"}`` until the loop has restored its state,
            plus the source's own entries (the Kafka source's ``kafka`` or
            ``topic``); empty while it judges.
        """
        out: dict[str, str] = {}
        if not self.ready.is_set():
            out["evaluator"] = "starting"
        out.update(self._source.not_ready())
        return out

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Restore the newest checkpoint (or load the active phases) once.

        A fresh start writes a checkpoint at once, so a restart always has one.
        """
        if self._started:
            return
        self._sink.setup()
        checkpoint = latest_checkpoint(self._conn, source=self._source.name)
        active = {spec.account_id: spec for spec in active_phase_specs(self._conn)}
        if checkpoint is not None:
            self._engine = RuleEngine.restore(checkpoint.snapshot)
            self._source.seek(checkpoint.position)
            self.stats.batch_seq = checkpoint.batch_seq
            self.stats.restored_from = checkpoint.id
            self._reconcile(active)
            committed = load_position(self._conn, source=self._source.name)
            if self._archive and not reached(checkpoint.position, committed):
                self._archived_to = committed
        else:
            self._engine = RuleEngine()
            for spec in active.values():
                self._register(spec)
            self._source.seek(load_position(self._conn, source=self._source.name))
        self.metrics.load(self._conn)
        self._started = True
        if checkpoint is None:
            self._sink.flush(checkpoint=self._checkpoint(self._source_position()))
            self.stats.checkpoints += 1
        logger.info(
            "evaluator started: %d phases, source %s at %s%s",
            len(self._engine),
            self._source.name,
            dict(self._source.position()),
            f", from checkpoint {checkpoint.id}" if checkpoint else "",
        )

    def run_once(self) -> bool:
        """Poll one batch and commit it.

        Returns:
            Whether a batch with ticks was processed.
        """
        self.start()
        self._apply_ops()
        archived_to = self._archived_to
        before = self._source.position() if archived_to is not None else None
        ticks, position = self._source.poll(self._max_records, self._timeout)
        deals = self._source.deals()
        if deals is not None and not deals.height:
            deals = None
        began = time.perf_counter()
        # Phases registered while the poll waited may own ticks in this batch.
        self._apply_ops()
        if not ticks.height and deals is None:
            return False
        # One call judges the batch's ticks and deals in delivery order.
        evaluation = self._engine.process(ticks, deals)
        archive = archive_deals = None
        if self._archive:
            archive, archive_deals = ticks, deals
            if archived_to is not None and before is not None:
                archive = self._source.unseen(
                    ticks, before=before, committed=archived_to
                )
                if deals is not None:
                    archive_deals = self._source.unseen_deals(
                        deals, before=before, committed=archived_to
                    )
        self.stats.batch_seq += 1
        self._since_checkpoint += 1
        checkpoint = None
        if self._since_checkpoint >= self._checkpoint_every:
            checkpoint = self._checkpoint(position)
        self._sink.add(
            evaluation, position=position, ticks=archive, deals=archive_deals
        )
        self._sink.flush(checkpoint=checkpoint)
        if archived_to is not None and reached(position, archived_to):
            self._archived_to = None  # the replay is over
        self._committed(
            evaluation,
            ticks.height,
            0 if deals is None else deals.height,
            checkpoint is not None,
        )
        if self._on_batch is not None:
            self._on_batch(evaluation, time.perf_counter() - began)
        return True

    def checkpoint(self) -> None:
        """Commit an engine checkpoint at the source's current position now."""
        self.start()
        self._sink.flush(checkpoint=self._checkpoint(self._source_position()))
        self.stats.checkpoints += 1
        self._since_checkpoint = 0

    # ----------------------------------------------------------------- internals

    def _source_position(self) -> Position:
        self._source.start()
        return self._source.position()

    def _checkpoint(self, position: Position) -> EngineCheckpoint:
        self._since_checkpoint = 0
        return EngineCheckpoint(
            source=self._source.name,
            position=dict(position),
            batch_seq=self.stats.batch_seq,
            engine_version=__version__,
            snapshot=self._engine.snapshot(),
            created_at=datetime.now(UTC),
        )

    def _committed(
        self, evaluation: Evaluation, ticks: int, deals: int, checkpoint: bool
    ) -> None:
        self.stats.count(evaluation, ticks, deals)
        stats = self.stats
        stats.checkpoints += int(checkpoint)
        self.metrics.update(evaluation.metrics)
        # An ended phase ignores every later tick; dropping it keeps the engine
        # (and its checkpoints) to the live phases. A replay from an older
        # checkpoint still has it and ends it again at the same tick.
        transitions = evaluation.transitions
        for account_id in transitions["account_id"].to_list():
            self._engine.remove(int(account_id))
            self._source.untrack(int(account_id))
        # A pass opened the challenge's next phase in the same transaction
        # (lifecycle.advance_phase): judge it from the next batch on.
        passed = {
            int(challenge)
            for challenge, status in zip(
                transitions["challenge_id"].to_list(),
                transitions["status"].to_list(),
                strict=True,
            )
            if status == "passed" and str(challenge).isdigit()
        }
        for spec in phase_specs_of(self._conn, challenge_ids=sorted(passed)):
            if spec.account_id not in self._engine:
                self._register(spec)

    def _register(self, spec: PhaseSpec) -> None:
        self._engine.register(spec)
        self._source.track(spec)

    def _apply_ops(self) -> None:
        while True:
            try:
                op = self._ops.get_nowait()
            except queue.Empty:
                return
            if isinstance(op, _Register):
                if op.spec.account_id in self._engine:
                    logger.warning(
                        "account %d already has a phase; registration ignored",
                        op.spec.account_id,
                    )
                    continue
                self._register(op.spec)
            else:
                self._engine.remove(op.account_id)
                self._source.untrack(op.account_id)
                self.metrics.forget(op.account_id)

    def _reconcile(self, active: dict[int, PhaseSpec]) -> None:
        """Align a restored engine with the store's phases."""
        engine_phases = self._engine.phases()
        statuses = _phase_statuses(self._conn, engine_phases)
        for row in engine_phases.iter_rows(named=True):
            account_id = int(row["account_id"])
            stored = statuses.get(account_id)
            if stored in (None, "cancelled", "pending"):
                # Cancelled (or gone) since the checkpoint: judge it no more.
                self._engine.remove(account_id)
                continue
            if row["status"] == "active":
                spec = active.get(account_id)
                if spec is None:
                    # Passed or failed in the store after the checkpoint: the
                    # replay ends it again; the source must still simulate it.
                    spec = phase_spec_by_account(self._conn, account_id=account_id)
                self._source.track(spec)
        for account_id, spec in active.items():
            if account_id not in self._engine:
                self._register(spec)

    def _run_hooks(self) -> None:
        if not self._hooks:
            return
        now = time.monotonic()
        if now < self._next_hooks:
            return
        self._next_hooks = now + self._hook_interval
        for hook in self._hooks:
            try:
                hook()
            except Exception:
                logger.exception("between-batch hook %r failed", hook)


def _phase_statuses(conn: Connection, phases: pl.DataFrame) -> dict[int, str]:
    if not phases.height:
        return {}
    frame = query_frame(
        conn,
        "SELECT account_id, status FROM challenge_phases "
        "WHERE account_id IN (SELECT unnest(?::BIGINT[]))",
        [phases["account_id"].to_list()],
    )
    return dict(
        zip(frame["account_id"].to_list(), frame["status"].to_list(), strict=True)
    )
