"""The production tick source: a Kafka consumer with positions kept in DuckDB.

:class:`KafkaSource` has the :class:`~prop_stream.evaluator.sources.TickSource`
methods (``poll/seek/position/start/track/untrack/close`` and ``name``); the
evaluator wraps it (``prop_stream.evaluator.service.KafkaTickSource``), since the
``kafka`` layer sits below the evaluator and does not import it.

**Effectively once.** The position (``{"<topic>:<partition>": next_offset}``) goes
into DuckDB in the transaction of the batch's results, and the engine checkpoint
carries one too. The loop calls :meth:`KafkaSource.seek` with the checkpoint's
position on start; the source then assigns itself every partition of the topic
and seeks each to its offset there (a partition without one starts at its
beginning). Kafka's committed offsets are never read back: :meth:`commit_async`
only publishes progress for monitoring (``kafka-consumer-groups``).

The source assigns itself all partitions (``KafkaConsumer.assign``) rather than
joining a consumer group: the engine judges every phase and one process owns the
DuckDB file, so a second member could never take half the partitions. It looks
for new partitions every ``partition_refresh_s`` seconds.

**Bad messages** (``decode.Reason``) never stop a partition: each goes to the
dead-letter topic with headers ``error`` (the reason code), ``error.detail``,
``source.topic``, ``source.partition``, ``source.offset`` and ``encoding``, and is
counted in :attr:`KafkaSource.stats`. The dead letters are flushed before the
poll returns, so the position never moves past a message that is neither judged
nor in the DLQ; if the DLQ can't be written, the poll is undone and retried.

**Records.** By default the consumer's fetched record batches are read by the
Rust core (:mod:`prop_stream.kafka.raw`), not as one kafka-python
``ConsumerRecord`` per record; a rejected message's record is rebuilt for the
DLQ. ``raw_records=False`` keeps kafka-python's records.

**Broker outages.** kafka-python reconnects by itself; polls return no ticks
meanwhile and :meth:`KafkaSource.healthy` is False until a leader of every
partition is connected again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import polars as pl
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from prop_stream.kafka.decode import (
    JSON_ENCODING,
    Rejection,
    decode_json,
    decode_messages,
)
from prop_stream.kafka.exceptions import DeadLetterError, KafkaSourceError
from prop_stream.kafka.raw import RawValues, chunks_of, header_encoding, install
from prop_stream.rules import TICK_SCHEMA, PhaseSpec

logger = logging.getLogger(__name__)

#: The default tick topic (``interfaces.md`` section 1).
DEFAULT_TOPIC: Final = "prop.equity-ticks"
#: Fetch settings measured for throughput on the 2-core machine (docs/kafka.md).
DEFAULT_FETCH_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_PARTITION_FETCH_BYTES: Final = 16 * 1024 * 1024
DEFAULT_FETCH_MAX_WAIT_MS: Final = 100

_EMPTY_TICKS: Final = pl.DataFrame(schema=TICK_SCHEMA)

#: ``on_rejected(rejection, record) -> bool``: True sends it to the DLQ.
RejectionCallback = Callable[[Rejection, Any], bool]


class _Records(Protocol):
    """A poll's records by index: a list, or ``RawValues``."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int, /) -> Any: ...


def dlq_topic_for(topic: str) -> str:
    """The default dead-letter topic of a tick topic: ``<topic>.dlq``."""
    return f"{topic}.dlq"


@dataclass(slots=True)
class KafkaSourceStats:
    """Counters of a source since it was created.

    Attributes:
        messages: Messages polled (replays count again).
        ticks: Good ticks handed out.
        rejected: Rejected messages (or batch-row groups) by reason code.
        rejected_ticks: Ticks rejected.
        dead_letters: Dead letters written.
        dlq_failures: Polls undone because the DLQ could not be written.
        reconnects: Times the source became healthy again after an outage.
    """

    messages: int = 0
    ticks: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    rejected_ticks: int = 0
    dead_letters: int = 0
    dlq_failures: int = 0
    reconnects: int = 0


