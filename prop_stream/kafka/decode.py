"""Decode Kafka tick messages in bulk, and say exactly why a bad one is bad.

Two encodings, named by the message header ``encoding`` (``interfaces.md``
section 1):

- ``json`` (the default; also when the header is missing): one tick per message,
  ``{"account_id": 1001, "ts": "2026-01-05T09:30:00.125Z", "equity": 100250.5,
  "balance": 100000.0}``; ``ts`` may also be integer epoch milliseconds; other
  fields are ignored.
- ``arrow-ipc-v1``: many ticks per message, the value is an Arrow IPC *stream*
  with the columns ``account_id`` (integer), ``ts`` (timestamp, or integer epoch
  milliseconds) and ``equity``, ``balance`` (floating point); other columns are
  ignored.

**No Python object per tick.** The JSON values of a poll are joined into one
NDJSON buffer and parsed by polars in one call; only a chunk that polars refuses
(a value that is not JSON, a mistyped field) is parsed again message by message
with orjson to find the culprits. Arrow batches go straight into polars. The
checks (missing fields, NaN/inf, bad timestamps, timestamps beyond the clock-skew
bound, unknown accounts) are polars expressions over the whole poll.

Every rejected message (or every rejected group of rows of a batch message) comes
back as a :class:`Rejection` with a stable :class:`Reason` code and a detail; the
source sends it to the dead-letter topic.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Protocol, runtime_checkable

import orjson
import polars as pl
import pyarrow as pa

from prop_stream.rules import TICK_SCHEMA, parse_ts_text

#: The message header that names a message's encoding.
ENCODING_HEADER: Final = "encoding"
#: One JSON tick per message (the default).
JSON_ENCODING: Final = "json"
#: Many ticks per message as an Arrow IPC stream.
ARROW_ENCODING: Final = "arrow-ipc-v1"
#: The encodings this version reads.
ENCODINGS: Final = (JSON_ENCODING, ARROW_ENCODING)

#: JSON values parsed by one polars call; a refused chunk is re-parsed one by one.
JSON_CHUNK: Final = 16_384

_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1
_FIELDS: Final = tuple(TICK_SCHEMA)
_RAW_JSON_SCHEMA: Final = {
    "account_id": pl.Int64(),
    "ts": pl.String(),
    "equity": pl.Float64(),
    "balance": pl.Float64(),
}


class Reason(StrEnum):
    """Why a message went to the dead-letter topic (its ``error`` header)."""

    #: The value is not JSON (or is empty).
    NOT_JSON = "not_json"
    #: The value is JSON but not an object.
    NOT_OBJECT = "not_object"
    #: A required field is absent or null.
    MISSING_FIELD = "missing_field"
    #: A required field has the wrong JSON type (or does not fit 64 bits).
    MISTYPED_FIELD = "mistyped_field"
    #: ``equity`` or ``balance`` is NaN or infinite.
    NOT_FINITE = "not_finite"
    #: ``ts`` is neither ISO 8601 nor integer epoch milliseconds.
    BAD_TS = "bad_ts"
    #: ``ts`` is more than the clock-skew bound ahead of the service's clock.
    FUTURE_TS = "future_ts"
    #: No phase is being judged for the account.
    UNKNOWN_ACCOUNT = "unknown_account"
    #: A batch message that is not a readable Arrow IPC stream of ticks.
    BAD_BATCH = "bad_batch"
    #: The ``encoding`` header names an encoding this version does not read.
    UNKNOWN_ENCODING = "unknown_encoding"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A message, or some rows of a batch message, that can't be judged.

    Attributes:
        index: The message's index in the decoded sequence.
        reason: The reason code.
        detail: A human-readable detail (the field, the parser's message).
        payload: None: the message itself is the dead letter. Otherwise the
            rejected rows of a batch message, as an Arrow IPC stream.
        rows: How many ticks are rejected (1 for a JSON message).
    """

    index: int
    reason: Reason
    detail: str
    payload: bytes | None = None
    rows: int = 1


