"""Hedge flags in the store: ``record_deal_opens`` in any batching and order.

The flags written by any split of a set of deals into batches, in any order of
arrival, with batches replayed, equal the backtest's polars join and the
plain-Python reference (``tests/reference_deals.hedge_flags``).
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg_support import BACKENDS, fresh_database
from reference_deals import Deal
from reference_deals import hedge_flags as reference_flags
from test_hedge_flags import as_rows, in_deals, to_frame

from prop_stream.backtest.flags import FLAGS_ORDER, FLAGS_SCHEMA, hedge_flags
from prop_stream.store import Connection, connect, init_database, query_frame
from prop_stream.store.db import transaction
from prop_stream.store.flags import record_deal_opens

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Account -> customer in the store (account 5 has no trading_accounts row).
OWNERS = {1: 1, 2: 1, 3: 2, 4: 2}


@pytest.fixture(scope="module", params=BACKENDS)
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Connection]:
    """One store per backend for the module; each test empties the deal tables."""
    with contextlib.ExitStack() as stack:
        where: Path | str = tmp_path_factory.mktemp("flags") / "flags.duckdb"
        if request.param == "postgres":
            where = stack.enter_context(
                fresh_database(request.getfixturevalue("pg_server"))
            )
        yield from _seeded(where)


def _seeded(where: Path | str) -> Iterator[Connection]:
    init_database(where)
    conn = connect(where)
    conn.execute("INSERT INTO account_groups VALUES ('demo', 'DEMO', 'USD', 100)")
    conn.execute("INSERT INTO customers (id, email) VALUES (1, 'a@x'), (2, 'b@x')")
    for account, customer in OWNERS.items():
        conn.execute(
            "INSERT INTO trading_accounts (account_id, customer_id, account_group, "
            "currency) VALUES (?, ?, 'demo', 'USD')",
            [account, customer],
        )
    yield conn
    conn.close()


def _empty(conn: Connection) -> None:
    conn.execute("DELETE FROM flags")
    conn.execute("DELETE FROM deal_opens")


def _store_flags(conn: Connection) -> pl.DataFrame:
    order = ", ".join(FLAGS_ORDER)
    frame = query_frame(conn, f"SELECT * FROM flags ORDER BY {order}")  # noqa: S608
    if frame.height == 0:  # PostgreSQL's rows carry no types: none, no dtypes
        return pl.DataFrame(schema=FLAGS_SCHEMA)
    return frame.with_columns(
        pl.col("customer_id").cast(pl.String),
        pl.col("ts_1").dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
        pl.col("ts_2").dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
    ).select(pl.col(name).cast(dtype) for name, dtype in FLAGS_SCHEMA.items())


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    deals=in_deals(),
    window=st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.5, 60.0, 1e300])),
    cuts=st.lists(st.integers(0, 40), max_size=5),
    seed=st.integers(0, 2**32),
)
def test_any_batching_and_order_give_the_reference_flags(
    store: Connection,
    deals: list[Deal],
    window: float | None,
    cuts: list[int],
    seed: int,
) -> None:
    customers = {a: str(c) for a, c in OWNERS.items()}
    expected = reference_flags(deals, customers, window)
    polars_flags = hedge_flags(to_frame(deals), customers, window)
    assert as_rows(polars_flags) == expected

    _empty(store)
    conn = store
    order = deals[:]
    random.Random(seed).shuffle(order)
    bounds = sorted({0, len(order), *(min(c, len(order)) for c in cuts)})
    batches = [order[a:b] for a, b in itertools.pairwise(bounds)]
    new = 0
    for index, batch in enumerate(batches):
        table = to_frame(batch).to_arrow()
        new += record_deal_opens(conn, table, window)
        if index == 0:  # a replayed batch changes nothing
            assert record_deal_opens(conn, table, window) == 0
    stored = _store_flags(conn)
    assert new == stored.height
    assert stored.equals(polars_flags)
    recorded = conn.execute("SELECT count(*) FROM deal_opens").fetchall()
    assert recorded == [(len(deals),)]


def test_an_account_without_an_owner_is_recorded_and_never_pairs(
    store: Connection,
) -> None:
    _empty(store)
    conn = store
    ts = datetime(2026, 1, 5, 10, tzinfo=UTC)
    frame = pl.DataFrame(
        {
            "account_id": [1, 5, 2],
            "deal_id": [1, 1, 1],
            "ts": [ts, ts, ts + timedelta(seconds=30)],
            "symbol": ["EURUSD"] * 3,
            "side": ["buy", "sell", "sell"],
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    # In the caller's transaction, as the sink's flush calls it.
    with transaction(conn):
        assert record_deal_opens(conn, frame.to_arrow(), 60) == 1
    owners = conn.execute(
        "SELECT account_id, customer_id FROM deal_opens ORDER BY account_id"
    ).fetchall()
    assert owners == [(1, 1), (2, 1), (5, None)]
    view = query_frame(conn, "SELECT * FROM risk_flags_by_customer_day")
    assert view.to_dicts() == [
        {
            "customer_id": 1,
            "day": ts.date(),
            "flags": 1,
            "symbols": 1,
            "accounts": 2,
            "min_gap_seconds": 30.0,
            "max_gap_seconds": 30.0,
        }
    ]
    with pytest.raises(ValueError, match="hedge_window_seconds"):
        record_deal_opens(conn, frame.to_arrow(), -1)
    with pytest.raises(ValueError, match="missing column"):
        record_deal_opens(conn, frame.drop("side").to_arrow(), 60)
