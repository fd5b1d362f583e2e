"""Kafka records straight from the fetch buffers, without one Python object each.

kafka-python builds a ``ConsumerRecord`` per record in pure Python (about 128k
records/s on the 2-core machine), which capped the JSON source far below the
decoder's speed. This module keeps kafka-python for everything but that step:
connections, metadata, fetch requests and sessions, positions, seeks, offset
resets, reconnects. :func:`install` replaces the consumer's per-partition record
reader (``Fetcher.PartitionRecords``, which kafka-python builds from each
partition's raw ``records`` bytes of a fetch response) with
:class:`RawPartitionRecords`, which hands the buffer to the Rust core
(:func:`prop_stream.rules.scan_record_batches`): it walks the v2 record batches,
checks their CRC-32C, skips control batches, and keeps offsets, timestamps, the
``encoding`` header and the spans of keys and values.

``KafkaConsumer.poll`` then returns, per partition, a list of :class:`Chunk`
objects, each repeated ``len(chunk)`` times, so kafka-python's ``max_records``
accounting and position updates stay exact; :func:`chunks_of` takes the distinct
chunks back out. :class:`RawValues` joins the chunks of a poll into the
:class:`~prop_stream.kafka.decode.MessageValues` the JSON decoder reads: one
NDJSON buffer per chunk range, built in Rust.

**Scope and versions.** :func:`install` sets attributes of one consumer's own
objects; kafka-python's classes and modules are never changed, so other clients
in the process keep the library's behaviour. Those attributes are kafka-python
internals: :func:`supported` checks that the installed version is one this was
tested with (:data:`TESTED_KAFKA_PYTHON`), and the source reads records through
kafka-python alone otherwise.

**Fallback.** Compressed batches (gzip, snappy, lz4, zstd), the old message
formats (magic 0 and 1) and ``isolation_level="read_committed"`` are left to
kafka-python: from the first such batch on, the rest of that partition's fetch
is read by kafka-python's own ``PartitionRecords`` and comes back as a
:class:`RecordsChunk` of ``ConsumerRecord`` objects (correct, at kafka-python's
speed).
"""

from __future__ import annotations

import bisect
import functools
import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from types import MethodType
from typing import Any, Final, Protocol

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CorruptRecordError, KafkaConnectionError
from kafka.net.transport import KafkaTCPTransport
from kafka.protocol.frame import KafkaBytes
from kafka.record.memory_records import MemoryRecords
from kafka.structs import TopicPartition

from prop_stream.kafka.decode import ENCODING_HEADER, JSON_ENCODING
from prop_stream.rules import RecordScan, scan_record_batches

logger = logging.getLogger(__name__)

_READ_COMMITTED: Final = 1  # kafka.consumer.fetcher.IsolationLevel.READ_COMMITTED
#: Bytes asked of the socket per ``recv`` (kafka-python asks 4 KiB).
RECV_BYTES: Final = 256 * 1024


class Chunk(Protocol):
    """Consecutive records of one partition, read from one fetch buffer."""

    topic_partition: TopicPartition

    def __len__(self) -> int: ...

    @property
    def last_offset(self) -> int:
        """The offset of the last record."""

    @property
    def json_only(self) -> bool:
        """Whether no record names an encoding other than ``json``."""

    def value(self, i: int) -> bytes | None:
        """Record ``i``'s value."""

    def encoding(self, i: int) -> str | None:
        """Record ``i``'s ``encoding`` header (None: absent or empty)."""

    def ndjson(self, lo: int, hi: int) -> bytes | None:
        """Values ``lo..hi`` joined by newlines; None if one is null."""

    def record(self, i: int) -> ConsumerRecord:
        """Record ``i`` as kafka-python's ``ConsumerRecord`` (for dead letters)."""


