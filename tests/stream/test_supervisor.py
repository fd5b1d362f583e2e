"""The supervisor: transient faults retried with a fresh component, others fatal."""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable

import duckdb
import pytest
from kafka.errors import KafkaConnectionError, KafkaTimeoutError

from prop_stream.evaluator.faults import transient_reason
from prop_stream.kafka.exceptions import KafkaSourceError
from prop_stream.store.exceptions import DatabaseLockedError, StoreError
from prop_stream.supervisor import Supervisor


class Flaky:
    """Raises the given faults on its first runs, then runs until stopped."""

    def __init__(self, faults: list[BaseException], built: list[Flaky]) -> None:
        self._faults = faults
        self.stopped = threading.Event()
        self.running = threading.Event()
        built.append(self)

    def run(self, stop: threading.Event) -> None:
        if self._faults:
            raise self._faults.pop(0)
        self.running.set()
        while not (stop.wait(0.01) or self.stopped.is_set()):
            pass

    def stop(self) -> None:
        self.stopped.set()


def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_supervisor_retries_a_transient_fault_with_a_fresh_component(
    caplog: pytest.LogCaptureFixture,
) -> None:
    faults: list[BaseException] = [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.ENOSPC, "No space left on device"),
    ]
    built: list[Flaky] = []
    fatal: list[bool] = []
    sup = Supervisor(
        classify=transient_reason,
        on_fatal=lambda: fatal.append(True),
        initial_backoff_s=0.01,
        fatal_exit_s=None,
    )
    sup.add("evaluator", lambda: Flaky(faults, built))
    with caplog.at_level(logging.WARNING, logger="prop_stream.supervisor"):
        sup.start()
        _until(lambda: len(built) == 3 and built[-1].running.is_set())
    assert sup.checks() == {"evaluator": "ok"}
    assert sup.restarts() == {"evaluator": 2}
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2  # one line per retry
    assert all(r.exc_info is None for r in retries)  # no traceback
    assert "disk full" in retries[0].getMessage()
    sup.stop(timeout_s=5)
    assert built[-1].stopped.is_set()
    assert not fatal


def test_supervisor_names_the_fault_while_it_waits() -> None:
    built: list[Flaky] = []
    sup = Supervisor(classify=transient_reason, initial_backoff_s=30, fatal_exit_s=None)
    sup.add("jobs", lambda: Flaky([DatabaseLockedError("x.duckdb", "locked")], built))
    sup.start()
    _until(lambda: "jobs" in sup.not_ready() and sup.restarts()["jobs"] == 1)
    assert sup.not_ready()["jobs"].startswith("database locked")
    sup.stop(timeout_s=5)  # interrupts the 30 s backoff


def test_supervisor_ends_on_a_fatal_fault() -> None:
    built: list[Flaky] = []
    fatal: list[bool] = []
    sup = Supervisor(
        classify=transient_reason,
        on_fatal=lambda: fatal.append(True),
        fatal_exit_s=None,
    )
    sup.add("jobs", lambda: Flaky([RuntimeError("a bug")], built))
    sup.add("evaluator", lambda: Flaky([], built))
    sup.start()
    _until(lambda: bool(fatal))
    assert sup.fatal is not None
    assert sup.fatal[0] == "jobs"
    assert sup.checks()["jobs"] == "failed: RuntimeError: a bug"
    assert sup.restarts() == {"jobs": 0, "evaluator": 0}
    sup.stop(timeout_s=5)


def test_supervisor_remove_stops_one_component() -> None:
    built: list[Flaky] = []
    sup = Supervisor(classify=transient_reason, fatal_exit_s=None)
    sup.add("a", lambda: Flaky([], built))
    sup.start()
    sup.add("b", lambda: Flaky([], built), start=True)
    _until(lambda: len(built) == 2 and all(c.running.is_set() for c in built))
    sup.remove("b")
    assert "b" not in sup.checks()
    assert sup.checks() == {"a": "ok"}
    sup.stop(timeout_s=5)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
        (
            duckdb.TransactionException(
                'Failed to commit: Could not write file "x.wal": No space left on '
                "device"
            ),
            "disk full",
        ),
        (DatabaseLockedError("x", "x is in use"), "database locked"),
        (duckdb.TransactionException("Conflict on update!"), "database busy"),
        (KafkaTimeoutError("Failed to update metadata"), "kafka"),
        (KafkaConnectionError("gone"), "kafka"),
        (KafkaSourceError("topic 't' does not exist on h:1", topic="t"), "topic"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "connection lost"),
        (StoreError("wrapped"), None),
        (RuntimeError("a bug"), None),
        (KeyError("x"), None),
        (duckdb.FatalException("database has been invalidated because of"), None),
        (KafkaSourceError("the tick topic name is empty"), None),
    ],
)
def test_transient_reason_table(exc: BaseException, reason: str | None) -> None:
    got = transient_reason(exc)
    if reason is None:
        assert got is None
    else:
        assert got is not None
        assert got.startswith(reason)


def test_transient_reason_follows_the_cause() -> None:
    outer = StoreError("can't open the database")
    outer.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert (transient_reason(outer) or "").startswith("disk full")
