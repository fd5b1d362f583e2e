"""The Kafka source without a broker: it waits, says why, and stops promptly.

No broker runs here: the source points at a free port nobody listens on. The
tests with a broker (a missing topic that appears, a broker stopped and
started) are in ``tests/integration/test_kafka_source.py``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from kafka_support import close_failed_connects
from pydantic import ValidationError

from prop_stream.config import StreamSettings
from prop_stream.evaluator.service import KafkaTickSource, build_source
from prop_stream.kafka import KafkaSource, raw
from prop_stream.kafka.source import DEFAULT_MAX_CLOCK_SKEW_S

SOURCE_LOG = "prop_stream.kafka.source"

# kafka-python leaves an unclosed socket behind each failed connect (a reference
# cycle); when the collector happens to run during a test of this module, which
# makes them on purpose, the warning is about kafka-python, not about us.
pytestmark = [
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def _failed_connects_closed() -> Iterator[None]:
    yield
    close_failed_connects()


def _nobody() -> str:
    """``127.0.0.1:PORT`` of a port nobody listens on (bound, then freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    return f"127.0.0.1:{port}"


def _kafka_io_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kafka-io")]


def _wait_until(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_without_a_broker_polls_wait_and_name_kafka(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bootstrap = _nobody()
    source = KafkaSource(
        bootstrap=bootstrap, topic="ticks", group_id=None, bootstrap_timeout_s=0.3
    )
    assert source.not_ready() == {"kafka": f"connecting to {bootstrap}"}
    caplog.set_level(logging.INFO, logger=SOURCE_LOG)
    polls = 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            ticks, position = source.poll(1000, 0.1)
            polls += 1
            assert ticks.height == 0
            assert position == {}
        assert source.not_ready() == {"kafka": f"no broker answers at {bootstrap}"}
        assert not source.healthy()
        assert source.lag() == {}
        assert source.dead_letters == {}
    finally:
        source.close()
    lines = [r for r in caplog.records if r.name == SOURCE_LOG]
    # One line per connection attempt (retries back off: 1 s, 2 s, ...), not
    # one per poll, and never a traceback.
    assert len(lines) == source.stats.connect_failures >= 2
    assert polls > 2 * len(lines)
    assert all(f"no Kafka broker answers at {bootstrap}" in r.message for r in lines)
    assert all(r.exc_info is None for r in lines)
    assert source.not_ready() == {"kafka": "the Kafka source is closed"}


def test_close_from_another_thread_ends_a_wait_for_the_broker() -> None:
    # The service's SIGTERM path: the loop thread is inside poll(), waiting for
    # a broker (kafka-python's constructor waits bootstrap_timeout_s); the main
    # thread calls close().
    source = KafkaSource(
        bootstrap=_nobody(), topic="ticks", group_id=None, bootstrap_timeout_s=60.0
    )
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            source.poll(1000, 0.5)
            if source.not_ready() == {"kafka": "the Kafka source is closed"}:
                done.set()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    _wait_until(lambda: source._building is not None)  # inside the constructor
    started = time.monotonic()
    source.close()
    thread.join(10.0)  # "answers at all": the 60 s wait is cut short
    assert not thread.is_alive()
    assert time.monotonic() - started < 10.0
    # The half-built consumer's network thread is stopped, not leaked.
    _wait_until(lambda: not _kafka_io_threads(), timeout=10.0)


def test_untested_kafka_python_falls_back_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(raw, "installed_kafka_python", lambda: "3.1.0")
    monkeypatch.setattr(raw, "_warned_versions", set())
    caplog.set_level(logging.WARNING, logger="prop_stream.kafka.raw")
    sources = [
        KafkaSource(bootstrap=_nobody(), topic="ticks", raw_records=True)
        for _ in range(3)
    ]
    assert [s.raw_records for s in sources] == [False, False, False]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "kafka-python 3.1.0" in warnings[0]
    assert "3.0.12" in warnings[0]


def test_the_tested_kafka_python_keeps_the_fast_path() -> None:
    assert raw.installed_kafka_python() in raw.TESTED_KAFKA_PYTHON
    assert KafkaSource(bootstrap=_nobody(), topic="ticks").raw_records
    assert not KafkaSource(
        bootstrap=_nobody(), topic="ticks", raw_records=False
    ).raw_records


def test_clock_skew_bound_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert StreamSettings().max_clock_skew_s == DEFAULT_MAX_CLOCK_SKEW_S == 300
    monkeypatch.setenv("PROP_STREAM_MAX_CLOCK_SKEW", "0")
    settings = StreamSettings(source="kafka", kafka_bootstrap=_nobody())
    assert settings.max_clock_skew_s == 0
    source = build_source(settings)
    assert isinstance(source, KafkaTickSource)
    assert source.max_clock_skew_s == 0
    assert StreamSettings(max_clock_skew_s=12.5).max_clock_skew_s == 12.5
    monkeypatch.setenv("PROP_STREAM_MAX_CLOCK_SKEW", "-1")
    with pytest.raises(ValidationError, match="PROP_STREAM_MAX_CLOCK_SKEW"):
        StreamSettings()