@dataclass(frozen=True, slots=True)
class Decoded:
    """The outcome of decoding a sequence of messages.

    Attributes:
        ticks: The good ticks in the engine's schema, in message order (rows of
            one batch message in their order), plus ``message`` (UInt32): the
            index of the message each came from.
        rejections: The rejected messages and rows, by message index.
    """

    ticks: pl.DataFrame
    rejections: list[Rejection] = field(default_factory=list)


#: The ``ticks`` of a :class:`Decoded` with no ticks.
EMPTY_DECODED_TICKS: Final = pl.DataFrame(
    schema={**TICK_SCHEMA, "message": pl.UInt32()}
)


def decode_messages(
    values: Sequence[bytes | None],
    encodings: Sequence[str | None] | None = None,
    *,
    known_accounts: pl.Series | None = None,
    not_after: datetime | None = None,
) -> Decoded:
    """Decode a poll's message values into ticks and rejections.

    Args:
        values: The message values, in delivery order.
        encodings: Each message's ``encoding`` header (None: JSON); None for all
            JSON.
        known_accounts: If given, ticks of other accounts are rejected with
            :attr:`Reason.UNKNOWN_ACCOUNT`.
        not_after: If given (an aware datetime), ticks with a later ``ts`` are
            rejected with :attr:`Reason.FUTURE_TS` (the service's clock plus
            the clock-skew bound).

    Returns:
        The good ticks and the rejections.
    """
    if encodings is None or all(e is None or e == JSON_ENCODING for e in encodings):
        return decode_json(values, known_accounts=known_accounts, not_after=not_after)
    json_index = [i for i, e in enumerate(encodings) if e is None or e == JSON_ENCODING]
    parts: list[pl.DataFrame] = []
    rejections: list[Rejection] = []
    if json_index:
        decoded = decode_json(
            [values[i] for i in json_index],
            known_accounts=known_accounts,
            not_after=not_after,
        )
        index_map = pl.Series("map", json_index, dtype=pl.UInt32)
        parts.append(
            decoded.ticks.with_columns(
                index_map.gather(decoded.ticks["message"]).alias("message")
            )
        )
        rejections.extend(
            Rejection(json_index[r.index], r.reason, r.detail, r.payload, r.rows)
            for r in decoded.rejections
        )
    arrow: list[tuple[int, bytes | None]] = []
    for i, encoding in enumerate(encodings):
        if encoding is None or encoding == JSON_ENCODING:
            continue
        if encoding != ARROW_ENCODING:
            rejections.append(
                Rejection(i, Reason.UNKNOWN_ENCODING, f"encoding {encoding!r}")
            )
            continue
        arrow.append((i, values[i]))
    if arrow:
        ticks, rejected = decode_arrow_many(
            arrow, known_accounts=known_accounts, not_after=not_after
        )
        parts.append(ticks)
        rejections.extend(rejected)
    ticks = pl.concat(parts) if parts else EMPTY_DECODED_TICKS
    if json_index and len(parts) > 1:
        ticks = ticks.sort("message", maintain_order=True)
    rejections.sort(key=lambda r: r.index)
    return Decoded(ticks, rejections)


# ---------------------------------------------------------------------------- JSON


@runtime_checkable
class MessageValues(Protocol):
    """Message values that need not be one Python object each.

    ``prop_stream.kafka.raw`` reads them straight from Kafka fetch buffers;
    :func:`decode_json` asks for a joined range, and for single values only in a
    range polars refuses.
    """

    def __len__(self) -> int: ...

    def value(self, i: int) -> bytes | None:
        """The value of message ``i``."""

    def joined(self, start: int, end: int) -> bytes | None:
        """Values ``start..end`` joined by newlines; None if one is null."""


class _ListValues:
    """:class:`MessageValues` over a sequence of values."""

    __slots__ = ("_values",)

    def __init__(self, values: Sequence[bytes | None]) -> None:
        self._values = values

    def __len__(self) -> int:
        return len(self._values)

    def value(self, i: int) -> bytes | None:
        return self._values[i]

    def joined(self, start: int, end: int) -> bytes | None:
        chunk = self._values[start:end]
        if any(v is None for v in chunk):
            return None
        return b"\n".join(chunk)  # type: ignore[arg-type]  # None checked above


