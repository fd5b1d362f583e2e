"""Decode Kafka tick and deal messages in bulk, and say exactly why a bad one is bad.

Ticks and deals share the topic (``interfaces.md`` section 5): a value whose
``type`` is ``"deal"`` is a deal (``account_id``, ``ts``, ``deal_id``,
``position_id``, ``symbol``, ``side``, ``volume``, ``price``, ``entry``); no
``type`` or ``"type": "equity"`` is a tick; any other ``type`` is a dead letter
(``unknown_type``). A batch message carries deals as rows whose ``type`` column
says ``deal``. A poll's deals come back beside its ticks, with ``before_tick``:
the delivery order (the deal was delivered before tick row ``before_tick``).

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
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Protocol, runtime_checkable

import orjson
import polars as pl
import pyarrow as pa

from prop_stream.rules import DEAL_SCHEMA, TICK_SCHEMA, parse_ts_text

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

#: The value of ``type`` that makes a message (or batch row) a deal.
DEAL_TYPE: Final = "deal"
#: The value of ``type`` that makes a message a tick (as does no ``type``).
EQUITY_TYPE: Final = "equity"
#: A deal's columns in the engine's types (``interfaces.md`` section 5), as polars
#: types: :data:`prop_stream.rules.DEAL_SCHEMA`.
DEAL_FRAME_SCHEMA: Final[dict[str, pl.DataType]] = dict(
    pl.DataFrame(DEAL_SCHEMA.empty_table()).schema
)
_DEAL_FIELDS: Final = tuple(DEAL_FRAME_SCHEMA)
#: Every field a message may carry, ticks' and deals'.
_ALL_FIELDS: Final = (*_FIELDS, *(f for f in _DEAL_FIELDS if f not in _FIELDS))
_INT_FIELDS: Final = frozenset({"account_id", "deal_id", "position_id"})
_TEXT_FIELDS: Final = frozenset({"symbol", "side", "entry"})
_SIDES: Final = ("buy", "sell")
_ENTRIES: Final = ("in", "out")
#: What a chunk of ticks is read with first; a chunk with a ``type`` is read again
#: with every field (:data:`_RAW_JSON_SCHEMA`), so tick-only streams pay for one
#: column more than before deals.
_TICK_JSON_SCHEMA: Final = {
    "type": pl.String(),
    "account_id": pl.Int64(),
    "ts": pl.String(),
    "equity": pl.Float64(),
    "balance": pl.Float64(),
}
_RAW_JSON_SCHEMA: Final = {
    "type": pl.String(),
    "account_id": pl.Int64(),
    "ts": pl.String(),
    "equity": pl.Float64(),
    "balance": pl.Float64(),
    "deal_id": pl.Int64(),
    "position_id": pl.Int64(),
    "symbol": pl.String(),
    "side": pl.String(),
    "volume": pl.Float64(),
    "price": pl.Float64(),
    "entry": pl.String(),
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
    #: ``type`` is neither ``equity`` nor ``deal``.
    UNKNOWN_TYPE = "unknown_type"
    #: A deal's ``side`` is neither ``buy`` nor ``sell``.
    BAD_SIDE = "bad_side"
    #: A deal's ``entry`` is neither ``in`` nor ``out``.
    BAD_ENTRY = "bad_entry"
    #: A deal's ``volume`` is not above 0, or rounds to 0 hundredths of a lot.
    BAD_VOLUME = "bad_volume"
    #: A deal's ``price`` is not above 0.
    BAD_PRICE = "bad_price"
    #: A deal's ``symbol`` is empty.
    BAD_SYMBOL = "bad_symbol"


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
        deals: The good deals (:data:`DEAL_FRAME_SCHEMA`) in message order, plus
            ``message`` (UInt32) and ``before_tick`` (Int64): the number of
            ``ticks`` rows delivered before the deal, so the engine judges the
            events in delivery order.
        unknown_accounts: The distinct accounts whose ticks or deals were
            rejected with :attr:`Reason.UNKNOWN_ACCOUNT` (Int64, ascending), so
            a caller can look them up in its directory before dead-lettering.
    """

    ticks: pl.DataFrame
    rejections: list[Rejection] = field(default_factory=list)
    deals: pl.DataFrame = field(default_factory=lambda: _empty_deals())
    unknown_accounts: pl.Series = field(default_factory=lambda: _no_accounts())


