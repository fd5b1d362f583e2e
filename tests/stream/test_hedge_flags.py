"""The hedge join of the backtest (polars) against the plain-Python reference.

``prop_stream.backtest.flags.hedge_flags`` must equal
``tests/reference_deals.hedge_flags`` on any set of processed ``in`` deals, in any
order, with deals repeated, at any window (0, fractions of a microsecond, huge).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference_deals import Deal, FlagRow
from reference_deals import hedge_flags as reference_flags

from prop_stream.backtest.flags import FLAGS_SCHEMA, hedge_flags
from prop_stream.rules import window_limit_us

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BASE_US = 1_767_607_200_000_000  # 2026-01-05T10:00:00Z


def to_frame(deals: list[Deal]) -> pl.DataFrame:
    """Deals as the engine's ``deal_opens`` columns."""
    return pl.DataFrame(
        {
            "account_id": [d.account_id for d in deals],
            "deal_id": [d.deal_id for d in deals],
            "ts": [EPOCH + timedelta(microseconds=d.ts) for d in deals],
            "symbol": [d.symbol for d in deals],
            "side": [d.side for d in deals],
        },
        schema={
            "account_id": pl.Int64(),
            "deal_id": pl.Int64(),
            "ts": pl.Datetime("us", "UTC"),
            "symbol": pl.String(),
            "side": pl.String(),
        },
    )


def as_rows(frame: pl.DataFrame) -> list[FlagRow]:
    """Flags frame rows as the reference's rows (timestamps in microseconds)."""
    assert frame.schema == FLAGS_SCHEMA
    rows = []
    for row in frame.iter_rows(named=True):
        values: dict[str, Any] = dict(row)
        for key in ("ts_1", "ts_2"):
            delta = values[key] - EPOCH
            values[key] = (
                delta.days * 86_400 + delta.seconds
            ) * 1_000_000 + delta.microseconds
        rows.append(FlagRow(**values))
    return rows


@st.composite
def in_deals(draw: st.DrawFn) -> list[Deal]:
    """A handful of ``in`` deals on few accounts, symbols and nearby instants."""
    count = draw(st.integers(0, 30))
    deals = []
    ids: dict[int, int] = {}
    for _ in range(count):
        account = draw(st.sampled_from([1, 2, 3, 4, 5]))
        ids[account] = ids.get(account, 0) + 1
        deals.append(
            Deal(
                account_id=account,
                ts=BASE_US + draw(st.integers(-3_000_000, 3_000_000)),
                deal_id=ids[account],
                position_id=ids[account],
                symbol=draw(st.sampled_from(["EURUSD", "XAUUSD"])),
                side=draw(st.sampled_from(["buy", "sell"])),
                volume=1.0,
                price=1.0,
                entry="in",
            )
        )
    return deals


customer_maps = st.fixed_dictionaries(
    {},
    optional={a: st.sampled_from(["alice", "bob"]) for a in (1, 2, 3, 4, 5)},
)
windows = st.one_of(
    st.none(),
    st.sampled_from([0.0, 0.5, 1.0, 1.0000005, 2.5, 60.0, 1e300]),
    st.floats(0, 4, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(
    deals=in_deals(),
    customers=customer_maps,
    window=windows,
    seed=st.integers(0, 2**32),
)
def test_polars_join_equals_reference(
    deals: list[Deal],
    customers: dict[int, str],
    window: float | None,
    seed: int,
) -> None:
    expected = reference_flags(deals, customers, window)
    # Any order, and each deal possibly twice (a replayed batch), changes nothing.
    shuffled = deals + random.Random(seed).sample(deals, len(deals) // 2)
    random.Random(seed + 1).shuffle(shuffled)
    got = as_rows(hedge_flags(to_frame(shuffled), customers, window))
    assert got == expected
    assert all(row.account_id_1 < row.account_id_2 for row in got)


def test_boundaries_of_the_window() -> None:
    def deal(account: int, ts: int, side: str) -> Deal:
        return Deal(account, ts, 1, 1, "EURUSD", side, 1.0, 1.0, "in")

    customers = {1: "c", 2: "c"}
    exactly = [deal(1, BASE_US, "buy"), deal(2, BASE_US + 60_000_000, "sell")]
    beyond = [deal(1, BASE_US, "buy"), deal(2, BASE_US + 60_000_001, "sell")]
    frame = hedge_flags(to_frame(exactly), customers, 60)
    assert frame.height == 1
    assert frame.row(0, named=True)["gap_seconds"] == 60.0
    assert hedge_flags(to_frame(beyond), customers, 60).height == 0
    # Same side, same account or another customer never pair.
    same_side = [deal(1, BASE_US, "buy"), deal(2, BASE_US, "buy")]
    assert hedge_flags(to_frame(same_side), customers, 60).height == 0
    assert hedge_flags(to_frame(exactly), {1: "c", 2: "d"}, 60).height == 0
    assert hedge_flags(to_frame(exactly), customers, None).height == 0
    # Window 0: only the same microsecond.
    same_instant = [deal(1, BASE_US, "buy"), deal(2, BASE_US, "sell")]
    assert hedge_flags(to_frame(same_instant), customers, 0).height == 1


@pytest.mark.parametrize("window", [-1.0, float("nan"), float("inf")])
def test_a_bad_window_is_refused(window: float) -> None:
    with pytest.raises(ValueError, match="hedge_window_seconds"):
        window_limit_us(window)
    with pytest.raises(ValueError, match="hedge_window_seconds"):
        hedge_flags(to_frame([]), {1: "c"}, window)
