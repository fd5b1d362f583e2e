"""Errors of the Kafka tick source and producer."""

from __future__ import annotations

from prop_stream.exceptions import PropStreamError


class KafkaSourceError(PropStreamError):
    """The Kafka source can't run: bad settings or a topic that does not exist.

    Attributes:
        topic: The topic concerned, if any.
    """

    def __init__(self, message: str, *, topic: str | None = None) -> None:
        super().__init__(message)
        self.topic = topic


class DeadLetterError(KafkaSourceError):
    """Rejected messages could not be written to the dead-letter topic.

    The source does not move past them: the poll that found them is undone and
    fetched again.

    Attributes:
        count: How many dead letters were waiting.
    """

    def __init__(self, message: str, *, topic: str, count: int) -> None:
        super().__init__(message, topic=topic)
        self.count = count


class ProduceError(KafkaSourceError):
    """A tick file could not be replayed to a topic."""


class KafkaUnavailableError(KafkaSourceError):
    """No Kafka broker answered in time (not bad input: it may answer later).

    Attributes:
        bootstrap: The addresses tried.
    """

    def __init__(self, message: str, *, bootstrap: str) -> None:
        super().__init__(message)
        self.bootstrap = bootstrap


__all__ = [
    "DeadLetterError",
    "KafkaSourceError",
    "KafkaUnavailableError",
    "ProduceError",
]
