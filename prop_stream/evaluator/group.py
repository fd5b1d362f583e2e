"""The scale-out evaluator: one member of a Kafka consumer group, state per partition.

:class:`GroupEvaluatorLoop` runs beside any number of its kind (other processes)
in one consumer group over the tick topic (``docs/scale-out.md``). Kafka's group
coordinator deals out the partitions; every partition this member is assigned
has its own engine state (:class:`_Partition`), its own fencing epoch and its own
checkpoint in the store (:mod:`prop_stream.store.partitions`).

**Assignment.** For each assigned partition, between two batches: take the
partition's epoch (``epoch + 1``), load its checkpoint (or the embedded
service's single checkpoint, pruned to the partition's accounts), drop the
phases cancelled since, and resume the partition at the checkpoint's offset: the
ticks from there to the stored position are replayed, and since every output is
an upsert keyed by the engine's identities, the replay changes nothing that was
committed. Phases are registered when their account's first tick arrives in the
partition (read from the store then), so the phases that became active since
the checkpoint (purchases, next phases opened by a pass on another partition or
in another process) are judged without a list of them.

**Each batch** is split by partition; each partition's part is judged by its
engine and committed in its own transaction, whose first statement checks the
partition's epoch (:func:`~prop_stream.store.partitions.check_epoch`). A member
that lost the partition meanwhile (paused past the session timeout, cut off,
slow) has its commit refused and rolled back; it logs one line (``commit
fenced``) and drops the partition's state.

**Revocation.** Partitions revoked in a rebalance get a last checkpoint (refused
harmlessly if the successor already took the epoch) and are dropped; lost ones
(the member was evicted) are dropped at once.

**Phase changes** made by other processes: between batches, at most every
``hook_interval_s``, the challenges the store notified since are read
(PostgreSQL's ``NOTIFY``, :class:`~prop_stream.store.changes.ChallengeListener`):
their accounts are no longer known to have no active phase (their next tick
reads the store again) and their phases cancelled since are removed. Without
notifications (DuckDB) :func:`~prop_stream.store.partitions.phase_version` is
compared with the last one, and on a change every phase is checked. The same
happens at once for changes made in this process
(:meth:`GroupEvaluatorLoop.register_phase`, ``remove_phase``, a pass).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import polars as pl
import psycopg

from prop_stream.evaluator.loop import DEFAULT_HOOK_INTERVAL_S, BatchDriver, LoopStats
from prop_stream.evaluator.metrics import LatestMetrics
from prop_stream.rules import Evaluation, PhaseSpec, RuleEngine, __version__
from prop_stream.sinks.duckdb_sink import DuckDBSink
from prop_stream.sinks.exceptions import SinkError
from prop_stream.store.changes import ChallengeListener
from prop_stream.store.db import Connection, is_postgres
from prop_stream.store.partitions import (
    PartitionCheckpoint,
    PartitionFencedError,
    active_specs_of,
    check_epoch,
    load_partition_checkpoint,
    phase_statuses,
    phase_statuses_of_challenges,
    phase_version,
    save_partition_checkpoint,
    stored_offset,
    take_epoch,
)
from prop_stream.store.progress import Position

logger = logging.getLogger(__name__)

#: The words every refused commit's log line starts with (operators grep it).
FENCED_LOG = "commit fenced"
#: On PostgreSQL, how long a batch transaction may sit idle between statements
#: (``idle_in_transaction_session_timeout``), and how long a successor waits for
#: a stalled owner's lock on the epoch row before it ends that owner's session.
DEFAULT_STALL_TIMEOUT_S = 10.0


class GroupSource(Protocol):
    """What the group loop needs of its source (the Kafka source in group mode)."""

    name: str
    topic: str

    def poll(self, max_records: int, timeout: float) -> tuple[pl.DataFrame, Position]:
        """Ticks of the live partitions, in partition then offset order."""

    def rebalance_events(self) -> list[tuple[str, list[int]]]:
        """``(assigned|revoked|lost, partitions)`` since the last call."""

    def resume_partition(self, partition: int, offset: int | None) -> None:
        """Hand out a partition's ticks from ``offset`` (None: its beginning)."""

    def drop_partition(self, partition: int) -> None:
        """Stop handing out a partition's ticks."""

    def last_slices(
        self, committed: Mapping[str, int] | None = None
    ) -> list[tuple[int, int, int, int]]:
        """The last poll's ``(partition, start, end, archive_from)`` row ranges."""

    def last_deals(self) -> dict[int, pl.DataFrame]:
        """The last poll's deals by partition, ``before_tick`` within its slice."""

    def last_deal_cuts(self, committed: Mapping[str, int]) -> dict[int, int]:
        """Per replayed partition, its first deal row not committed yet."""

    def partition_of(self, account_id: int) -> int | None:
        """The partition an account's ticks go to, if known."""

    def not_ready(self) -> dict[str, str]:
        """What keeps the source from delivering ticks (``/readyz``)."""

    def track(self, spec: PhaseSpec) -> None:
        """A phase is judged from now on."""

    def untrack(self, account_id: int) -> None:
        """A phase is judged no more."""

    def close(self) -> None:
        """Release the source."""


