"""Hedge flags of a backtest: the cross-account join of processed ``in`` deals.

A hedge flag pairs two processed ``in`` deals of two different accounts of one
customer, on one symbol, of opposite sides, at most ``hedge_window_seconds`` apart
(``rules.md``, "Cross-account hedging"). The join runs after the engine, on the
``deal_opens`` every ``process`` call returns, so it sees each account's deals
whatever the batching, and the result depends on nothing but the set of deals.

The join is a windowed equi-join: time is cut into buckets one window wide, so
the partner of a deal is in its own bucket or a neighbour. Each buy deal is joined
with the sell deals of the same (customer, symbol) in the three buckets around
its own, then the exact gap is checked. The work is linear in the deals plus the
candidate pairs (at most three buckets' worth per deal), never the square of a
customer's deals.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import polars as pl

from prop_stream.rules import window_limit_us

_UTC_US: Final = pl.Datetime("us", "UTC")
_US_PER_SECOND: Final = 1_000_000
# Buckets wider than this are all one bucket in practice (about 146 000 years).
_MAX_BUCKET_US: Final = 2**62

#: The ``flags`` output (``interfaces.md`` section 5), one row per pair.
FLAGS_SCHEMA: Final = pl.Schema(
    {
        "customer_id": pl.String(),
        "symbol": pl.String(),
        "account_id_1": pl.Int64(),
        "deal_id_1": pl.Int64(),
        "ts_1": _UTC_US,
        "side_1": pl.String(),
        "account_id_2": pl.Int64(),
        "deal_id_2": pl.Int64(),
        "ts_2": _UTC_US,
        "side_2": pl.String(),
        "gap_seconds": pl.Float64(),
    }
)
#: The order of the ``flags`` rows.
FLAGS_ORDER: Final = (
    "customer_id",
    "symbol",
    "account_id_1",
    "deal_id_1",
    "account_id_2",
    "deal_id_2",
)
#: The columns of the engine's ``deal_opens`` the join reads.
DEAL_OPENS_COLUMNS: Final = ("account_id", "deal_id", "ts", "symbol", "side")


def hedge_flags(
    deal_opens: pl.DataFrame | pl.LazyFrame,
    customers: Mapping[int, str],
    window_seconds: float | None,
) -> pl.DataFrame:
    """Every hedge flag among processed ``in`` deals, in :data:`FLAGS_ORDER`.

    Args:
        deal_opens: Processed ``in`` deals with :data:`DEAL_OPENS_COLUMNS` (the
            engine's ``deal_opens``, concatenated in any order; a deal given twice
            counts once).
        customers: ``customer_id`` per account; accounts without one never pair.
        window_seconds: The window; None turns flags off (no rows).

    Returns:
        The flags (:data:`FLAGS_SCHEMA`), ``account_id_1 < account_id_2``.

    Raises:
        ValueError: The window is negative or not finite.
    """
    if window_seconds is None or not customers:
        if window_seconds is not None:
            window_limit_us(window_seconds)  # still refuse a bad window
        return pl.DataFrame(schema=FLAGS_SCHEMA)
    limit = window_limit_us(window_seconds)
    bucket_us = max(1, min(limit, _MAX_BUCKET_US))
    owners = pl.LazyFrame(
        {
            "account_id": list(customers),
            "customer_id": list(customers.values()),
        },
        schema={"account_id": pl.Int64(), "customer_id": pl.String()},
    )
    opens = (
        deal_opens.lazy()
        .select(
            pl.col("account_id").cast(pl.Int64),
            pl.col("deal_id").cast(pl.Int64),
            pl.col("ts").cast(_UTC_US),
            pl.col("symbol").cast(pl.String),
            pl.col("side").cast(pl.String),
        )
        .unique(subset=["account_id", "deal_id"], keep="first")
        .join(owners, on="account_id", how="inner")
        .with_columns(
            _us=pl.col("ts").dt.epoch("us"),
        )
        .with_columns(_bucket=pl.col("_us") // bucket_us)
    )
    buys = opens.filter(pl.col("side") == "buy")
    # Each sell deal is offered to the buckets before, at and after its own; a
    # buy deal has one bucket, so each (buy, sell) pair meets at most once.
    sells = (
        opens.filter(pl.col("side") == "sell")
        .with_columns(_bucket=pl.concat_list(pl.col("_bucket") + d for d in (-1, 0, 1)))
        .explode("_bucket")
    )
    pairs = (
        buys.join(
            sells,
            on=["customer_id", "symbol", "_bucket"],
            how="inner",
            suffix="_s",
        )
        .filter(pl.col("account_id") != pl.col("account_id_s"))
        .with_columns(_gap=(pl.col("_us") - pl.col("_us_s")).abs())
        .filter(pl.col("_gap") <= limit)
    )
    first = pl.col("account_id") < pl.col("account_id_s")

    def pick(buy: str, sell: str, one: bool) -> pl.Expr:
        # The deal of the smaller account is deal 1, whichever side it is.
        return (
            pl.when(first if one else ~first).then(pl.col(buy)).otherwise(pl.col(sell))
        )

    flags = pairs.select(
        pl.col("customer_id"),
        pl.col("symbol"),
        pick("account_id", "account_id_s", True).alias("account_id_1"),
        pick("deal_id", "deal_id_s", True).alias("deal_id_1"),
        pick("ts", "ts_s", True).alias("ts_1"),
        pick("side", "side_s", True).alias("side_1"),
        pick("account_id", "account_id_s", False).alias("account_id_2"),
        pick("deal_id", "deal_id_s", False).alias("deal_id_2"),
        pick("ts", "ts_s", False).alias("ts_2"),
        pick("side", "side_s", False).alias("side_2"),
        pl.col("_gap"),
    ).sort(list(FLAGS_ORDER))
    frame = flags.collect()
    # Divided in numpy: polars turns a division by a constant into a product with
    # its reciprocal, which is off by an ulp (43 us gave 4.2999999999999995e-05);
    # the spec's gap is |ts1 - ts2| in seconds, correctly rounded.
    seconds = frame["_gap"].cast(pl.Float64).to_numpy() / float(_US_PER_SECOND)
    return frame.with_columns(gap_seconds=pl.Series(seconds, dtype=pl.Float64)).select(
        pl.col(name).cast(dtype) for name, dtype in FLAGS_SCHEMA.items()
    )