def decode_json(
    values: Sequence[bytes | None] | MessageValues,
    *,
    known_accounts: pl.Series | None = None,
    not_after: datetime | None = None,
) -> Decoded:
    """Decode JSON tick messages, one tick per message.

    Args:
        values: The message values (a sequence, or :class:`MessageValues`).
        known_accounts: If given, ticks of other accounts are rejected.
        not_after: If given, ticks with a later ``ts`` are rejected
            (:attr:`Reason.FUTURE_TS`).

    Returns:
        The good ticks (``message`` = index in ``values``) and the rejections.
    """
    column = values if isinstance(values, MessageValues) else _ListValues(values)
    raws: list[pl.DataFrame] = []
    rejections: list[Rejection] = []
    for start in range(0, len(column), JSON_CHUNK):
        end = min(start + JSON_CHUNK, len(column))
        raw = _parse_json_fast(column, start, end)
        if raw is None:
            raw, refused = _parse_json_slow(column, start, end)
            rejections.extend(
                Rejection(start + r.index, r.reason, r.detail) for r in refused
            )
        else:
            raw = raw.with_row_index("message")
        if start:
            raw = raw.with_columns(pl.col("message") + start)
        raws.append(raw)
    if not raws:
        return Decoded(EMPTY_DECODED_TICKS)
    raw = pl.concat(raws)
    checked = _check(
        raw.with_columns(_parse_ts(pl.col("ts"))), known_accounts, not_after
    )
    bad = checked.filter(pl.col("reason").is_not_null())
    rejections.extend(
        Rejection(int(i), Reason(r), str(d))
        for i, r, d in bad.select("message", "reason", "detail").iter_rows()
    )
    rejections.sort(key=lambda r: r.index)
    good = checked.filter(pl.col("reason").is_null()).select(
        *(pl.col(name).cast(dtype) for name, dtype in TICK_SCHEMA.items()),
        pl.col("message").cast(pl.UInt32),
    )
    return Decoded(good, rejections)


def _parse_json_fast(
    values: MessageValues, start: int, end: int
) -> pl.DataFrame | None:
    """One polars call for the chunk; None if polars refuses any value."""
    if end <= start:
        return None
    buffer = values.joined(start, end)
    if buffer is None:
        return None
    try:
        frame = pl.read_ndjson(io.BytesIO(buffer), schema=_RAW_JSON_SCHEMA)
    except pl.exceptions.PolarsError:
        return None
    # An empty value or one with a newline would shift the rows: re-parse.
    if frame.height != end - start:
        return None
    return frame


def _parse_json_slow(
    values: MessageValues, start: int, end: int
) -> tuple[pl.DataFrame, list[Rejection]]:
    """Parse one by one: the values that pass as columns, the rest as reasons.

    Indexes (``message``, :attr:`Rejection.index`) count from ``start``.
    """
    index: list[int] = []
    columns: dict[str, list[Any]] = {name: [] for name in _FIELDS}
    refused: list[Rejection] = []
    for i in range(end - start):
        row, why = _parse_one(values.value(start + i))
        if row is None:
            assert why is not None  # noqa: S101 - _parse_one gives one or the other
            refused.append(Rejection(i, why[0], why[1]))
            continue
        index.append(i)
        for name in _FIELDS:
            columns[name].append(row[name])
    frame = pl.DataFrame(
        {"message": index, **columns},
        schema={"message": pl.UInt32(), **_RAW_JSON_SCHEMA},
    )
    return frame, refused


