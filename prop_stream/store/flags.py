"""Hedge flags in the store: the processed ``in`` deals and the pairs they form.

The engine judges each account alone; a hedge pairs two accounts of one customer,
which may sit on different Kafka partitions, in different batches or in different
processes. So the join runs here, in the store every evaluator commits to, in the
transaction of the batch that brings a deal (docs/store.md, "Hedge flags"):

1. the batch's processed ``in`` deals go into ``deal_opens`` with the account's
   ``customer_id`` (from ``trading_accounts``);
2. one set-based ``INSERT ... SELECT`` pairs each new deal with every recorded deal
   (the batch's own included) and inserts the new pairs into ``flags``, ``ON
   CONFLICT DO NOTHING``.

A pair is written by the batch that records the later-arriving of its two deals,
whichever that is; a pair found twice (both deals in one batch, or a replayed
batch) is one row. The flags are therefore a function of the set of recorded
deals: the same whatever the batching and the order of arrival.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

import polars as pl
import pyarrow as pa

from prop_stream.rules import window_limit_us
from prop_stream.store.db import Connection, frame_table, transaction
from prop_stream.store.pg import PgConnection

#: The columns of the engine's ``deal_opens`` this reads (others are ignored).
DEAL_OPENS_COLUMNS: Final = ("account_id", "deal_id", "ts", "symbol", "side")
_BATCH_VIEW: Final = "_deal_opens_batch"
_US_PER_SECOND: Final = 1_000_000
#: The widest window bounded per deal on PostgreSQL: 1,000 years keeps ``ts +/-
#: window`` inside PostgreSQL's range (4713 BC to 294276 AD) for any datetime.
_ROW_WINDOW_MAX_US: Final = 1_000 * 366 * 86_400 * _US_PER_SECOND

_INSERT_OPENS: Final = f"""
    INSERT INTO deal_opens (account_id, deal_id, customer_id, symbol, side, ts)
    SELECT DISTINCT ON (b.account_id, b.deal_id)
        b.account_id, b.deal_id, a.customer_id, b.symbol, b.side, b.ts
    FROM {_BATCH_VIEW} AS b
    LEFT JOIN trading_accounts AS a ON a.account_id = b.account_id
    ORDER BY b.account_id, b.deal_id
    ON CONFLICT (account_id, deal_id) DO NOTHING
"""  # noqa: S608 - a constant view name

# ``n`` are the batch's deals as recorded (the first row of a key wins, as in
# deal_opens), ``o`` every recorded deal within the window of the batch's time
# span. Opposite sides make each unordered pair appear twice when both deals are
# new (n buy/o sell and n sell/o buy): ON CONFLICT keeps one. ``$2``/``$3`` are
# constants, so DuckDB prunes deal_opens' row groups by their ts zone maps instead
# of scanning the whole table (the batch's own deals lie in the same span).
_INSERT_FLAGS: Final = """
    INSERT INTO flags (
        customer_id, symbol,
        account_id_1, deal_id_1, ts_1, side_1,
        account_id_2, deal_id_2, ts_2, side_2,
        gap_seconds
    )
    WITH {ctes}
    pairs AS (
        SELECT
            n.customer_id,
            n.symbol,
            n.account_id < o.account_id AS n_first,
            n.account_id AS a_n, n.deal_id AS d_n, n.ts AS t_n, n.side AS s_n,
            o.account_id AS a_o, o.deal_id AS d_o, o.ts AS t_o, o.side AS s_o,
            abs({epoch_us_n} - {epoch_us_o}) AS gap_us
        FROM n
        JOIN {partners} AS o
            ON o.customer_id = n.customer_id
            AND o.symbol = n.symbol
            AND o.side <> n.side
            AND o.account_id <> n.account_id
            {row_window}
    )
    SELECT
        customer_id, symbol,
        CASE WHEN n_first THEN a_n ELSE a_o END,
        CASE WHEN n_first THEN d_n ELSE d_o END,
        CASE WHEN n_first THEN t_n ELSE t_o END,
        CASE WHEN n_first THEN s_n ELSE s_o END,
        CASE WHEN n_first THEN a_o ELSE a_n END,
        CASE WHEN n_first THEN d_o ELSE d_n END,
        CASE WHEN n_first THEN t_o ELSE t_n END,
        CASE WHEN n_first THEN s_o ELSE s_n END,
        gap_us / 1000000.0
    FROM pairs
    WHERE gap_us <= $1
    ON CONFLICT DO NOTHING
    RETURNING 1
