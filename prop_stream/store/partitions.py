"""Per-partition stream state of the scale-out evaluators: epochs and checkpoints.

When evaluators form one Kafka consumer group (``docs/scale-out.md``), each tick
partition has its own state in the store:

- ``partition_epochs``: the partition's **fencing epoch**. An evaluator that is
  assigned the partition takes it (:func:`take_epoch`: ``epoch + 1``, remembered);
  every batch transaction for the partition first checks that the epoch is still
  its own (:func:`check_epoch`, an ``UPDATE ... WHERE epoch = mine``), so an
  evaluator that lost the partition (paused, partitioned away, slow) can never
  commit over its successor: its transaction is refused and rolled back
  (:class:`PartitionFencedError`). On PostgreSQL the check's ``UPDATE`` holds
  the row lock until the batch commits, so a successor's :func:`take_epoch`
  waits for a batch in flight and then sees its results.
- ``partition_checkpoints``: the engine state of the partition's phases with the
  offset of the first tick it lacks (one row per partition, replaced).
- the partition's committed position stays in ``source_offsets`` under the key
  ``<topic>:<partition>`` (:mod:`prop_stream.store.progress`), the same rows the
  embedded service writes, so a running database keeps its position.

**From one checkpoint to per-partition state.** Migration 6 only adds the tables:
the embedded service's single checkpoint (``engine_checkpoints``, source
``kafka``) stays where it is, and :func:`legacy_checkpoint` hands it to a group
evaluator that takes a partition with no checkpoint of its own (restored,
pruned to the partition's accounts, replayed from its offset there), so nothing
is lost in the switch.

**Phase changes.** :func:`phase_version` is a cheap fingerprint of the phase
table that evaluators poll between batches; a purchase, a cancel or a pass made
by another process changes it (the hook where PostgreSQL's ``LISTEN/NOTIFY``
plugs in later).

The SQL here is written once for both backends: ``?`` parameters, ``BIGINT``,
``VARCHAR``, ``BYTEA``, ``TIMESTAMPTZ``, ``ON CONFLICT ... DO UPDATE`` and
``RETURNING``, which DuckDB and PostgreSQL both accept.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import psycopg

from prop_stream.rules import PhaseSpec
from prop_stream.store.db import Connection, is_postgres, transaction
from prop_stream.store.exceptions import StoreError

logger = logging.getLogger(__name__)

#: How many stalled holders :func:`take_epoch` ends before it gives up.
_MAX_HOLDERS_ENDED: Final = 5

#: Migration 6: the tables of this module (``prop_stream.store.migrations``).
MIGRATION_6: Final = (
    """
    CREATE TABLE partition_epochs (
        source VARCHAR NOT NULL,
        "partition" VARCHAR NOT NULL,
        epoch BIGINT NOT NULL,
        owner VARCHAR NOT NULL,
        taken_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (source, "partition")
    )
    """,
    """
    CREATE TABLE partition_checkpoints (
        source VARCHAR NOT NULL,
        "partition" VARCHAR NOT NULL,
        next_offset BIGINT NOT NULL,
        batch_seq BIGINT NOT NULL,
        engine_version VARCHAR NOT NULL,
        snapshot BYTEA NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (source, "partition")
    )
    """,
)


class PartitionFencedError(StoreError):
    """A batch's partition was taken by another evaluator: the commit is refused.

    Attributes:
        partition: The partition key (``<topic>:<n>``).
        epoch: The epoch the refused evaluator held.
        current: The partition's epoch in the store now (None: no row).
    """

    def __init__(self, partition: str, epoch: int, current: int | None) -> None:
        super().__init__(
            f"partition {partition}: epoch {epoch} is no longer current "
            f"(the store has {current}); another evaluator owns it"
        )
        self.partition = partition
        self.epoch = epoch
        self.current = current


@dataclass(frozen=True, slots=True)
class PartitionCheckpoint:
    """A partition's engine state at an offset.

    Attributes:
        source: The tick source's name (``kafka``).
        partition: The partition key (``<topic>:<n>``).
        next_offset: The first offset the state has not seen.
        batch_seq: Batches of the partition processed when it was taken.
        engine_version: The engine version that wrote ``snapshot``.
        snapshot: ``RuleEngine.snapshot()`` bytes of the partition's phases.
        created_at: When it was written.
        shared: It is the embedded service's whole-engine checkpoint
            (:func:`legacy_checkpoint`): it holds other partitions' phases too.
    """

    source: str
    partition: str
    next_offset: int
    batch_seq: int
    engine_version: str
    snapshot: bytes
    created_at: datetime
    shared: bool = False


def take_epoch(
    conn: Connection,
    *,
    source: str,
    partition: str,
    owner: str,
    stall_s: float | None = None,
) -> int:
    """Fence every earlier owner of a partition: its epoch plus one, taken now.

    Call it outside a transaction, before loading the partition's checkpoint: on
    PostgreSQL it waits for a batch in flight of the previous owner (whose epoch
    check holds the row lock), so the state loaded next includes that batch or
    the batch is refused.

    A previous owner stopped mid-batch (SIGSTOP, a paused VM, cut off) would
    hold the lock until it resumes. With ``stall_s``, after waiting that long
    for the lock the session holding it is ended (``pg_terminate_backend``:
    its transaction is rolled back and the lock freed), and the take is tried
    again. A batch that takes longer than ``stall_s`` to commit counts as
    stalled, so give ``stall_s`` a wide margin over the slowest batch commit.

    Args:
        conn: The connection.
        source: The tick source's name.
        partition: The partition key (``<topic>:<n>``).
        owner: Who takes it (host, pid, member id: for operators).
        stall_s: On PostgreSQL, how long the lock may be held by another
            session before that session is ended (None: wait for ever).

    Returns:
        The new epoch, the caller's to present at each commit.

    Raises:
        StoreError: The holders kept coming back, or may not be ended (the
            database role lacks the right to signal the holder's session).
    """
    if stall_s is None or not is_postgres(conn):
        return _take(conn, source=source, partition=partition, owner=owner)
    wait_ms = max(1, round(stall_s * 1000))
    for _ in range(_MAX_HOLDERS_ENDED):
        try:
            with transaction(conn):
                conn.execute(f"SET LOCAL lock_timeout = {wait_ms}")
                return _take(conn, source=source, partition=partition, owner=owner)
        except psycopg.errors.LockNotAvailable:
            _end_holders(conn, source=source, partition=partition, stall_s=stall_s)
    raise StoreError(
        f"partition {partition}: its epoch stayed locked after ending "
        f"{_MAX_HOLDERS_ENDED} stalled sessions"
    )


def _take(conn: Connection, *, source: str, partition: str, owner: str) -> int:
    row = conn.execute(
        'INSERT INTO partition_epochs (source, "partition", epoch, owner, taken_at) '
        "VALUES (?, ?, 1, ?, ?) "
        'ON CONFLICT (source, "partition") DO UPDATE SET '
        "epoch = partition_epochs.epoch + 1, owner = excluded.owner, "
        "taken_at = excluded.taken_at "
        "RETURNING epoch",
        [source, partition, owner, datetime.now(UTC)],
    ).fetchall()
    return int(row[0][0])


def _end_holders(
    conn: Connection, *, source: str, partition: str, stall_s: float
) -> None:
    """End the sessions whose open transaction locks a partition's epoch row."""
    # The row's xmax is the transaction that locks it (the previous owner's
    # epoch check); every transaction holds the lock on its own id.
    try:
        ended = conn.execute(
            "SELECT l.pid, e.owner, pg_terminate_backend(l.pid) "
            "FROM partition_epochs AS e JOIN pg_locks AS l "
            "ON l.locktype = 'transactionid' AND l.transactionid = e.xmax "
            "AND l.mode = 'ExclusiveLock' AND l.granted "
            'WHERE e.source = ? AND e."partition" = ? AND l.pid <> pg_backend_pid()',
            [source, partition],
        ).fetchall()
    except psycopg.errors.InsufficientPrivilege as exc:
        raise StoreError(
            f"partition {partition}: its previous owner's session holds the epoch "
            f"for more than {stall_s:g} s and this role may not end it: {exc}"
        ) from exc
    for pid, owner, done in ended:
        logger.warning(
            "partition %s: its previous owner %s held the epoch for more than %g s "
            "(stopped or cut off mid-batch); its session (pid %s) %s",
            partition,
            owner,
            stall_s,
            pid,
            "was ended, its batch rolled back" if done else "could not be ended",
        )


def check_epoch(conn: Connection, *, source: str, partition: str, epoch: int) -> None:
    """Refuse the transaction unless ``epoch`` is still the partition's epoch.

    Run it first in every batch transaction of the partition.

    Raises:
        PartitionFencedError: Another evaluator took the partition since.
    """
    rows = conn.execute(
        "UPDATE partition_epochs SET epoch = epoch "
        'WHERE source = ? AND "partition" = ? AND epoch = ? RETURNING epoch',
        [source, partition, epoch],
    ).fetchall()
    if rows:
        return
    raise PartitionFencedError(
        partition, epoch, current_epoch(conn, source=source, partition=partition)
    )


def current_epoch(conn: Connection, *, source: str, partition: str) -> int | None:
    """A partition's epoch now (None if nobody ever took it)."""
    rows = conn.execute(
        'SELECT epoch FROM partition_epochs WHERE source = ? AND "partition" = ?',
        [source, partition],
    ).fetchall()
    return int(rows[0][0]) if rows else None


def save_partition_checkpoint(
    conn: Connection, *, checkpoint: PartitionCheckpoint
) -> None:
    """Replace a partition's checkpoint (in the batch's transaction)."""
    conn.execute(
        'INSERT INTO partition_checkpoints (source, "partition", next_offset, '
        "batch_seq, engine_version, snapshot, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) "
        'ON CONFLICT (source, "partition") DO UPDATE SET '
        "next_offset = excluded.next_offset, batch_seq = excluded.batch_seq, "
        "engine_version = excluded.engine_version, snapshot = excluded.snapshot, "
        "created_at = excluded.created_at",
        [
            checkpoint.source,
            checkpoint.partition,
            checkpoint.next_offset,
            checkpoint.batch_seq,
            checkpoint.engine_version,
            checkpoint.snapshot,
            checkpoint.created_at,
        ],
    )


def load_partition_checkpoint(
    conn: Connection, *, source: str, partition: str
) -> PartitionCheckpoint | None:
    """A partition's checkpoint, else the embedded service's (None: neither).

    Args:
        conn: The connection.
        source: The tick source's name.
        partition: The partition key (``<topic>:<n>``).

    Returns:
        The partition's own checkpoint; without one, :func:`legacy_checkpoint`.
    """
    rows = conn.execute(
        "SELECT next_offset, batch_seq, engine_version, snapshot, created_at "
        'FROM partition_checkpoints WHERE source = ? AND "partition" = ?',
        [source, partition],
    ).fetchall()
    if not rows:
        return legacy_checkpoint(conn, source=source, partition=partition)
    offset, seq, version, snapshot, created = rows[0]
    return PartitionCheckpoint(
        source=source,
        partition=partition,
        next_offset=int(offset),
        batch_seq=int(seq),
        engine_version=str(version),
        snapshot=bytes(snapshot),
        created_at=created,
    )


def legacy_checkpoint(
    conn: Connection, *, source: str, partition: str
) -> PartitionCheckpoint | None:
    """The embedded service's newest checkpoint, as a start for one partition.

    Its snapshot holds every phase the single engine judged (``shared``); the
    caller keeps those of the partition's accounts. Only a checkpoint whose
    position names the partition qualifies: one taken before the partition
    existed knows nothing of its ticks.

    Args:
        conn: The connection.
        source: The tick source's name.
        partition: The partition key (``<topic>:<n>``).

    Returns:
        The checkpoint, or None.
    """
    rows = conn.execute(
        "SELECT position, batch_seq, engine_version, snapshot, created_at "
        "FROM engine_checkpoints WHERE source = ? ORDER BY id DESC LIMIT 1",
        [source],
    ).fetchall()
    if not rows:
        return None
    position, seq, version, snapshot, created = rows[0]
    offsets = json.loads(str(position))
    if partition not in offsets:
        return None
    return PartitionCheckpoint(
        source=source,
        partition=partition,
        next_offset=int(offsets[partition]),
        batch_seq=int(seq),
        engine_version=str(version),
        snapshot=bytes(snapshot),
        created_at=created,
        shared=True,
    )


def stored_offset(conn: Connection, *, source: str, partition: str) -> int | None:
    """A partition's committed position (``source_offsets``), None if none."""
    rows = conn.execute(
        'SELECT next_offset FROM source_offsets WHERE source = ? AND "partition" = ?',
        [source, partition],
    ).fetchall()
    return int(rows[0][0]) if rows else None


def active_specs_of(conn: Connection, *, account_ids: Sequence[int]) -> list[PhaseSpec]:
    """The active phases of some accounts, as the engine registers them.

    Args:
        conn: The connection.
        account_ids: The accounts.

    Returns:
        The phases (accounts without an active phase are left out).
    """
    if not account_ids:
        return []
    rows = conn.execute(
        "SELECT account_id, challenge_id, phase_index, started_at, rules "
        "FROM challenge_phases WHERE status = 'active' "
        "AND account_id IS NOT NULL AND started_at IS NOT NULL "
        "AND account_id IN (SELECT unnest(?))",
        [[int(a) for a in account_ids]],
    ).fetchall()
    return [
        PhaseSpec(
            account_id=int(account),
            challenge_id=str(challenge),
            phase_index=int(index),
            started_at=started,
            rules=json.loads(str(rules)),
        )
        for account, challenge, index, started, rules in rows
    ]


def phase_statuses(conn: Connection, *, account_ids: Sequence[int]) -> dict[int, str]:
    """The status of each account's phase (accounts without one left out)."""
    if not account_ids:
        return {}
    rows = conn.execute(
        "SELECT account_id, status FROM challenge_phases "
        "WHERE account_id IN (SELECT unnest(?))",
        [[int(a) for a in account_ids]],
    ).fetchall()
    return {int(account): str(status) for account, status in rows}


def phase_statuses_of_challenges(
    conn: Connection, *, challenge_ids: Sequence[int]
) -> list[tuple[int, int | None, str]]:
    """The phases of some challenges: (challenge, account, status) each.

    A phase not opened yet has no account (None); a challenge without phases
    (or gone) has no row.
    """
    if not challenge_ids:
        return []
    rows = conn.execute(
        "SELECT challenge_id, account_id, status FROM challenge_phases "
        "WHERE challenge_id IN (SELECT unnest(?))",
        [[int(c) for c in challenge_ids]],
    ).fetchall()
    return [(int(c), None if a is None else int(a), str(s)) for c, a, s in rows]


def phase_version(conn: Connection) -> tuple[object, ...]:
    """A fingerprint of the phase table that any phase change moves.

    A purchase adds an active phase, a cancel or an end changes a status and
    sets ``ended_at``, a pass starts the next phase: each changes a count or a
    newest timestamp here. Evaluators poll it between batches (on PostgreSQL a
    ``NOTIFY`` from the writers can replace the poll).

    Returns:
        Comparable values; equal fingerprints mean no phase changed.
    """
    row = conn.execute(
        "SELECT count(*), "
        "sum(CASE WHEN status = 'active' THEN 1 ELSE 0 END), "
        "max(started_at), max(ended_at) FROM challenge_phases"
    ).fetchall()
    return tuple(row[0]) if row else ()


__all__ = [
    "MIGRATION_6",
    "PartitionCheckpoint",
    "PartitionFencedError",
    "active_specs_of",
    "check_epoch",
    "current_epoch",
    "legacy_checkpoint",
    "load_partition_checkpoint",
    "phase_statuses",
    "phase_statuses_of_challenges",
    "phase_version",
    "save_partition_checkpoint",
    "stored_offset",
    "take_epoch",
]
