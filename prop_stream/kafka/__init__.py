"""Kafka: the production tick source, its decoder and the tick-file producer.

This layer sits below :mod:`prop_stream.evaluator` (which wraps
:class:`KafkaSource` as a tick source) and knows nothing of DuckDB.
"""

from prop_stream.kafka.admin import ensure_topic
from prop_stream.kafka.decode import (
    ARROW_ENCODING,
    ENCODING_HEADER,
    JSON_ENCODING,
    Decoded,
    Reason,
    Rejection,
    decode_messages,
    encode_arrow,
)
from prop_stream.kafka.exceptions import (
    DeadLetterError,
    KafkaSourceError,
    KafkaUnavailableError,
    ProduceError,
)
from prop_stream.kafka.produce import produce_file
from prop_stream.kafka.source import (
    DEFAULT_TOPIC,
    KafkaSource,
    KafkaSourceStats,
    dlq_topic_for,
)

__all__ = [
    "ARROW_ENCODING",
    "DEFAULT_TOPIC",
    "ENCODING_HEADER",
    "JSON_ENCODING",
    "DeadLetterError",
    "Decoded",
    "KafkaSource",
    "KafkaSourceError",
    "KafkaSourceStats",
    "KafkaUnavailableError",
    "ProduceError",
    "Reason",
    "Rejection",
    "decode_messages",
    "dlq_topic_for",
    "encode_arrow",
    "ensure_topic",
    "produce_file",
]