"""


# Where the dialects differ. DuckDB: ``near`` (the recorded deals in the batch's
# span, pruned by ts zone maps), its SEMI JOIN and epoch_us. PostgreSQL: EXISTS,
# an exact epoch (extract answers NUMERIC since 14), and a join order that cannot
# go quadratic. Its plans once joined ``near`` with itself before keeping the
# batch's deals (psycopg prepares a statement run five times and PostgreSQL then
# plans it generically, guessing a few rows for ``ts BETWEEN $2 AND $3``): every
# recorded pair, each batch, ~0.9 s at 2,000 deals (docs/benchmarks.md). So ``n``
# is MATERIALIZED (a fence: the batch's deals first) and each partner is found
# through migration 7's index on (customer_id, symbol, ts) by a sargable range
# around its deal's ts ($4, an interval; {row_window}).
_DUCKDB: Final = {
    "ctes": """near AS (
        SELECT * FROM deal_opens
        WHERE ts BETWEEN $2 AND $3 AND customer_id IS NOT NULL
    ),
    n AS (
        SELECT d.*
        FROM near AS d
        SEMI JOIN {batch} AS b
            ON b.account_id = d.account_id AND b.deal_id = d.deal_id
    ),""".replace("{batch}", _BATCH_VIEW),
    "partners": "near",
    "row_window": "",
    "semi_join": f"SEMI JOIN {_BATCH_VIEW} AS b "
    "ON b.account_id = d.account_id AND b.deal_id = d.deal_id",
    "epoch_us_n": "epoch_us(n.ts)",
    "epoch_us_o": "epoch_us(o.ts)",
}
_POSTGRES: Final = {
    "ctes": """n AS MATERIALIZED (
        SELECT d.*
        FROM deal_opens AS d
        WHERE d.customer_id IS NOT NULL AND EXISTS (
            SELECT 1 FROM {batch} AS b
            WHERE b.account_id = d.account_id AND b.deal_id = d.deal_id
        )
    ),""".replace("{batch}", _BATCH_VIEW),
    "partners": "deal_opens",
    "row_window": "AND o.ts BETWEEN $2 AND $3",
    "semi_join": f"WHERE EXISTS (SELECT 1 FROM {_BATCH_VIEW} AS b "  # noqa: S608 - constant
    "WHERE b.account_id = d.account_id AND b.deal_id = d.deal_id)",
    "epoch_us_n": "CAST(extract(epoch FROM n.ts) * 1000000 AS BIGINT)",
    "epoch_us_o": "CAST(extract(epoch FROM o.ts) * 1000000 AS BIGINT)",
}


def record_deal_opens(
    conn: Connection,
    deal_opens: pa.Table,
    hedge_window_seconds: float | None,
) -> int:
    """Record a batch's processed ``in`` deals and insert the hedge flags they form.

    Call it inside the batch's transaction (the sink's flush), after the deals'
    accounts exist in ``trading_accounts`` (an account that doesn't is recorded
    without a customer and never pairs).

    Args:
        conn: The store, in the batch's transaction.
        deal_opens: The engine's ``BatchResult.deal_opens``: ``account_id, deal_id,
            ts, symbol, side`` (a deal already recorded is skipped).
        hedge_window_seconds: The firm-wide window
            (``PROP_STREAM_HEDGE_WINDOW_SECONDS``); None records the deals but
            pairs nothing.

    Returns:
        The number of new flags.

    Raises:
        ValueError: The window is negative or not finite, or a column is missing.
    """
    limit = (
        None if hedge_window_seconds is None else window_limit_us(hedge_window_seconds)
    )
    missing = [c for c in DEAL_OPENS_COLUMNS if c not in deal_opens.column_names]
    if missing:
        raise ValueError(f"deal_opens: missing column(s): {', '.join(missing)}")
    if deal_opens.num_rows == 0:
        return 0
    batch = deal_opens.select(list(DEAL_OPENS_COLUMNS))
    if not isinstance(conn, PgConnection):
        conn.register(_BATCH_VIEW, batch)
        try:
            return _record(conn, _DUCKDB, limit)
        finally:
            conn.unregister(_BATCH_VIEW)
    frame = pl.from_arrow(batch)
    assert isinstance(frame, pl.DataFrame)  # noqa: S101 - from_arrow of a Table
    if conn.in_transaction:
        with frame_table(conn, _BATCH_VIEW, frame):
            return _record(conn, _POSTGRES, limit)
    # A caller outside a transaction (a test, a one-off): PostgreSQL's batch
    # table lives for one transaction, so make one.
    with transaction(conn), frame_table(conn, _BATCH_VIEW, frame):
        return _record(conn, _POSTGRES, limit)


def _record(conn: Connection, dialect: dict[str, str], limit: int | None) -> int:
    """Both statements, the batch's deals queryable as ``_BATCH_VIEW``."""
    conn.execute(_INSERT_OPENS)
    if limit is None:
        return 0
    # The span of the batch's deals as recorded (a replayed deal keeps its
    # first ts), widened by the window: every partner lies within it.
    span = conn.execute(
        "SELECT min(d.ts), max(d.ts) FROM deal_opens AS d "  # noqa: S608 - constants
        + dialect["semi_join"]
    ).fetchall()
    lo, hi = span[0]
    if lo is None:
        return 0
    params: list[object] = [limit, _shift(lo, -limit), _shift(hi, limit)]
    if dialect is _POSTGRES and limit <= _ROW_WINDOW_MAX_US:
        # The per-deal range migration 7's index serves; it admits exactly the
        # gaps the exact test below admits. A wider window goes without it
        # (``n.ts +/- $4`` could overflow PostgreSQL's timestamps): the span
        # ($2, $3) and the exact test give the same pairs, only more slowly.
        dialect = {
            **dialect,
            "row_window": dialect["row_window"]
            + " AND o.ts BETWEEN n.ts - $4 AND n.ts + $4",
        }
        params.append(timedelta(microseconds=limit))
    # RETURNING yields the rows actually inserted (not those ON CONFLICT
    # skipped); fetching them all also completes the statement.
    return len(conn.execute(_spelled(_INSERT_FLAGS, dialect), params).fetchall())


def _spelled(template: str, dialect: dict[str, str]) -> str:
    for key, text in dialect.items():
        template = template.replace("{" + key + "}", text)
    return template


def _shift(ts: datetime, micros: int) -> datetime:
    """``ts`` moved by ``micros``, clamped to the datetime range (huge windows)."""
    try:
        return ts + timedelta(microseconds=micros)
    except OverflowError:
        edge = datetime.min if micros < 0 else datetime.max
        return edge.replace(tzinfo=UTC)
