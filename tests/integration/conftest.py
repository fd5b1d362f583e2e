"""Fixtures for integration tests: a real Kafka broker and a topic per test.

The broker is the project's own single-node KRaft broker, ``scripts/kafka-local``
(docs/kafka.md):

- ``kafka_broker`` / ``kafka_bootstrap`` (session): the shared broker. The first test
  that needs it starts it, once per session; a running one is reused. Several pytest
  sessions on one checkout share it: each holds a lease on it, and the last one to
  finish stops it if a test session started it (``PROP_STREAM_KAFKA_KEEP=1`` keeps it
  running). A broker started by hand is left running.
- ``topic_factory`` (test): uniquely named topics on the shared broker, deleted after
  the test.
- ``private_kafka_broker`` (test): a broker of the test's own, in ``tmp_path`` on
  free ports, for tests that stop, kill or restart it without disturbing the others.

``PROP_STREAM_KAFKA_BOOTSTRAP=H:P`` points the shared fixtures at a broker started some
other way (Docker, say).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import subprocess
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import pytest

with warnings.catch_warnings():
    # kafka-python 3.0 loads its protocol schemas at import time with
    # importlib.resources.read_text/open_text, deprecated in Python 3.11 and 3.12 (not
    # 3.13); the suite turns warnings into errors. Import every part the tests use here.
    warnings.filterwarnings(
        "ignore", "(read|open)_text is deprecated", DeprecationWarning
    )
    import kafka
    import kafka.coordinator.assignors.sticky.sticky_assignor  # noqa: F401
    from kafka.admin import KafkaAdminClient
    from kafka.errors import UnknownTopicOrPartitionError

REPO = Path(__file__).resolve().parents[2]
KAFKA_LOCAL = REPO / "scripts" / "kafka-local"

#: A cold start fetches ~45 MB of jars with Maven first.
START_TIMEOUT_S = 600


def shared_home() -> Path:
    """The folder of the shared broker, as ``scripts/kafka-local`` chooses it."""
    return Path(os.environ.get("PROP_STREAM_KAFKA_HOME") or REPO / ".kafka-local")


class KafkaBroker:
    """A broker run by ``scripts/kafka-local``, or an external one.

    Attributes:
        bootstrap: ``127.0.0.1:PORT``, the address clients connect to.
        managed: Whether ``scripts/kafka-local`` runs it, so tests may stop and
            start it; False for a broker given by ``PROP_STREAM_KAFKA_BOOTSTRAP``.
    """

    def __init__(
        self, env: Mapping[str, str] | None = None, bootstrap: str | None = None
    ) -> None:
        self.managed = bootstrap is None
        self.bootstrap = bootstrap or ""
        self._env = {**os.environ, **(env or {})}

    def _run(self, command: str) -> subprocess.CompletedProcess[str]:
        if not self.managed:
            pytest.skip("the broker is external (PROP_STREAM_KAFKA_BOOTSTRAP)")
        result = subprocess.run(  # noqa: S603 - our own script, fixed arguments
            [str(KAFKA_LOCAL), command],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=False,
            env=self._env,
        )
        if result.returncode not in (0, 3):  # 3: status of a stopped broker
            pytest.fail(
                f"scripts/kafka-local {command} exited {result.returncode}:\n"
                f"{result.stderr}",
                pytrace=False,
            )
        return result

    def is_running(self) -> bool:
        """Whether ``scripts/kafka-local status`` finds the broker running."""
        return self._run("status").returncode == 0

    def start(self) -> str:
        """Start the broker, or find it running; return its bootstrap address."""
        self.bootstrap = self._run("start").stdout.strip()
        return self.bootstrap

    def stop(self) -> None:
        """Stop the broker and wait until it has exited."""
        self._run("stop")


@contextlib.contextmanager
def _leases_locked(leases: Path) -> Iterator[None]:
    leases.mkdir(parents=True, exist_ok=True)
    with (leases / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _live_leases(leases: Path) -> list[Path]:
    live = []
    for lease in leases.glob("[0-9]*"):
        try:
            os.kill(int(lease.name), 0)
        except ProcessLookupError:
            lease.unlink(missing_ok=True)  # a session that died
        else:
            live.append(lease)
    return live


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """The shared Kafka broker, started on first use."""
    external = os.environ.get("PROP_STREAM_KAFKA_BOOTSTRAP")
    if external:
        yield KafkaBroker(bootstrap=external)
        return
    broker = KafkaBroker()
    leases = shared_home() / "test-sessions"
    started_by_tests = leases / ".started-by-tests"
    lease = leases / str(os.getpid())
    with _leases_locked(leases):
        if not broker.is_running():
            started_by_tests.touch()
        broker.start()
        lease.touch()
    try:
        yield broker
    finally:
        with _leases_locked(leases):
            lease.unlink(missing_ok=True)
            if (
                started_by_tests.exists()
                and not _live_leases(leases)
                and os.environ.get("PROP_STREAM_KAFKA_KEEP") != "1"
            ):
                broker.stop()
                started_by_tests.unlink()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: KafkaBroker) -> str:
    """The bootstrap address (``H:P``) of the shared Kafka broker."""
    return kafka_broker.bootstrap


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


@pytest.fixture
def private_kafka_broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    """A started broker of this test's own, stopped after it.

    Its data lives in ``tmp_path``, its ports are free ones, and it shares the shared
    broker's jars. Starting one takes a few seconds more than a topic.
    """
    port, controller_port = _free_ports(2)
    broker = KafkaBroker(
        env={
            "PROP_STREAM_KAFKA_HOME": str(tmp_path / "kafka"),
            "PROP_STREAM_KAFKA_JARS": str(shared_home() / "lib"),
            "PROP_STREAM_KAFKA_PORT": str(port),
            "PROP_STREAM_KAFKA_CONTROLLER_PORT": str(controller_port),
        }
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    configs: Mapping[str, str] | None = None,
) -> None:
    """Create a topic and wait until every partition has a leader."""
    client = KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="prop-stream-tests"
    )
    try:
        client.create_topics(
            {
                name: {
                    "num_partitions": partitions,
                    "replication_factor": 1,
                    "configs": dict(configs or {}),
                }
            },
            wait_for_metadata=True,
        )
    finally:
        client.close()


class TopicFactory(Protocol):
    """``topic_factory(partitions=1, configs=None) -> name``."""

    def __call__(
        self, partitions: int = 1, configs: Mapping[str, str] | None = None
    ) -> str: ...


@pytest.fixture
def topic_factory(
    kafka_bootstrap: str, request: pytest.FixtureRequest
) -> Iterator[TopicFactory]:
    """Create uniquely named topics on the shared broker; delete them after the test.

    Call it as ``topic_factory(partitions=3, configs={"cleanup.policy": "compact"})``;
    it returns the topic's name once every partition has a leader.
    """
    created: list[str] = []
    stem = re.sub(r"[^a-zA-Z0-9._-]+", "-", request.node.name)[:80].strip("-")

    def create(partitions: int = 1, configs: Mapping[str, str] | None = None) -> str:
        name = f"test-{stem}-{uuid.uuid4().hex[:8]}"
        create_topic(kafka_bootstrap, name, partitions, configs)
        created.append(name)
        return name

    yield create

    if created:
        client = KafkaAdminClient(
            bootstrap_servers=kafka_bootstrap, client_id="prop-stream-tests"
        )
        try:
            for name in created:
                # The test may have deleted it itself.
                with contextlib.suppress(UnknownTopicOrPartitionError):
                    client.delete_topics([name])
        finally:
            client.close()