def _parse_one(
    value: bytes | None,
) -> tuple[dict[str, Any] | None, tuple[Reason, str] | None]:
    if not value:
        return None, (Reason.NOT_JSON, "empty value")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        # Python's json writes NaN and Infinity; say so rather than "not JSON".
        try:
            doc = json.loads(value)
        except ValueError:
            return None, (Reason.NOT_JSON, str(exc))
    if not isinstance(doc, dict):
        return None, (Reason.NOT_OBJECT, f"a JSON {type(doc).__name__}")
    row: dict[str, Any] = {}
    for name in _FIELDS:
        item = doc.get(name)
        if item is None:
            row[name] = None  # reported by the vectorized checks
        elif isinstance(item, bool):
            return None, (Reason.MISTYPED_FIELD, f"{name}: a boolean")
        elif name == "account_id":
            if not isinstance(item, int) or not _I64_MIN <= item <= _I64_MAX:
                return None, (Reason.MISTYPED_FIELD, f"account_id: {item!r}")
            row[name] = item
        elif name == "ts":
            if isinstance(item, int):
                row[name] = str(item)
            elif isinstance(item, str):
                row[name] = item
            else:
                return None, (Reason.MISTYPED_FIELD, f"ts: {type(item).__name__}")
        elif isinstance(item, int | float):
            row[name] = float(item)
        else:
            return None, (Reason.MISTYPED_FIELD, f"{name}: {type(item).__name__}")
    return row, None


def _parse_ts(text: pl.Expr) -> pl.Expr:
    """ISO 8601 (``Z``, an offset, or naive meaning UTC) or integer epoch ms."""
    return parse_ts_text(text.str.strip_chars()).alias("ts_parsed")


