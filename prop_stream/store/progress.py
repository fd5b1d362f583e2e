"""Stream progress: source positions and engine checkpoints.

A **position** is a mapping of partition name to the next offset to read, the
shape of ``source_offsets`` (one row per source and partition). The Kafka source
maps partitions to offsets; the demo source keeps its batch counter and its clock
there (see :mod:`prop_stream.evaluator.demo`).

An **engine checkpoint** is the engine's whole state (``RuleEngine.snapshot()``)
with the position of the first tick it has not seen. It is written in the same
transaction as the outputs of the batch before it, so a restart restores it and
replays the source from its position: the outputs are upserts, and replaying them
changes nothing that was already committed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from prop_stream.store.db import Connection

#: Partition name to the next offset to read.
Position = Mapping[str, int]


@dataclass(frozen=True, slots=True)
class EngineCheckpoint:
    """The engine's state at a source position.

    Attributes:
        source: The tick source's name (``demo``, ``kafka``).
        position: Where the source resumes: the first tick the state lacks.
        batch_seq: Batches the loop had processed when it was taken.
        engine_version: The engine version that wrote ``snapshot``.
        snapshot: ``RuleEngine.snapshot()`` bytes.
        created_at: When it was written.
        id: Its row id (None before it is saved).
    """

    source: str
    position: Position
    batch_seq: int
    engine_version: str
    snapshot: bytes
    created_at: datetime
    id: int | None = None


def save_position(conn: Connection, *, source: str, position: Position) -> None:
    """Upsert a source's position, one row per partition.

    Args:
        conn: The connection; the sink's transaction.
        source: The source's name.
        position: Partition name to next offset.
    """
    if not position:
        return
    now = datetime.now(UTC)
    rows = sorted(position.items())
    # One statement for every partition: each statement costs about a millisecond.
    values = ", ".join(["(?, ?, ?, ?)"] * len(rows))
    params: list[object] = []
    for partition, offset in rows:
        params += [source, partition, int(offset), now]
    conn.execute(
        'INSERT INTO source_offsets (source, "partition", next_offset, updated_at) '  # noqa: S608 - placeholders only
        f'VALUES {values} ON CONFLICT (source, "partition") DO UPDATE SET '
        "next_offset = excluded.next_offset, updated_at = excluded.updated_at",
        params,
    )


def load_position(conn: Connection, *, source: str) -> dict[str, int]:
    """The committed position of a source (empty if it never committed one).

    Args:
        conn: The connection.
        source: The source's name.

    Returns:
        Partition name to next offset.
    """
    rows = conn.execute(
        'SELECT "partition", next_offset FROM source_offsets WHERE source = ?',
        [source],
    ).fetchall()
    return {str(partition): int(offset) for partition, offset in rows}


def save_checkpoint(
    conn: Connection, *, checkpoint: EngineCheckpoint, keep: int = 3
) -> int:
    """Store an engine checkpoint and delete all but the ``keep`` newest.

    Args:
        conn: The connection; the sink's transaction.
        checkpoint: The checkpoint.
        keep: How many checkpoints of the source to keep (at least 1).

    Returns:
        The checkpoint's id.
    """
    row = conn.execute(
        "INSERT INTO engine_checkpoints (source, position, batch_seq, "
        "engine_version, snapshot, created_at) VALUES (?, ?, ?, ?, ?, ?) "
        "RETURNING id",
        [
            checkpoint.source,
            json.dumps(dict(sorted(checkpoint.position.items()))),
            checkpoint.batch_seq,
            checkpoint.engine_version,
            checkpoint.snapshot,
            checkpoint.created_at,
        ],
    ).fetchone()
    assert row is not None  # noqa: S101 - INSERT ... RETURNING returns the row
    conn.execute(
        "DELETE FROM engine_checkpoints WHERE source = ? AND id NOT IN ("
        "SELECT id FROM engine_checkpoints WHERE source = ? "
        "ORDER BY id DESC LIMIT ?)",
        [checkpoint.source, checkpoint.source, max(1, keep)],
    )
    return int(row[0])


def latest_checkpoint(conn: Connection, *, source: str) -> EngineCheckpoint | None:
    """The newest engine checkpoint of a source, if any.

    Args:
        conn: The connection.
        source: The source's name.

    Returns:
        The checkpoint, or None.
    """
    rows = list_checkpoints(conn, source=source, limit=1)
    return rows[0] if rows else None


def list_checkpoints(
    conn: Connection, *, source: str, limit: int = 100
) -> list[EngineCheckpoint]:
    """A source's engine checkpoints, newest first.

    Args:
        conn: The connection.
        source: The source's name.
        limit: At most this many.

    Returns:
        The checkpoints.
    """
    rows = conn.execute(
        "SELECT id, source, position, batch_seq, engine_version, snapshot, "
        "created_at FROM engine_checkpoints WHERE source = ? "
        "ORDER BY id DESC LIMIT ?",
        [source, limit],
    ).fetchall()
    return [
        EngineCheckpoint(
            source=str(src),
            position={str(k): int(v) for k, v in json.loads(str(pos)).items()},
            batch_seq=int(seq),
            engine_version=str(version),
            snapshot=bytes(snap),
            created_at=created,
            id=int(cid),
        )
        for cid, src, pos, seq, version, snap, created in rows
    ]
