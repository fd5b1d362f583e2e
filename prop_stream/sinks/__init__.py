"""Where the evaluator's outputs go: the :class:`BaseSink` interface and DuckDB."""

from prop_stream.sinks.base import BaseSink
from prop_stream.sinks.duckdb_sink import DuckDBSink
from prop_stream.sinks.exceptions import SinkError

__all__ = ["BaseSink", "DuckDBSink", "SinkError"]