#: The ``ticks`` of a :class:`Decoded` with no ticks.
EMPTY_DECODED_TICKS: Final = pl.DataFrame(
    schema={**TICK_SCHEMA, "message": pl.UInt32()}
)
#: The ``deals`` of a :class:`Decoded` with no deals.
EMPTY_DECODED_DEALS: Final = pl.DataFrame(
    schema={**DEAL_FRAME_SCHEMA, "message": pl.UInt32(), "before_tick": pl.Int64()}
)


def _empty_deals() -> pl.DataFrame:
    return EMPTY_DECODED_DEALS


def _no_accounts() -> pl.Series:
    return pl.Series("account_id", [], dtype=pl.Int64)


def _unknown_of(bad: pl.DataFrame) -> pl.Series:
    """The accounts of rejected rows whose reason is an unknown account."""
    return (
        bad.filter(pl.col("reason") == Reason.UNKNOWN_ACCOUNT.value)
        .get_column("account_id")
        .cast(pl.Int64)
    )


#: Good ticks or deals before :func:`_finish`: ``message`` and ``row`` in it.
_EMPTY_TICK_ROWS: Final = pl.DataFrame(
    schema={**TICK_SCHEMA, "message": pl.UInt32(), "row": pl.UInt32()}
)
_EMPTY_DEAL_ROWS: Final = pl.DataFrame(
    schema={**DEAL_FRAME_SCHEMA, "message": pl.UInt32(), "row": pl.UInt32()}
)


@dataclass(frozen=True, slots=True)
class _Rows:
    """Good ticks and deals with ``message`` and ``row`` (the row in a batch)."""

    ticks: pl.DataFrame
    deals: pl.DataFrame
    rejections: list[Rejection]
    unknown: pl.Series = field(default_factory=lambda: _no_accounts())


def _finish(parts: Sequence[_Rows], *, resort: bool) -> Decoded:
    """Join decoded parts into one :class:`Decoded`, ``before_tick`` computed.

    Args:
        parts: The parts; each one's rows are in (message, row) order.
        resort: The parts interleave (sort by message again).
    """
    tick_parts = [p.ticks for p in parts if p.ticks.height]
    deal_parts = [p.deals for p in parts if p.deals.height]
    ticks = pl.concat(tick_parts) if tick_parts else _EMPTY_TICK_ROWS
    deals = pl.concat(deal_parts) if deal_parts else _EMPTY_DEAL_ROWS
    if resort and len(tick_parts) > 1:
        ticks = ticks.sort("message", "row", maintain_order=True)
    if resort and len(deal_parts) > 1:
        deals = deals.sort("message", "row", maintain_order=True)
    rejections = [r for p in parts for r in p.rejections]
    rejections.sort(key=lambda r: r.index)
    if deals.height:
        # A deal and a tick never share (message, row): count the ticks before.
        before = _order_key(ticks).search_sorted(_order_key(deals), side="left")
        deals = deals.with_columns(before.cast(pl.Int64).alias("before_tick"))
    else:
        deals = deals.with_columns(pl.lit(None, pl.Int64).alias("before_tick"))
    return Decoded(ticks.drop("row"), rejections, deals.drop("row"), _unknown_in(parts))


def _unknown_in(parts: Sequence[_Rows]) -> pl.Series:
    found = [p.unknown for p in parts if p.unknown.len()]
    if not found:
        return _no_accounts()
    return pl.concat(found).unique().sort()


def _order_key(rows: pl.DataFrame) -> pl.Series:
    return rows["message"].cast(pl.UInt64) * (1 << 32) + rows["row"].cast(pl.UInt64)


