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

By default the source assigns itself all partitions (``KafkaConsumer.assign``)
rather than joining a consumer group: the engine judges every phase and one
process owns the DuckDB file, so a second member could never take half the
partitions. It looks for new partitions every ``partition_refresh_s`` seconds.

**Consumer group** (``consumer_group=True``, the scale-out evaluators,
``docs/scale-out.md``): the source subscribes to the topic in the group
``group_id`` with the cooperative-sticky assignor (KIP-429: a rebalance moves
only the partitions that change owner, the others keep being judged) and a
rebalance listener. The listener runs on kafka-python's network thread, so it
only pauses each newly assigned partition and queues the event; the evaluator
(:mod:`prop_stream.evaluator.group`) takes the events between batches
(:meth:`KafkaSource.rebalance_events`), rebuilds the partition's state from the
store and calls :meth:`KafkaSource.resume_partition` with the stored offset, so
no tick of a partition is handed out before its state is loaded.

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

**Future timestamps.** A tick whose ``ts`` is more than ``max_clock_skew_s``
ahead of the service's clock goes to the DLQ (``future_ts``) and is never
judged (``interfaces.md`` section 1).

**Waiting, not failing.** A broker that does not answer, a topic that does not
exist yet and a broker outage are waited out: polls return no ticks meanwhile,
the log gets one line when the wait starts and then one per retry, with
backoff, and :meth:`KafkaSource.not_ready` names the reason (``/readyz``).
:meth:`KafkaSource.close` from another thread ends any wait promptly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import polars as pl
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from kafka.errors import KafkaError
from kafka.partitioner.default import murmur2
from kafka.structs import OffsetAndMetadata, TopicPartition

from prop_stream.kafka.admin import (
    DEFAULT_BOOTSTRAP_TIMEOUT_S,
    abort_bootstrap,
    build_client,
    discard,
    ensure_topic,
)
from prop_stream.kafka.decode import (
    JSON_ENCODING,
    Decoded,
    Rejection,
    decode_json,
    decode_messages,
)
from prop_stream.kafka.exceptions import DeadLetterError, KafkaSourceError
from prop_stream.kafka.raw import (
    RawValues,
    chunks_of,
    header_encoding,
    install,
    supported,
)
from prop_stream.rules import TICK_SCHEMA, PhaseSpec

logger = logging.getLogger(__name__)

