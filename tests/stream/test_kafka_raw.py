"""Record batches read by the Rust core agree with kafka-python's record reader.

The batches are built with kafka-python's own ``DefaultRecordBatchBuilder`` (what
its producer sends), then read twice: by kafka-python's ``PartitionRecords`` with
one ``ConsumerRecord`` per record, decoded as the source always did, and by
``prop_stream.kafka.raw`` as the source now does. Everything must agree: the
ticks, every rejection (index, reason, detail, rejected rows), the records the
dead-letter path rebuilds, and the position after the fetch.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from itertools import cycle
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords
from kafka.structs import TopicPartition

from prop_stream.kafka import ARROW_ENCODING, encode_arrow
from prop_stream.kafka.decode import (
    EMPTY_DECODED_DEALS,
    EMPTY_DECODED_TICKS,
    JSON_CHUNK,
    Decoded,
    Rejection,
    decode_arrow,
    decode_arrow_many,
    decode_json,
    decode_messages,
)
from prop_stream.kafka.raw import RawPartitionRecords, RawValues, chunks_of
from prop_stream.rules import scan_record_batches

TP = TopicPartition("ticks", 2)
Headers = list[tuple[str, bytes | None]]
Message = tuple[bytes | None, bytes | None, Headers]  # key, value, headers


def build(
    messages: Sequence[Message],
    *,
    per_batch: int = 7,
    base_offset: int = 0,
    compression: Sequence[int] = (0,),
    gap: int = 0,
) -> bytes:
    """Record batches as a broker returns them, ``per_batch`` records each.

    ``compression`` gives each batch's codec in turn; ``gap`` leaves offsets
    unused between batches (as compaction does).
    """
    out = bytearray()
    offset = base_offset
    codecs = cycle(compression)
    for start in range(0, len(messages), per_batch):
        group = messages[start : start + per_batch]
        builder = DefaultRecordBatchBuilder(
            magic=2,
            compression_type=next(codecs),
            is_transactional=0,
            producer_id=-1,
            producer_epoch=-1,
            base_sequence=-1,
            batch_size=1 << 30,
        )
        for i, (key, value, headers) in enumerate(group):
            builder.append(
                i,
                timestamp=1_767_605_400_000 + i,
                key=key,
                value=value,
                headers=headers,
            )
        batch = bytearray(builder.build())
        batch[0:8] = struct.pack(">q", offset)  # the broker sets the base offset
        out += batch
        offset += len(group) + gap
    return bytes(out)


def read_old(buffer: bytes, fetch_offset: int) -> tuple[list[ConsumerRecord], int]:
    part = Fetcher.PartitionRecords(fetch_offset, TP, MemoryRecords(buffer))
    records = part.take()
    return records, part.next_fetch_offset


def read_raw(
    buffer: bytes, fetch_offset: int, takes: Sequence[int] = (1 << 30,)
) -> tuple[RawValues, int]:
    part = RawPartitionRecords(fetch_offset, TP, MemoryRecords(buffer))
    repeated: list[Any] = []
    for n in cycle(takes):
        if not part:
            break
        got = part.take(n)
        assert len(got) <= n
        repeated += got
    return RawValues(chunks_of(repeated)), part.next_fetch_offset


def decode_old(records: Sequence[ConsumerRecord]) -> Decoded:
    """What ``KafkaSource.poll`` did with kafka-python's records."""
    values = [r.value for r in records]
    encodings = [_encoding(r.headers) for r in records]
    has_batches = any(e is not None and e != "json" for e in encodings)
    return decode_messages(values, encodings if has_batches else None)


def decode_raw(raw: RawValues) -> Decoded:
    """What ``KafkaSource.poll`` does now."""
    if raw.json_only:
        return decode_json(raw)
    return decode_messages(raw.values(), raw.encodings())


def _encoding(headers: Headers) -> str | None:
    for key, value in headers or []:
        if key == "encoding":
            return value.decode("utf-8", "replace") if value else None
    return None


def assert_same(
    buffer: bytes, fetch_offset: int = 0, takes: Sequence[int] = (1 << 30,)
) -> None:
    records, old_next = read_old(buffer, fetch_offset)
    raw, raw_next = read_raw(buffer, fetch_offset, takes)
    assert raw_next == old_next
    assert len(raw) == len(records)
    assert [raw[i] for i in range(len(raw))] == records
    old, new = decode_old(records), decode_raw(raw)
    assert new.ticks.equals(old.ticks)
    assert new.deals.equals(old.deals)
    assert new.rejections == old.rejections


# ------------------------------------------------------------------ strategies

