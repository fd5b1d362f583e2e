"""Building kafka-python clients with a bounded wait, and creating topics.

kafka-python's clients (``KafkaConsumer``, ``KafkaAdminClient``) contact a broker
in their constructor and wait ``bootstrap_timeout_ms`` (30 s by default) for one
to answer. A constructor that gives up leaves its network thread running, and
nothing can interrupt it meanwhile. :func:`build_client` keeps hold of the
half-built client so that a failed constructor is cleaned up, and another
thread can abort a construction in progress (:func:`discard`).

:func:`ensure_topic` creates a topic unless it exists: ``prop-stream produce``
creates the tick topic, and the source its dead-letter topic (brokers here do
not auto-create topics, rightly: a typo must not make one).
"""

from __future__ import annotations

import logging
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
            :func:`discard` it meanwhile.

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
    "build_client",
    "discard",
    "ensure_topic",
]