class KafkaSource:
    """Equity ticks from a Kafka topic, decoded in bulk.

    Args:
        bootstrap: ``host:port[,host:port...]`` of the brokers.
        topic: The tick topic (must exist: brokers don't auto-create).
        dlq_topic: The dead-letter topic (default ``<topic>.dlq``).
        group_id: The group Kafka offsets are committed under (for monitoring
            only); None commits nothing.
        client_id: The client id the brokers log.
        fetch_max_bytes: Most bytes of one fetch response.
        max_partition_fetch_bytes: Most bytes per partition in one fetch.
        fetch_max_wait_ms: Longest the broker holds a fetch for more data.
        dlq_unknown_accounts: Send ticks of unknown accounts to the DLQ
            (reason ``unknown_account``) instead of the engine, which only
            counts them. An account is known when the store has it
            (``account_directory``) or it was :meth:`track`-ed; without a
            directory only tracked accounts are known, and after a restart
            the phases that ended before the checkpoint are not tracked any
            more (docs/kafka.md, "Unknown accounts").
        account_directory: Returns every account id the platform has (the
            store's ``trading_accounts``); read at the first poll and by
            :meth:`refresh_accounts`. The service passes one.
        on_rejected: ``(rejection, record) -> bool`` for every rejected message;
            False keeps it out of the DLQ (it is still counted).
        partition_refresh_s: Seconds between looks for new partitions.
        raw_records: Read each partition's fetched record batches in the Rust
            core (``prop_stream.kafka.raw``) instead of one kafka-python
            ``ConsumerRecord`` per record; False is the old path (kept to
            compare, and as a way out).
        consumer_config: Extra ``KafkaConsumer`` settings (override the above).
        producer_config: Extra ``KafkaProducer`` settings of the DLQ producer.
    """

    name = "kafka"

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str = DEFAULT_TOPIC,
        dlq_topic: str | None = None,
        group_id: str | None = "prop-stream",
        client_id: str = "prop-stream",
        fetch_max_bytes: int = DEFAULT_FETCH_MAX_BYTES,
        max_partition_fetch_bytes: int = DEFAULT_MAX_PARTITION_FETCH_BYTES,
        fetch_max_wait_ms: int = DEFAULT_FETCH_MAX_WAIT_MS,
        dlq_unknown_accounts: bool = False,
        account_directory: Callable[[], Iterable[int]] | None = None,
        on_rejected: RejectionCallback | None = None,
        partition_refresh_s: float = 30.0,
        raw_records: bool = True,
        consumer_config: Mapping[str, Any] | None = None,
        producer_config: Mapping[str, Any] | None = None,
    ) -> None:
        if not topic:
            raise KafkaSourceError("the tick topic name is empty")
        self.bootstrap = bootstrap
        self.topic = topic
        self.dlq_topic = dlq_topic or dlq_topic_for(topic)
        self.group_id = group_id
        self.stats = KafkaSourceStats()
        self._consumer_config: dict[str, Any] = {
            "bootstrap_servers": bootstrap.split(","),
            "client_id": client_id,
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "check_crcs": True,
            "fetch_max_bytes": fetch_max_bytes,
            "max_partition_fetch_bytes": max_partition_fetch_bytes,
            "fetch_max_wait_ms": fetch_max_wait_ms,
            "max_poll_records": 100_000,
            "receive_buffer_bytes": 4 * 1024 * 1024,
            "reconnect_backoff_max_ms": 2_000,
            **dict(consumer_config or {}),
        }
        self._producer_config: dict[str, Any] = {
            "bootstrap_servers": bootstrap.split(","),
            "client_id": f"{client_id}-dlq",
            "acks": "all",
            "linger_ms": 5,
            "max_block_ms": 10_000,
            "reconnect_backoff_max_ms": 2_000,
            **dict(producer_config or {}),
        }
        self._dlq_unknown = dlq_unknown_accounts
        self._on_rejected = on_rejected
        self._refresh_s = partition_refresh_s
        self._raw = raw_records
        self._consumer: KafkaConsumer | None = None
        self._producer: KafkaProducer | None = None
        self._assigned: list[TopicPartition] = []
        self._next_refresh = 0.0
        self._next: dict[str, int] = {}
        self._lock = threading.Lock()
        self._known: set[int] = set()
        self._known_series: pl.Series | None = None
        self._directory = account_directory
        self._directory_read = False
        self._ticks_per_message = 1.0
        self._closed = threading.Event()
        self._was_healthy = False

    # ------------------------------------------------------------ TickSource API

    def start(self) -> None:
        """Nothing to fix: a partition without a position starts at its beginning."""

    def seek(self, position: Mapping[str, int]) -> None:
        """Resume from ``position``; partitions of other topics are ignored.

        Args:
            position: ``{"<topic>:<partition>": next_offset}`` as :meth:`poll`
                returned it; empty means every partition's beginning.
        """
        prefix = f"{self.topic}:"
        self._next = {
            key: int(offset)
            for key, offset in position.items()
            if key.startswith(prefix)
        }
        if self._consumer is not None and self._assigned:
            self._seek_assigned(self._consumer, self._assigned)

    def position(self) -> dict[str, int]:
        """The next offset of every partition read or sought so far."""
        return dict(self._next)

    def track(self, spec: PhaseSpec) -> None:
        """Ticks of this account are judged from now on; thread-safe."""
        with self._lock:
            self._known.add(int(spec.account_id))
            self._known_series = None

    def untrack(self, account_id: int) -> None:
        """The account's phase has ended or was removed; thread-safe.

        The account stays known: the ticks a platform keeps sending for an
        ended phase go to the engine (which counts them) rather than flood the
        DLQ.
        """

    def set_account_directory(self, directory: Callable[[], Iterable[int]]) -> None:
        """Use the store's accounts to tell unknown accounts (see ``__init__``)."""
        with self._lock:
            self._directory = directory
            self._directory_read = False

    def refresh_accounts(self) -> None:
        """Read the account directory again (accounts opened since are known).

        The service calls it between batches; accounts never leave the store,
        so what was known stays known. A failing read is logged and retried at
        the next call.
        """
        directory = self._directory
        if directory is None or not self._dlq_unknown:
            return
        try:
            ids = {int(a) for a in directory()}
        except Exception:  # a failing read must not stop the loop
            logger.exception("reading the account directory failed")
            return
        with self._lock:
            self._directory_read = True
            if not ids <= self._known:
                self._known |= ids
                self._known_series = None

    def close(self) -> None:
        """Close the consumer and the DLQ producer (a poll in progress returns)."""
        self._closed.set()
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except Exception:  # closing must not fail a stop
                logger.exception("closing the Kafka consumer failed")
        if producer is not None:
            try:
                producer.close(timeout=5)
            except Exception:  # closing must not fail a stop
                logger.exception("closing the DLQ producer failed")

    def poll(
        self, max_records: int, timeout: float
    ) -> tuple[pl.DataFrame, dict[str, int]]:
        """Fetch up to about ``max_records`` ticks and decode them in bulk.

        A batch-encoded message counts as the ticks it holds on average, so a
        poll of them stays near ``max_records`` ticks (it may exceed it by one
        message's worth).

        Args:
            max_records: Most ticks wanted.
            timeout: Longest wait, in seconds.

        Returns:
            The good ticks in the engine's schema, in partition then offset order,
            and the position after them (rejected messages included).
        """
        consumer = self._ensure_consumer(timeout)
        if consumer is None:
            return _EMPTY_TICKS, self.position()
        messages = max(1, min(max_records, int(max_records / self._ticks_per_message)))
        try:
            fetched = consumer.poll(
                timeout_ms=int(timeout * 1000), max_records=messages
            )
        except KafkaError as exc:
            logger.warning("Kafka poll failed: %s", exc)
            return _EMPTY_TICKS, self.position()
        if not fetched:
            self._note_health()
            return _EMPTY_TICKS, self.position()
        before = dict(self._next)
        records: _Records
        if self._raw:
            raw = RawValues(
                [c for tp in sorted(fetched) for c in chunks_of(fetched[tp])]
            )
            records = raw
            if raw.json_only:
                decoded = decode_json(raw, known_accounts=self._known_accounts())
            else:
                decoded = decode_messages(
                    raw.values(), raw.encodings(), known_accounts=self._known_accounts()
                )
            for tp, part in fetched.items():
                self._next[_key(tp.topic, tp.partition)] = part[-1].last_offset + 1
        else:
            records = [record for tp in sorted(fetched) for record in fetched[tp]]
            values = [record.value for record in records]
            encodings = [_encoding(record.headers) for record in records]
            has_batches = any(e is not None and e != JSON_ENCODING for e in encodings)
            decoded = decode_messages(
                values,
                encodings if has_batches else None,
                known_accounts=self._known_accounts(),
            )
            for tp, part in fetched.items():
                self._next[_key(tp.topic, tp.partition)] = part[-1].offset + 1
        if decoded.rejections:
            try:
                self._dead_letters(decoded.rejections, records)
            except DeadLetterError as exc:
                logger.warning("%s; the poll is undone", exc)
                self.stats.dlq_failures += 1
                self._next = before
                self._seek_assigned(consumer, list(fetched))
                return _EMPTY_TICKS, self.position()
        ticks = decoded.ticks.drop("message")
        stats = self.stats
        stats.messages += len(records)
        stats.ticks += ticks.height
        total = ticks.height + sum(r.rows for r in decoded.rejections)
        self._ticks_per_message = max(
            1.0, 0.5 * self._ticks_per_message + 0.5 * total / len(records)
        )
        return ticks, self.position()

    # ------------------------------------------------------------------- extras

    def healthy(self) -> bool:
        """Whether the source is connected to the leader of every partition.

        False before the first assignment, during a broker outage and after
        :meth:`close`; what ``/readyz`` reports for the Kafka source.
        """
        consumer = self._consumer
        if consumer is None or not self._assigned or self._closed.is_set():
            return False
        try:
            # kafka-python has no public per-node connection state.
            client = consumer._client
            cluster = client.cluster
            leaders = {cluster.leader_for_partition(tp) for tp in self._assigned}
            if None in leaders or -1 in leaders:
                return False
            return all(client.connected(node) for node in leaders)
        except Exception:  # a health probe never raises
            return False

    def commit_async(self) -> None:
        """Publish the current position to Kafka's group offsets (monitoring only).

        Call it after the position's batch is committed to DuckDB (the service
        does, between batches). Does nothing without a group id.
        """
        consumer = self._consumer
        if consumer is None or self.group_id is None or not self._next:
            return
        offsets = {
            TopicPartition(self.topic, int(key.rsplit(":", 1)[1])): OffsetAndMetadata(
                offset, "", -1
            )
            for key, offset in self._next.items()
        }
        try:
            consumer.commit_async(offsets)
        except KafkaError as exc:
            logger.debug("Kafka offset commit skipped: %s", exc)

    def end_offsets(self) -> dict[str, int]:
        """The end offset of every partition (tests and benchmarks wait for it)."""
        consumer = self._ensure_consumer(30.0)
        if consumer is None:
            raise KafkaSourceError("not connected", topic=self.topic)
        ends = consumer.end_offsets(self._assigned)
        return {_key(tp.topic, tp.partition): int(off) for tp, off in ends.items()}

    # ---------------------------------------------------------------- internals

    def _ensure_consumer(self, timeout: float) -> KafkaConsumer | None:
        if self._closed.is_set():
            return None
        consumer = self._consumer
        if consumer is None:
            try:
                consumer = KafkaConsumer(**self._consumer_config)
            except KafkaError as exc:
                logger.warning("Kafka at %s not reachable: %s", self.bootstrap, exc)
                self._closed.wait(timeout)
                return None
            if self._raw:
                install(consumer)
            self._consumer = consumer
        if time.monotonic() >= self._next_refresh:
            self._refresh_partitions(consumer)
        return consumer if self._assigned else None

    def _refresh_partitions(self, consumer: KafkaConsumer) -> None:
        try:
            partitions = consumer.partitions_for_topic(self.topic)
        except KafkaError as exc:
            logger.warning("no metadata for topic %s: %s", self.topic, exc)
            return
        self._next_refresh = time.monotonic() + self._refresh_s
        if not partitions:
            raise KafkaSourceError(
                f"topic {self.topic!r} does not exist on {self.bootstrap}",
                topic=self.topic,
            )
        wanted = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        if wanted == self._assigned:
            return
        consumer.assign(wanted)
        self._assigned = wanted
        # A new assignment forgets the fetch positions: seek every partition to
        # the position the engine has seen (never to Kafka's committed offsets).
        self._seek_assigned(consumer, wanted)
        logger.info("assigned %s at %s", self.topic, self.position())

    def _seek_assigned(
        self, consumer: KafkaConsumer, partitions: Sequence[TopicPartition]
    ) -> None:
        beginning = []
        for tp in partitions:
            offset = self._next.get(_key(tp.topic, tp.partition))
            if offset is None:
                beginning.append(tp)
            else:
                consumer.seek(tp, offset)
        if beginning:
            consumer.seek_to_beginning(*beginning)

    def _note_health(self) -> None:
        healthy = self.healthy()
        if healthy and not self._was_healthy:
            self.stats.reconnects += 1
        self._was_healthy = healthy

    def _known_accounts(self) -> pl.Series | None:
        if not self._dlq_unknown:
            return None
        if self._directory is not None and not self._directory_read:
            self.refresh_accounts()
        with self._lock:
            if self._known_series is None:
                self._known_series = pl.Series(
                    "known", sorted(self._known), dtype=pl.Int64
                )
            return self._known_series

    def _dead_letters(self, rejections: Sequence[Rejection], records: _Records) -> None:
        stats = self.stats
        sends = []
        for rejection in rejections:
            record = records[rejection.index]
            stats.rejected[rejection.reason.value] += 1
            stats.rejected_ticks += rejection.rows
            if self._on_rejected is not None and not self._on_rejected(
                rejection, record
            ):
                continue
            sends.append((rejection, record))
        if not sends:
            return
        try:
            producer = self._producer
            if producer is None:
                producer = self._producer = KafkaProducer(**self._producer_config)
            futures = [
                producer.send(
                    self.dlq_topic,
                    key=record.key,
                    value=record.value
                    if rejection.payload is None
                    else rejection.payload,
                    headers=_dlq_headers(rejection, record),
                )
                for rejection, record in sends
            ]
            producer.flush(timeout=30)
            for future in futures:
                future.get(timeout=0)
        except KafkaError as exc:
            raise DeadLetterError(
                f"could not write {len(sends)} dead letter(s) to "
                f"{self.dlq_topic}: {exc}",
                topic=self.dlq_topic,
                count=len(sends),
            ) from exc
        stats.dead_letters += len(sends)


def _key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def _encoding(headers: Sequence[tuple[str, bytes | None]] | None) -> str | None:
    return header_encoding(headers)


def _dlq_headers(rejection: Rejection, record: Any) -> list[tuple[str, bytes]]:
    headers = [
        ("error", rejection.reason.value.encode()),
        ("error.detail", rejection.detail.encode("utf-8", "replace")[:1000]),
        ("source.topic", str(record.topic).encode()),
        ("source.partition", str(record.partition).encode()),
        ("source.offset", str(record.offset).encode()),
        ("encoding", (_encoding(record.headers) or JSON_ENCODING).encode()),
    ]
    if rejection.payload is not None:
        headers.append(("rows", str(rejection.rows).encode()))
    return headers


__all__ = [
    "DEFAULT_TOPIC",
    "KafkaSource",
    "KafkaSourceStats",
    "RejectionCallback",
    "dlq_topic_for",
]
