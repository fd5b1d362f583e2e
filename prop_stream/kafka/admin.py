"""Building kafka-python clients with a bounded wait, and creating topics.

kafka-python's clients (``KafkaConsumer``, ``KafkaAdminClient``) contact a broker
in their constructor and wait ``bootstrap_timeout_ms`` (30 s by default) for one
to answer. A constructor that gives up leaves its network thread running, and
nothing can interrupt it meanwhile. :func:`build_client` keeps hold of the
half-built client so that a failed constructor is cleaned up, and another
thread can abort a construction waiting for a broker (:func:`abort_bootstrap`).

:func:`ensure_topic` creates a topic unless it exists: ``prop-stream produce``
creates the tick topic, and the source its dead-letter topic (brokers here do
not auto-create topics, rightly: a typo must not make one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from prop_stream.kafka.exceptions import KafkaSourceError, KafkaUnavailableError

logger = logging.getLogger(__name__)

#: How long a client's constructor waits for a broker to answer.
DEFAULT_BOOTSTRAP_TIMEOUT_S: Final = 3.0
#: Most replicas of a topic this module creates (fewer brokers: one per broker).
MAX_REPLICATION: Final = 3

ClientT = TypeVar("ClientT")


def build_client(
    cls: type[ClientT],
    config: dict[str, Any],
    *,
    building: Callable[[ClientT | None], None] | None = None,
) -> ClientT:
    """Construct a kafka-python client; clean up after a constructor that fails.

    Args:
        cls: ``KafkaConsumer`` or ``KafkaAdminClient``.
        config: Its settings.
        building: Called with the instance before its constructor runs and with
            None after it returned or failed, so that another thread can
            :func:`abort_bootstrap` it meanwhile.

    Returns:
        The client, connected to a broker.

    Raises:
        KafkaError: The constructor failed (no broker answered in time, say);
            its network thread is stopped.
    """
    client = cls.__new__(cls)
    if building is not None:
        building(client)
    try:
        # The instance exists before its constructor runs, so a failure (or
        # discard() from another thread) can stop what the constructor started.
        cls.__init__(client, **config)
    except BaseException:
        discard(client)
        raise
    finally:
        if building is not None:
            building(None)
    return client


def discard(client: object) -> None:
    """Close a client, built or half-built; never raises.

    Closing the network client wakes a constructor waiting for a broker (it
    then fails) and stops the client's network thread.
    """
    inner = getattr(client, "_client", None)
    if inner is None:
        return
    try:
        inner.close()
    except Exception:  # closing a half-built client must not fail a stop
        logger.debug("closing a kafka-python client failed", exc_info=True)


def abort_bootstrap(client: object, timeout_s: float = 1.0) -> bool:
    """Make a constructor that is waiting for a broker fail now (another thread).

    The constructor waits on its network thread for the bootstrap; closing
    the network client fails that wait at once. Closing it any earlier could
    leave the constructor waiting for an event that never comes, so this waits
    (up to ``timeout_s``) until the constructor is inside that wait.

    Args:
        client: A client :func:`build_client` is constructing.
        timeout_s: Longest wait for the constructor to reach the bootstrap.

    Returns:
        Whether it was aborted (False: the constructor ends by itself within
        its ``bootstrap_timeout_ms``; discard the client afterwards).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        net = getattr(client, "_net", None)
        # A pending cross-thread waiter: the constructor is blocked in
        # net.run(bootstrap), which closing the client fails at once.
        if net is not None and getattr(net, "_pending_waiters", None):
            discard(client)
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def ensure_topic(
    bootstrap: str,
    topic: str,
    *,
    partitions: int,
    timeout_s: float = 30.0,
    bootstrap_timeout_s: float = DEFAULT_BOOTSTRAP_TIMEOUT_S,
    client_id: str = "prop-stream-admin",
) -> bool:
    """Create a topic unless it exists, and wait until its partitions have leaders.

    Args:
        bootstrap: ``host:port[,host:port...]`` of the brokers.
        topic: The topic.
        partitions: Its partition count, if it is created (an existing topic is
            left as it is).
        timeout_s: Longest wait for the broker to create it.
        bootstrap_timeout_s: Longest wait for a broker to answer at all.
        client_id: The client id the brokers log.

    Returns:
        True if it was created, False if it existed.

    Raises:
        KafkaUnavailableError: No broker answered.
        KafkaSourceError: The brokers refused to create it (a bad name, no
            permission, more partitions than allowed).
    """
    if partitions < 1:
        raise KafkaSourceError(f"partitions must be at least 1, got {partitions}")
    try:
        admin = build_client(
            KafkaAdminClient,
            {
                "bootstrap_servers": bootstrap.split(","),
                "client_id": client_id,
                "bootstrap_timeout_ms": int(bootstrap_timeout_s * 1000),
                "request_timeout_ms": int(timeout_s * 1000),
            },
        )
    except KafkaError as exc:
        raise KafkaUnavailableError(
            f"no Kafka broker answers at {bootstrap}", bootstrap=bootstrap
        ) from exc
    try:
        if topic in admin.list_topics():
            return False
        brokers = len(admin.describe_cluster().get("brokers") or []) or 1
        replicas = min(MAX_REPLICATION, brokers)
        try:
            admin.create_topics(
                {topic: {"num_partitions": partitions, "replication_factor": replicas}},
                timeout_ms=int(timeout_s * 1000),
                wait_for_metadata=True,
            )
        except TopicAlreadyExistsError:
            return False  # someone else was quicker
        logger.info(
            "created topic %s (%d partition(s), %d replica(s))",
            topic,
            partitions,
            replicas,
        )
    except KafkaError as exc:
        raise KafkaSourceError(
            f"could not create topic {topic!r} on {bootstrap}: {exc}", topic=topic
        ) from exc
    finally:
        admin.close()
    return True


__all__ = [
    "DEFAULT_BOOTSTRAP_TIMEOUT_S",
    "abort_bootstrap",
    "build_client",
    "discard",
    "ensure_topic",
]
