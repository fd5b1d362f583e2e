"""``prop-stream produce --deals``: ticks and deals in one order, without a broker.

The messages ``produce`` would send are captured from a stand-in producer and
decoded back with the service's decoder: the same events, each account's in the
backtest's order (``ts``, a deal before a tick at an equal ``ts``, file order).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from tqdm import tqdm

from prop_stream.kafka.decode import DEAL_FRAME_SCHEMA, decode_messages
from prop_stream.kafka.exceptions import ProduceError
from prop_stream.kafka.produce import (
    _Failures,
    _send_batches,
    _send_json,
    merge_events,
    read_deal_file,
    read_tick_file,
)
from prop_stream.rules import TICK_SCHEMA

T0 = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)


class _Sent:
    def add_errback(self, callback: Any) -> _Sent:
        return self


class FakeProducer:
    """Keeps what ``send`` got, per partition (JSON: one partition)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes | None, bytes, list[tuple[str, bytes]] | None]] = []

    def send(
        self,
        topic: str,
        *,
        value: bytes,
        key: bytes | None = None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> _Sent:
        self.sent.append((key, value, headers))
        return _Sent()


def _files(tmp_path: Path) -> tuple[Path, Path]:
    ticks = pl.DataFrame(
        {
            "account_id": [1, 2, 1, 1, 2],
            "ts": [T0 + timedelta(seconds=s) for s in (0, 0, 5, 5, 9)],
            "equity": [100.0, 200.0, 101.0, 102.0, 201.0],
            "balance": [100.0, 200.0, 100.0, 100.0, 200.0],
        },
        schema=TICK_SCHEMA,
    )
    deals = pl.DataFrame(
        {
            "account_id": [1, 2, 1],
            "ts": [T0 + timedelta(seconds=s) for s in (5, 9, 0)],
            "deal_id": [11, 21, 10],
            "position_id": [1, 2, 1],
            "symbol": ["EURUSD", "EURUSD", "EURUSD"],
            "side": ["buy", "sell", "buy"],
            "volume": [1.0, 0.5, 1.0],
            "price": [1.08, 1.09, 1.07],
            "entry": ["out", "in", "in"],
        },
        schema=DEAL_FRAME_SCHEMA,
    )
    tick_path, deal_path = tmp_path / "ticks.parquet", tmp_path / "deals.csv"
    ticks.write_parquet(tick_path)
    deals.write_csv(deal_path)
    return tick_path, deal_path


def _order(frame: pl.DataFrame) -> list[tuple[int, str]]:
    """Each event as (account, what) in frame order."""
    return [
        (int(a), f"d{d}" if t == "deal" else f"t{e}")
        for t, a, d, e in frame.select(
            "type", "account_id", "deal_id", "equity"
        ).iter_rows()
    ]


def test_merge_puts_a_deal_before_a_tick_at_an_equal_ts(tmp_path: Path) -> None:
    tick_path, deal_path = _files(tmp_path)
    events = merge_events(read_tick_file(tick_path), read_deal_file(deal_path))
    assert _order(events) == [
        (1, "d10"),
        (1, "t100.0"),
        (2, "t200.0"),
        (1, "d11"),
        (1, "t101.0"),
        (1, "t102.0"),
        (2, "d21"),
        (2, "t201.0"),
    ]


@pytest.mark.parametrize("encoding", ["json", "batch"])
def test_sent_messages_decode_to_the_same_events(tmp_path: Path, encoding: str) -> None:
    tick_path, deal_path = _files(tmp_path)
    events = merge_events(read_tick_file(tick_path), read_deal_file(deal_path))
    producer = FakeProducer()
    bar = tqdm(disable=True)
    if encoding == "json":
        _send_json(producer, "t", events, bar, _Failures())
    else:
        _send_batches(producer, "t", events, 1, 3, bar, _Failures())
    values = [value for _, value, _ in producer.sent]
    encodings = [None if h is None else "arrow-ipc-v1" for _, _, h in producer.sent]
    if encoding == "json":
        assert [k for k, _, _ in producer.sent] == [
            str(a).encode() for a in events["account_id"]
        ]
    decoded = decode_messages(values, encodings)
    assert not decoded.rejections
    assert decoded.ticks.drop("message").equals(
        events.filter(pl.col("type").is_null()).select(list(TICK_SCHEMA))
    )
    deals = events.filter(pl.col("type") == "deal").select(list(DEAL_FRAME_SCHEMA))
    assert decoded.deals.select(list(DEAL_FRAME_SCHEMA)).equals(deals)
    # Delivery order: d10 before any tick, d11 after two, d21 after four.
    assert decoded.deals["before_tick"].to_list() == [0, 2, 4]


def test_a_deal_file_missing_a_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deals.csv"
    pl.DataFrame({"account_id": [1], "ts": ["2026-01-05T09:30:00Z"]}).write_csv(path)
    with pytest.raises(ProduceError, match="missing column"):
        read_deal_file(path)
    bad = tmp_path / "deals2.csv"
    bad.write_text(
        "account_id,ts,deal_id,position_id,symbol,side,volume,price,entry\n"
        "1,soon,1,1,X,buy,1,1,in\n"
    )
    with pytest.raises(ProduceError, match="row 1: ts"):
        read_deal_file(bad)
