"""The runtime read model: challenges, phases and latest metrics in memory.

``GET /prop/challenges`` and ``GET /prop/challenges/{id}`` never query DuckDB on
the hot path. :class:`RuntimeCache` keeps every challenge with its runtime phases
(loaded at start-up), and reads each phase's latest metric from a
:class:`~prop_stream.evaluator.LatestMetrics` that the evaluator loop updates right
after each batch commits. DuckDB stays the durable copy; the cache only ever shows
what has been committed.

How it stays current (``docs/api.md``, "Hot reads"):

- **Metrics**: the loop's ``LatestMetrics`` (``EvaluatorLoop.metrics``) is shared
  with the app (``create_app(metrics=...)``); a challenge's encoded body is kept
  and reused while the metric rows of its phases are the same objects
  (``LatestMetrics`` replaces a row, never edits it).
- **Phase transitions**: every transition comes with a metric row whose ``status``
  is ``passed`` or ``failed``. When a phase the cache holds as ``active`` shows such
  a row, the challenge is re-read from DuckDB (the transition was committed in the
  same transaction as the row).
- **Other writers** (the purchase flow creating a challenge or opening the next
  phase): call :meth:`RuntimeCache.refresh` after the commit. An id the cache
  doesn't know is read from DuckDB on first request, and :meth:`RuntimeCache.sync`
  (run every ``cache_sync_interval_s`` by the app) re-reads every challenge whose
  row or phases changed, as a safety net.
- **PostgreSQL** (other processes write): :meth:`RuntimeCache.sync` re-reads the
  challenges the store notified since the last sync, and the ``metrics_latest``
  rows the evaluators committed since (:mod:`prop_stream.store.changes`): a sync
  reads what changed, not the tables.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from api.db import Database
from api.serialize import dumps, iso, metric_public, progress_public, ratio
from prop_stream.evaluator import LatestMetrics
from prop_stream.store import (
    CHALLENGE_STATUS_NAMES,
    Connection,
    is_postgres,
)
from prop_stream.store.changes import MetricFeed

MetricRow = Mapping[str, Any]

_CHALLENGES_SQL: Final = """
    SELECT c.id, c.customer_id, c.program_id, p.name, c.purchase_id, c.status,
        c.created_at, c.updated_at, c.ended_at, c.current_phase_index
    FROM challenges AS c JOIN programs AS p ON p.id = c.program_id
"""
_PHASES_SQL: Final = """
    SELECT challenge_id, phase_index, name, phase_type, account_group, account_id,
        status, started_at, ended_at, rules, profit_split
    FROM challenge_phases
"""
_FINGERPRINT_DUCKDB: Final = """
    SELECT c.id, hash(c.status, c.current_phase_index, c.ended_at, c.purchase_id,
        c.customer_id, p.h)
    FROM challenges AS c LEFT JOIN (
        SELECT challenge_id,
            bit_xor(hash(phase_index, status, account_id, started_at, ended_at)) AS h
        FROM challenge_phases GROUP BY challenge_id
    ) AS p ON p.challenge_id = c.id
"""
# PostgreSQL has no row hash: the first 64 bits of an md5 of the row's text.
_FINGERPRINT_POSTGRES: Final = """
    SELECT c.id, ('x' || left(md5(ROW(c.status, c.current_phase_index, c.ended_at,
        c.purchase_id, c.customer_id, p.h)::text), 16))::bit(64)::bigint
    FROM challenges AS c LEFT JOIN (
        SELECT challenge_id,
            string_agg(ROW(phase_index, status, account_id, started_at,
                ended_at)::text, ';' ORDER BY phase_index) AS h
        FROM challenge_phases GROUP BY challenge_id
    ) AS p ON p.challenge_id = c.id
