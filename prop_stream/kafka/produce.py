"""Replay a tick file to a Kafka topic (``prop-stream produce``).

The topic is created first unless it exists (``partitions`` partitions, one
replica per broker up to three): brokers do not auto-create topics. The file's
ticks are then sent in time order (a stable sort by ``ts``, so ticks of one
account with equal times keep their file order, as the backtest's stable sort
does), keyed so that one account's ticks stay in one partition:

- ``json``: one message per tick, key = ``account_id`` in decimal ASCII, value
  ``{"account_id": …, "ts": "…Z", "equity": …, "balance": …}`` (``ts`` with
  microseconds);
- ``batch``: ``arrow-ipc-v1`` messages of up to ``batch_rows`` ticks, each holding
  the ticks of one partition in order, sent to that partition explicitly with
  header ``encoding: arrow-ipc-v1`` and no key. The partition of an account is
  the one Kafka's default partitioner gives its decimal key, so JSON and batch
  producers can share a topic.

With a deals file (``--deals``, ``interfaces.md`` section 5) the deals travel on
the same topic with the same key: JSON messages with ``"type": "deal"``, or rows
of the batch messages whose ``type`` column says ``deal``. Ticks and deals are
sent in one stable order by (``ts``, a deal before a tick), so each account's
events arrive in the order the backtest judges them (a stable sort by
(``account_id``, ``ts``), a deal before a tick at an equal ``ts``, file order
breaking the remaining ties).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final, Literal

import polars as pl
from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.partitioner.default import murmur2
from tqdm import tqdm

from prop_stream.kafka.admin import DEFAULT_BOOTSTRAP_TIMEOUT_S, ensure_topic
from prop_stream.kafka.decode import (
    ARROW_ENCODING,
    DEAL_FRAME_SCHEMA,
    DEAL_TYPE,
    ENCODING_HEADER,
    convert_column,
    convert_tick_column,
    encode_arrow,
)
from prop_stream.kafka.exceptions import KafkaUnavailableError, ProduceError
from prop_stream.rules import TICK_SCHEMA

Encoding = Literal["json", "batch"]

#: Ticks per batch message: 32 bytes each keeps a message under the broker's
#: default 1 MB ``message.max.bytes``.
DEFAULT_BATCH_ROWS: Final = 25_000
#: Partitions of a topic ``produce`` creates.
DEFAULT_PARTITIONS: Final = 6
#: Longest wait for the broker to acknowledge every message.
ACK_TIMEOUT_S: Final = 60.0
_TS_FORMAT: Final = "%Y-%m-%dT%H:%M:%S%.6fZ"


def read_tick_file(path: str | Path) -> pl.DataFrame:
    """Read a Parquet or CSV tick file as the engine's columns, in time order.

    Args:
        path: A ``.parquet``/``.pq`` or ``.csv`` file with ``account_id``, ``ts``
            (timestamp, ISO 8601 text or epoch ms), ``equity`` and ``balance``.

    Returns:
        The ticks, stably sorted by ``ts``.

    Raises:
        ProduceError: The file can't be read or lacks a column.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            raw = pl.read_parquet(path)
        elif suffix == ".csv":
            raw = pl.read_csv(path, infer_schema_length=10_000)
        else:
            raise ProduceError(f"{path}: not a .parquet or .csv file")
        missing = [name for name in TICK_SCHEMA if name not in raw.columns]
        if missing:
            raise ProduceError(f"{path}: missing column(s): {', '.join(missing)}")
        frame = raw.select(
            convert_tick_column(name, raw.schema[name]).alias(name)
            for name in TICK_SCHEMA
        )
    except (OSError, pl.exceptions.PolarsError, ValueError) as exc:
        raise ProduceError(f"{path}: can't read ticks: {exc}") from exc
    return frame.sort("ts", maintain_order=True)