#: The default tick topic (``interfaces.md`` section 1).
DEFAULT_TOPIC: Final = "prop.equity-ticks"
#: Fetch settings measured for throughput on the 2-core machine (docs/kafka.md).
DEFAULT_FETCH_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_PARTITION_FETCH_BYTES: Final = 16 * 1024 * 1024
DEFAULT_FETCH_MAX_WAIT_MS: Final = 100
#: Default bound of how far a tick's ``ts`` may be ahead of the clock (seconds).
DEFAULT_MAX_CLOCK_SKEW_S: Final = 300.0
#: Seconds between looks for a topic that does not exist yet.
MISSING_TOPIC_RETRY_S: Final = 1.0
#: First and longest pause between two connection attempts (or log lines).
FIRST_RETRY_S: Final = 1.0
MAX_RETRY_S: Final = 30.0

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
        deals: Good deals handed out.
        rejected: Rejected messages (or batch-row groups) by reason code.
        rejected_ticks: Ticks rejected.
        dead_letters: Dead letters written.
        dead_letters_by_reason: Dead letters written, by reason code.
        dlq_failures: Polls undone because the DLQ could not be written.
        reconnects: Times the source became healthy again after an outage.
        connect_failures: Attempts to reach a broker that failed.
    """

    messages: int = 0
    ticks: int = 0
    deals: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    rejected_ticks: int = 0
    dead_letters: int = 0
    dead_letters_by_reason: Counter[str] = field(default_factory=Counter)
    dlq_failures: int = 0
    reconnects: int = 0
    connect_failures: int = 0


class _Wait:
    """The log lines of one kind of wait: one when it starts, one per retry.

    The retries back off (``FIRST_RETRY_S`` doubling up to ``MAX_RETRY_S``);
    :meth:`over` logs one line when the wait ends.
    """

    def __init__(self) -> None:
        self.since: float | None = None
        self._next = 0.0
        self._step = FIRST_RETRY_S

    @property
    def waiting(self) -> bool:
        return self.since is not None

    def due(self) -> bool:
        """Whether the next retry is due."""
        return time.monotonic() >= self._next

    def retry_in(self) -> float:
        """Seconds until the next retry is due (0 if it is)."""
        return max(0.0, self._next - time.monotonic())

    def failed(
        self, message: str, *args: object, then: str = "retrying in %.0f s"
    ) -> None:
        """A try failed: log it (once per retry) and schedule the next one.

        Args:
            message: The line (``%`` arguments in ``args``); from the second
                line of a wait on, ``for N s`` is added.
            *args: Its arguments.
            then: What comes next, with the seconds until the next retry.
        """
        now = time.monotonic()
        if self.since is None:
            self.since = now
            self._step = FIRST_RETRY_S
            text, values = message, args
        else:
            self._step = min(MAX_RETRY_S, self._step * 2)
            text, values = message + " for %.0f s", (*args, now - self.since)
        self._next = now + self._step
        logger.warning(text + "; " + then, *values, self._step)

    def over(self, message: str, *args: object) -> None:
        """The wait has ended: log how long it took."""
        if self.since is None:
            return
        waited = time.monotonic() - self.since
        self.since = None
        self._step = FIRST_RETRY_S
        self._next = 0.0
        logger.info(message + " after %.0f s", *args, waited)


class KafkaSource:
    """Equity ticks from a Kafka topic, decoded in bulk.

    Args:
        bootstrap: ``host:port[,host:port...]`` of the brokers.
        topic: The tick topic (brokers don't auto-create it; until it exists
            the source waits for it).
        dlq_topic: The dead-letter topic (default ``<topic>.dlq``; created
            with one partition when the first dead letter is written, unless
            it exists).
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
            compare, and as a way out). Also False when the installed
            kafka-python is not a version that path was tested with
            (``raw.supported``, one warning).
        max_clock_skew_s: Ticks whose ``ts`` is more than this many seconds
            ahead of ``clock`` go to the DLQ (``future_ts``); 0 turns the
            check off.
        clock: The service's clock (seconds since the epoch; tests set it).
        bootstrap_timeout_s: Longest a connection attempt waits for a broker.
        consumer_group: Join the consumer group ``group_id`` and judge only the
            partitions it assigns (see the module's docstring).
        group_instance_id: Static membership (KIP-345): a restarted member with
            the same id gets its partitions back without a rebalance, if it
            returns within the session timeout. Only with ``consumer_group``.
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
        max_clock_skew_s: float = DEFAULT_MAX_CLOCK_SKEW_S,
        clock: Callable[[], float] = time.time,
        bootstrap_timeout_s: float = DEFAULT_BOOTSTRAP_TIMEOUT_S,
        consumer_group: bool = False,
        group_instance_id: str | None = None,
        consumer_config: Mapping[str, Any] | None = None,
        producer_config: Mapping[str, Any] | None = None,
    ) -> None:
        if not topic:
            raise KafkaSourceError("the tick topic name is empty")
        if not max_clock_skew_s >= 0:
            raise KafkaSourceError(
                f"max_clock_skew_s must be 0 or more, got {max_clock_skew_s}"
            )
        self.bootstrap = bootstrap
        self.topic = topic
        self.dlq_topic = dlq_topic or dlq_topic_for(topic)
        if consumer_group and not group_id:
            raise KafkaSourceError("a consumer group needs a group id")
        self.group_id = group_id
        self.stats = KafkaSourceStats()
        #: Whether the source is a member of the consumer group ``group_id``.
        self.consumer_group = consumer_group
        group_config: dict[str, Any] = {}
        if consumer_group:
            # Cooperative-sticky (kafka-python 3.0.12 has it): a member keeps
            # the partitions that do not move, so a join or a leave pauses
            # only the moving ones.
            group_config["partition_assignment_strategy"] = (CooperativeStickyAssignor,)
            if group_instance_id:
                group_config["group_instance_id"] = group_instance_id
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
            "bootstrap_timeout_ms": int(bootstrap_timeout_s * 1000),
            **group_config,
            **dict(consumer_config or {}),
        }
        self._producer_config: dict[str, Any] = {
            "bootstrap_servers": bootstrap.split(","),
            "client_id": f"{client_id}-dlq",
            "acks": "all",
            "linger_ms": 5,
            "max_block_ms": 10_000,
            "reconnect_backoff_max_ms": 2_000,
            "bootstrap_timeout_ms": int(bootstrap_timeout_s * 1000),
            **dict(producer_config or {}),
        }
        self._bootstrap_timeout_s = bootstrap_timeout_s
        self._dlq_unknown = dlq_unknown_accounts
        self._on_rejected = on_rejected
        self._refresh_s = partition_refresh_s
        self._raw = raw_records and supported()
        #: Whether the fast record path is in use (see ``raw_records``).
        self.raw_records = self._raw
        #: The clock-skew bound in seconds (0: no check).
        self.max_clock_skew_s = float(max_clock_skew_s)
        self._skew = self.max_clock_skew_s
        self._clock = clock
        self._consumer: KafkaConsumer | None = None
        # A consumer whose constructor is waiting for a broker (close() aborts it).
        self._building: KafkaConsumer | None = None
        self._client_lock = threading.Lock()
        self._producer: KafkaProducer | None = None
        self._assigned: list[TopicPartition] = []
        self._next_refresh = 0.0
        self._next: dict[str, int] = {}
        self._lock = threading.Lock()
        self._known: set[int] = set()
        self._known_series: pl.Series | None = None
        self._directory = account_directory
        self._lookup: Callable[[Sequence[int]], Iterable[int]] | None = None
        self._directory_read = False
        self._ticks_per_message = 1.0
        self._closed = threading.Event()
        self._was_healthy = False
        self._connect_wait = _Wait()
        self._outage = _Wait()
        self._dlq_wait = _Wait()
        self._topic_missing = False
        self._dlq_ready = False
        self._highwater: dict[int, int] = {}
        self._unread: dict[int, int] = {}
        # The last poll's records and each returned tick's record index (unseen).
        self._last_records: _Records | None = None
        self._last_messages: pl.Series | None = None
        # Consumer group: subscribed yet, first assignment seen, the queued
        # rebalance events and the partitions whose state the loop has loaded.
        self._subscribed = False
        self._joined = False
        self._events: list[tuple[str, list[int]]] = []
        self._live: set[int] = set()
        self._partition_count = 0
        self._last_deals: pl.DataFrame | None = None
        # The record index of each of the last poll's deals (group mode splits
        # them by partition).
        self._last_deal_messages: pl.Series | None = None

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

    def set_account_directory(
        self,
        directory: Callable[[], Iterable[int]],
        lookup: Callable[[Sequence[int]], Iterable[int]] | None = None,
    ) -> None:
        """Use the store's accounts to tell unknown accounts (see ``__init__``).

        Args:
            directory: Every account id the store has.
            lookup: Which of some account ids the store has (one indexed
                query); without it the whole ``directory`` is read instead.
        """
        with self._lock:
            self._directory = directory
            self._lookup = lookup
            self._directory_read = False

    def _look_up(self, accounts: pl.Series) -> bool:
        """Add those of ``accounts`` the directory has now; True if any were.

        Called for the accounts a poll would dead-letter as unknown: the
        directory is read between batches (``refresh_accounts``), so an account
        another process opened since (a purchase on an API process, a pass on
        another evaluator) would otherwise lose its first ticks to the DLQ. A
        failing read is logged and the ticks are dead-lettered.
        """
        directory, lookup = self._directory, self._lookup
        if directory is None:
            return False
        wanted = [int(a) for a in accounts.to_list()]
        try:
            if lookup is not None:
                found = {int(a) for a in lookup(wanted)}
            else:
                found = {int(a) for a in directory()} & set(wanted)
        except Exception:  # a failing read must not stop the loop
            logger.exception("looking up unknown accounts in the directory failed")
            return False
        if not found:
            return False
        with self._lock:
            self._known |= found
            self._known_series = None
        return True

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
        """Close the consumer and the DLQ producer; thread-safe.

        A poll in progress in another thread returns promptly, also one
        waiting for a broker or a topic.
        """
        self._closed.set()
        with self._client_lock:
            building, self._building = self._building, None
            consumer, self._consumer = self._consumer, None
            producer, self._producer = self._producer, None
        if building is not None:
            # Its constructor, waiting for a broker, fails now; else the poll
            # thread discards it once the constructor returns.
            abort_bootstrap(building)
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except Exception:  # closing must not fail a stop
                logger.exception("closing the Kafka consumer failed")
        if producer is not None:
            try:
                producer.close(timeout=1)  # unsent dead letters are fetched again
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
            and the position after them (rejected messages included). The poll's
            deals are kept for :meth:`deals`.
        """
        # The last poll's records are kept for unseen() until this one.
        self._last_records = self._last_messages = self._last_deals = None
        self._last_deal_messages = None
        consumer = self._ensure_consumer(timeout)
        if consumer is None:
            return _EMPTY_TICKS, self.position()
        messages = max(1, min(max_records, int(max_records / self._ticks_per_message)))
        try:
            fetched = consumer.poll(
                timeout_ms=int(timeout * 1000), max_records=messages
            )
        except Exception as exc:
            if self._closed.is_set():
                return _EMPTY_TICKS, self.position()  # closed under the poll
            if not isinstance(exc, KafkaError):
                raise
            self._note_health(str(exc))
            return _EMPTY_TICKS, self.position()
        self._note_health()
        self._note_highwater(consumer)
        if self.consumer_group and fetched:
            # Records of a partition whose state is not loaded (assigned under
            # this poll, or dropped after a refused commit) are never handed out.
            fetched = {
                tp: part for tp, part in fetched.items() if tp.partition in self._live
            }
        if not fetched:
            return _EMPTY_TICKS, self.position()
        before = dict(self._next)
        not_after = (
            datetime.fromtimestamp(self._clock() + self._skew, UTC)
            if self._skew > 0
            else None
        )
        records: _Records
        decode: Callable[[pl.Series | None], Decoded]
        if self._raw:
            raw = RawValues(
                [c for tp in sorted(fetched) for c in chunks_of(fetched[tp])]
            )
            records = raw
            if raw.json_only:

                def decode(known: pl.Series | None) -> Decoded:
                    return decode_json(raw, known_accounts=known, not_after=not_after)

            else:

                def decode(known: pl.Series | None) -> Decoded:
                    return decode_messages(
                        raw.values(),
                        raw.encodings(),
                        known_accounts=known,
                        not_after=not_after,
                    )

            for tp, part in fetched.items():
                self._next[_key(tp.topic, tp.partition)] = part[-1].last_offset + 1
        else:
            records = [record for tp in sorted(fetched) for record in fetched[tp]]
            values = [record.value for record in records]
            encodings = [_encoding(record.headers) for record in records]
            has_batches = any(e is not None and e != JSON_ENCODING for e in encodings)

            def decode(known: pl.Series | None) -> Decoded:
                return decode_messages(
                    values,
                    encodings if has_batches else None,
                    known_accounts=known,
                    not_after=not_after,
                )

            for tp, part in fetched.items():
                self._next[_key(tp.topic, tp.partition)] = part[-1].offset + 1
        decoded = decode(self._known_accounts())
        if decoded.unknown_accounts.len() and self._look_up(decoded.unknown_accounts):
            # Accounts opened since the directory was last read (by another
            # process, moments before their first ticks): judged, not DLQ'd.
            decoded = decode(self._known_accounts())
        if decoded.rejections:
            try:
                self._dead_letters(decoded.rejections, records)
            except DeadLetterError as exc:
                if self._dlq_wait.due():
                    self._dlq_wait.failed(
                        "%s",
                        exc,
                        then="the poll is undone and fetched again "
                        "(next report in %.0f s)",
                    )
                self.stats.dlq_failures += 1
                self._next = before
                self._seek_assigned(consumer, list(fetched))
                return _EMPTY_TICKS, self.position()
        self._last_records = records
        self._last_messages = decoded.ticks.get_column("message")
        ticks = decoded.ticks.drop("message")
        if decoded.deals.height:
            self._last_deal_messages = decoded.deals.get_column("message")
            self._last_deals = decoded.deals.drop("message")
        stats = self.stats
        stats.messages += len(records)
        stats.ticks += ticks.height
        stats.deals += decoded.deals.height
        total = (
            ticks.height
            + decoded.deals.height
            + sum(r.rows for r in decoded.rejections)
        )
        self._ticks_per_message = max(
            1.0, 0.5 * self._ticks_per_message + 0.5 * total / len(records)
        )
        return ticks, self.position()

    def deals(self) -> pl.DataFrame | None:
        """The deals of the last :meth:`poll`, None when it had none.

        Returns:
            The deal columns (``interfaces.md`` section 5) in delivery order,
            plus ``before_tick``: the deal was delivered before that row of the
            poll's ticks (each partition's order kept, partitions one after
            the other as the ticks are).
        """
        return self._last_deals

    def unseen(
        self,
        ticks: pl.DataFrame,
        *,
        before: Mapping[str, int],
        committed: Mapping[str, int],
    ) -> pl.DataFrame:
        """The ticks of the last poll whose message offset is at or after ``committed``.

        A replay may cut its batches differently (a poll takes what the fetcher
        holds), so each partition of the last poll is cut at its committed
        offset: a binary search over its records' offsets, a few lookups.

        Args:
            ticks: The ticks the last :meth:`poll` returned.
            before: The position the poll started from (unused: offsets say all).
            committed: The store's committed position.

        Returns:
            The rows of ``ticks`` from messages not committed yet, in order.

        Raises:
            KafkaSourceError: ``ticks`` are not the last poll's.
        """
        records, messages = self._last_records, self._last_messages
        if not ticks.height:
            return ticks
        if records is None or messages is None or len(messages) != ticks.height:
            raise KafkaSourceError("unseen() takes the ticks of the last poll")
        return _drop_committed(ticks, messages, records, committed)

    def unseen_deals(
        self,
        deals: pl.DataFrame,
        *,
        before: Mapping[str, int],
        committed: Mapping[str, int],
    ) -> pl.DataFrame:
        """The deals of the last poll whose message offset is at or after ``committed``.

        :meth:`unseen` for the poll's deals: each deal row knows the record it
        came from, so a replayed poll is cut at the committed offsets as its
        ticks are.

        Args:
            deals: The deals the last poll returned (:meth:`deals`).
            before: The position the poll started from (unused).
            committed: The store's committed position.

        Returns:
            The rows of ``deals`` from messages not committed yet, in order.

        Raises:
            KafkaSourceError: ``deals`` are not the last poll's.
        """
        records, messages = self._last_records, self._last_deal_messages
        if not deals.height:
            return deals
        if records is None or messages is None or len(messages) != deals.height:
            raise KafkaSourceError("unseen_deals() takes the deals of the last poll")
        return _drop_committed(deals, messages, records, committed)

    # ------------------------------------------------------------------- extras

    def not_ready(self) -> dict[str, str]:
        """What keeps the source from delivering ticks now; empty when nothing.

        Maps a component to the reason, for ``/readyz``: ``{"kafka": "no
        broker answers at H:P"}`` (while no broker answers, or the leader of
        an assigned partition is not connected), ``{"kafka": "connecting to
        ..."}`` (before the first connection, right after the assignment),
        ``{"kafka": "the Kafka source is closed"}`` or ``{"topic": "topic T
        does not exist"}``. Thread-safe and cheap: it asks no broker.
        """
        if self._closed.is_set():
            return {"kafka": "the Kafka source is closed"}
        consumer = self._consumer
        if consumer is None:
            if self.stats.connect_failures:
                return {"kafka": f"no broker answers at {self.bootstrap}"}
            return {"kafka": f"connecting to {self.bootstrap}"}
        if self._topic_missing:
            return {"topic": f"topic {self.topic} does not exist"}
        assigned = self._assigned
        if self.consumer_group and not (self._joined or _stable_member(consumer)):
            return {"kafka": f"joining consumer group {self.group_id} on {self.topic}"}
        if self.consumer_group and not assigned:
            return {}  # a member with no partition (more members than partitions)
        if not assigned:
            return {"kafka": f"looking up topic {self.topic} at {self.bootstrap}"}
        if not _leaders_connected(consumer, assigned):
            if not self._was_healthy and not self._outage.waiting:
                # Just assigned: the connections to the leaders are opening.
                return {"kafka": f"connecting to the leaders of {self.topic}"}
            return {"kafka": f"no broker answers at {self.bootstrap}"}
        return {}

    def healthy(self) -> bool:
        """Whether :meth:`not_ready` is empty (connected, topic assigned)."""
        return not self.not_ready()

    @property
    def dead_letters(self) -> dict[str, int]:
        """Dead letters written since the source was created, by reason code.

        Counted once each message is acknowledged by the DLQ topic (a poll
        undone and fetched again does not count twice). Thread-safe (a copy).
        """
        return dict(self.stats.dead_letters_by_reason)

    def lag(self) -> dict[int, int]:
        """Messages behind the end of each partition: log end minus next position.

        The end offsets are the high watermarks the fetcher saw in its last
        fetch responses (it fetches continuously, so they are at most about
        ``fetch_max_wait_ms`` old), taken after each poll; the call asks no
        broker. Partitions without a fetch response yet are left out.
        Thread-safe.
        """
        highwater, unread, position = self._highwater, self._unread, self._next
        lag = {}
        for partition, end in highwater.items():
            next_offset = position.get(_key(self.topic, partition))
            if next_offset is None:
                next_offset = unread.get(partition, 0)
            lag[partition] = max(0, end - next_offset)
        return lag

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
        if self.consumer_group:
            live = self._live
            offsets = {tp: o for tp, o in offsets.items() if tp.partition in live}
            if not offsets:
                return
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

    # ----------------------------------------------------------- consumer group

    def rebalance_events(self) -> list[tuple[str, list[int]]]:
        """The rebalance events since the last call, in order; thread-safe.

        Returns:
            ``("assigned" | "revoked" | "lost", partitions)`` pairs. Assigned
            partitions are paused until :meth:`resume_partition`.
        """
        with self._lock:
            events, self._events = self._events, []
        return events

    def resume_partition(self, partition: int, offset: int | None) -> None:
        """Hand out a partition's ticks from ``offset`` (None: its beginning).

        Call it from the polling thread once the partition's state is loaded.
        """
        consumer = self._consumer
        key = _key(self.topic, partition)
        tp = TopicPartition(self.topic, partition)
        if offset is None:
            self._next.pop(key, None)
        else:
            self._next[key] = int(offset)
        self._live.add(partition)
        if consumer is None or tp not in consumer.assignment():
            return
        if offset is None:
            consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, int(offset))
        consumer.resume(tp)

    def drop_partition(self, partition: int) -> None:
        """Stop handing out a partition's ticks (revoked, or its commit refused).

        Call it from the polling thread.
        """
        self._live.discard(partition)
        self._next.pop(_key(self.topic, partition), None)
        consumer = self._consumer
        tp = TopicPartition(self.topic, partition)
        if consumer is not None and tp in consumer.assignment():
            consumer.pause(tp)

    def live_partitions(self) -> set[int]:
        """The partitions whose ticks are handed out now."""
        return set(self._live)

    def partition_count(self) -> int:
        """The topic's partitions as last looked up (0 before the first look)."""
        return self._partition_count

    def partition_of(self, account_id: int) -> int | None:
        """The partition the default partitioner puts an account's ticks in.

        The tick key is the account id in decimal ASCII (``interfaces.md``
        section 1); None before the topic was looked up.
        """
        count = self._partition_count
        if not count:
            return None
        return int(murmur2(str(int(account_id)).encode()) & 0x7FFFFFFF) % count

    def last_slices(
        self, committed: Mapping[str, int] | None = None
    ) -> list[tuple[int, int, int, int]]:
        """The last poll's ticks by partition, as row ranges.

        Args:
            committed: The store's committed offsets of partitions being
                replayed: ticks of earlier messages are archived already.

        Returns:
            ``(partition, start, end, archive_from)`` per partition of the last
            poll: its ticks are rows ``start:end`` (the poll returns them in
            partition then offset order); those from ``archive_from`` on come
            from messages at or after the committed offset.
        """
        records, messages = self._last_records, self._last_messages
        if records is None or messages is None or not len(messages):
            return []
        committed = committed or {}
        out = []
        for topic, partition, first, end in _spans(records):
            start = int(messages.search_sorted(first, "left"))
            stop = int(messages.search_sorted(end, "left"))
            if stop <= start and not self._deal_span(first, end)[1]:
                continue  # neither ticks nor deals of this partition
            archive_from = start
            offset = committed.get(_key(topic, partition))
            if offset is not None:
                lo = _first_at(records, first, end, offset)
                archive_from = int(messages.search_sorted(lo, "left"))
            out.append((partition, start, stop, archive_from))
        return out

    def last_deal_cuts(self, committed: Mapping[str, int]) -> dict[int, int]:
        """Where each replayed partition's deals of the last poll start to count.

        Args:
            committed: The store's committed offsets of partitions being
                replayed (as for :meth:`last_slices`).

        Returns:
            Per partition of ``committed`` with deals in the last poll, the
            first row of its :meth:`last_deals` frame that comes from a message
            at or after the committed offset (the rows before it are archived
            already); partitions not listed keep all their deals.
        """
        records, found = self._last_records, self._last_deal_messages
        if records is None or found is None or not committed:
            return {}
        out: dict[int, int] = {}
        for topic, partition, first, end in _spans(records):
            offset = committed.get(_key(topic, partition))
            if offset is None:
                continue
            lo, count = self._deal_span(first, end)
            if not count:
                continue
            at = _first_at(records, first, end, offset)
            out[partition] = int(found.search_sorted(at, "left")) - lo
        return out

    def last_deals(self) -> dict[int, pl.DataFrame]:
        """The last poll's deals by partition, for the group loop.

        Returns:
            Per partition with deals, its deals in delivery order with
            ``before_tick`` counted from the partition's first tick row of the
            poll (the row ranges of :meth:`last_slices`).
        """
        records, messages, deals = (
            self._last_records,
            self._last_messages,
            self._last_deals,
        )
        if records is None or messages is None or deals is None:
            return {}
        out: dict[int, pl.DataFrame] = {}
        for _topic, partition, first, end in _spans(records):
            lo, count = self._deal_span(first, end)
            if not count:
                continue
            start = int(messages.search_sorted(first, "left"))
            out[partition] = deals.slice(lo, count).with_columns(
                pl.col("before_tick") - start
            )
        return out

    def _deal_span(self, first: int, end: int) -> tuple[int, int]:
        """``(first row, rows)`` of the last poll's deals from records ``first:end``."""
        found = self._last_deal_messages
        if found is None:
            return 0, 0
        lo = int(found.search_sorted(first, "left"))
        return lo, int(found.search_sorted(end, "left")) - lo

    def _rebalanced(self, kind: str, partitions: Iterable[TopicPartition]) -> None:
        """A rebalance listener call (kafka-python's network thread): queue it."""
        mine = sorted(tp.partition for tp in partitions if tp.topic == self.topic)
        consumer = self._consumer
        if kind == "assigned" and consumer is not None:
            # Nothing is fetched for them until their state is loaded.
            consumer.pause(*[TopicPartition(self.topic, p) for p in mine])
        with self._lock:
            assigned = {tp.partition for tp in self._assigned}
            if kind == "assigned":
                assigned |= set(mine)
                self._joined = True
            else:
                assigned -= set(mine)
            self._assigned = [TopicPartition(self.topic, p) for p in sorted(assigned)]
            if mine:
                self._events.append((kind, mine))
        logger.info("consumer group %s: %s %s", self.group_id, kind, mine)

    # ---------------------------------------------------------------- internals

    def _ensure_consumer(self, timeout: float) -> KafkaConsumer | None:
        """The consumer with the topic assigned; None (after waiting) if not yet."""
        if self._closed.is_set():
            return None
        consumer = self._consumer
        if consumer is None:
            wait = self._connect_wait
            if not wait.due():
                self._closed.wait(min(timeout, wait.retry_in()))
                return None
            consumer = self._connect()
            if consumer is None:
                return None
        if time.monotonic() >= self._next_refresh:
            self._refresh_partitions(consumer)
        # A group member polls with nothing assigned: the poll joins the group.
        if not (self._subscribed if self.consumer_group else self._assigned):
            self._closed.wait(timeout)  # a poll waits its time, also for a topic
            return None
        return consumer

    def _connect(self) -> KafkaConsumer | None:
        """Build the consumer; None (logged, retry scheduled) if no broker answers."""

        def building(consumer: KafkaConsumer | None) -> None:
            with self._client_lock:
                self._building = consumer

        try:
            consumer = build_client(
                KafkaConsumer, self._consumer_config, building=building
            )
        except Exception as exc:
            if self._closed.is_set():
                return None  # aborted by close(): whatever it raised
            if not isinstance(exc, KafkaError):
                raise
            self.stats.connect_failures += 1
            self._connect_wait.failed(
                "no Kafka broker answers at %s (%s)", self.bootstrap, exc
            )
            return None
        if self._raw:
            install(consumer)
        with self._client_lock:
            if self._closed.is_set():  # closed while it was being built
                discard(consumer)
                return None
            self._consumer = consumer
        self._connect_wait.over("Kafka broker at %s answers", self.bootstrap)
        return consumer

    def _refresh_partitions(self, consumer: KafkaConsumer) -> None:
        try:
            partitions = consumer.partitions_for_topic(self.topic)
        except KafkaError as exc:
            self._note_health(f"no metadata for topic {self.topic}: {exc}")
            return
        if not partitions:
            self._next_refresh = time.monotonic() + MISSING_TOPIC_RETRY_S
            if not self._topic_missing:
                self._topic_missing = True
                # One line for the whole wait: the topic may take a while.
                logger.warning(
                    "topic %s does not exist yet on %s; waiting for it",
                    self.topic,
                    self.bootstrap,
                )
            if self._assigned and not self.consumer_group:  # it was deleted
                consumer.assign([])
                self._assigned = []
            return
        self._next_refresh = time.monotonic() + self._refresh_s
        if self._topic_missing:
            self._topic_missing = False
            logger.info("topic %s exists now", self.topic)
        self._partition_count = len(partitions)
        if self.consumer_group:
            if not self._subscribed:
                consumer.subscribe(topics=[self.topic], listener=_Listener(self))
                self._subscribed = True
                logger.info(
                    "joining consumer group %s on %s", self.group_id, self.topic
                )
            return
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

    def _note_health(self, error: str | None = None) -> None:
        """After a poll: log the start of an outage, each retry, and its end."""
        if self._closed.is_set():
            return  # closed under the poll: not an outage
        consumer = self._consumer
        healthy = (
            error is None
            and consumer is not None
            and bool(self._assigned)
            and _leaders_connected(consumer, self._assigned)
        )
        if healthy:
            if not self._was_healthy:
                self.stats.reconnects += 1
            self._outage.over("Kafka broker at %s answers again", self.bootstrap)
        elif (error is not None or self._was_healthy or self._outage.waiting) and (
            not self._outage.waiting or self._outage.due()
        ):
            # kafka-python reconnects by itself (backoff up to 2 s); one line
            # per retry of ours, with backoff, not one per poll.
            self._outage.failed(
                "lost the Kafka broker at %s (%s)",
                self.bootstrap,
                error or "no connection to a partition leader",
                then="waiting for it; kafka-python reconnects (next report in %.0f s)",
            )
        self._was_healthy = healthy

    def _note_highwater(self, consumer: KafkaConsumer) -> None:
        """Keep the fetcher's high watermarks for :meth:`lag` (no broker call).

        Also the fetch position of each partition nothing was read from yet
        (its log start, which retention may have moved past 0).
        """
        highwater = {}
        unread = {}
        for tp in self._assigned:
            try:
                end = consumer.highwater(tp)
            except KafkaError:
                continue
            if end is None:
                continue
            highwater[tp.partition] = int(end)
            if _key(tp.topic, tp.partition) not in self._next:
                start = _fetch_position(consumer, tp)
                if start is not None:
                    unread[tp.partition] = start
        self._unread = unread
        self._highwater = highwater

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
        if not self._dlq_ready:
            self._ensure_dlq_topic()
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
        stats.dead_letters_by_reason.update(r.reason.value for r, _ in sends)
        self._dlq_wait.over("dead letters go to %s again", self.dlq_topic)

    def _ensure_dlq_topic(self) -> None:
        """Create the DLQ topic unless it exists (one partition), like Kafka Connect."""
        try:
            ensure_topic(
                self.bootstrap,
                self.dlq_topic,
                partitions=1,
                bootstrap_timeout_s=self._bootstrap_timeout_s,
                timeout_s=10.0,
            )
        except KafkaSourceError as exc:
            raise DeadLetterError(str(exc), topic=self.dlq_topic, count=0) from exc
        self._dlq_ready = True


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # untyped kafka-python
    """Hands the group's rebalances to the source (see ``_rebalanced``)."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._source._rebalanced("revoked", revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._source._rebalanced("assigned", assigned)

    def on_partitions_lost(self, lost: Any) -> None:
        self._source._rebalanced("lost", lost)


def _first_at(records: _Records, first: int, end: int, offset: int) -> int:
    """The first record of ``first:end`` (one partition's) at or after ``offset``."""
    lo, hi = first, end
    while lo < hi:  # a binary search: the records are in offset order
        mid = (lo + hi) // 2
        if int(records[mid].offset) < offset:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _drop_committed(
    frame: pl.DataFrame,
    messages: pl.Series,
    records: _Records,
    committed: Mapping[str, int],
) -> pl.DataFrame:
    """The rows of ``frame`` whose record (``messages``) is not committed yet."""
    drop: list[tuple[int, int]] = []
    for topic, partition, first, end in _spans(records):
        offset = committed.get(_key(topic, partition))
        if offset is None:
            continue
        lo = _first_at(records, first, end, offset)
        if lo > first:
            drop.append((first, lo))
    if not drop:
        return frame
    old = pl.lit(False)
    for first, end in drop:
        old = old | pl.col("_message").is_between(first, end, closed="left")
    return frame.with_columns(messages.alias("_message")).filter(~old).drop("_message")


def _spans(records: _Records) -> list[tuple[str, int, int, int]]:
    """``(topic, partition, first, end)`` runs of a poll's record indexes."""
    if isinstance(records, RawValues):
        return records.spans()
    spans: list[tuple[str, int, int, int]] = []
    for i in range(len(records)):
        record = records[i]
        topic, partition = str(record.topic), int(record.partition)
        if spans and spans[-1][:2] == (topic, partition):
            spans[-1] = (topic, partition, spans[-1][2], i + 1)
        else:
            spans.append((topic, partition, i, i + 1))
    return spans


def _key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def _fetch_position(consumer: KafkaConsumer, tp: TopicPartition) -> int | None:
    """The consumer's fetch position of a partition, without asking a broker."""
    try:
        # KafkaConsumer.position() may block on a broker; the state does not.
        position = consumer._subscription.assignment[tp].position
    except Exception:  # internals of kafka-python: no position then
        return None
    return None if position is None else int(position.offset)


def _stable_member(consumer: KafkaConsumer) -> bool:
    """Whether the consumer has joined its group (a member may own nothing)."""
    try:
        # kafka-python has no public membership state.
        return consumer._coordinator.generation_if_stable() is not None
    except Exception:  # a health probe never raises
        return False


def _leaders_connected(
    consumer: KafkaConsumer, partitions: Sequence[TopicPartition]
) -> bool:
    """Whether the consumer is connected to the leader of every partition."""
    try:
        # kafka-python has no public per-node connection state.
        client = consumer._client
        cluster = client.cluster
        leaders = {cluster.leader_for_partition(tp) for tp in partitions}
        if None in leaders or -1 in leaders:
            return False
        return all(client.connected(node) for node in leaders)
    except Exception:  # a health probe never raises
        return False


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
    "DEFAULT_MAX_CLOCK_SKEW_S",
    "DEFAULT_TOPIC",
    "KafkaSource",
    "KafkaSourceStats",
    "RejectionCallback",
    "dlq_topic_for",
]