class ScanChunk:
    """A :class:`Chunk` read by the Rust core (:class:`RecordScan`)."""

    __slots__ = ("_scan", "topic_partition")

    def __init__(self, tp: TopicPartition, scan: RecordScan) -> None:
        self.topic_partition = tp
        self._scan = scan

    def __len__(self) -> int:
        return len(self._scan)

    @property
    def last_offset(self) -> int:
        """See :class:`Chunk`."""
        return self._scan.last_offset

    @property
    def json_only(self) -> bool:
        """See :class:`Chunk`."""
        return self._scan.json_only

    def value(self, i: int) -> bytes | None:
        """See :class:`Chunk`."""
        return self._scan.value(i)

    def encoding(self, i: int) -> str | None:
        """See :class:`Chunk`."""
        return self._scan.encoding(i)

    def ndjson(self, lo: int, hi: int) -> bytes | None:
        """See :class:`Chunk`."""
        return self._scan.ndjson(lo, hi)

    def record(self, i: int) -> ConsumerRecord:
        """See :class:`Chunk`."""
        scan = self._scan
        tp = self.topic_partition
        key = scan.key(i)
        value = scan.value(i)
        headers = scan.headers(i)
        header_size = (
            sum(len(k.encode()) + (len(v) if v is not None else 0) for k, v in headers)
            if headers
            else -1
        )
        return ConsumerRecord(
            tp.topic,
            tp.partition,
            scan.leader_epoch,
            scan.offset(i),
            scan.timestamp(i),
            scan.timestamp_type(i),
            key,
            value,
            headers,
            None,
            len(key) if key is not None else -1,
            len(value) if value is not None else -1,
            header_size,
        )


class RecordsChunk:
    """A :class:`Chunk` of ``ConsumerRecord`` objects (the fallback path)."""

    __slots__ = ("_records", "topic_partition")

    def __init__(self, tp: TopicPartition, records: Sequence[ConsumerRecord]) -> None:
        self.topic_partition = tp
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    @property
    def last_offset(self) -> int:
        """See :class:`Chunk`."""
        return int(self._records[-1].offset)

    @property
    def json_only(self) -> bool:
        """See :class:`Chunk`."""
        return all(self.encoding(i) in (None, JSON_ENCODING) for i in range(len(self)))

    def value(self, i: int) -> bytes | None:
        """See :class:`Chunk`."""
        value: bytes | None = self._records[i].value
        return value

    def encoding(self, i: int) -> str | None:
        """See :class:`Chunk`."""
        return header_encoding(self._records[i].headers)

    def ndjson(self, lo: int, hi: int) -> bytes | None:
        """See :class:`Chunk`."""
        values = [r.value for r in self._records[lo:hi]]
        if any(v is None for v in values):
            return None
        return b"\n".join(values)

    def record(self, i: int) -> ConsumerRecord:
        """See :class:`Chunk`."""
        return self._records[i]


def header_encoding(headers: Sequence[tuple[str, bytes | None]] | None) -> str | None:
    """The first ``encoding`` header's value (None when absent or empty)."""
    if not headers:
        return None
    for key, value in headers:
        if key == ENCODING_HEADER:
            return value.decode("utf-8", "replace") if value else None
    return None