"""


def _fingerprint_sql(conn: Connection) -> str:
    """Per challenge, a number that changes when its row or its phases change."""
    return _FINGERPRINT_POSTGRES if is_postgres(conn) else _FINGERPRINT_DUCKDB


@dataclass(slots=True)
class PhaseRecord:
    """One runtime phase as the cache holds it.

    Attributes:
        phase_index: Its position in the program.
        status: ``pending``, ``active``, ``passed``, ``failed`` or ``cancelled``.
        account_id: Its trading account (None until opened).
        rules: Its rules, defaults filled in.
        static: The JSON fields that don't depend on metrics.
    """

    phase_index: int
    status: str
    account_id: int | None
    rules: dict[str, Any]
    static: dict[str, Any]


@dataclass(slots=True)
class ChallengeRecord:
    """One challenge as the cache holds it, with its last encoded body.

    Attributes:
        id: The challenge's id.
        customer_id: Its owner.
        status: The ``challenges.status`` number.
        created_at: When it was created (list order).
        phases: Its runtime phases, in order.
        static: The JSON fields of the challenge itself.
        rendered_for: The metric rows :attr:`body` was built from.
        body: The encoded challenge object.
        refreshed_for: Metric rows that already caused a re-read (no loop).
    """

    id: int
    customer_id: int
    status: int
    created_at: datetime
    phases: tuple[PhaseRecord, ...]
    static: dict[str, Any]
    rendered_for: tuple[MetricRow | None, ...] | None = None
    body: bytes = b""
    refreshed_for: tuple[MetricRow | None, ...] | None = field(default=None)


def _phase_record(row: Sequence[Any]) -> PhaseRecord:
    (
        _challenge_id,
        phase_index,
        name,
        phase_type,
        account_group,
        account_id,
        status,
        started_at,
        ended_at,
        rules_json,
        profit_split,
    ) = row
    rules = json.loads(rules_json) if isinstance(rules_json, str) else dict(rules_json)
    split: Decimal | None = profit_split
    return PhaseRecord(
        phase_index=int(phase_index),
        status=str(status),
        account_id=None if account_id is None else int(account_id),
        rules=rules,
        static={
            "phase_index": int(phase_index),
            "name": name,
            "phase_type": int(phase_type),
            "account_group": account_group,
            "status": status,
            "account_id": None if account_id is None else int(account_id),
            "started_at": iso(started_at),
            "ended_at": iso(ended_at),
            "profit_split": ratio(split),
            "rules": rules,
        },
    )


def _challenge_record(
    row: Sequence[Any], phases: tuple[PhaseRecord, ...]
) -> ChallengeRecord:
    (
        challenge_id,
        customer_id,
        program_id,
        program_name,
        purchase_id,
        status,
        created_at,
        updated_at,
        ended_at,
        current_phase_index,
    ) = row
    return ChallengeRecord(
        id=int(challenge_id),
        customer_id=int(customer_id),
        status=int(status),
        created_at=created_at,
        phases=phases,
        static={
            "id": int(challenge_id),
            "program_id": int(program_id),
            "program_name": program_name,
            "purchase_id": None if purchase_id is None else int(purchase_id),
            "status": int(status),
            "status_name": CHALLENGE_STATUS_NAMES.get(int(status), str(status)),
            "created_at": iso(created_at),
            "updated_at": iso(updated_at),
            "ended_at": iso(ended_at),
            "current_phase_index": int(current_phase_index),
        },
    )


def render_challenge(
    record: ChallengeRecord, rows: Sequence[MetricRow | None]
) -> dict[str, Any]:
    """The challenge object of ``api.md`` from a record and its phases' metrics.

    Args:
        record: The challenge.
        rows: The latest metric row of each phase (None before its first tick).

    Returns:
        The JSON-ready object.
    """
    phases = []
    for phase, row in zip(record.phases, rows, strict=True):
        item = dict(phase.static)
        item["latest_metric"] = None if row is None else metric_public(row)
        item["progress"] = progress_public(phase.rules, row)
        phases.append(item)
    body = dict(record.static)
    body["phases"] = phases
    return body


class RuntimeCache:
    """Challenges and their phases in memory, with latest metrics; thread-safe.

    Args:
        db: The store, read at :meth:`load`, on a miss and to re-read a challenge.
        metrics: The latest metrics the evaluator keeps current.
        reload_metrics: Read the metrics the store's evaluators commit (the
            metric feed, at :meth:`load` and every :meth:`sync`): on PostgreSQL,
            where evaluators run in other processes (the ``api`` role) or some
            partitions' evaluators do (several ``all`` processes in a group).
    """

    def __init__(
        self, db: Database, metrics: LatestMetrics, *, reload_metrics: bool = False
    ) -> None:
        self._db = db
        self.metrics = metrics
        self._reload_metrics = reload_metrics
        self._feed = MetricFeed()
        self._listener = db.challenge_listener()
        self._challenges: dict[int, ChallengeRecord] = {}
        self._by_customer: dict[int, list[int]] = {}
        self._fingerprints: dict[int, int] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._challenges)

    # -------------------------------------------------------------- loading

    def load(self) -> int:
        """Read every challenge from the store (at start-up), and the metrics.

        On PostgreSQL the challenge listener starts first, so a change committed
        while the challenges are read is notified; on DuckDB each challenge's
        fingerprint is kept for :meth:`sync`. With ``reload_metrics`` the whole
        of ``metrics_latest`` is read too (the metric feed's first read).

        Returns:
            How many challenges were loaded.
        """
        self._listener.start()
        with self._db.cursor() as conn:
            records = _read(conn, None)
            fingerprints = (
                {}
                if self._listener.enabled
                else dict(conn.execute(_fingerprint_sql(conn)).fetchall())
            )
        with self._lock:
            self._challenges = {r.id: r for r in records}
            self._fingerprints = {int(k): int(v) for k, v in fingerprints.items()}
            self._reindex()
        if self._reload_metrics:
            self._sync_metrics()
        return len(records)

    def close(self) -> None:
        """End the challenge listener's session (at shutdown)."""
        self._listener.close()

    def refresh(self, challenge_ids: Iterable[int]) -> None:
        """Re-read some challenges from the store (after another writer's commit).

        Call it after a transaction that created a challenge or changed its
        phases outside the evaluator (e.g. the purchase flow). Ids that no longer
        exist are dropped.

        Args:
            challenge_ids: The challenges.
        """
        ids = sorted({int(i) for i in challenge_ids})
        if not ids:
            return
        with self._db.cursor() as conn:
            records = _read(conn, ids)
        self._store(ids, records)

    def sync(self) -> int:
        """Re-read the challenges that changed in the store, and new metrics.

        On PostgreSQL the challenges notified since the last sync are re-read
        (all of them when the listener is new or lost its session), and with
        ``reload_metrics`` the metric rows the evaluators committed since (the
        metric feed, :mod:`prop_stream.store.changes`). On DuckDB, whose writers
        update the cache themselves, it is a safety net: every challenge whose
        fingerprint moved is re-read. The app runs it periodically off the event
        loop.

        Returns:
            How many challenges were re-read.
        """
        if self._reload_metrics:
            self._sync_metrics()
        if self._listener.enabled:
            notified = self._listener.drain()
            if notified is None:
                return self._reload_all()
            self.refresh(notified)
            return len(notified)
        with self._db.cursor() as conn:
            current = {
                int(k): int(v)
                for k, v in conn.execute(_fingerprint_sql(conn)).fetchall()
            }
        changed = [
            cid for cid, h in current.items() if self._fingerprints.get(cid) != h
        ]
        gone = [cid for cid in self._fingerprints if cid not in current]
        if changed or gone:
            self.refresh([*changed, *gone])
        with self._lock:
            self._fingerprints = current
        return len(changed) + len(gone)

    def _sync_metrics(self) -> None:
        # Rows committed since the last read (the first read, or one after
        # falling behind the feed, is the whole table): one COPY through
        # bulk_frame, since the read holds the GIL that requests wait for
        # (docs/benchmarks.md, "32 connections").
        with self._db.cursor() as conn:
            frame, _whole = self._feed.read(conn, held=len(self.metrics))
        if frame is not None:
            self.metrics.update(frame)

    def _reload_all(self) -> int:
        with self._db.cursor() as conn:
            records = _read(conn, None)
        with self._lock:
            self._challenges = {r.id: r for r in records}
            self._reindex()
        return len(records)

    def _store(self, ids: Sequence[int], records: Sequence[ChallengeRecord]) -> None:
        with self._lock:
            found = {r.id: r for r in records}
            leaving: dict[int, set[int]] = {}
            joining: dict[int, list[int]] = {}
            for cid in ids:
                old = self._challenges.get(cid)
                record = found.get(cid)
                if record is None:
                    self._challenges.pop(cid, None)
                else:
                    self._challenges[cid] = record
                if old is not None and record is not None and _same_place(old, record):
                    continue  # listed where it was (a status change, say)
                if old is not None:
                    leaving.setdefault(old.customer_id, set()).add(cid)
                if record is not None:
                    joining.setdefault(record.customer_id, []).append(cid)
            # Only the lists of the customers concerned change, each by what
            # left and what joined (a sync re-reads what changed, and so should
            # the index); a list is replaced, never edited, as readers take it
            # without the lock.
            for customer in leaving.keys() | joining.keys():
                gone = leaving.get(customer, set())
                listed = [
                    cid
                    for cid in self._by_customer.get(customer, ())
                    if cid not in gone
                ]
                for cid in joining.get(customer, ()):
                    bisect.insort(listed, cid, key=self._list_key)
                if listed:
                    self._by_customer[customer] = listed
                else:
                    self._by_customer.pop(customer, None)

    def _list_key(self, challenge_id: int) -> tuple[int, int]:
        """A customer's list order, newest first, as an ascending key."""
        record = self._challenges[challenge_id]
        return -_micros(record.created_at), -record.id

    def _reindex(self) -> None:
        by_customer: dict[int, list[int]] = {}
        for record in self._challenges.values():
            by_customer.setdefault(record.customer_id, []).append(record.id)
        for listed in by_customer.values():
            listed.sort(key=self._list_key)
        self._by_customer = by_customer

    # ---------------------------------------------------------------- reads

    def _record(self, challenge_id: int) -> ChallengeRecord | None:
        record = self._challenges.get(challenge_id)
        if record is None:
            # Not known yet (created by another writer): the store decides.
            self.refresh([challenge_id])
            record = self._challenges.get(challenge_id)
        return record

    def _rows(self, record: ChallengeRecord) -> tuple[MetricRow | None, ...]:
        get = self.metrics.get
        return tuple(
            None if p.account_id is None else get(p.account_id) for p in record.phases
        )

    def _current(self, record: ChallengeRecord) -> tuple[ChallengeRecord, bytes]:
        rows = self._rows(record)
        rendered = record.rendered_for
        if rendered is not None and all(
            a is b for a, b in zip(rows, rendered, strict=True)
        ):
            return record, record.body
        if self._ended_unseen(record, rows):
            record.refreshed_for = rows
            self.refresh([record.id])
            fresh = self._challenges.get(record.id)
            if fresh is None:
                return record, record.body
            fresh.refreshed_for = rows
            record = fresh
            rows = self._rows(record)
        body = dumps(render_challenge(record, rows))
        record.rendered_for = rows
        record.body = body
        return record, body

    @staticmethod
    def _ended_unseen(
        record: ChallengeRecord, rows: tuple[MetricRow | None, ...]
    ) -> bool:
        if record.refreshed_for is not None and all(
            a is b for a, b in zip(rows, record.refreshed_for, strict=True)
        ):
            return False
        return any(
            row is not None and phase.status == "active" and row["status"] != "active"
            for phase, row in zip(record.phases, rows, strict=True)
        )

    def challenge_body(self, challenge_id: int, *, customer_id: int) -> bytes | None:
        """The encoded challenge object, if that customer owns it.

        Args:
            challenge_id: The challenge.
            customer_id: The customer asking.

        Returns:
            The JSON bytes, or None when it doesn't exist or isn't theirs.
        """
        record = self._record(challenge_id)
        if record is None or record.customer_id != customer_id:
            return None
        return self._current(record)[1]

    def owns(self, challenge_id: int, *, customer_id: int) -> bool:
        """Whether a challenge exists and belongs to a customer.

        Args:
            challenge_id: The challenge.
            customer_id: The customer asking.

        Returns:
            True when it is theirs.
        """
        record = self._record(challenge_id)
        return record is not None and record.customer_id == customer_id

    def list_bodies(
        self,
        *,
        customer_id: int,
        status: int | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[bytes], int]:
        """A page of a customer's challenges, newest first.

        Args:
            customer_id: The customer.
            status: Only challenges with this ``status`` number.
            limit: Page size.
            offset: Challenges skipped.

        Returns:
            The encoded challenge objects of the page and the total count.
        """
        ids = self._by_customer.get(customer_id, [])
        records = [self._challenges[i] for i in ids if i in self._challenges]
        if status is None:
            # A transition may have changed statuses; bring them current first.
            page = records[offset : offset + limit]
            return [self._current(r)[1] for r in page], len(records)
        matching = []
        for record in records:
            current, body = self._current(record)
            if current.status == status:
                matching.append(body)
        return matching[offset : offset + limit], len(matching)


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(when: datetime) -> int:
    """Microseconds since 1970 (exact, unlike a float timestamp)."""
    return (when - _EPOCH) // timedelta(microseconds=1)


def _same_place(old: ChallengeRecord, new: ChallengeRecord) -> bool:
    """Whether a re-read challenge keeps its owner and its place in the list."""
    return old.customer_id == new.customer_id and old.created_at == new.created_at


def _read(conn: Connection, ids: Sequence[int] | None) -> list[ChallengeRecord]:
    where = "" if ids is None else " WHERE {col} IN (SELECT unnest(?::BIGINT[]))"
    params = None if ids is None else [list(ids)]
    challenges = conn.execute(
        _CHALLENGES_SQL + where.format(col="c.id"), params
    ).fetchall()
    phases: dict[int, list[PhaseRecord]] = {}
    for row in conn.execute(
        _PHASES_SQL + where.format(col="challenge_id") + " ORDER BY 1, 2", params
    ).fetchall():
        phases.setdefault(int(row[0]), []).append(_phase_record(row))
    return [
        _challenge_record(row, tuple(phases.get(int(row[0]), ()))) for row in challenges
    ]
