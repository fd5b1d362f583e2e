"""``bulk_frame``: the same rows as ``query_frame``, through ``COPY`` on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from prop_stream.evaluator import LatestMetrics
from prop_stream.store import (
    Connection,
    bulk_frame,
    connect,
    init_database,
    query_frame,
    transaction,
)

# Every type the COPY path reads, with the values CSV and time zones get wrong
# most easily: an empty string beside a NULL, a separator, quotes and a line
# break in a text, instants and days before 1970, microseconds, extreme floats.
_VALUES_SQL = """
    SELECT * FROM (VALUES
        (1, 'plain', TRUE, DATE '2026-11-29',
         TIMESTAMPTZ '2026-11-29 01:02:03.456789+00',
         CAST(0.1 AS DOUBLE PRECISION), 7),
        (-2, '', FALSE, DATE '1969-12-31',
         TIMESTAMPTZ '1969-12-31 23:59:59.999999+00',
         CAST(1e300 AS DOUBLE PRECISION), NULL),
        (3, 'a,"b"' || chr(10) || 'c', NULL, NULL, NULL, NULL, -5),
        (4, NULL, TRUE, DATE '1970-01-01',
         TIMESTAMPTZ '1970-01-01 00:00:00+00', CAST(-2.5e-300 AS DOUBLE PRECISION), 0)
    ) AS t (id, label, flag, day, ts, x, n)
    ORDER BY id
"""

_EXPECTED = {
    "id": [-2, 1, 3, 4],
    "label": ["", "plain", 'a,"b"\nc', None],
    "flag": [False, True, None, True],
    "day": [date(1969, 12, 31), date(2026, 11, 29), None, date(1970, 1, 1)],
    "ts": [
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 11, 29, 1, 2, 3, 456789, tzinfo=UTC),
        None,
        datetime(1970, 1, 1, tzinfo=UTC),
    ],
    "x": [1e300, 0.1, None, -2.5e-300],
    "n": [None, 7, -5, 0],
}


@pytest.fixture
def db(store_db: Path | str) -> Iterator[Connection]:
    init_database(store_db)
    conn = connect(store_db)
    try:
        yield conn
    finally:
        conn.close()


def test_bulk_frame_reads_every_value_exactly(db: Connection) -> None:
    frame = bulk_frame(db, _VALUES_SQL)
    assert frame.to_dict(as_series=False) == _EXPECTED
    assert frame.schema["ts"] == pl.Datetime("us", "UTC")
    assert frame.schema["day"] == pl.Date
    assert frame.schema["flag"] == pl.Boolean
    assert frame.equals(query_frame(db, _VALUES_SQL))


def test_bulk_frame_of_no_rows_keeps_the_columns_types(db: Connection) -> None:
    frame = bulk_frame(db, f"SELECT * FROM ({_VALUES_SQL}) AS v WHERE id > 100")  # noqa: S608 - constant
    assert frame.height == 0
    assert frame.columns == list(_EXPECTED)
    assert frame.schema["ts"] == pl.Datetime("us", "UTC")
    assert frame.schema["flag"] == pl.Boolean


def test_bulk_frame_reads_other_types_like_query_frame(db: Connection) -> None:
    # NUMERIC is not read through COPY: it keeps query_frame's exact values.
    sql = "SELECT CAST(12.34 AS NUMERIC(18, 2)) AS price, 'x' AS label"
    frame = bulk_frame(db, sql)
    assert frame.equals(query_frame(db, sql))
    assert frame["price"].to_list() == [Decimal("12.34")]


def test_latest_metrics_load_reads_metrics_latest(db: Connection) -> None:
    columns = query_frame(db, "SELECT * FROM metrics_latest WHERE false").columns
    # Zero for the other NOT NULL columns (numbers), NULL for the optional ones.
    values = dict.fromkeys(columns, "0") | {
        "account_id": "1001",
        "challenge_id": "7",
        "ts": "TIMESTAMPTZ '2026-11-29 01:00:00.25+00'",
        "status": "'active'",
        "day": "DATE '2026-11-29'",
        "equity": "100123.45",
        "daily_paused": "FALSE",
        "trading_days": "3",
        "daily_loss_limit": "NULL",
        "open_lots": "NULL",
    }
    with transaction(db):
        db.execute(
            f"INSERT INTO metrics_latest ({', '.join(columns)}) "  # noqa: S608 - catalog names
            f"VALUES ({', '.join(values[c] for c in columns)})"
        )
    latest = LatestMetrics()
    latest.load(db)
    row = latest.get(1001)
    assert row is not None
    assert row["ts"] == datetime(2026, 11, 29, 1, 0, 0, 250000, tzinfo=UTC)
    assert row["equity"] == 100123.45
    assert row["status"] == "active"
    assert row["daily_paused"] is False
    assert row["trading_days"] == 3
    assert row["day"] == date(2026, 11, 29)
    assert row["daily_loss_limit"] is None
    assert latest.get(1002) is None