class RawPartitionRecords:
    """Stands in for kafka-python's ``Fetcher.PartitionRecords``.

    kafka-python builds one per partition of a fetch response (same arguments)
    and calls :meth:`take` for up to ``n`` records, reading ``next_fetch_offset``
    after each call to move the partition's position. :meth:`take` returns one
    :class:`Chunk` repeated ``len(chunk)`` times.
    """

    def __init__(
        self,
        fetch_offset: int,
        tp: TopicPartition,
        records: MemoryRecords,
        key_deserializer: Any = None,
        value_deserializer: Any = None,
        check_crcs: bool = True,
        isolation_level: int = 0,
        aborted_transactions: Any = None,
        metric_aggregator: Any = None,
        on_drain: Callable[[Any], None] = lambda _: None,
    ) -> None:
        self.fetch_offset = fetch_offset
        self.topic_partition = tp
        self.leader_epoch = -1
        self.next_fetch_offset = fetch_offset
        self.bytes_read = 0
        self.records_read = 0
        self.metric_aggregator = metric_aggregator
        self.on_drain = on_drain
        self._check_crcs = check_crcs
        self._fallback_args: dict[str, Any] = {
            "key_deserializer": key_deserializer,
            "value_deserializer": value_deserializer,
            "check_crcs": check_crcs,
            "isolation_level": isolation_level,
            "aborted_transactions": aborted_transactions,
        }
        buffer = records._buffer  # the raw bytes are the point
        self._buffer: bytes | None = (
            buffer if isinstance(buffer, bytes) else bytes(buffer or b"")
        )
        self._pos = 0
        self._delegate: Any = None
        self._drained = False
        if (
            isolation_level == _READ_COMMITTED
            or key_deserializer is not None
            or value_deserializer is not None
        ):
            self._fall_back()

    def __bool__(self) -> bool:
        return not self._drained

    def drain(self) -> None:
        """Forget the rest of the buffer (kafka-python calls it too)."""
        if self._drained:
            return
        self._drained = True
        self._buffer = None
        if self._delegate is not None:
            self._delegate.drain()
        if self.metric_aggregator:
            self.metric_aggregator.record(
                self.topic_partition, self.bytes_read, self.records_read
            )
        self.on_drain(self)

    def take(self, n: int | None = None) -> list[Chunk]:
        """Up to ``n`` records, as one chunk repeated once per record."""
        if self._drained:
            return []
        limit = n if n is not None else 1 << 62
        if self._delegate is not None:
            return self._take_fallback(limit)
        assert self._buffer is not None  # noqa: S101 - None only once drained
        try:
            scan = scan_record_batches(
                self._buffer,
                self._pos,
                self.next_fetch_offset,
                limit,
                check_crc=self._check_crcs,
            )
        except ValueError as exc:
            raise CorruptRecordError(
                f"partition {self.topic_partition}: {exc}"
            ) from exc
        self._pos = scan.end
        self.next_fetch_offset = scan.next_offset
        if scan.leader_epoch >= 0:
            self.leader_epoch = scan.leader_epoch
        self.bytes_read += scan.bytes_read
        self.records_read += len(scan)
        if scan.stop == "unsupported":
            self._fall_back()
            if not len(scan):
                return self._take_fallback(limit)
        elif scan.stop == "end":
            self.drain()
        if not len(scan):
            return []
        chunk = ScanChunk(self.topic_partition, scan)
        return [chunk] * len(scan)

    def _fall_back(self) -> None:
        """Read the rest of the buffer with kafka-python's own record reader."""
        assert self._buffer is not None  # noqa: S101 - None only once drained
        logger.debug(
            "%s: kafka-python reads from offset %d (compressed or old-format batch)",
            self.topic_partition,
            self.next_fetch_offset,
        )
        self._delegate = Fetcher.PartitionRecords(
            self.next_fetch_offset,
            self.topic_partition,
            MemoryRecords(self._buffer[self._pos :]),
            **self._fallback_args,
        )

    def _take_fallback(self, limit: int) -> list[Chunk]:
        delegate = self._delegate
        records = delegate.take(limit)
        self.next_fetch_offset = delegate.next_fetch_offset
        self.leader_epoch = delegate.leader_epoch
        self.records_read += len(records)
        if not delegate:
            self.drain()
        if not records:
            return []
        chunk = RecordsChunk(self.topic_partition, records)
        return [chunk] * len(records)


#: The kafka-python versions whose internals this module was tested with: it
#: sets attributes of a consumer's fetcher, connection manager, transports and
#: protocol parsers. Any other version reads records with kafka-python's own
#: reader (:func:`supported`).
TESTED_KAFKA_PYTHON: Final = frozenset({"3.0.12"})

_warned_versions: set[str | None] = set()


