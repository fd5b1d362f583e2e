"""Change feeds: what scale-out readers re-read instead of whole tables.

With PostgreSQL several processes share the store, and each keeps some of it in
memory: an ``api`` process its runtime cache (challenges, phases, latest
metrics), an evaluator its engine's phases. Before migration 9 they found what
changed by reading everything again (all of ``metrics_latest``, a fingerprint of
every challenge, an aggregate over ``challenge_phases``) every few seconds. Two
feeds tell them what changed instead (``docs/scale-out.md``, "Change feeds"):

- **Metrics** (:func:`record_metric_changes`, :class:`MetricFeed`). Each sink
  flush that writes ``metrics_latest`` adds one ``metrics_changes`` row: its
  stream (the evaluator's, or a group member's partition), a number and the
  accounts it wrote. The number is the stream's ``metric_streams.head`` plus one;
  the update's row lock is held to the commit, so a stream's numbers commit in
  order and a reader that saw number N has seen every number below it. A reader
  keeps per stream the last number it read and reads the ``metrics_latest``
  rows of the accounts changed after it. Writers delete their stream's changes
  older than :data:`METRIC_CHANGES_KEPT_S`; a reader further behind than that,
  or new, reads the whole table once.
- **Challenges and phases** (:class:`ChallengeListener`). Triggers on
  ``challenges`` and ``challenge_phases`` send the challenge's id on the channel
  :data:`CHALLENGE_CHANNEL` when the writing transaction commits (``NOTIFY``),
  whoever the writer is (a purchase, the job worker, an evaluator's pass, an
  admin's cancel, SQL by hand). A listener that is new or lost its session
  answers None: the caller reads everything once, then only what is notified.

Both are PostgreSQL's: a DuckDB file has one process, whose writers update the
readers in memory, so on DuckDB no change is recorded, :class:`MetricFeed` reads
the whole table and :class:`ChallengeListener` always answers None.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from typing import Final

import polars as pl
import psycopg

from prop_stream.dburl import is_url
from prop_stream.store.db import Connection, bulk_frame, is_postgres, transaction
from prop_stream.store.pg import PgConnection, connect_url

logger = logging.getLogger(__name__)

#: The ``NOTIFY`` channel of challenge and phase changes (payload: the id).
CHALLENGE_CHANNEL: Final = "prop_stream_challenges"

#: How long a stream's metric changes are kept (seconds). A reader further
#: behind reads all of ``metrics_latest`` once.
METRIC_CHANGES_KEPT_S: Final = 60

#: A feed reads the whole table instead when the changes since its last read
#: name more accounts than this share of the rows it holds (measured in
#: ``docs/benchmarks.md``, "Change feeds": an index probe per changed row costs
#: about what scanning two or three rows does).
WHOLE_READ_SHARE: Final = 0.25

#: A writer prunes its stream's old changes every this many flushes.
METRIC_CHANGES_PRUNE_EVERY: Final = 64

# Migration 9. Both backends get the tables (one schema); only PostgreSQL's
# writers fill them and only PostgreSQL has the triggers.
_V9_TABLES: Final = (
    """
    CREATE TABLE metric_streams (
        stream VARCHAR PRIMARY KEY,
        head BIGINT NOT NULL
    )
    """,
    """
    CREATE TABLE metrics_changes (
        stream VARCHAR NOT NULL,
        seq BIGINT NOT NULL,
        written_at TIMESTAMPTZ NOT NULL,
        accounts BIGINT[] NOT NULL,
        PRIMARY KEY (stream, seq)
    )
    """,
)
_V9_NOTIFY: Final = (
    f"""
    CREATE FUNCTION prop_stream_notify_challenge() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_TABLE_NAME = 'challenges' THEN
            PERFORM pg_notify('{CHALLENGE_CHANNEL}',
                (CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END)::text);
        ELSE
            PERFORM pg_notify('{CHALLENGE_CHANNEL}',
                (CASE WHEN TG_OP = 'DELETE' THEN OLD.challenge_id
                    ELSE NEW.challenge_id END)::text);
        END IF;
        RETURN NULL;
    END
    $$
    """,
    "CREATE TRIGGER challenges_notify AFTER INSERT OR UPDATE OR DELETE "
    "ON challenges FOR EACH ROW EXECUTE FUNCTION prop_stream_notify_challenge()",
    "CREATE TRIGGER challenge_phases_notify AFTER INSERT OR UPDATE OR DELETE "
    "ON challenge_phases FOR EACH ROW "
    "EXECUTE FUNCTION prop_stream_notify_challenge()",
)
#: Migration 9's statements on DuckDB and on PostgreSQL, statement for statement
#: (DuckDB has no triggers: a no-op in place of each).
MIGRATION_9: Final = (*_V9_TABLES, *("SELECT 1" for _ in _V9_NOTIFY))
MIGRATION_9_POSTGRES: Final = (*_V9_TABLES, *_V9_NOTIFY)

# The stream's next number; the row lock orders the stream's flushes.
_TAKE_HEAD: Final = (
    "INSERT INTO metric_streams (stream, head) VALUES (?, 1) "
    "ON CONFLICT (stream) DO UPDATE SET head = metric_streams.head + 1 "
    "RETURNING head"
)
_PRUNE: Final = (
    "DELETE FROM metrics_changes WHERE stream = ? AND seq < ? "  # noqa: S608 - a constant
    f"AND written_at < now() - interval '{METRIC_CHANGES_KEPT_S} seconds'"
)
# Per stream: its head and its oldest change still kept (one index probe each).
_HEADS: Final = (
    "SELECT s.stream, s.head, "
    "(SELECT min(c.seq) FROM metrics_changes AS c WHERE c.stream = s.stream) "
    "FROM metric_streams AS s"
)


def record_metric_changes(conn: Connection, *, stream: str, table: str) -> None:
    """Record that a flush wrote the ``metrics_latest`` rows of some accounts.

    Run it in the flush's transaction, after the upsert (PostgreSQL only: see the
    module's docstring).

    Args:
        conn: A PostgreSQL connection, in the flush's transaction.
        stream: The sink's stream ('' for the single evaluator, the partition
            key for a group member's partition).
        table: The flush's metric rows (this package's temporary table, with the
            flag ``_latest`` on each account's newest row).
    """
    row = conn.execute(_TAKE_HEAD, [stream]).fetchone()
    if row is None:  # pragma: no cover - RETURNING always answers a row
        raise RuntimeError(f"metric_streams: no number for stream {stream!r}")
    seq = int(row[0])
    conn.execute(
        "INSERT INTO metrics_changes (stream, seq, written_at, accounts) "  # noqa: S608 - our table
        f"SELECT ?, ?, now(), coalesce(array_agg(account_id), '{{}}') "
        f"FROM {table} WHERE _latest",
        [stream, seq],
    )
    if seq % METRIC_CHANGES_PRUNE_EVERY == 0:
        conn.execute(_PRUNE, [stream, seq])


def _literal(text: str) -> str:
    """A SQL string literal (standard-conforming strings: quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


class MetricFeed:
    """The ``metrics_latest`` rows written since the last read, stream by stream.

    Not thread-safe: one reader (an ``api`` process's cache sync) owns it.
    """

    def __init__(self) -> None:
        self._seen: dict[str, int] | None = None
        self.whole_reads = 0
        self.change_reads = 0

    def read(
        self, conn: Connection, *, held: int = 0
    ) -> tuple[pl.DataFrame | None, bool]:
        """Read what changed since the last call.

        The first call (and a call after falling behind the kept changes) reads
        the whole table; later ones read the rows of the accounts changed since,
        unless they are so many that one scan of the table is cheaper (more than
        :data:`WHOLE_READ_SHARE` of ``held``: an index probe per row costs about
        what scanning a few rows does). A row may come again; newer rows win in
        :class:`~prop_stream.evaluator.LatestMetrics`.

        Args:
            conn: The store (not in a transaction).
            held: How many rows the reader holds (the table's size as it knows
                it; 0: never read the whole table for size).

        Returns:
            The rows (None: nothing changed) and whether they are the whole table.
        """
        if not is_postgres(conn):
            self.whole_reads += 1
            return bulk_frame(conn, "SELECT * FROM metrics_latest"), True
        with transaction(conn, snapshot=True):
            heads = {
                str(stream): (int(head), None if oldest is None else int(oldest))
                for stream, head, oldest in conn.execute(_HEADS).fetchall()
            }
            seen = self._seen
            ranges: list[tuple[str, int, int]] = []
            whole = seen is None
            for stream, (head, oldest) in heads.items():
                after = 0 if seen is None else seen.get(stream, 0)
                if head <= after:
                    continue
                if oldest is None or oldest > after + 1:
                    whole = True  # pruned past this reader (or a new reader)
                ranges.append((stream, after, head))
            if not whole and ranges and held > 0:
                # So many changed that one scan is cheaper than a probe each.
                whole = _changed_entries(conn, ranges) > held * WHOLE_READ_SHARE
            if whole:
                frame: pl.DataFrame | None = bulk_frame(
                    conn, "SELECT * FROM metrics_latest"
                )
                self.whole_reads += 1
            elif ranges:
                frame = bulk_frame(conn, _changed_sql(ranges))
                self.change_reads += 1
            else:
                frame = None
        self._seen = {stream: head for stream, (head, _) in heads.items()}
        return frame, whole


def _in_ranges(ranges: list[tuple[str, int, int]]) -> str:
    """A join of ``metrics_changes AS c`` to the changes in some ranges."""
    values = ", ".join(f"({_literal(s)}, {lo:d}, {hi:d})" for s, lo, hi in ranges)
    return (
        f"JOIN (VALUES {values}) AS r(stream, lo, hi) "
        "ON c.stream = r.stream AND c.seq > r.lo AND c.seq <= r.hi"
    )


def _changed_entries(conn: Connection, ranges: list[tuple[str, int, int]]) -> int:
    """How many account entries the changes in some ranges hold (repeats too)."""
    row = conn.execute(
        "SELECT coalesce(sum(cardinality(c.accounts)), 0) "  # noqa: S608 - numbers and quoted keys
        f"FROM metrics_changes AS c {_in_ranges(ranges)}"
    ).fetchone()
    return 0 if row is None else int(row[0])


def _changed_sql(ranges: list[tuple[str, int, int]]) -> str:
    """The ``metrics_latest`` rows of the accounts changed in some ranges."""
    return (
        "SELECT m.* FROM metrics_latest AS m WHERE m.account_id IN ("  # noqa: S608 - numbers and quoted keys
        "SELECT DISTINCT unnest(c.accounts) FROM metrics_changes AS c "
        f"{_in_ranges(ranges)})"
    )


class ChallengeListener:
    """The ids of challenges changed since the last :meth:`drain` (``LISTEN``).

    It holds a session of its own (a ``LISTEN`` lives in a session). Not
    thread-safe: one reader owns it.

    Args:
        url: The store: a ``postgresql://`` URL (anything else: no listener,
            :meth:`drain` answers None).
    """

    def __init__(self, url: str) -> None:
        self._url = url if is_url(url) else None
        self._conn: PgConnection | None = None

    @classmethod
    def of(cls, conn: Connection) -> ChallengeListener:
        """A listener on ``conn``'s database (inert when it is DuckDB)."""
        return cls(conn.url if isinstance(conn, PgConnection) else "")

    @property
    def enabled(self) -> bool:
        """Whether the store is PostgreSQL (on DuckDB it never listens)."""
        return self._url is not None

    def start(self) -> None:
        """Listen from now on; call it before reading what it keeps current."""
        if self._url is None or self._conn is not None:
            return
        conn = connect_url(self._url)
        try:
            conn.execute(f"LISTEN {CHALLENGE_CHANNEL}")
        except BaseException:
            # Kept only once listening: a session without LISTEN would answer
            # "nothing changed" for ever.
            conn.close()
            raise
        self._conn = conn

    def drain(self) -> set[int] | None:
        """The challenges changed since the last call, without waiting.

        Returns:
            Their ids; None when the caller must read everything: the listener
            was not started, is not on PostgreSQL, or lost its session (it then
            listens again from now on).
        """
        if self._url is None:
            return None
        if self._conn is None:
            self.start()
            return None
        try:
            payloads = self._conn.notifications()
        except psycopg.Error as exc:
            logger.warning("change listener lost its session (%s): reading all", exc)
            self.close()
            with suppress(psycopg.Error):
                self.start()  # else the next drain tries again
            return None
        return {int(p) for p in payloads}

    def close(self) -> None:
        """End the session."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(psycopg.Error):
                conn.close()


__all__ = [
    "CHALLENGE_CHANNEL",
    "METRIC_CHANGES_KEPT_S",
    "MIGRATION_9",
    "MIGRATION_9_POSTGRES",
    "ChallengeListener",
    "MetricFeed",
    "record_metric_changes",
]
