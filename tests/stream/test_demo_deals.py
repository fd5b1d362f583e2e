"""The demo source's deals: plausible, deterministic, regenerated on a replay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl

from prop_stream.evaluator import DemoConfig, DemoSource
from prop_stream.rules import PhaseSpec

START = datetime(2026, 1, 2, 12, tzinfo=UTC)  # a Friday: the swing holds see weekends
#: One tick a demo minute per account, ten demo minutes per batch.
DEMO = DemoConfig(
    seed=5, rate=3 / 60, batch_ms=10 * 60_000, realtime=False, epoch=START
)
BATCHES = 700  # about five demo days


def _spec(account: int, started_at: datetime = START) -> PhaseSpec:
    return PhaseSpec(
        account_id=account,
        challenge_id="c",
        phase_index=0,
        started_at=started_at,
        rules={"initial_balance": 100_000},
    )


def _source(accounts: tuple[int, ...] = (1, 2, 3)) -> DemoSource:
    source = DemoSource(DEMO)
    for account in accounts:
        source.track(_spec(account))
    return source


def _polled(source: DemoSource, n: int) -> list[tuple[pl.DataFrame, pl.DataFrame]]:
    out = []
    for _ in range(n):
        ticks, _ = source.poll(10**6, 0.1)
        deals = source.deals()
        out.append((ticks, deals if deals is not None else pl.DataFrame()))
    return out


def test_demo_deals_replay_exactly_after_seek() -> None:
    source = _source()
    polled = _polled(source, 2)
    position = source.position()
    polled += _polled(source, 30)
    again = _source((3, 2, 1))
    again.seek(position)
    replay = _polled(again, 30)
    for (ticks, deals), (ticks2, deals2) in zip(polled[2:], replay, strict=True):
        assert ticks2.equals(ticks)
        assert deals2.equals(deals)
    assert sum(d.height for _, d in polled) > 0
    # deal_rows regenerates the deals without moving the source.
    rows = _source().deal_rows(range(32))
    assert rows.equals(
        pl.concat([d.drop("before_tick") for _, d in polled if d.height])
    )


def test_demo_deals_come_before_the_ticks_at_their_time() -> None:
    for ticks, deals in _polled(_source(), 40):
        for ts, before in deals.select("ts", "before_tick").iter_rows():
            assert before == ticks.filter(pl.col("ts") < ts).height


def test_demo_deals_of_an_account_ignore_the_others() -> None:
    alone = DemoSource(DEMO)
    alone.track(_spec(2))
    mine = _source((1, 2, 3)).deal_rows(range(50)).filter(pl.col("account_id") == 2)
    assert mine.equals(alone.deal_rows(range(50)))


def test_demo_deals_open_and_close_positions_plausibly() -> None:
    late = START + timedelta(hours=3, minutes=7)
    source = DemoSource(DEMO)
    for account, started in ((1, START), (2, START), (3, late)):
        source.track(_spec(account, started))
    deals = source.deal_rows(range(BATCHES))
    assert deals.filter(pl.col("account_id") == 3)["ts"].min() >= late  # type: ignore[operator]
    assert deals["ts"].is_sorted()
    assert deals.select(pl.struct("account_id", "deal_id").is_unique().all()).item()
    ins = deals.filter(pl.col("entry") == "in")
    outs = deals.filter(pl.col("entry") == "out")
    assert set(deals["side"]) == {"buy", "sell"}
    assert deals["volume"].min() >= 0.1  # type: ignore[operator]
    assert (deals["price"] > 0).all()
    # Every close has its open earlier, same position, same lots, symbol and side.
    pairs = outs.join(ins, on=["account_id", "position_id"], suffix="_in")
    assert pairs.height == outs.height
    assert (pairs["ts_in"] < pairs["ts"]).all()
    assert (pairs["volume"] == pairs["volume_in"]).all()
    assert (pairs["symbol"] == pairs["symbol_in"]).all()
    assert (pairs["side"] == pairs["side_in"]).all()
    held = (pairs["ts"] - pairs["ts_in"]).dt.total_seconds()
    assert (held <= 20).sum() >= 3  # a few scalps
    assert (held >= 3 * 86_400).sum() >= 1  # a swing position held over days
    # Some swing position was open over the Friday 22:00 UTC weekend close.
    weekend = datetime(2026, 1, 2, 22, tzinfo=UTC)
    swings = pairs.filter(held >= 86_400)
    assert swings.filter(
        (pl.col("ts_in") <= weekend + timedelta(days=7))
        & (pl.col("ts") > weekend + timedelta(days=7))
        | (pl.col("ts_in") <= weekend) & (pl.col("ts") > weekend)
    ).height


def test_demo_deals_hold_opposite_opens_of_two_accounts_within_a_minute() -> None:
    ins = _source((1, 2)).deal_rows(range(200)).filter(pl.col("entry") == "in")
    hedges = ins.join(ins, on="symbol", suffix="_2").filter(
        (pl.col("account_id") < pl.col("account_id_2"))
        & (pl.col("side") != pl.col("side_2"))
        & ((pl.col("ts") - pl.col("ts_2")).abs() <= timedelta(seconds=60))
    )
    assert hedges.height >= 3


def test_demo_without_deals_gives_none() -> None:
    source = DemoSource(
        DemoConfig(
            seed=5, rate=1, batch_ms=600_000, realtime=False, epoch=START, deals=False
        )
    )
    source.track(_spec(1))
    ticks, _ = source.poll(10**6, 0.1)
    assert ticks.height
    assert source.deals() is None