def decode_messages(
    values: Sequence[bytes | None],
    encodings: Sequence[str | None] | None = None,
    *,
    known_accounts: pl.Series | None = None,
    not_after: datetime | None = None,
) -> Decoded:
    """Decode a poll's message values into ticks, deals and rejections.

    Args:
        values: The message values, in delivery order.
        encodings: Each message's ``encoding`` header (None: JSON); None for all
            JSON.
        known_accounts: If given, ticks and deals of other accounts are rejected
            with :attr:`Reason.UNKNOWN_ACCOUNT`.
        not_after: If given (an aware datetime), ticks and deals with a later
            ``ts`` are rejected with :attr:`Reason.FUTURE_TS` (the service's
            clock plus the clock-skew bound).

    Returns:
        The good ticks and deals, and the rejections.
    """
    if encodings is None or all(e is None or e == JSON_ENCODING for e in encodings):
        return decode_json(values, known_accounts=known_accounts, not_after=not_after)
    json_index = [i for i, e in enumerate(encodings) if e is None or e == JSON_ENCODING]
    parts: list[_Rows] = []
    if json_index:
        decoded = _json_rows(
            _ListValues([values[i] for i in json_index]), known_accounts, not_after
        )
        index_map = pl.Series("map", json_index, dtype=pl.UInt32)
        parts.append(
            _Rows(
                decoded.ticks.with_columns(
                    index_map.gather(decoded.ticks["message"]).alias("message")
                ),
                decoded.deals.with_columns(
                    index_map.gather(decoded.deals["message"]).alias("message")
                ),
                [
                    Rejection(
                        json_index[r.index], r.reason, r.detail, r.payload, r.rows
                    )
                    for r in decoded.rejections
                ],
                decoded.unknown,
            )
        )
    arrow: list[tuple[int, bytes | None]] = []
    unknown: list[Rejection] = []
    for i, encoding in enumerate(encodings):
        if encoding is None or encoding == JSON_ENCODING:
            continue
        if encoding != ARROW_ENCODING:
            unknown.append(
                Rejection(i, Reason.UNKNOWN_ENCODING, f"encoding {encoding!r}")
            )
            continue
        arrow.append((i, values[i]))
    if unknown:
        parts.append(_Rows(_EMPTY_TICK_ROWS, _EMPTY_DEAL_ROWS, unknown))
    if arrow:
        parts.append(_arrow_many_rows(arrow, known_accounts, not_after))
    return _finish(parts, resort=bool(json_index))


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
    """Decode JSON messages, one tick or deal per message.

    Args:
        values: The message values (a sequence, or :class:`MessageValues`).
        known_accounts: If given, ticks and deals of other accounts are rejected.
        not_after: If given, ticks and deals with a later ``ts`` are rejected
            (:attr:`Reason.FUTURE_TS`).

    Returns:
        The good ticks and deals (``message`` = index in ``values``) and the
        rejections.
    """
    column = values if isinstance(values, MessageValues) else _ListValues(values)
    return _finish([_json_rows(column, known_accounts, not_after)], resort=False)


def _json_rows(
    column: MessageValues, known: pl.Series | None, not_after: datetime | None
) -> _Rows:
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
        return _Rows(_EMPTY_TICK_ROWS, _EMPTY_DEAL_ROWS, [])
    raw = pl.concat(raws, how="diagonal").with_columns(
        pl.col("message").cast(pl.UInt32), pl.lit(0, pl.UInt32).alias("row")
    )
    checked = _check(raw.with_columns(_parse_ts(pl.col("ts"))), known, not_after)
    bad = checked.filter(pl.col("reason").is_not_null())
    rejections.extend(
        Rejection(int(i), Reason(r), str(d))
        for i, r, d in bad.select("message", "reason", "detail").iter_rows()
    )
    rejections.sort(key=lambda r: r.index)
    ticks, deals = _good(checked)
    return _Rows(ticks, deals, rejections, _unknown_of(bad))


