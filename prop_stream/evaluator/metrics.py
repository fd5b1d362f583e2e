"""The latest metric of every account, in memory, for hot reads.

The evaluator updates it right after each batch is committed, so it never shows
what the database could still lose; the API reads from it instead of querying
DuckDB per request (``docs/store.md``, "Hot reads").
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import polars as pl

from prop_stream.store.db import Connection, query_frame

MetricRow = Mapping[str, Any]


class LatestMetrics:
    """Thread-safe map of account_id to its latest metric row.

    Rows are read-only mappings of the ``metrics_latest`` columns; a newer row
    replaces the whole mapping, so a reader never sees half of an update.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[int, MetricRow] = {}
        self._version = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, account_id: object) -> bool:
        return account_id in self._rows

    @property
    def version(self) -> int:
        """Bumped by every update: a cheap "has anything changed" check."""
        return self._version

    def get(self, account_id: int) -> MetricRow | None:
        """The account's latest metric, or None before its first tick."""
        return self._rows.get(account_id)

    def many(self, account_ids: Iterable[int]) -> dict[int, MetricRow]:
        """The latest metrics of some accounts (those without one are left out)."""
        rows = self._rows
        return {a: rows[a] for a in account_ids if a in rows}

    def snapshot(self) -> dict[int, MetricRow]:
        """A copy of the whole map."""
        with self._lock:
            return dict(self._rows)

    def update(self, metrics: pl.DataFrame) -> None:
        """Take the engine's metric rows of a committed batch (newer rows win).

        Args:
            metrics: Rows with the ``metrics_latest`` columns (``challenge_id``
                as the engine's string or the store's integer).
        """
        if not metrics.height:
            return
        if metrics.schema.get("challenge_id") == pl.String:
            metrics = metrics.with_columns(pl.col("challenge_id").cast(pl.Int64))
        with self._lock:
            for row in metrics.iter_rows(named=True):
                current = self._rows.get(row["account_id"])
                if current is None or row["ts"] >= current["ts"]:
                    self._rows[row["account_id"]] = MappingProxyType(row)
            self._version += 1

    def forget(self, account_id: int) -> None:
        """Drop an account (its phase was removed)."""
        with self._lock:
            self._rows.pop(account_id, None)
            self._version += 1

    def load(self, conn: Connection) -> None:
        """Fill the map from ``metrics_latest`` (at start-up).

        Args:
            conn: A store connection.
        """
        frame = query_frame(conn, "SELECT * FROM metrics_latest")
        with self._lock:
            self._rows.clear()
        self.update(frame)