GOOD = {
    "account_id": 1001,
    "ts": "2026-01-05T09:30:00.125Z",
    "equity": 1.5,
    "balance": 2.0,
}

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
timestamps = st.one_of(
    st.integers(0, 4_102_444_800_000),
    st.datetimes().map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat() + "Z"),
    st.sampled_from(
        ["2026-01-05T09:30:00+02:00", "2026-01-05 09:30", "2026-01-05T09:30:00.5z"]
    ),
)
good_ticks = st.fixed_dictionaries(
    {
        "account_id": st.integers(-(2**63), 2**63 - 1),
        "ts": timestamps,
        "equity": st.one_of(finite, st.integers(-(10**12), 10**12)),
        "balance": finite,
    },
    optional={"note": st.text(max_size=5)},
).map(orjson.dumps)


def _with(**fields: object) -> bytes:
    return orjson.dumps({**GOOD, **fields})


bad_values = st.one_of(
    st.binary(max_size=20),
    st.just(b""),
    st.just(None),
    st.sampled_from(
        [
            b"[1, 2]",
            b'"text"',
            b"null",
            b"{}",
            b'{"account_id": 1, "ts": 1}',
            b'{"account_id": 1, "ts": 1, "equity": NaN, "balance": 1}',
            b'{"account_id": 1, "ts": 1, "equity": 1, "balance": -Infinity}',
            b'{"account_id": 1, "ts": 1, "equity": 1e999, "balance": 1}',
            b'{"account_id": 99999999999999999999, "ts": 1, "equity": 1, "balance": 1}',
            b'{"account_id": 1,\n "ts": 1, "equity": 1, "balance": 1}',
            b'{"account_id": 1, "ts": 1, "equity": 1, "balance": 1}\n{"a": 1}',
            b'{"account_id": 1, "ts": 1, "equity": 1, "balance": 1} x',
        ]
    ),
    st.sampled_from(
        [
            _with(equity=None),
            _with(equity="1.5"),
            _with(account_id=1.5),
            _with(account_id="1001"),
            _with(account_id=True),
            _with(ts=True),
            _with(ts=1.5),
            _with(ts="yesterday"),
            _with(ts="2026-13-45T00:00:00Z"),
            _with(ts=None),
            _with(balance=[1]),
        ]
    ),
)

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
good_deals = st.fixed_dictionaries(
    {
        "type": st.just("deal"),
        "account_id": st.integers(-(2**63), 2**63 - 1),
        "ts": timestamps,
        "deal_id": st.integers(-(2**63), 2**63 - 1),
        "position_id": st.integers(0, 10),
        "symbol": st.text(min_size=1, max_size=6),
        "side": st.sampled_from(["buy", "sell"]),
        "volume": st.floats(0.006, 1e6),
        "price": st.floats(1e-9, 1e9),
        "entry": st.sampled_from(["in", "out"]),
    },
    optional={"equity": finite, "note": st.text(max_size=5)},
).map(orjson.dumps)


def _deal_with(**fields: object) -> bytes:
    return orjson.dumps({k: v for k, v in {**DEAL, **fields}.items() if v is not ...})


#: One malformed deal per reason, and some types.
bad_deals = st.sampled_from(
    [
        _deal_with(side="long"),
        _deal_with(entry="both"),
        _deal_with(volume=0),
        _deal_with(volume=0.005),
        _deal_with(price=-1),
        _deal_with(symbol=""),
        _deal_with(symbol=...),
        _deal_with(symbol=["x"]),
        _deal_with(symbol=12),
        _deal_with(side=True),
        _deal_with(deal_id="9"),
        _deal_with(position_id=None),
        _deal_with(ts="soon"),
        _deal_with(type="order"),
        _deal_with(type=3),
        _deal_with(type="equity"),  # a tick without equity: missing_field
        _deal_with().replace(b'"volume":1.5', b'"volume":NaN'),
    ]
)