def _good(checked: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The good ticks and the good deals of checked rows, with message and row."""
    good = checked.filter(pl.col("reason").is_null())
    if "deal_id" not in good.columns:  # a tick-only frame
        return good.select(
            *(pl.col(name).cast(dtype) for name, dtype in TICK_SCHEMA.items()),
            pl.col("message").cast(pl.UInt32),
            pl.col("row").cast(pl.UInt32),
        ), _EMPTY_DEAL_ROWS
    ticks = good.filter(pl.col("_kind") == "tick").select(
        *(pl.col(name).cast(dtype) for name, dtype in TICK_SCHEMA.items()),
        pl.col("message").cast(pl.UInt32),
        pl.col("row").cast(pl.UInt32),
    )
    deals = good.filter(pl.col("_kind") == "deal").select(
        *(pl.col(name).cast(dtype) for name, dtype in DEAL_FRAME_SCHEMA.items()),
        pl.col("message").cast(pl.UInt32),
        pl.col("row").cast(pl.UInt32),
    )
    return ticks, deals


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
        frame = pl.read_ndjson(io.BytesIO(buffer), schema=_TICK_JSON_SCHEMA)
        if frame.height == end - start and frame["type"].null_count() == frame.height:
            return frame  # ticks only
        frame = pl.read_ndjson(io.BytesIO(buffer), schema=_RAW_JSON_SCHEMA)
    except pl.exceptions.PolarsError:
        return None
    # An empty value or one with a newline would shift the rows: re-parse.
    if frame.height != end - start:
        return None
    # polars reads a JSON array or object as its text: let the slow path see
    # whether a deal's text field was one (a mistyped field) or a string.
    container = pl.any_horizontal(
        pl.col(name).str.starts_with("[") | pl.col(name).str.starts_with("{")
        for name in sorted(_TEXT_FIELDS)
    )
    if frame.select(((pl.col("type") == DEAL_TYPE) & container).any()).item():
        return None
    return frame


def _parse_json_slow(
    values: MessageValues, start: int, end: int
) -> tuple[pl.DataFrame, list[Rejection]]:
    """Parse one by one: the values that pass as columns, the rest as reasons.

    Indexes (``message``, :attr:`Rejection.index`) count from ``start``.
    """
    index: list[int] = []
    columns: dict[str, list[Any]] = {name: [] for name in _RAW_JSON_SCHEMA}
    refused: list[Rejection] = []
    for i in range(end - start):
        row, why = _parse_one(values.value(start + i))
        if row is None:
            assert why is not None  # noqa: S101 - _parse_one gives one or the other
            refused.append(Rejection(i, why[0], why[1]))
            continue
        index.append(i)
        for name in _RAW_JSON_SCHEMA:
            columns[name].append(row.get(name))
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
    kind = doc.get("type")
    if kind is not None and not isinstance(kind, str):
        return None, (Reason.UNKNOWN_TYPE, f"type: {kind!r}"[:80])
    row: dict[str, Any] = {"type": kind}
    # Only the fields of the message's kind are read (a tick may carry others).
    for name in _DEAL_FIELDS if kind == DEAL_TYPE else _FIELDS:
        item = doc.get(name)
        if item is None:
            row[name] = None  # reported by the vectorized checks
        elif isinstance(item, bool) and name not in _TEXT_FIELDS:
            return None, (Reason.MISTYPED_FIELD, f"{name}: a boolean")
        elif name in _INT_FIELDS:
            if not isinstance(item, int) or not _I64_MIN <= item <= _I64_MAX:
                return None, (Reason.MISTYPED_FIELD, f"{name}: {item!r}"[:80])
            row[name] = item
        elif name == "ts":
            if isinstance(item, int):
                row[name] = str(item)
            elif isinstance(item, str):
                row[name] = item
            else:
                return None, (Reason.MISTYPED_FIELD, f"ts: {type(item).__name__}")
        elif name in _TEXT_FIELDS:
            if isinstance(item, list | dict):
                return None, (Reason.MISTYPED_FIELD, f"{name}: {type(item).__name__}")
            row[name] = _text(item)
        elif isinstance(item, int | float):
            try:
                row[name] = float(item)
            except OverflowError:
                row[name] = math.inf  # reported as not finite
        else:
            return None, (Reason.MISTYPED_FIELD, f"{name}: {type(item).__name__}")
    return row, None


def _text(item: object) -> str:
    """A deal's JSON scalar as text, as polars reads it into a string column.

    A number or boolean where a string belongs is read as its text on both
    paths (so a numeric symbol works either way; a bad side or entry is then
    ``bad_side``/``bad_entry``).
    """
    if isinstance(item, str):
        return item
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, float) and math.isfinite(item) and item.is_integer():
        return ("-" if math.copysign(1.0, item) < 0 else "") + str(abs(int(item)))
    return str(item)


def _parse_ts(text: pl.Expr) -> pl.Expr:
    """ISO 8601 (``Z``, an offset, or naive meaning UTC) or integer epoch ms."""
    return parse_ts_text(text.str.strip_chars()).alias("ts_parsed")


def _check(
    raw: pl.DataFrame, known: pl.Series | None, not_after: datetime | None
) -> pl.DataFrame:
    """Add ``reason``/``detail`` (null when good), ``_kind`` and the parsed ``ts``.

    ``raw`` has ``message``, ``row``, ``type`` and every field (``ts`` as
    received; a field a row's kind does not use may be anything) and
    ``ts_parsed``. ``_kind`` is ``tick``, ``deal`` or null (an unknown ``type``).
    The first failing check names the reason.
    """
    kind_text = pl.col("type")
    # Rows without a ``type`` are ticks: a tick-only frame skips the deal checks
    # (and may lack the deal columns).
    ticks_only = raw["type"].null_count() == raw.height
    kind = (
        pl.lit("tick")
        if ticks_only
        else pl.when(kind_text.is_null() | (kind_text == EQUITY_TYPE))
        .then(pl.lit("tick"))
        .when(kind_text == DEAL_TYPE)
        .then(pl.lit("deal"))
        .otherwise(pl.lit(None, pl.String))
    )
    raw = raw.with_columns(kind.alias("_kind"))
    fields = _FIELDS if ticks_only else _ALL_FIELDS
    tick = pl.col("_kind") == "tick"
    deal = pl.col("_kind") == "deal"
    reason: Any = pl.when(pl.col("_kind").is_null()).then(
        pl.lit(Reason.UNKNOWN_TYPE.value)
    )
    detail: Any = pl.when(pl.col("_kind").is_null()).then(
        pl.lit("type: ") + kind_text.str.slice(0, 64)
    )
    for name in fields:
        uses = (
            tick if name not in _DEAL_FIELDS else deal if name not in _FIELDS else None
        )
        missing = pl.col(name).is_null()
        if uses is not None:
            missing = uses & missing
        reason = reason.when(missing).then(pl.lit(Reason.MISSING_FIELD.value))
        detail = detail.when(missing).then(pl.lit(name))
    bad_ts = pl.col("ts_parsed").is_null()
    reason = reason.when(bad_ts).then(pl.lit(Reason.BAD_TS.value))
    detail = detail.when(bad_ts).then(
        pl.lit("ts: ") + pl.col("ts").cast(pl.String).str.slice(0, 64)
    )
    for name, uses in (
        ("equity", tick),
        ("balance", tick),
        *(() if ticks_only else (("volume", deal), ("price", deal))),
    ):
        nan = uses & ~pl.col(name).is_finite()
        reason = reason.when(nan).then(pl.lit(Reason.NOT_FINITE.value))
        detail = detail.when(nan).then(
            pl.lit(f"{name}: ") + pl.col(name).cast(pl.String)
        )
    deal_checks = (
        ("side", ~pl.col("side").is_in(_SIDES), Reason.BAD_SIDE),
        ("entry", ~pl.col("entry").is_in(_ENTRIES), Reason.BAD_ENTRY),
        # round_half_even(volume * 100) >= 1 exactly when volume * 100 > 0.5.
        ("volume", pl.col("volume") * 100 <= 0.5, Reason.BAD_VOLUME),
        ("price", pl.col("price") <= 0, Reason.BAD_PRICE),
        ("symbol", pl.col("symbol") == pl.lit(""), Reason.BAD_SYMBOL),
    )
    for name, bad, why in () if ticks_only else deal_checks:
        reason = reason.when(deal & bad).then(pl.lit(why.value))
        detail = detail.when(deal & bad).then(
            pl.lit(f"{name}: ") + pl.col(name).cast(pl.String).str.slice(0, 64)
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
    """Encode ticks (and deals) as one ``arrow-ipc-v1`` message value.

    Args:
        ticks: The four tick columns (others are dropped); or, with a ``type``
            column, ticks and deals in delivery order: ``type`` and every tick
            and deal column present are kept (a deal row's ``type`` is
            ``deal``, a tick row's null or ``equity``).

    Returns:
        An Arrow IPC stream (uncompressed: ticks barely compress and the reader
        then maps the buffers without copying).
    """
    if "type" in ticks.columns:
        names = ["type", *(n for n in _ALL_FIELDS if n in ticks.columns)]
    else:
        names = list(_FIELDS)
    return _ipc(ticks.select(names).to_arrow())


def decode_arrow(
    value: bytes | None,
    index: int,
    *,
    known_accounts: pl.Series | None = None,
    not_after: datetime | None = None,
) -> Decoded:
    """Decode one ``arrow-ipc-v1`` message.

    Args:
        value: The message value.
        index: The message's index (for ``message`` and the rejections).
        known_accounts: If given, ticks and deals of other accounts are rejected.
        not_after: If given, ticks and deals with a later ``ts`` are rejected
            (:attr:`Reason.FUTURE_TS`).

    Returns:
        The good ticks and deals (``message`` = ``index``) and the rejections:
        the whole message if it is unreadable, else one per reason with the
        rejected rows as an Arrow IPC stream.
    """
    return _finish([_arrow_rows(value, index, known_accounts, not_after)], resort=False)


def _arrow_rows(
    value: bytes | None,
    index: int,
    known: pl.Series | None,
    not_after: datetime | None,
) -> _Rows:
    try:
        raw = _read_arrow(value)
        converted = raw.select(
            pl.lit(index, pl.UInt32).alias("message"),
            pl.int_range(pl.len(), dtype=pl.UInt32).alias("row"),
            *_convert_all(raw),
        )
    except _UNREADABLE as exc:
        return _Rows(
            _EMPTY_TICK_ROWS,
            _EMPTY_DEAL_ROWS,
            [Rejection(index, Reason.BAD_BATCH, _first_line(exc))],
        )
    checked = _check(
        converted.with_columns(pl.col("ts").alias("ts_parsed")), known, not_after
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
    """An ``arrow-ipc-v1`` value as a frame with its columns (or raise).

    Without a ``type`` column every row is a tick and the tick columns must all
    be there; with one, a column a row needs and the stream lacks is a missing
    field of that row.
    """
    if not value:
        raise ValueError("empty value")
    table = pa.ipc.open_stream(pa.py_buffer(value)).read_all()
    raw = pl.from_arrow(table)
    assert isinstance(raw, pl.DataFrame)  # noqa: S101 - a table gives a frame
    if "type" not in raw.columns:
        missing = [name for name in _FIELDS if name not in raw.columns]
        if missing:
            raise ValueError(f"missing column(s): {', '.join(missing)}")
    return raw


def _convert_all(raw: pl.DataFrame) -> list[pl.Expr]:
    """The conversions of every column to the checked types (absent ones null)."""
    exprs = [
        convert_column("type", raw.schema["type"])
        if "type" in raw.columns
        else pl.lit(None, pl.String).alias("type")
    ]
    for name in _ALL_FIELDS:
        if name in raw.columns:
            exprs.append(convert_column(name, raw.schema[name]).alias(name))
        else:
            dtype = TICK_SCHEMA["ts"] if name == "ts" else _RAW_JSON_SCHEMA[name]
            exprs.append(pl.lit(None, dtype).alias(name))
    return exprs


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _split(
    checked: pl.DataFrame, rows_of: Callable[[int, pl.Series], pl.DataFrame]
) -> _Rows:
    """Checked rows (with ``message`` and ``row``) into good rows and rejections.

    ``rows_of(index, rows)`` gives message ``index``'s received rows, for the
    rejection's payload.
    """
    ticks, deals = _good(checked)
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
    return _Rows(ticks, deals, rejections, _unknown_of(bad))


def decode_arrow_many(
    messages: Sequence[tuple[int, bytes | None]],
    *,
    known_accounts: pl.Series | None = None,
    not_after: datetime | None = None,
) -> Decoded:
    """Decode many ``arrow-ipc-v1`` messages as :func:`decode_arrow` does each.

    The messages whose columns have the same types are converted and checked
    together: one set of polars calls instead of one per message (about a
    millisecond each). A group whose conversion fails is decoded message by
    message, so every message gets the outcome it would get alone.

    Args:
        messages: ``(index, value)`` of each message, in order.
        known_accounts: If given, ticks and deals of other accounts are rejected.
        not_after: If given, ticks and deals with a later ``ts`` are rejected
            (:attr:`Reason.FUTURE_TS`).

    Returns:
        The good ticks and deals (``message`` = the index) in message order,
        and the rejections in message order.
    """
    return _finish(
        [_arrow_many_rows(messages, known_accounts, not_after)], resort=False
    )


def _arrow_many_rows(
    messages: Sequence[tuple[int, bytes | None]],
    known: pl.Series | None,
    not_after: datetime | None,
) -> _Rows:
    parts: list[_Rows] = []
    raws: dict[int, pl.DataFrame] = {}
    groups: dict[tuple[pl.DataType | None, ...], list[int]] = {}
    for index, value in messages:
        try:
            raw = _read_arrow(value)
        except _UNREADABLE as exc:
            parts.append(
                _Rows(
                    _EMPTY_TICK_ROWS,
                    _EMPTY_DEAL_ROWS,
                    [Rejection(index, Reason.BAD_BATCH, _first_line(exc))],
                )
            )
            continue
        raws[index] = raw
        key = tuple(
            raw.schema[name] if name in raw.columns else None
            for name in ("type", *_ALL_FIELDS)
        )
        groups.setdefault(key, []).append(index)
    values = dict(messages)
    for indexes in groups.values():
        decoded = _decode_group(indexes, raws, known, not_after)
        if decoded is None:
            parts.extend(
                _arrow_rows(values[index], index, known, not_after) for index in indexes
            )
        else:
            parts.append(decoded)
    if not parts:
        return _Rows(_EMPTY_TICK_ROWS, _EMPTY_DEAL_ROWS, [])
    tick_parts = [p.ticks for p in parts if p.ticks.height]
    deal_parts = [p.deals for p in parts if p.deals.height]
    ticks = pl.concat(tick_parts) if tick_parts else _EMPTY_TICK_ROWS
    deals = pl.concat(deal_parts) if deal_parts else _EMPTY_DEAL_ROWS
    if len(tick_parts) > 1:
        ticks = ticks.sort("message", "row", maintain_order=True)
    if len(deal_parts) > 1:
        deals = deals.sort("message", "row", maintain_order=True)
    rejections = [r for p in parts for r in p.rejections]
    rejections.sort(key=lambda r: r.index)
    return _Rows(ticks, deals, rejections, _unknown_in(parts))


def _decode_group(
    indexes: Sequence[int],
    raws: dict[int, pl.DataFrame],
    known: pl.Series | None,
    not_after: datetime | None,
) -> _Rows | None:
    """Messages whose columns have the same types; None if conversion fails."""
    first = raws[indexes[0]]
    names = [n for n in ("type", *_ALL_FIELDS) if n in first.columns]
    picked = [raws[i].select(names) for i in indexes]
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
            *_convert_all(raw),
        )
    except (pl.exceptions.PolarsError, ValueError):
        return None
    # ``row`` is the row within its message, as decode_arrow numbers it.
    ids = pl.Series(indexes, dtype=pl.UInt32)
    offsets = pl.Series([starts[i] for i in indexes], dtype=pl.UInt32)
    shift = pl.col("message").replace_strict(ids, offsets, return_dtype=pl.UInt32)
    converted = converted.with_columns((pl.col("row") - shift).alias("row"))
    checked = _check(
        converted.with_columns(pl.col("ts").alias("ts_parsed")), known, not_after
    )
    return _split(checked, lambda index, rows: raws[index][rows])


def convert_column(name: str, dtype: pl.DataType) -> pl.Expr:
    """An expression converting a received batch column to the checked type.

    Args:
        name: ``type``, a tick column (``account_id``, ``ts``, ``equity``,
            ``balance``) or a deal column.
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
        if dtype == pl.Null:
            return col.cast(pl.Datetime("us", "UTC"))
        raise ValueError(f"column ts has type {dtype}")
    if name in _INT_FIELDS:
        if not (dtype.is_integer() or dtype == pl.Null):
            raise ValueError(f"column {name} has type {dtype}")
        return col.cast(pl.Int64)
    if name in _TEXT_FIELDS or name == "type":
        if dtype not in (pl.String, pl.Categorical, pl.Null):
            raise ValueError(f"column {name} has type {dtype}")
        return col.cast(pl.String)
    if not (dtype.is_numeric() or dtype == pl.Null):
        raise ValueError(f"column {name} has type {dtype}")
    return col.cast(pl.Float64)


#: The tick columns' conversion (the name before deals).
convert_tick_column = convert_column


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue())


__all__ = [
    "ARROW_ENCODING",
    "DEAL_FRAME_SCHEMA",
    "DEAL_TYPE",
    "EMPTY_DECODED_DEALS",
    "EMPTY_DECODED_TICKS",
    "ENCODINGS",
    "ENCODING_HEADER",
    "EQUITY_TYPE",
    "JSON_ENCODING",
    "Decoded",
    "MessageValues",
    "Reason",
    "Rejection",
    "convert_column",
    "convert_tick_column",
    "decode_arrow",
    "decode_arrow_many",
    "decode_json",
    "decode_messages",
    "encode_arrow",
]
