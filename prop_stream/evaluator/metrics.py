"""The latest metric of every account, in memory, for hot reads.

The evaluator updates it right after each batch is committed, so it never shows
what the database could still lose; the API reads from it instead of querying
DuckDB per request (``docs/store.md``, "Hot reads").
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import polars as pl

from prop_stream.store.db import Connection, bulk_frame

MetricRow = Mapping[str, Any]

#: The ts of a slot without a row.
_NONE: Final = np.iinfo(np.int64).min
#: Frames kept before the ones no account points at any more are dropped.
_FRAMES_KEPT: Final = 64


class LatestMetrics:
    """Thread-safe map of account_id to its latest metric row.

    Rows are read-only mappings of the ``metrics_latest`` columns; a newer row
    replaces the whole mapping, so a reader never sees half of an update.

    **Cost.** The evaluator calls :meth:`update` after every batch with one row
    per account it judged (thousands), while the API reads a few. So an update
    only records, with numpy, *where* each account's newest row is (its batch's
    frame and the row number in it); :meth:`get` builds the mapping on the first
    read after a change and hands out that same object until the next change
    (readers may compare rows with ``is``). An update holds the GIL for well
    under a millisecond however many rows it takes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self._reset()

    def _reset(self) -> None:
        # Known accounts, sorted, and the slot of each (slots never move).
        self._ids = np.empty(0, dtype=np.int64)
        self._slots_of_ids = np.empty(0, dtype=np.int64)
        # Per slot: newest ts (µs; INT64_MIN: none), the frame and row holding it.
        self._ts = np.empty(0, dtype=np.int64)
        self._frame = np.empty(0, dtype=np.int64)
        self._row = np.empty(0, dtype=np.int64)
        self._account = np.empty(0, dtype=np.int64)
        self._frames: dict[int, pl.DataFrame] = {}
        self._next_frame = 0
        self._built: dict[int, tuple[int, int, MetricRow]] = {}
        self._count = 0
        self._version += 1

    def __len__(self) -> int:
        return self._count

    def __contains__(self, account_id: object) -> bool:
        if not isinstance(account_id, int):
            return False
        slot = self._where(account_id)
        return slot is not None and bool(self._ts[slot] != _NONE)

    @property
    def frames_held(self) -> int:
        """Batch frames kept for their rows (bounded: unused ones are dropped)."""
        return len(self._frames)

    @property
    def version(self) -> int:
        """Bumped by every update: a cheap "has anything changed" check."""
        return self._version

    def get(self, account_id: int) -> MetricRow | None:
        """The account's latest metric, or None before its first tick."""
        with self._lock:
            return self._get(account_id)

    def many(self, account_ids: Iterable[int]) -> dict[int, MetricRow]:
        """The latest metrics of some accounts (those without one are left out)."""
        with self._lock:
            found = {a: self._get(a) for a in account_ids}
        return {a: row for a, row in found.items() if row is not None}

    def snapshot(self) -> dict[int, MetricRow]:
        """A copy of the whole map."""
        with self._lock:
            present = self._account[self._ts != _NONE].tolist()
            found = {a: self._get(a) for a in present}
        return {a: row for a, row in found.items() if row is not None}

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
        ids = metrics["account_id"].cast(pl.Int64).to_numpy()
        ts = metrics["ts"].dt.epoch("us").cast(pl.Int64).fill_null(_NONE).to_numpy()
        # The newest row of each account in the frame (the last of equal ones).
        order = np.lexsort((np.arange(ids.size), ts, ids))
        ids, ts, rows = ids[order], ts[order], order.astype(np.int64)
        last = np.append(ids[1:] != ids[:-1], True)
        ids, ts, rows = ids[last], ts[last], rows[last]
        with self._lock:
            slots = self._slots(ids)
            newer = ts >= self._ts[slots]
            if not newer.any():
                return
            frame_no = self._next_frame
            self._next_frame += 1
            self._frames[frame_no] = metrics
            won = slots[newer]
            self._count += int(np.count_nonzero(self._ts[won] == _NONE))
            self._ts[won] = ts[newer]
            self._frame[won] = frame_no
            self._row[won] = rows[newer]
            self._version += 1
            if len(self._frames) > _FRAMES_KEPT:
                self._drop_unused_frames()

    def forget(self, account_id: int) -> None:
        """Drop an account (its phase was removed)."""
        with self._lock:
            slot = self._where(account_id)
            if slot is not None and self._ts[slot] != _NONE:
                self._ts[slot] = _NONE
                self._frame[slot] = -1
                self._count -= 1
                self._built.pop(slot, None)
            self._version += 1

    def load(self, conn: Connection) -> None:
        """Fill the map from ``metrics_latest`` (at start-up).

        Args:
            conn: A store connection.
        """
        frame = bulk_frame(conn, "SELECT * FROM metrics_latest")
        with self._lock:
            self._reset()
        self.update(frame)

    # ------------------------------------------------------------ internals

    def _where(self, account_id: int) -> int | None:
        i = int(np.searchsorted(self._ids, account_id))
        if i < self._ids.size and int(self._ids[i]) == account_id:
            return int(self._slots_of_ids[i])
        return None

    def _get(self, account_id: int) -> MetricRow | None:
        slot = self._where(account_id)
        if slot is None or self._ts[slot] == _NONE:
            return None
        frame_no, row_no = int(self._frame[slot]), int(self._row[slot])
        built = self._built.get(slot)
        if built is not None and built[0] == frame_no and built[1] == row_no:
            return built[2]
        row: MetricRow = MappingProxyType(
            self._frames[frame_no].row(row_no, named=True)
        )
        self._built[slot] = (frame_no, row_no, row)
        return row

    def _slots(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The slots of some accounts (sorted, unique), adding new ones."""
        at = np.searchsorted(self._ids, ids)
        clipped = np.minimum(at, max(self._ids.size - 1, 0))
        known = (
            (at < self._ids.size) & (self._ids[clipped] == ids)
            if self._ids.size
            else np.zeros(ids.size, dtype=bool)
        )
        if not known.all():
            new = ids[~known]
            first = self._ts.size
            grow = new.size
            self._ts = np.append(self._ts, np.full(grow, _NONE, dtype=np.int64))
            self._frame = np.append(self._frame, np.full(grow, -1, dtype=np.int64))
            self._row = np.append(self._row, np.zeros(grow, dtype=np.int64))
            self._account = np.append(self._account, new)
            all_ids = np.append(self._ids, new)
            all_slots = np.append(
                self._slots_of_ids, np.arange(first, first + grow, dtype=np.int64)
            )
            order = np.argsort(all_ids, kind="stable")
            self._ids, self._slots_of_ids = all_ids[order], all_slots[order]
            at = np.searchsorted(self._ids, ids)
        return self._slots_of_ids[at]

    def _drop_unused_frames(self) -> None:
        used = set(np.unique(self._frame[self._ts != _NONE]).tolist())
        for frame_no in [f for f in self._frames if f not in used]:
            del self._frames[frame_no]