def read_deal_file(path: str | Path) -> pl.DataFrame:
    """Read a Parquet or CSV deal file as the deal columns, in time order.

    The values are not judged here: a malformed deal is sent as it is and the
    service's decoder sends it to the DLQ with its reason (docs/kafka.md).

    Args:
        path: A ``.parquet``/``.pq`` or ``.csv`` file with ``account_id``, ``ts``
            (timestamp, ISO 8601 text or epoch ms), ``deal_id``, ``position_id``,
            ``symbol``, ``side``, ``volume``, ``price`` and ``entry``.

    Returns:
        The deals, stably sorted by ``ts``.

    Raises:
        ProduceError: The file can't be read, lacks a column or has a column of
            a type that can't hold its field.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            raw = pl.read_parquet(path)
        elif suffix == ".csv":
            raw = pl.read_csv(
                path,
                infer_schema_length=10_000,
                schema_overrides=dict.fromkeys(("symbol", "side", "entry"), pl.String),
            )
        else:
            raise ProduceError(f"{path}: not a .parquet or .csv file")
        missing = [name for name in DEAL_FRAME_SCHEMA if name not in raw.columns]
        if missing:
            raise ProduceError(f"{path}: missing column(s): {', '.join(missing)}")
        frame = raw.select(
            convert_column(name, raw.schema[name]).alias(name)
            for name in DEAL_FRAME_SCHEMA
        )
    except (OSError, pl.exceptions.PolarsError, ValueError) as exc:
        raise ProduceError(f"{path}: can't read deals: {exc}") from exc
    if frame["ts"].null_count():
        row = int(frame.with_row_index().filter(pl.col("ts").is_null())["index"][0])
        raise ProduceError(f"{path}: row {row + 1}: ts is not a timestamp")
    return frame.sort("ts", maintain_order=True)


def merge_events(ticks: pl.DataFrame, deals: pl.DataFrame) -> pl.DataFrame:
    """Ticks and deals as one frame in sending order, ``type`` saying which.

    Args:
        ticks: The tick columns, in file order sorted stably by ``ts``.
        deals: The deal columns, likewise.

    Returns:
        ``type`` (``deal`` or null for a tick) and every tick and deal column
        (null where a row's kind has none), sorted stably by (``ts``, a deal
        before a tick).
    """
    deal_rows = deals.select(
        pl.lit(DEAL_TYPE).alias("type"),
        *(pl.col(n) for n in DEAL_FRAME_SCHEMA),
        pl.lit(0, pl.Int8).alias("_kind"),
    )
    tick_rows = ticks.select(
        pl.lit(None, pl.String).alias("type"),
        *(pl.col(n) for n in TICK_SCHEMA),
        pl.lit(1, pl.Int8).alias("_kind"),
    )
    merged = pl.concat([deal_rows, tick_rows], how="diagonal_relaxed")
    return merged.sort("ts", "_kind", maintain_order=True).drop("_kind")


def produce_file(
    path: str | Path,
    *,
    bootstrap: str,
    topic: str,
    deals: str | Path | None = None,
    encoding: Encoding = "json",
    progress: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    partitions: int = DEFAULT_PARTITIONS,
    bootstrap_timeout_s: float = DEFAULT_BOOTSTRAP_TIMEOUT_S,
) -> int:
    """Replay a tick file to a topic and wait until every message is acknowledged.

    Args:
        path: The Parquet or CSV tick file.
        bootstrap: ``host:port`` of a broker.
        topic: The topic; created with ``partitions`` partitions unless it
            exists.
        deals: A Parquet or CSV deal file to send with the ticks, interleaved
            by (``ts``, a deal before a tick); None sends ticks only.
        encoding: ``json`` (one tick per message) or ``batch`` (Arrow IPC).
        progress: Show a progress bar on stderr when it is a terminal.
        batch_rows: Ticks per batch message.
        partitions: Partitions of the topic if it is created.
        bootstrap_timeout_s: Longest wait for a broker to answer at all.

    Returns:
        The number of ticks and deals sent.

    Raises:
        ProduceError: A file is unreadable or the settings are bad.
        KafkaUnavailableError: No broker answered, or the broker did not
            acknowledge every message.
        KafkaSourceError: The topic could not be created.
    """
    if encoding not in ("json", "batch"):
        raise ProduceError(f"unknown encoding {encoding!r} (json or batch)")
    if batch_rows < 1:
        raise ProduceError("batch_rows must be positive")
    if partitions < 1:
        raise ProduceError(f"partitions must be at least 1, got {partitions}")
    ticks = read_tick_file(path)
    events = ticks if deals is None else merge_events(ticks, read_deal_file(deals))
    ensure_topic(
        bootstrap,
        topic,
        partitions=partitions,
        bootstrap_timeout_s=bootstrap_timeout_s,
        client_id="prop-stream-produce",
    )
    try:
        producer = KafkaProducer(
            bootstrap_servers=bootstrap.split(","),
            client_id="prop-stream-produce",
            acks="all",
            linger_ms=20,
            batch_size=1024 * 1024,
            max_request_size=4 * 1024 * 1024,
            bootstrap_timeout_ms=int(bootstrap_timeout_s * 1000),
            # A broker that goes away mid-replay fails the sends in bounded time.
            max_block_ms=int(ACK_TIMEOUT_S * 1000),
            request_timeout_ms=15_000,
            delivery_timeout_ms=int(ACK_TIMEOUT_S * 1000) - 5_000,
        )
    except KafkaError as exc:
        raise KafkaUnavailableError(
            f"no Kafka broker answers at {bootstrap}: {exc}", bootstrap=bootstrap
        ) from exc
    failures = _Failures()
    bar = tqdm(
        total=events.height,
        unit="event" if deals is not None else "tick",
        unit_scale=True,
        desc=f"produce {topic}",
        disable=not (progress and sys.stderr.isatty()),
        file=sys.stderr,
        leave=False,
    )
    try:
        found = producer.partitions_for(topic)
        if not found:
            raise ProduceError(f"topic {topic!r} does not exist on {bootstrap}")
        with bar:
            if encoding == "json":
                _send_json(producer, topic, events, bar, failures)
            else:
                _send_batches(
                    producer, topic, events, len(found), batch_rows, bar, failures
                )
            producer.flush(timeout=ACK_TIMEOUT_S)
    except KafkaError as exc:
        raise KafkaUnavailableError(
            f"producing to {topic} at {bootstrap} failed: {exc}", bootstrap=bootstrap
        ) from exc
    finally:
        producer.close(timeout=10)
    if failures.count:
        raise KafkaUnavailableError(
            f"{failures.count} message(s) to {topic} were not acknowledged: "
            f"{failures.first}",
            bootstrap=bootstrap,
        )
    return events.height


class _Failures:
    """Counts the sends the broker did not acknowledge (their futures' errbacks)."""

    __slots__ = ("count", "first")

    def __init__(self) -> None:
        self.count = 0
        self.first: BaseException | None = None

    def __call__(self, exc: BaseException) -> None:
        if self.first is None:
            self.first = exc
        self.count += 1


def partition_of(account_id: int, partitions: int) -> int:
    """The partition Kafka's default partitioner gives an account's key.

    Args:
        account_id: The account.
        partitions: The topic's partition count.

    Returns:
        The partition number.
    """
    return int(murmur2(str(account_id).encode()) & 0x7FFFFFFF) % partitions


def _send_json(
    producer: KafkaProducer,
    topic: str,
    ticks: pl.DataFrame,
    bar: tqdm,
    failures: _Failures,
) -> None:
    chunk = 100_000
    has_deals = "type" in ticks.columns
    for start in range(0, ticks.height, chunk):
        part = ticks.slice(start, chunk)
        tick_value = pl.struct(
            "account_id",
            pl.col("ts").dt.strftime(_TS_FORMAT),
            "equity",
            "balance",
        ).struct.json_encode()
        value = tick_value
        if has_deals:
            deal_value = pl.struct(
                "type",
                "account_id",
                pl.col("ts").dt.strftime(_TS_FORMAT),
                *(n for n in DEAL_FRAME_SCHEMA if n not in ("account_id", "ts")),
            ).struct.json_encode()
            value = (
                pl.when(pl.col("type") == DEAL_TYPE)
                .then(deal_value)
                .otherwise(tick_value)
            )
        encoded = part.select(
            pl.col("account_id").cast(pl.String).alias("key"),
            value.alias("value"),
        )
        for key, value in encoded.iter_rows():
            producer.send(topic, key=key.encode(), value=value.encode()).add_errback(
                failures
            )
        bar.update(part.height)


def _send_batches(
    producer: KafkaProducer,
    topic: str,
    ticks: pl.DataFrame,
    partitions: int,
    batch_rows: int,
    bar: tqdm,
    failures: _Failures,
) -> None:
    accounts = ticks["account_id"].unique().to_list()
    mapping = pl.DataFrame(
        {
            "account_id": accounts,
            "partition": [partition_of(a, partitions) for a in accounts],
        },
        schema={"account_id": pl.Int64, "partition": pl.Int32},
    )
    routed = ticks.join(mapping, on="account_id", how="left", maintain_order="left")
    headers = [(ENCODING_HEADER, ARROW_ENCODING.encode())]
    for (partition,), part in routed.group_by("partition", maintain_order=True):
        for start in range(0, part.height, batch_rows):
            rows = part.slice(start, batch_rows)
            producer.send(
                topic,
                value=encode_arrow(rows),
                partition=int(str(partition)),
                headers=headers,
            ).add_errback(failures)
            bar.update(rows.height)


__all__ = [
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_PARTITIONS",
    "Encoding",
    "merge_events",
    "partition_of",
    "produce_file",
    "read_deal_file",
    "read_tick_file",
]