def installed_kafka_python() -> str | None:
    """The installed kafka-python's version (None if the metadata is missing)."""
    try:
        return importlib.metadata.version("kafka-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def supported() -> bool:
    """Whether the installed kafka-python is one this module was tested with.

    Otherwise logs one warning (once per process and version) and returns
    False: the source then reads records through kafka-python alone.
    """
    version = installed_kafka_python()
    if version in TESTED_KAFKA_PYTHON:
        return True
    if version not in _warned_versions:
        _warned_versions.add(version)
        logger.warning(
            "kafka-python %s is not a version the fast record path was tested "
            "with (%s): records are read by kafka-python itself, more slowly",
            version or "(unknown version)",
            ", ".join(sorted(TESTED_KAFKA_PYTHON)),
        )
    return False


def install(consumer: KafkaConsumer) -> None:
    """Make ``consumer.poll`` return :class:`Chunk` objects instead of records.

    Everything replaced is an attribute of this consumer's own objects (its
    fetcher, its connection manager, and the transports and protocol parsers
    of the connections that manager opens), never a class or module of
    kafka-python: other consumers and producers in the process are untouched.
    Call it only when :func:`supported` is True.

    Also makes the consumer's network reads copy less
    (:func:`tune_connection`, for every connection it opens from now on).
    """
    # An instance attribute: `self.PartitionRecords(...)` in the fetcher finds it.
    consumer._fetcher.PartitionRecords = RawPartitionRecords  # no public hook
    manager = consumer._manager
    connect = manager._connect

    async def _connect(node: Any, conn: Any, *args: Any, **kwargs: Any) -> None:
        # kafka-python schedules `self._connect(...)` for every (re)connect, so
        # this instance attribute sees each connection this consumer opens.
        await connect(node, conn, *args, **kwargs)
        tune_connection(conn)

    manager._connect = _connect
    for conn in list(manager._conns.values()):
        tune_connection(conn)


def tune_connection(conn: Any) -> None:
    """Make one kafka-python connection copy fetch responses less.

    Profiling the batch encoding (160 MB per 5M ticks) showed kafka-python's
    network thread busy for most of the run, holding the GIL: it reads the
    socket 4 KiB per ``recv`` call, and ``KafkaBytes.read`` copies a whole
    response twice (a ``bytearray`` slice, then ``bytes`` of it). For a
    plaintext connection (``KafkaTCPTransport``; the SSL transport has its own
    reader and is left alone) this sets, on this connection's objects only:
    the transport's ``_sock_recv`` to one reading :data:`RECV_BYTES` per call,
    and the protocol parser's ``_process_response`` to one that reads the
    response buffer with a single copy (:class:`OneCopyKafkaBytes`). Both keep
    kafka-python's behaviour (errors, positions).

    Args:
        conn: A ``kafka.net.connection.KafkaConnection`` (after its connect;
            one whose connect failed has no transport and is left alone).
    """
    transport: Any = getattr(conn, "transport", None)
    if type(transport) is KafkaTCPTransport and "_sock_recv" not in vars(transport):
        transport._sock_recv = MethodType(_sock_recv, transport)
    parser = getattr(conn, "parser", None)
    if parser is not None and "_process_response" not in vars(parser):
        parser._process_response = functools.partial(
            _process_one_copy, parser._process_response
        )


def _sock_recv(self: Any) -> tuple[bytes, KafkaConnectionError | None]:
    """Everything the socket has now, :data:`RECV_BYTES` per ``recv`` call."""
    sock = self._sock
    parts: list[bytes] = []
    error = None
    while True:
        try:
            data = sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            break
        except BaseException as exc:  # kafka-python closes the connection on any
            # Debug only: the source reports the outage itself, once per retry.
            logger.debug("%s: error receiving network data", self, exc_info=True)
            error = KafkaConnectionError(exc)
            break
        if not data:
            logger.debug("%s: socket disconnected", self)
            error = KafkaConnectionError("socket disconnected")
            break
        parts.append(data)
    return (parts[0] if len(parts) == 1 else b"".join(parts)), error


class OneCopyKafkaBytes(KafkaBytes):  # type: ignore[misc]  # untyped base
    """A response buffer whose ``read`` copies once instead of twice."""

    _idx: int  # KafkaBytes' read position

    def read(self, nbytes: int | None = None) -> bytes:
        """``KafkaBytes.read`` through a ``memoryview``: one copy."""
        start = self._idx
        end = len(self) if nbytes is None else min(start + nbytes, len(self))
        self._idx = end
        return bytes(memoryview(self)[start:end])


def _process_one_copy(process: Callable[[Any], Any], read_buffer: Any) -> Any:
    """Parse a response with its buffer read by :class:`OneCopyKafkaBytes`."""
    if type(read_buffer) is KafkaBytes:
        # Same layout (a subclass adding only methods): only this buffer
        # object changes class, not KafkaBytes.
        read_buffer.__class__ = OneCopyKafkaBytes
    return process(read_buffer)


def chunks_of(repeated: Sequence[Chunk]) -> list[Chunk]:
    """The distinct chunks of a list :meth:`RawPartitionRecords.take` built."""
    chunks = []
    i = 0
    while i < len(repeated):
        chunk = repeated[i]
        chunks.append(chunk)
        i += len(chunk)
    return chunks


class RawValues:
    """The records of a poll's chunks, indexed 0..n-1 in chunk order.

    A :class:`~prop_stream.kafka.decode.MessageValues` for the JSON decoder, and
    ``raw[i]`` gives record ``i`` as a ``ConsumerRecord`` (for dead letters).
    """

    __slots__ = ("_chunks", "_starts", "_total")

    def __init__(self, chunks: Sequence[Chunk]) -> None:
        self._chunks = list(chunks)
        self._starts: list[int] = []
        total = 0
        for chunk in self._chunks:
            self._starts.append(total)
            total += len(chunk)
        self._total = total

    def __len__(self) -> int:
        return self._total

    @property
    def json_only(self) -> bool:
        """Whether every record is JSON (no other ``encoding`` header)."""
        return all(chunk.json_only for chunk in self._chunks)

    def _locate(self, i: int) -> tuple[Chunk, int]:
        if not 0 <= i < self._total:
            raise IndexError(i)
        c = bisect.bisect_right(self._starts, i) - 1
        return self._chunks[c], i - self._starts[c]

    def value(self, i: int) -> bytes | None:
        """See :class:`~prop_stream.kafka.decode.MessageValues`."""
        chunk, j = self._locate(i)
        return chunk.value(j)

    def encoding(self, i: int) -> str | None:
        """Record ``i``'s ``encoding`` header."""
        chunk, j = self._locate(i)
        return chunk.encoding(j)

    def __getitem__(self, i: int) -> ConsumerRecord:
        chunk, j = self._locate(i)
        return chunk.record(j)

    def joined(self, start: int, end: int) -> bytes | None:
        """See :class:`~prop_stream.kafka.decode.MessageValues`."""
        pieces = []
        for chunk, base in zip(self._chunks, self._starts, strict=True):
            lo = max(start, base)
            hi = min(end, base + len(chunk))
            if lo >= hi:
                continue
            piece = chunk.ndjson(lo - base, hi - base)
            if piece is None:
                return None
            pieces.append(piece)
        return pieces[0] if len(pieces) == 1 else b"\n".join(pieces)

    def spans(self) -> list[tuple[str, int, int, int]]:
        """``(topic, partition, first, end)`` of each chunk's record indexes."""
        return [
            (c.topic_partition.topic, c.topic_partition.partition, s, s + len(c))
            for c, s in zip(self._chunks, self._starts, strict=True)
        ]

    def values(self) -> list[bytes | None]:
        """Every value as bytes (the mixed-encoding path)."""
        return [c.value(j) for c in self._chunks for j in range(len(c))]

    def encodings(self) -> list[str | None]:
        """Every record's ``encoding`` header."""
        return [c.encoding(j) for c in self._chunks for j in range(len(c))]


__all__ = [
    "TESTED_KAFKA_PYTHON",
    "Chunk",
    "OneCopyKafkaBytes",
    "RawPartitionRecords",
    "RawValues",
    "RecordsChunk",
    "ScanChunk",
    "chunks_of",
    "header_encoding",
    "install",
    "installed_kafka_python",
    "supported",
    "tune_connection",
]
