"""Decoding Kafka tick messages without a broker."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import polars as pl
import pytest

from prop_stream.kafka import ARROW_ENCODING, Reason, decode_messages, encode_arrow
from prop_stream.kafka.decode import DEAL_FRAME_SCHEMA, JSON_CHUNK, decode_json
from prop_stream.rules import TICK_SCHEMA

GOOD = {"account_id": 1001, "equity": 100_250.5, "balance": 100_000.0}


def _json(**fields: object) -> bytes:
    return orjson.dumps({**GOOD, "ts": "2026-01-05T09:30:00.125Z", **fields})


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"not json", Reason.NOT_JSON),
        (b"", Reason.NOT_JSON),
        (None, Reason.NOT_JSON),
        (b"[1, 2]", Reason.NOT_OBJECT),
        (b'"text"', Reason.NOT_OBJECT),
        (orjson.dumps({"account_id": 1001, "ts": 1}), Reason.MISSING_FIELD),
        (_json(equity=None), Reason.MISSING_FIELD),
        (_json(equity="1.5"), Reason.MISTYPED_FIELD),
        (_json(account_id=1.5), Reason.MISTYPED_FIELD),
        (_json(account_id="1001"), Reason.MISTYPED_FIELD),
        (
            b'{"account_id": 99999999999999999999, "ts": 1, "equity": 1, "balance": 1}',
            Reason.MISTYPED_FIELD,
        ),
        (_json(ts=True), Reason.BAD_TS),
        (_json(ts=1.5), Reason.BAD_TS),
        (
            b'{"account_id": 1, "ts": 1, "equity": NaN, "balance": 1}',
            Reason.NOT_FINITE,
        ),
        (
            b'{"account_id": 1, "ts": 1, "equity": 1, "balance": -Infinity}',
            Reason.NOT_FINITE,
        ),
        (
            b'{"account_id": 1, "ts": 1, "equity": 1e999, "balance": 1}',
            Reason.NOT_FINITE,
        ),
        (_json(ts="yesterday"), Reason.BAD_TS),
        (_json(ts="2026-13-45T00:00:00Z"), Reason.BAD_TS),
    ],
)
def test_decode_json_rejects_bad_message_with_reason(
    value: bytes | None, reason: Reason
) -> None:
    decoded = decode_messages([_json(), value, _json(ts=1767605400000)])
    assert [r.reason for r in decoded.rejections] == [reason]
    assert decoded.rejections[0].index == 1
    assert decoded.ticks["message"].to_list() == [0, 2]


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-01-05T09:30:00.125Z", datetime(2026, 1, 5, 9, 30, 0, 125_000, UTC)),
        ("2026-01-05T10:30:00+01:00", datetime(2026, 1, 5, 9, 30, tzinfo=UTC)),
        ("2026-01-05T09:30:00", datetime(2026, 1, 5, 9, 30, tzinfo=UTC)),
        (1767605400125, datetime(2026, 1, 5, 9, 30, 0, 125_000, UTC)),
    ],
)
def test_decode_json_reads_every_ts_form(ts: object, expected: datetime) -> None:
    decoded = decode_messages([_json(ts=ts, extra={"ignored": [1]})])
    assert not decoded.rejections
    assert decoded.ticks.drop("message").schema == pl.Schema(TICK_SCHEMA)
    assert decoded.ticks["ts"].to_list() == [expected]


def test_decode_json_one_bad_value_keeps_the_rest_in_order() -> None:
    values = [_json(ts=1767605400000 + i, account_id=i) for i in range(JSON_CHUNK + 10)]
    values[JSON_CHUNK + 3] = b"{broken"
    values[5] = b"\n"
    decoded = decode_json(values)
    assert [r.index for r in decoded.rejections] == [5, JSON_CHUNK + 3]
    ids = decoded.ticks["account_id"].to_list()
    assert ids == [i for i in range(JSON_CHUNK + 10) if i not in (5, JSON_CHUNK + 3)]
    assert decoded.ticks["message"].to_list() == ids


def test_decode_unknown_accounts_are_rejected_when_asked() -> None:
    values = [_json(account_id=1), _json(account_id=2)]
    decoded = decode_messages(values, known_accounts=pl.Series([2]))
    assert [(r.index, r.reason) for r in decoded.rejections] == [
        (0, Reason.UNKNOWN_ACCOUNT)
    ]
    assert decode_messages(values).ticks.height == 2
    assert decoded.unknown_accounts.to_list() == [1]


def test_decode_names_each_unknown_account_once_across_encodings() -> None:
    batch = _ticks(4).with_columns(pl.Series("account_id", [7, 2, 7, 9]))
    decoded = decode_messages(
        [_json(account_id=9), encode_arrow(batch), _json(account_id=2)],
        [None, ARROW_ENCODING, None],
        known_accounts=pl.Series([2]),
    )
    assert decoded.unknown_accounts.to_list() == [7, 9]
    assert decoded.ticks["account_id"].to_list() == [2, 2]
    assert not decode_messages([_json(account_id=2)]).unknown_accounts.len()


def _ticks(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "account_id": list(range(n)),
            "ts": [datetime(2026, 1, 5, 9, 30, i, tzinfo=UTC) for i in range(n)],
            "equity": [float(i) for i in range(n)],
            "balance": [1.0] * n,
        },
        schema=TICK_SCHEMA,
    )


def test_decode_arrow_batch_round_trips() -> None:
    ticks = _ticks(5)
    decoded = decode_messages([encode_arrow(ticks)], [ARROW_ENCODING])
    assert not decoded.rejections
    assert decoded.ticks.drop("message").equals(ticks)


def test_decode_mixed_encodings_keep_message_order() -> None:
    batch = encode_arrow(_ticks(3))
    decoded = decode_messages(
        [_json(account_id=100), batch, _json(account_id=200)],
        [None, ARROW_ENCODING, "json"],
    )
    assert decoded.ticks["account_id"].to_list() == [100, 0, 1, 2, 200]
    assert decoded.ticks["message"].to_list() == [0, 1, 1, 1, 2]


def test_decode_arrow_bad_rows_and_batches_are_rejected() -> None:
    ticks = _ticks(4).with_columns(
        pl.when(pl.col("account_id") == 2)
        .then(float("nan"))
        .otherwise(pl.col("equity"))
        .alias("equity")
    )
    decoded = decode_messages(
        [encode_arrow(ticks), b"\x00junk", b"{}"],
        [ARROW_ENCODING, ARROW_ENCODING, "avro"],
        known_accounts=pl.Series([0, 1, 2]),
    )
    assert decoded.ticks["account_id"].to_list() == [0, 1]
    got = [(r.index, r.reason, r.rows) for r in decoded.rejections]
    assert got == [
        (0, Reason.NOT_FINITE, 1),
        (0, Reason.UNKNOWN_ACCOUNT, 1),
        (1, Reason.BAD_BATCH, 1),
        (2, Reason.UNKNOWN_ENCODING, 1),
    ]
    payload = decoded.rejections[1].payload
    assert payload is not None
    rows = decode_messages([payload], [ARROW_ENCODING]).ticks
    assert rows["account_id"].to_list() == [3]


def test_decode_arrow_missing_column_is_a_bad_batch() -> None:
    value = encode_arrow(_ticks(2)).replace(b"balance", b"balanxe")
    decoded = decode_messages([value], [ARROW_ENCODING])
    assert [r.reason for r in decoded.rejections] == [Reason.BAD_BATCH]


# ------------------------------------------------------------------ future_ts

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)
BOUND = datetime(2026, 1, 5, 12, 5, tzinfo=UTC)  # NOW + a 300 s skew bound


def test_decode_json_rejects_ticks_beyond_the_clock_skew_bound() -> None:
    values = [
        _json(ts="2026-01-05T12:04:59Z"),  # within the bound
        _json(ts="2026-01-11T12:00:00Z"),  # six days ahead: a platform clock bug
        _json(ts=int(BOUND.timestamp() * 1000) + 1),  # 1 ms beyond, epoch ms
        _json(ts="2026-01-05T12:05:00Z"),  # exactly the bound: still judged
        _json(ts="2026-01-05T12:01:00Z"),  # later in the stream, earlier in time
    ]
    decoded = decode_messages(values, not_after=BOUND)
    assert [(r.index, r.reason) for r in decoded.rejections] == [
        (1, Reason.FUTURE_TS),
        (2, Reason.FUTURE_TS),
    ]
    assert decoded.rejections[0].detail == (
        "ts: 2026-01-11T12:00:00Z is after 2026-01-05T12:05:00.000000Z "
        "(the clock-skew bound)"
    )
    assert decoded.ticks["message"].to_list() == [0, 3, 4]
    # Without a bound (PROP_STREAM_MAX_CLOCK_SKEW=0) every tick is judged.
    assert not decode_messages(values).rejections


def test_decode_future_ts_comes_after_the_field_checks() -> None:
    values = [
        _json(ts="2026-02-01T00:00:00Z", equity=None),
        b'{"account_id": 1, "ts": "2026-02-01T00:00:00Z", "equity": NaN, "balance": 1}',
        _json(ts="2026-02-01T00:00:00Z", account_id=7),
    ]
    decoded = decode_messages(
        values, not_after=BOUND, known_accounts=pl.Series([1001], dtype=pl.Int64)
    )
    assert [r.reason for r in decoded.rejections] == [
        Reason.MISSING_FIELD,
        Reason.NOT_FINITE,
        Reason.FUTURE_TS,  # a future tick of an unknown account: future_ts first
    ]


def test_decode_arrow_rejects_only_the_future_rows_of_a_batch() -> None:
    rows = pl.DataFrame(
        {
            "account_id": [1001, 1001, 1001],
            "ts": [NOW, datetime(2026, 1, 11, 12, tzinfo=UTC), NOW],
            "equity": [1.0, 2.0, 3.0],
            "balance": [1.0, 1.0, 1.0],
        }
    )
    decoded = decode_messages(
        [encode_arrow(rows), _json(ts="2026-01-11T12:00:00Z")],
        [ARROW_ENCODING, None],
        not_after=BOUND,
    )
    assert [(r.index, r.reason, r.rows) for r in decoded.rejections] == [
        (0, Reason.FUTURE_TS, 1),
        (1, Reason.FUTURE_TS, 1),
    ]
    payload = decoded.rejections[0].payload
    assert payload is not None
    rejected = pl.read_ipc_stream(payload)
    assert rejected["equity"].to_list() == [2.0]
    assert decoded.ticks["equity"].to_list() == [1.0, 3.0]


def test_decode_future_bound_must_be_aware() -> None:
    with pytest.raises(ValueError, match="aware"):
        decode_json([_json()], not_after=datetime(2026, 1, 5))


# ---------------------------------------------------------------------- deals

DEAL = {
    "type": "deal",
    "account_id": 1001,
    "ts": "2026-01-05T09:30:00.125Z",
    "deal_id": 9,
    "position_id": 4,
    "symbol": "EURUSD",
    "side": "buy",
    "volume": 1.5,
    "price": 1.0843,
    "entry": "in",
}


def _deal(**fields: object) -> bytes:
    doc = {**DEAL, **fields}
    return orjson.dumps({k: v for k, v in doc.items() if v is not _ABSENT})


_ABSENT = object()

#: Every malformed deal and the reason it goes to the DLQ with.
BAD_DEALS = [
    (_deal(side="long"), Reason.BAD_SIDE),
    (_deal(side="BUY"), Reason.BAD_SIDE),
    (_deal(entry="inout"), Reason.BAD_ENTRY),
    (_deal(volume=0), Reason.BAD_VOLUME),
    (_deal(volume=-1.0), Reason.BAD_VOLUME),
    (_deal(volume=0.004), Reason.BAD_VOLUME),  # 0.4 hundredths
    (_deal(volume=0.005), Reason.BAD_VOLUME),  # 0.5 rounds half-even to 0
    (_deal(price=0), Reason.BAD_PRICE),
    (_deal(price=-2.5), Reason.BAD_PRICE),
    (_deal(symbol=""), Reason.BAD_SYMBOL),
    (_deal(symbol=None), Reason.MISSING_FIELD),
    (_deal(symbol=_ABSENT), Reason.MISSING_FIELD),
    (_deal(deal_id=_ABSENT), Reason.MISSING_FIELD),
    (_deal(position_id=None), Reason.MISSING_FIELD),
    (_deal(entry=_ABSENT), Reason.MISSING_FIELD),
    (_deal(account_id=_ABSENT), Reason.MISSING_FIELD),
    (_deal(deal_id=1.5), Reason.MISTYPED_FIELD),
    (_deal(deal_id="9"), Reason.MISTYPED_FIELD),
    (_deal(volume="1.5"), Reason.MISTYPED_FIELD),
    (_deal(volume=True), Reason.MISTYPED_FIELD),
    (_deal(symbol=["EURUSD"]), Reason.MISTYPED_FIELD),
    (_deal(ts="yesterday"), Reason.BAD_TS),
    (_deal(ts=_ABSENT), Reason.MISSING_FIELD),
    (
        _deal().replace(b'"volume":1.5', b'"volume":NaN'),
        Reason.NOT_FINITE,
    ),
    (
        _deal().replace(b'"price":1.0843', b'"price":Infinity'),
        Reason.NOT_FINITE,
    ),
    (_deal().replace(b'"price":1.0843', b'"price":1e999'), Reason.NOT_FINITE),
    (_deal(type="order"), Reason.UNKNOWN_TYPE),
    (_deal(type=5), Reason.UNKNOWN_TYPE),
    (_deal(type=""), Reason.UNKNOWN_TYPE),
]


@pytest.mark.parametrize(("value", "reason"), BAD_DEALS)
def test_decode_json_rejects_malformed_deal_with_reason(
    value: bytes, reason: Reason
) -> None:
    decoded = decode_messages([_json(), value, _deal(deal_id=10)])
    assert [(r.index, r.reason) for r in decoded.rejections] == [(1, reason)]
    assert decoded.ticks["message"].to_list() == [0]
    assert decoded.deals["deal_id"].to_list() == [10]
    assert decoded.deals["message"].to_list() == [2]


@pytest.mark.parametrize(("value", "reason"), BAD_DEALS)
def test_decode_json_slow_path_gives_the_same_reason(
    value: bytes, reason: Reason
) -> None:
    # b"not json" makes polars refuse the chunk: every value is parsed alone.
    decoded = decode_messages([b"not json", value, _deal(deal_id=10)])
    assert [(r.index, r.reason) for r in decoded.rejections] == [
        (0, Reason.NOT_JSON),
        (1, reason),
    ]
    assert decoded.deals["deal_id"].to_list() == [10]


def test_decode_deal_reads_every_column() -> None:
    decoded = decode_messages(
        [_deal(ts=1767605400125), _deal(type="deal", volume=2, price=3, entry="out")]
    )
    assert not decoded.rejections
    assert not decoded.ticks.height
    deals = decoded.deals
    assert deals.drop("message", "before_tick").schema == pl.Schema(DEAL_FRAME_SCHEMA)
    assert deals.row(0, named=True) == {
        "account_id": 1001,
        "ts": datetime(2026, 1, 5, 9, 30, 0, 125_000, UTC),
        "deal_id": 9,
        "position_id": 4,
        "symbol": "EURUSD",
        "side": "buy",
        "volume": 1.5,
        "price": 1.0843,
        "entry": "in",
        "message": 0,
        "before_tick": 0,
    }
    assert deals["volume"].to_list() == [1.5, 2.0]
    assert deals["entry"].to_list() == ["in", "out"]


def test_decode_type_equity_is_a_tick_and_volume_boundary_is_one_hundredth() -> None:
    decoded = decode_messages(
        [_json(type="equity"), _deal(volume=0.006), _deal(volume=0.01)]
    )
    assert not decoded.rejections
    assert decoded.ticks.height == 1
    assert decoded.deals["volume"].to_list() == [0.006, 0.01]


def test_before_tick_is_the_delivery_order() -> None:
    values = [
        _deal(deal_id=1),
        _json(),
        _json(),
        _deal(deal_id=2),
        b"bad",
        _deal(deal_id=3),
        _json(),
        _deal(deal_id=4),
    ]
    decoded = decode_messages(values)
    assert decoded.deals["deal_id"].to_list() == [1, 2, 3, 4]
    assert decoded.deals["before_tick"].to_list() == [0, 2, 2, 3]
    assert decoded.ticks.height == 3


def _events() -> pl.DataFrame:
    """Ticks and deals in one batch frame, ``type`` saying which."""
    base = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
    rows = [
        ("deal", 1, 0, 1, "EURUSD", "buy", 1.0, 1.1, "in", None),
        (None, 1, 1, None, None, None, None, None, None, 100.0),
        ("equity", 1, 2, None, None, None, None, None, None, 101.0),
        ("deal", 1, 3, 2, "EURUSD", "sell", 0.0, 1.1, "out", None),  # bad volume
        ("deal", 1, 4, 3, "EURUSD", "sell", 1.0, 1.1, "out", None),
        ("quote", 1, 5, None, None, None, None, None, None, 1.0),  # unknown type
        (None, 1, 6, None, None, None, None, None, None, 102.0),
    ]
    return pl.DataFrame(
        {
            "type": [r[0] for r in rows],
            "account_id": [r[1] for r in rows],
            "ts": [base.replace(second=r[2]) for r in rows],
            "deal_id": [r[3] for r in rows],
            "symbol": [r[4] for r in rows],
            "side": [r[5] for r in rows],
            "volume": [r[6] for r in rows],
            "price": [r[7] for r in rows],
            "entry": [r[8] for r in rows],
            "position_id": [r[3] for r in rows],
            "equity": [r[9] for r in rows],
            "balance": [r[9] for r in rows],
        }
    )


def test_decode_arrow_batch_carries_deals_in_order() -> None:
    value = encode_arrow(_events())
    decoded = decode_messages(
        [_deal(deal_id=50), value, _json()], [None, ARROW_ENCODING, None]
    )
    assert decoded.ticks["equity"].to_list() == [100.0, 101.0, 102.0, 100_250.5]
    assert decoded.deals["deal_id"].to_list() == [50, 1, 3]
    assert decoded.deals["before_tick"].to_list() == [0, 0, 2]
    assert decoded.deals["message"].to_list() == [0, 1, 1]
    got = [(r.index, r.reason, r.rows) for r in decoded.rejections]
    assert got == [(1, Reason.BAD_VOLUME, 1), (1, Reason.UNKNOWN_TYPE, 1)]
    payload = decoded.rejections[0].payload
    assert payload is not None
    assert pl.read_ipc_stream(payload)["deal_id"].to_list() == [2]


def test_decode_arrow_deal_only_batch_without_tick_columns() -> None:
    deals = _events().filter(pl.col("type") == "deal").drop("equity", "balance")
    decoded = decode_messages([encode_arrow(deals)], [ARROW_ENCODING])
    assert decoded.deals["deal_id"].to_list() == [1, 3]
    assert [r.reason for r in decoded.rejections] == [Reason.BAD_VOLUME]
    # A tick row in such a batch lacks its equity: a missing field, not a bad batch.
    mixed = _events().drop("equity")
    decoded = decode_messages([encode_arrow(mixed)], [ARROW_ENCODING])
    assert Reason.MISSING_FIELD in [r.reason for r in decoded.rejections]
    assert not decoded.ticks.height


def test_decode_deals_beyond_the_skew_bound_and_of_unknown_accounts() -> None:
    values = [
        _deal(ts="2026-01-05T12:04:00Z"),
        _deal(ts="2026-01-11T12:00:00Z"),
        _deal(account_id=7),
    ]
    decoded = decode_messages(
        values, not_after=BOUND, known_accounts=pl.Series([1001], dtype=pl.Int64)
    )
    assert [(r.index, r.reason) for r in decoded.rejections] == [
        (1, Reason.FUTURE_TS),
        (2, Reason.UNKNOWN_ACCOUNT),
    ]
    assert decoded.deals["message"].to_list() == [0]


def test_before_tick_across_json_chunks_of_ticks_only_and_with_deals() -> None:
    # Chunk 1 holds ticks only (read with the tick columns), chunk 2 a deal and a
    # value polars refuses (parsed one by one), chunk 3 ticks and a deal.
    values = [_json(account_id=i) for i in range(2 * JSON_CHUNK + 5)]
    values[JSON_CHUNK + 1] = _deal(deal_id=1)
    values[JSON_CHUNK + 2] = b"{broken"
    values[2 * JSON_CHUNK + 3] = _deal(deal_id=2)
    decoded = decode_json(values)
    assert [r.index for r in decoded.rejections] == [JSON_CHUNK + 2]
    assert decoded.deals["deal_id"].to_list() == [1, 2]
    assert decoded.deals["before_tick"].to_list() == [
        JSON_CHUNK + 1,
        2 * JSON_CHUNK + 1,
    ]
    assert decoded.ticks.height == 2 * JSON_CHUNK + 2