_ARROW_OK = encode_arrow(
    pl.DataFrame(
        {
            "account_id": [1, 2, 3],
            "ts": [1_767_605_400_000, 1_767_605_400_001, 1],
            "equity": [1.0, math.nan, 3.0],
            "balance": [1.0, 2.0, 3.0],
        }
    )
)
json_headers = st.sampled_from(
    [[], [("encoding", b"json")], [("encoding", b"")], [("trace", b"x")]]
)
other_headers = st.sampled_from(
    [
        [("encoding", ARROW_ENCODING.encode())],
        [("trace", None), ("encoding", ARROW_ENCODING.encode())],
        [("encoding", b"xml")],
        [("encoding", b"\xff\xfe")],
    ]
)
keys = st.one_of(st.none(), st.binary(max_size=8))
json_messages = st.tuples(
    keys, st.one_of(good_ticks, bad_values, good_deals, bad_deals), json_headers
)
_ARROW_DEALS = encode_arrow(
    pl.DataFrame(
        {
            "type": ["deal", None, "deal", "deal", "equity", "swap"],
            "account_id": [1, 1, 1, 2, 2, 2],
            "ts": [1_767_605_400_000 + i for i in range(6)],
            "equity": [None, 1.0, None, None, 2.0, 3.0],
            "balance": [None, 1.0, None, None, 2.0, 3.0],
            "deal_id": [1, None, 2, 3, None, None],
            "position_id": [1, None, 1, 2, None, None],
            "symbol": ["X", None, "X", "", None, None],
            "side": ["buy", None, "sell", "buy", None, None],
            "volume": [1.0, None, 1.0, 1.0, None, None],
            "price": [1.0, None, 1.0, 1.0, None, None],
            "entry": ["in", None, "out", "in", None, None],
        }
    )
)
other_messages = st.tuples(
    keys,
    st.sampled_from([_ARROW_OK, _ARROW_DEALS, b"not arrow", b"", None]),
    other_headers,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(json_messages, max_size=40),
    per_batch=st.integers(1, 9),
    takes=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    skip=st.integers(0, 3),
)
def test_json_messages_decode_the_same(
    messages: list[Message], per_batch: int, takes: list[int], skip: int
) -> None:
    buffer = build(messages, per_batch=per_batch, base_offset=100)
    assert_same(buffer, 100 + min(skip, len(messages)), takes)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(st.one_of(json_messages, other_messages), max_size=25),
    per_batch=st.integers(1, 6),
    takes=st.lists(st.integers(1, 12), min_size=1, max_size=3),
)
def test_mixed_encodings_decode_the_same(
    messages: list[Message], per_batch: int, takes: list[int]
) -> None:
    assert_same(build(messages, per_batch=per_batch), 0, takes)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (_deal_with(side="long"), "bad_side"),
        (_deal_with(entry="both"), "bad_entry"),
        (_deal_with(volume=-2.0), "bad_volume"),
        (_deal_with(volume=0.004), "bad_volume"),
        (_deal_with(price=0), "bad_price"),
        (_deal_with(symbol=""), "bad_symbol"),
        (_deal_with(symbol=...), "missing_field"),
        (_deal_with(symbol={"a": 1}), "mistyped_field"),
        (_deal_with(deal_id=1.5), "mistyped_field"),
        (_deal_with(ts="soon"), "bad_ts"),
        (_deal_with(type="order"), "unknown_type"),
        (_deal_with().replace(b'"price":1.0843', b'"price":Infinity'), "not_finite"),
    ],
)
def test_a_malformed_deal_is_rejected_alike_on_both_record_paths(
    value: bytes, reason: str
) -> None:
    messages: list[Message] = [
        (b"1001", _with(), []),
        (b"1001", value, []),
        (b"1001", _deal_with(deal_id=10), []),
    ]
    buffer = build(messages, per_batch=2)
    records, _ = read_old(buffer, 0)
    raw, _ = read_raw(buffer, 0)
    for decoded in (decode_old(records), decode_raw(raw)):
        assert [(r.index, r.reason) for r in decoded.rejections] == [(1, reason)]
        assert decoded.deals["deal_id"].to_list() == [10]
        assert decoded.deals["before_tick"].to_list() == [1]
    assert_same(buffer)


def _ticks(n: int, bad: dict[int, bytes | None]) -> list[Message]:
    out: list[Message] = []
    for i in range(n):
        value = bad.get(i, _with(account_id=i, ts=1_767_605_400_000 + i))
        out.append((str(i % 7).encode(), value, []))
    return out


def test_chunks_spanning_the_json_chunk_size_decode_the_same() -> None:
    n = 2 * JSON_CHUNK + 500
    messages = _ticks(n, {JSON_CHUNK + 3: b"not json", n - 1: None})
    buffer = build(messages, per_batch=1000)
    assert_same(buffer, 0, [5_000, 12_345, 30_000])
    raw, _ = read_raw(buffer, 0, [5_000])
    decoded = decode_raw(raw)
    assert decoded.ticks.height == n - 2
    assert [r.index for r in decoded.rejections] == [JSON_CHUNK + 3, n - 1]


def test_compacted_offsets_and_the_position_after_the_last_batch() -> None:
    buffer = build(_ticks(20, {}), per_batch=4, base_offset=50, gap=3)
    assert_same(buffer, 50)
    assert_same(buffer, 58, [3])


def test_compressed_batches_fall_back_to_kafka_python() -> None:
    codec = 1  # gzip: the codec that needs no extra package
    messages = _ticks(30, {4: b"[]", 17: None})
    buffer = build(messages, per_batch=5, compression=(0, codec, 0))
    scan = scan_record_batches(buffer, 0, 0, 1 << 30)
    assert (scan.stop, len(scan)) == ("unsupported", 5)
    assert_same(buffer, 0)
    assert_same(buffer, 7, [4, 9])