@dataclass(slots=True)
class _Partition:
    """One assigned partition's state."""

    number: int
    key: str
    epoch: int
    engine: RuleEngine
    sink: DuckDBSink
    batch_seq: int = 0
    since_checkpoint: int = 0
    #: While replaying: the stored offset (the ticks before it are archived).
    archived_to: int | None = None
    #: Accounts whose ticks came here and that had no active phase then.
    without_phase: set[int] = field(default_factory=set)


class GroupEvaluatorLoop(BatchDriver):
    """A consumer-group member judging the partitions it is assigned.

    Args:
        conn: A store connection (or cursor) for the loop's reads and the
            epochs.
        source: The group source.
        sink_factory: A new sink (its own cursor) for each assigned partition.
        max_batch_records: Most ticks asked of the source per poll.
        poll_timeout_s: Longest wait of a poll.
        checkpoint_every: A partition's batches between two of its checkpoints.
        metrics: The in-memory latest metrics to keep current.
        hooks: Called between batches, at most every ``hook_interval_s``.
        hook_interval_s: See ``hooks``; also the phase-change poll's interval.
        stats: The counters to add to (kept over rebuilds).
        on_batch: Called after each committed partition batch.
        archive: Stage each batch's ticks and deals for the archive, numbered
            in the partition's own archive stream (its key, ``topic:N``).
        owner: Who takes the epochs (default ``host:pid``), for operators.
        stall_timeout_s: On PostgreSQL, a batch transaction idle this long
            between two statements is ended by the server, and a member taking
            a partition whose epoch row another session has locked this long
            ends that session (the previous owner stopped, paused or cut off
            mid-batch, even inside a statement), so the successor is never
            held up for longer. The stalled member's late commit then fails
            and its loop ends with the error (the supervisor builds a new one).
    """

    def __init__(
        self,
        conn: Connection,
        source: GroupSource,
        sink_factory: Callable[[], DuckDBSink],
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
        owner: str | None = None,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        if stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be positive")
        self._stall_ms = max(1, round(stall_timeout_s * 1000))
        self._conn = conn
        self._source = source
        self._sink_factory = sink_factory
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
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self._parts: dict[int, _Partition] = {}
        self._ops: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._version: tuple[object, ...] | None = None
        self._listener = ChallengeListener.of(conn)
        self._stop = threading.Event()
        self._started = False
        #: Set once the loop has started and is taking batches.
        self.ready = threading.Event()
        #: The exception that ended :meth:`run`, if one did.
        self.error: BaseException | None = None
        #: Commits refused because another member took the partition.
        self.fenced = 0

    @property
    def source(self) -> GroupSource:
        """Where the loop's ticks come from."""
        return self._source

    def partitions(self) -> dict[int, int]:
        """The partitions judged now, with the epoch held for each."""
        return {n: part.epoch for n, part in self._parts.items()}

    def engine_of(self, partition: int) -> RuleEngine | None:
        """A partition's engine (read it only from the loop's thread or stopped)."""
        part = self._parts.get(partition)
        return part.engine if part is not None else None

    # ------------------------------------------------------------ thread-safe API

    def register_phase(self, spec: PhaseSpec) -> None:
        """A phase became active in the store (committed): judge it; thread-safe.

        Its account's next tick reads it from the store, whatever partition the
        tick comes from.
        """
        self._source.track(spec)
        self._ops.put(("changed", int(spec.account_id)))

    def remove_phase(self, account_id: int) -> None:
        """Stop judging a phase from the next batch on; thread-safe."""
        self._ops.put(("remove", int(account_id)))

    def stop(self) -> None:
        """Ask :meth:`run` to finish its batch, checkpoint and return."""
        self._stop.set()

    def not_ready(self) -> dict[str, str]:
        """What keeps the loop from judging ticks now (``/readyz``); thread-safe."""
        out: dict[str, str] = {}
        if not self.ready.is_set():
            out["evaluator"] = "starting"
        out.update(self._source.not_ready())
        return out

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Check the schema and load the latest metrics once."""
        if self._started:
            return
        self._sink_factory().setup()
        self.metrics.load(self._conn)
        # Listen before anything is read: a change committed after is notified.
        self._listener.start()
        if not self._listener.enabled:
            self._version = phase_version(self._conn)
        self._started = True
        logger.info(
            "evaluator started as %s in a consumer group (source %s)",
            self.owner,
            self._source.name,
        )

    def _closing(self) -> None:
        self._source.close()
        self._listener.close()

    def run_once(self) -> bool:
        """Handle rebalances and phase changes, poll one batch and commit it.

        Returns:
            Whether a batch with ticks was processed.
        """
        self.start()
        self._rebalance()
        self._apply_ops()
        committed = {
            part.key: part.archived_to
            for part in self._parts.values()
            if part.archived_to is not None
        }
        ticks, position = self._source.poll(self._max_records, self._timeout)
        deals = self._source.last_deals()
        if not ticks.height and not deals:
            return False
        deal_cuts = self._source.last_deal_cuts(committed) if self._archive else {}
        began = time.perf_counter()
        # Phases registered while the poll waited may own ticks in this batch.
        self._apply_ops()
        any_batch = False
        for number, start, end, archive_from in self._source.last_slices(committed):
            part = self._parts.get(number)
            key = f"{self._source.topic}:{number}"
            if part is None or key not in position:
                continue  # dropped under the poll: its ticks are not ours
            sub = ticks.slice(start, end - start)
            sub_deals = deals.get(number)
            archive = archive_deals = None
            if self._archive:
                archive = (
                    sub.slice(archive_from - start) if archive_from > start else sub
                )
                cut = deal_cuts.get(number, 0)
                archive_deals = (
                    sub_deals.slice(cut) if sub_deals is not None and cut else sub_deals
                )
            if self._commit(
                part,
                sub,
                sub_deals,
                {key: position[key]},
                (archive, archive_deals),
                began,
            ):
                any_batch = True
        return any_batch

    def checkpoint(self) -> None:
        """Commit a checkpoint of every partition at its position now."""
        for part in list(self._parts.values()):
            self._checkpoint_now(part)

    # ----------------------------------------------------------------- internals

    def _commit(
        self,
        part: _Partition,
        ticks: pl.DataFrame,
        deals: pl.DataFrame | None,
        position: Position,
        archive: tuple[pl.DataFrame | None, pl.DataFrame | None],
        began: float,
    ) -> bool:
        self._register_new(part, ticks, deals)
        # One call judges the partition's ticks and deals in delivery order.
        evaluation = part.engine.process(ticks, deals)
        part.batch_seq += 1
        part.since_checkpoint += 1
        self.stats.batch_seq += 1
        offset = int(next(iter(position.values())))
        also = None
        if part.since_checkpoint >= self._checkpoint_every:
            also = self._checkpoint_writer(part, offset)
        part.sink.add(
            evaluation,
            position=position,
            ticks=archive[0],
            deals=archive[1],
            stream=part.key,
        )
        try:
            part.sink.flush(fence=self._fence(part), also=also)
        except PartitionFencedError as exc:
            self._fenced(part, exc)
            return False
        except SinkError as exc:
            self._ended_by_store(part, exc)
            raise
        if also is not None:
            part.since_checkpoint = 0
            self.stats.checkpoints += 1
        if part.archived_to is not None and offset >= part.archived_to:
            part.archived_to = None  # the replay is over
        self._committed(
            part, evaluation, ticks.height, 0 if deals is None else deals.height
        )
        if self._on_batch is not None:
            self._on_batch(evaluation, time.perf_counter() - began)
        return True

    def _fence(self, part: _Partition) -> Callable[[Connection], None]:
        source, key, epoch = self._source.name, part.key, part.epoch
        stall_ms = self._stall_ms

        def fence(conn: Connection) -> None:
            if is_postgres(conn):
                # check_epoch's UPDATE holds the epoch row's lock to the commit,
                # and the successor's take_epoch waits for it. A member stopped
                # mid-batch (SIGSTOP, a VM pause, cut off) would hold it until
                # it resumes: the server ends the transaction once it has been
                # idle that long between statements (and take_epoch ends a
                # session stalled inside one, a COPY waiting for rows).
                conn.execute(
                    f"SET LOCAL idle_in_transaction_session_timeout = {stall_ms}"
                )
            check_epoch(conn, source=source, partition=key, epoch=epoch)

        return fence

    def _checkpoint_writer(
        self, part: _Partition, offset: int
    ) -> Callable[[Connection], None]:
        checkpoint = PartitionCheckpoint(
            source=self._source.name,
            partition=part.key,
            next_offset=offset,
            batch_seq=part.batch_seq,
            engine_version=__version__,
            snapshot=part.engine.snapshot(),
            created_at=datetime.now(UTC),
        )

        def write(conn: Connection) -> None:
            save_partition_checkpoint(conn, checkpoint=checkpoint)

        return write

    def _checkpoint_now(self, part: _Partition) -> None:
        offset = stored_offset(self._conn, source=self._source.name, partition=part.key)
        if offset is None:
            return  # nothing committed yet: nothing to resume from
        if part.archived_to is not None:
            return  # mid-replay: the engine is behind the stored position
        try:
            part.sink.flush(
                fence=self._fence(part), also=self._checkpoint_writer(part, offset)
            )
        except PartitionFencedError as exc:
            self._fenced(part, exc)
            return
        except SinkError as exc:
            self._ended_by_store(part, exc)
            raise
        part.since_checkpoint = 0
        self.stats.checkpoints += 1

    def _fenced(self, part: _Partition, exc: PartitionFencedError) -> None:
        self.fenced += 1
        logger.warning(
            "%s: partition %s, epoch %d: another evaluator took it (the store has "
            "epoch %s); the batch was rolled back and the partition's state dropped",
            FENCED_LOG,
            part.key,
            part.epoch,
            exc.current,
        )
        self._drop(part.number)

    def _ended_by_store(self, part: _Partition, exc: SinkError) -> None:
        """Log a batch whose transaction the store ended (it stalled, or was lost)."""
        lost = _session_lost(exc)
        if lost is None:
            return
        self.fenced += 1
        logger.warning(
            "%s: partition %s, epoch %d: the store ended the batch's transaction "
            "(%s; a batch stalled for more than %.1f s is ended: this member was "
            "stopped or cut off mid-batch, and another evaluator may have taken "
            "the partition); the loop restarts on new sessions from the stored "
            "position",
            FENCED_LOG,
            part.key,
            part.epoch,
            lost,
            self._stall_ms / 1000,
        )

    def _drop(self, number: int) -> None:
        part = self._parts.pop(number, None)
        self._source.drop_partition(number)
        if part is None:
            return
        for account_id in part.engine.phases()["account_id"].to_list():
            self._source.untrack(int(account_id))

    def _register_new(
        self, part: _Partition, ticks: pl.DataFrame, deals: pl.DataFrame | None
    ) -> None:
        """Register the active phases of the batch's accounts the engine lacks."""
        engine = part.engine
        accounts = set(ticks.get_column("account_id").to_list())
        if deals is not None:
            accounts.update(deals.get_column("account_id").to_list())
        ids = [
            int(a)
            for a in sorted(accounts)
            if a not in engine and a not in part.without_phase
        ]
        if not ids:
            return
        specs = active_specs_of(self._conn, account_ids=ids)
        for spec in specs:
            engine.register(spec)
            self._source.track(spec)
        part.without_phase.update(set(ids) - {spec.account_id for spec in specs})

    def _committed(
        self, part: _Partition, evaluation: Evaluation, ticks: int, deals: int
    ) -> None:
        self.stats.count(evaluation, ticks, deals)
        self.metrics.update(evaluation.metrics)
        transitions = evaluation.transitions
        if not transitions.height:
            return
        # An ended phase ignores every later tick: drop it (a replay from an
        # older checkpoint still has it and ends it again at the same tick).
        for account_id in transitions["account_id"].to_list():
            part.engine.remove(int(account_id))
            part.without_phase.add(int(account_id))
            self._source.untrack(int(account_id))
        if "passed" in transitions["status"].to_list():
            # A pass opened the next phase, on an account of any partition.
            self._forget_without_phase()

    def _forget_without_phase(self) -> None:
        for part in self._parts.values():
            part.without_phase.clear()

    def _rebalance(self) -> None:
        for kind, numbers in self._source.rebalance_events():
            for number in numbers:
                if kind == "assigned":
                    self._take(number)
                elif kind == "revoked":
                    part = self._parts.get(number)
                    if part is not None:
                        self._checkpoint_now(part)
                    self._drop(number)
                else:
                    self._drop(number)

    def _take(self, number: int) -> None:
        """Take a partition's epoch, load its state and resume it."""
        self._drop(number)
        source = self._source.name
        key = f"{self._source.topic}:{number}"
        epoch = take_epoch(
            self._conn,
            source=source,
            partition=key,
            owner=self.owner,
            stall_s=self._stall_ms / 1000,
        )
        checkpoint = load_partition_checkpoint(self._conn, source=source, partition=key)
        stored = stored_offset(self._conn, source=source, partition=key)
        engine = RuleEngine()
        offset: int | None = None
        seq = 0
        if checkpoint is not None:
            engine = RuleEngine.restore(checkpoint.snapshot)
            offset, seq = checkpoint.next_offset, checkpoint.batch_seq
            if checkpoint.shared:
                self._keep_partition_phases(engine, number)
            self._drop_ended(engine)
        part = _Partition(
            number=number,
            key=key,
            epoch=epoch,
            engine=engine,
            sink=self._sink_factory(),
            batch_seq=seq,
        )
        if stored is not None and (offset is None or offset < stored):
            part.archived_to = stored
        self._parts[number] = part
        self._source.resume_partition(number, offset)
        logger.info(
            "partition %s taken with epoch %d: %d phases from %s, resuming at %s "
            "(stored position %s)",
            key,
            epoch,
            len(engine),
            "its checkpoint"
            if checkpoint is not None and not checkpoint.shared
            else "the embedded checkpoint"
            if checkpoint is not None
            else "no checkpoint",
            offset if offset is not None else "its beginning",
            stored,
        )

    def _keep_partition_phases(self, engine: RuleEngine, number: int) -> None:
        """Keep only the phases whose account's ticks go to partition ``number``."""
        for account_id in engine.phases()["account_id"].to_list():
            home = self._source.partition_of(int(account_id))
            if home is not None and home != number:
                engine.remove(int(account_id))

    def _drop_ended(self, engine: RuleEngine) -> None:
        """Remove the phases cancelled (or gone) since the checkpoint."""
        ids = [int(a) for a in engine.phases()["account_id"].to_list()]
        statuses = phase_statuses(self._conn, account_ids=ids)
        for account_id in ids:
            if statuses.get(account_id) in (None, "cancelled", "pending"):
                engine.remove(account_id)

    def _apply_ops(self) -> None:
        changed = False
        while True:
            try:
                kind, account_id = self._ops.get_nowait()
            except queue.Empty:
                break
            changed = True
            if kind == "remove":
                for part in self._parts.values():
                    part.engine.remove(account_id)
                self._source.untrack(account_id)
                self.metrics.forget(account_id)
        if changed:
            self._forget_without_phase()

    def poll_phase_changes(self) -> None:
        """Take in phase changes made by other processes (between batches).

        Called from the loop's thread every ``hook_interval_s``. On PostgreSQL
        the challenges the store notified since the last call are read: their
        accounts are no longer known to have no active phase (their next tick
        reads the store again), and their phases cancelled since are removed;
        when the listener lost its session, every phase is checked once. On
        DuckDB (no notifications) the phase table's fingerprint is compared
        and, when it moved, every phase is checked. See the module's docstring.
        """
        if self._listener.enabled:
            notified = self._listener.drain()
            if notified is not None:
                if notified:
                    self._take_changes(notified)
                return
        else:
            version = phase_version(self._conn)
            if version == self._version:
                return
            self._version = version
        self._check_every_phase()

    def _check_every_phase(self) -> None:
        self._forget_without_phase()
        for part in self._parts.values():
            self._drop_ended(part.engine)

    def _take_changes(self, challenge_ids: set[int]) -> None:
        statuses = phase_statuses_of_challenges(
            self._conn, challenge_ids=sorted(challenge_ids)
        )
        if len({challenge for challenge, _, _ in statuses}) < len(challenge_ids):
            # A challenge without phases now (deleted): its accounts are unknown.
            self._check_every_phase()
            return
        for _challenge, account_id, status in statuses:
            if account_id is None:
                continue
            for part in self._parts.values():
                part.without_phase.discard(account_id)
                if status in ("cancelled", "pending") and account_id in part.engine:
                    part.engine.remove(account_id)

    def _run_hooks(self) -> None:
        now = time.monotonic()
        if now < self._next_hooks:
            return
        self._next_hooks = now + self._hook_interval
        for hook in (self.poll_phase_changes, *self._hooks):
            try:
                hook()
            except Exception:
                logger.exception("between-batch hook %r failed", hook)


def _session_lost(exc: BaseException) -> str | None:
    """What ended ``exc``'s PostgreSQL session, None if it was something else.

    The server's ``idle_in_transaction_session_timeout`` error is not always
    read before the socket closes: psycopg may only report the lost connection.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(
            current,
            psycopg.errors.IdleInTransactionSessionTimeout | psycopg.OperationalError,
        ):
            return " ".join(str(current).split())[:200]
        current = current.__cause__ or current.__context__
    return None