def _check(
    raw: pl.DataFrame, known: pl.Series | None, not_after: datetime | None
) -> pl.DataFrame:
    """Add ``reason``/``detail`` (null when good) and the parsed ``ts``.

    ``raw`` has ``message``, the four tick fields (``ts`` as received) and
    ``ts_parsed``. The first failing check names the reason.
    """
    reason: Any = pl.when(False).then(pl.lit(None, pl.String))
    detail: Any = pl.when(False).then(pl.lit(None, pl.String))
    for name in _FIELDS:
        missing = pl.col(name).is_null()
        reason = reason.when(missing).then(pl.lit(Reason.MISSING_FIELD.value))
        detail = detail.when(missing).then(pl.lit(name))
    bad_ts = pl.col("ts_parsed").is_null()
    reason = reason.when(bad_ts).then(pl.lit(Reason.BAD_TS.value))
    detail = detail.when(bad_ts).then(
        pl.lit("ts: ") + pl.col("ts").cast(pl.String).str.slice(0, 64)
    )
    for name in ("equity", "balance"):
        nan = ~pl.col(name).is_finite()
        reason = reason.when(nan).then(pl.lit(Reason.NOT_FINITE.value))
        detail = detail.when(nan).then(
            pl.lit(f"{name}: ") + pl.col(name).cast(pl.String)
        )
    if not_after is not None:
        if not_after.tzinfo is None:
            raise ValueError("not_after must be an aware datetime")
        bound = pl.lit(not_after).dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        future = pl.col("ts_parsed") > bound
        reason = reason.when(future).then(pl.lit(Reason.FUTURE_TS.value))
        detail = detail.when(future).then(
            pl.lit("ts: ")
            + pl.col("ts_parsed").dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ")
            + pl.lit(f" is after {_iso(not_after)} (the clock-skew bound)")
        )
    if known is not None:
        unknown = ~pl.col("account_id").is_in(known.implode())
        reason = reason.when(unknown).then(pl.lit(Reason.UNKNOWN_ACCOUNT.value))
        detail = detail.when(unknown).then(
            pl.lit("account_id: ") + pl.col("account_id").cast(pl.String)
        )
    return (
        raw.with_columns(
            reason.otherwise(None).alias("reason"),
            detail.otherwise(None).alias("detail"),
        )
        .with_columns(pl.col("ts_parsed").alias("ts"))
        .drop("ts_parsed")
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------- Arrow


def encode_arrow(ticks: pl.DataFrame) -> bytes:
    """Encode ticks as one ``arrow-ipc-v1`` message value.

    Args:
        ticks: The four tick columns (others are dropped).

    Returns:
        An Arrow IPC stream (uncompressed: ticks barely compress and the reader
        then maps the buffers without copying).
    """
    table = ticks.select(_FIELDS).to_arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


def decode_arrow(
    value: bytes | None,
    index: int,
    *,
    known_accounts: pl.Series | None = None,
    not_after: datetime | None = None,
) -> tuple[pl.DataFrame, list[Rejection]]:
    """Decode one ``arrow-ipc-v1`` message.

    Args:
        value: The message value.
        index: The message's index (for ``message`` and the rejections).
        known_accounts: If given, ticks of other accounts are rejected.
        not_after: If given, ticks with a later ``ts`` are rejected
            (:attr:`Reason.FUTURE_TS`).

    Returns:
        The good ticks (``message`` = ``index``) and the rejections: the whole
        message if it is unreadable, else one per reason with the rejected rows
        as an Arrow IPC stream.
    """
    try:
        raw = _read_arrow(value)
        converted = raw.select(
            pl.lit(index, pl.UInt32).alias("message"),
            pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"),
            *(convert_tick_column(name, raw.schema[name]) for name in _FIELDS),
        )
    except _UNREADABLE as exc:
        return EMPTY_DECODED_TICKS, [
            Rejection(index, Reason.BAD_BATCH, _first_line(exc))
        ]
    checked = _check(
        converted.with_columns(pl.col("ts").alias("ts_parsed")),
        known_accounts,
        not_after,
    )
    return _split(checked, lambda _, rows: raw[rows])


#: What an unreadable ``arrow-ipc-v1`` value raises.
_UNREADABLE: Final = (
    pa.ArrowException,
    pl.exceptions.PolarsError,
    ValueError,
    OSError,
)


def _read_arrow(value: bytes | None) -> pl.DataFrame:
    """An ``arrow-ipc-v1`` value as a frame with every tick column (or raise)."""
    if not value:
        raise ValueError("empty value")
    table = pa.ipc.open_stream(pa.py_buffer(value)).read_all()
    raw = pl.from_arrow(table)
    assert isinstance(raw, pl.DataFrame)  # noqa: S101 - a table gives a frame
    missing = [name for name in _FIELDS if name not in raw.columns]
    if missing:
        raise ValueError(f"missing column(s): {', '.join(missing)}")
    return raw


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _split(
    checked: pl.DataFrame, rows_of: Callable[[int, pl.Series], pl.DataFrame]
) -> tuple[pl.DataFrame, list[Rejection]]:
    """Checked rows (with ``message`` and ``row``) into good ticks and rejections.

    ``rows_of(index, rows)`` gives message ``index``'s received rows, for the
    rejection's payload.
    """
    good = checked.filter(pl.col("reason").is_null()).select(
        *(pl.col(name).cast(dtype) for name, dtype in TICK_SCHEMA.items()),
        pl.col("message"),
    )
    rejections: list[Rejection] = []
    bad = checked.filter(pl.col("reason").is_not_null())
    if bad.height:
        groups = bad.group_by(["message", "reason"], maintain_order=True)
        for (message, reason), rows in groups:
            index = int(str(message))
            rejections.append(
                Rejection(
                    index,
                    Reason(str(reason)),
                    str(rows["detail"][0]),
                    payload=_ipc(rows_of(index, rows["row"]).to_arrow()),
                    rows=rows.height,
                )
            )
    return good, rejections


def decode_arrow_many(
    messages: Sequence[tuple[int, bytes | None]],
    *,
    known_accounts: pl.Series | None = None,
    not_after: datetime | None = None,
) -> tuple[pl.DataFrame, list[Rejection]]:
    """Decode many ``arrow-ipc-v1`` messages as :func:`decode_arrow` does each.

    The messages whose tick columns have the same types are converted and
    checked together: one set of polars calls instead of one per message (about
    a millisecond each). A group whose conversion fails is decoded message by
    message, so every message gets the outcome it would get alone.

    Args:
        messages: ``(index, value)`` of each message, in order.
        known_accounts: If given, ticks of other accounts are rejected.
        not_after: If given, ticks with a later ``ts`` are rejected
            (:attr:`Reason.FUTURE_TS`).

    Returns:
        The good ticks (``message`` = the index) in message order, and the
        rejections in message order.
    """
    rejections: list[Rejection] = []
    raws: dict[int, pl.DataFrame] = {}
    groups: dict[tuple[pl.DataType, ...], list[int]] = {}
    for index, value in messages:
        try:
            raw = _read_arrow(value)
        except _UNREADABLE as exc:
            rejections.append(Rejection(index, Reason.BAD_BATCH, _first_line(exc)))
            continue
        raws[index] = raw
        key = tuple(raw.schema[name] for name in _FIELDS)
        groups.setdefault(key, []).append(index)
    values = dict(messages)
    parts: list[pl.DataFrame] = []
    for indexes in groups.values():
        decoded = _decode_group(indexes, raws, known_accounts, not_after)
        if decoded is None:
            for index in indexes:
                ticks, rejected = decode_arrow(
                    values[index],
                    index,
                    known_accounts=known_accounts,
                    not_after=not_after,
                )
                parts.append(ticks)
                rejections.extend(rejected)
        else:
            parts.append(decoded[0])
            rejections.extend(decoded[1])
    ticks = pl.concat(parts) if parts else EMPTY_DECODED_TICKS
    if len(parts) > 1:
        ticks = ticks.sort("message", maintain_order=True)
    rejections.sort(key=lambda r: r.index)
    return ticks, rejections


def _decode_group(
    indexes: Sequence[int],
    raws: dict[int, pl.DataFrame],
    known: pl.Series | None,
    not_after: datetime | None,
) -> tuple[pl.DataFrame, list[Rejection]] | None:
    """Messages whose tick columns have the same types; None if conversion fails."""
    picked = [raws[i].select(_FIELDS) for i in indexes]
    starts: dict[int, int] = {}
    total = 0
    for index, frame in zip(indexes, picked, strict=True):
        starts[index] = total
        total += frame.height
    message = pl.concat(
        [
            pl.repeat(index, frame.height, dtype=pl.UInt32, eager=True)
            for index, frame in zip(indexes, picked, strict=True)
        ]
    ).alias("message")
    raw = pl.concat(picked)
    try:
        converted = raw.select(
            pl.lit(message),
            pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"),
            *(convert_tick_column(name, raw.schema[name]) for name in _FIELDS),
        )
    except (pl.exceptions.PolarsError, ValueError):
        return None
    checked = _check(
        converted.with_columns(pl.col("ts").alias("ts_parsed")), known, not_after
    )
    return _split(checked, lambda index, rows: raws[index][rows - starts[index]])


def convert_tick_column(name: str, dtype: pl.DataType) -> pl.Expr:
    """An expression converting a received tick column to the engine's type.

    Args:
        name: ``account_id``, ``ts``, ``equity`` or ``balance``.
        dtype: The column's type as received.

    Returns:
        The conversion (unparsable ``ts`` text becomes null).

    Raises:
        ValueError: The type can't hold the field.
    """
    col = pl.col(name)
    if name == "ts":
        if isinstance(dtype, pl.Datetime):
            utc = (
                col.dt.replace_time_zone("UTC")
                if dtype.time_zone is None
                else col.dt.convert_time_zone("UTC")
            )
            return utc.dt.cast_time_unit("us")
        if dtype.is_integer():
            return pl.from_epoch(
                col.cast(pl.Int64), time_unit="ms"
            ).dt.replace_time_zone("UTC")
        if dtype == pl.String:
            return _parse_ts(col).alias("ts")
        raise ValueError(f"column ts has type {dtype}")
    if name == "account_id":
        if not dtype.is_integer():
            raise ValueError(f"column account_id has type {dtype}")
        return col.cast(pl.Int64)
    if not dtype.is_numeric():
        raise ValueError(f"column {name} has type {dtype}")
    return col.cast(pl.Float64)


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


__all__ = [
    "ARROW_ENCODING",
    "ENCODINGS",
    "ENCODING_HEADER",
    "JSON_ENCODING",
    "Decoded",
    "MessageValues",
    "Reason",
    "Rejection",
    "convert_tick_column",
    "decode_arrow",
    "decode_arrow_many",
    "decode_json",
    "decode_messages",
    "encode_arrow",
]