def test_a_corrupt_batch_raises_kafka_pythons_error() -> None:
    buffer = bytearray(build(_ticks(3, {}), per_batch=3))
    buffer[-5] ^= 0x20  # inside the last value
    part = RawPartitionRecords(0, TP, MemoryRecords(bytes(buffer)))
    with pytest.raises(CorruptRecordError, match="CRC"):
        part.take(10)
    # Unchecked, it reads (as kafka-python does with check_crcs=False).
    part = RawPartitionRecords(0, TP, MemoryRecords(bytes(buffer)), check_crcs=False)
    assert len(part.take(10)) == 3


def test_an_empty_or_cut_fetch_gives_nothing() -> None:
    whole = build(_ticks(4, {}), per_batch=2)
    for cut in (0, 5, len(whole) // 2 - 1):
        raw, next_offset = read_raw(whole[:cut], 0)
        assert len(raw) == 0
        assert next_offset == 0
    raw, next_offset = read_raw(whole[: len(whole) - 3], 0)
    assert [raw[i].offset for i in range(len(raw))] == [0, 1]
    assert next_offset == 2


# ------------------------------------------------- batch messages, many at once


@st.composite
def arrow_messages(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.sampled_from(["frame", "frame", "frame", "garbage", "none"]))
    if kind == "garbage":
        return draw(st.binary(max_size=30))
    if kind == "none":
        return None
    n = draw(st.integers(0, 6))
    ids = draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))
    stamps = draw(st.lists(st.integers(0, 4_102_444_800_000), min_size=n, max_size=n))
    money = st.one_of(finite, st.just(math.nan), st.just(math.inf))
    equity = draw(st.lists(money, min_size=n, max_size=n))
    columns: dict[str, pl.Series] = {
        "account_id": pl.Series(
            ids, dtype=draw(st.sampled_from([pl.Int64, pl.UInt64, pl.Int32]))
        ),
        "ts": pl.Series(stamps, dtype=pl.Int64),
        "equity": pl.Series(equity, dtype=pl.Float64),
        "balance": pl.Series([1] * n).cast(
            draw(st.sampled_from([pl.Float64, pl.Float32, pl.Int64]))
        ),
    }
    ts_kind = draw(st.sampled_from(["int", "datetime", "naive", "text", "bool"]))
    if ts_kind == "datetime":
        columns["ts"] = pl.from_epoch(
            columns["ts"], time_unit="ms"
        ).dt.replace_time_zone("Europe/Berlin")
    elif ts_kind == "naive":
        columns["ts"] = pl.from_epoch(columns["ts"], time_unit="ms")
    elif ts_kind == "text":
        columns["ts"] = pl.Series(
            draw(
                st.lists(
                    st.sampled_from(["2026-01-05T09:30:00Z", "nope", "17"]),
                    min_size=n,
                    max_size=n,
                )
            ),
            dtype=pl.String,
        )
    elif ts_kind == "bool":
        columns["ts"] = pl.Series([True] * n)
    if draw(st.booleans()):
        columns["extra"] = pl.Series(["x"] * n)
    if draw(st.integers(0, 9)) == 0:
        del columns[draw(st.sampled_from(sorted(columns)))]
    return encode_arrow_all(pl.DataFrame(columns))


def encode_arrow_all(frame: pl.DataFrame) -> bytes:
    """An Arrow IPC stream with every column (``encode_arrow`` keeps four)."""
    sink = pa.BufferOutputStream()
    table = frame.to_arrow()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(arrow_messages(), max_size=8), known=st.booleans())
def test_batch_messages_together_equal_one_by_one(
    values: list[bytes | None], known: bool
) -> None:
    accounts = (
        pl.Series("known", [0, 1, 2, 5, 2**31 - 1], dtype=pl.Int64) if known else None
    )
    items = [(i * 2 + 1, v) for i, v in enumerate(values)]
    many = decode_arrow_many(items, known_accounts=accounts)
    parts: list[pl.DataFrame] = []
    deal_parts: list[pl.DataFrame] = []
    expected: list[Rejection] = []
    for index, value in items:
        one = decode_arrow(value, index, known_accounts=accounts)
        # before_tick counts the ticks of the whole call: shift each message's.
        deal_parts.append(
            one.deals.with_columns(pl.col("before_tick") + sum(p.height for p in parts))
        )
        parts.append(one.ticks)
        expected.extend(one.rejections)
    assert many.ticks.equals(pl.concat([EMPTY_DECODED_TICKS, *parts]))
    assert many.deals.equals(pl.concat([EMPTY_DECODED_DEALS, *deal_parts]))
    assert many.rejections == expected
