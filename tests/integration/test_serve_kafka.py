"""The README's Kafka commands, as written there, on a fresh private broker.

The commands are read from README.md (the "With Kafka" block and the
``init``/``session`` commands of the paragraph before it), so this test breaks
when the README changes. Only the placeholders are filled in (``H:P``, ``T``;
``TICKS.parquet`` is written into the working directory first) and ``serve``
gets ``--port 0``, since a fixed port may be taken on a shared machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import duckdb
import httpx
import polars as pl
import pytest
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient
from kafka.errors import UnknownTopicOrPartitionError
from kafka.structs import TopicPartition

from integration.conftest import KAFKA_LOCAL, REPO, KafkaBroker
from integration.test_serve import _start, _stop

pytestmark = pytest.mark.integration

PROP_STREAM = Path(sys.executable).with_name("prop-stream")
README = REPO / "README.md"


def readme_kafka_commands() -> tuple[list[str], list[str]]:
    """The README's commands: (init and session), (the "With Kafka" block).

    Returns:
        ``prop-stream init ...`` and ``prop-stream session ...`` from the
        paragraph about one's own database, and the lines of the first code
        block after "With Kafka".
    """
    text = README.read_text()
    at = text.index("With Kafka")
    # Code blocks out first: their fences would pair up the inline backticks.
    before = re.sub(r"```.*?```", "", text[:at], flags=re.DOTALL).replace("\n", " ")
    spans = re.findall(r"`([^`]+)`", before)
    setup = [
        next(s for s in spans if s.startswith("prop-stream init ")),
        next(s for s in spans if s.startswith("prop-stream session ")),
    ]
    block = re.search(r"```[a-z]*\n(.*?)```", text[at:], re.DOTALL)
    assert block is not None, "no code block after 'With Kafka' in README.md"
    lines = [line.split(" #")[0].strip() for line in block.group(1).splitlines()]
    return setup, [line for line in lines if line]


def _argv(command: str, fill: dict[str, str]) -> list[str]:
    words = [fill.get(word, word) for word in shlex.split(command)]
    if words[0] == "prop-stream":
        words[0] = str(PROP_STREAM)
    elif words[0] == "scripts/kafka-local":
        words[0] = str(KAFKA_LOCAL)
    return words


def _breaking_ticks(db: Path, path: Path) -> int:
    """Ticks that lose 20 % on every active demo phase, from its start on."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        phases = con.execute(
            "SELECT account_id, started_at, "
            "CAST(json_extract(rules, '$.initial_balance') AS DOUBLE) "
            "FROM challenge_phases WHERE status = 'active' ORDER BY account_id"
        ).fetchall()
    finally:
        con.close()
    assert phases
    rows = [
        {
            "account_id": int(account),
            "ts": started + timedelta(seconds=i + 1),
            "equity": initial * (1 - 0.005 * i),
            "balance": initial,
        }
        for account, started, initial in phases
        for i in range(41)
    ]
    pl.DataFrame(rows).write_parquet(path)
    return len(rows)


def test_readme_kafka_commands_give_breaches_over_http(
    tmp_path: Path, private_kafka_broker: KafkaBroker
) -> None:
    setup, kafka = readme_kafka_commands()
    assert [c.split()[:2] for c in kafka] == [
        ["scripts/kafka-local", "start"],
        ["prop-stream", "produce"],
        ["prop-stream", "serve"],
    ]
    env = {**os.environ, **private_kafka_broker._env}
    topic = f"readme-{uuid.uuid4().hex[:8]}"  # brand-new: produce creates it

    def run(command: str, fill: dict[str, str]) -> str:
        done = subprocess.run(  # noqa: S603 - the README's own commands
            _argv(command, fill),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"{command}: {done.stderr}"
        return done.stdout.strip()

    run(setup[0], {})  # prop-stream init --db prop.duckdb --demo
    bootstrap = run(kafka[0], {})  # scripts/kafka-local start
    assert bootstrap == private_kafka_broker.bootstrap
    fill = {"H:P": bootstrap, "T": topic}
    _breaking_ticks(tmp_path / "prop.duckdb", tmp_path / "TICKS.parquet")
    run(kafka[1], fill)  # prop-stream produce TICKS.parquet ...

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        described = admin.describe_topics([topic])[0]
    finally:
        admin.close()
    assert len(described["partitions"]) == 6  # the default of --partitions

    serve = [*_argv(kafka[2], fill)[1:], "--port", "0"]
    proc, url = _start(serve, tmp_path)
    try:
        token = run(setup[1], {})  # prop-stream session alice@example.com ...
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as client:
            challenges = client.get("/prop/challenges").json()["items"]
            assert challenges
            breaches: list[dict[str, object]] = []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                breaches = [
                    breach
                    for challenge in challenges
                    for breach in client.get(
                        f"/prop/challenges/{challenge['id']}/breaches"
                    ).json()["items"]
                ]
                if len(breaches) >= len(challenges):
                    break
                time.sleep(0.5)
    finally:
        assert _stop(proc) == 0
    # Every challenge of alice's lost 20 %: each has a breach that failed it.
    assert {b["challenge_id"] for b in breaches} == {c["id"] for c in challenges}
    assert any(b["action"] == "phase_failed" for b in breaches)


def test_serve_waits_for_a_missing_topic_with_one_line_then_judges(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    db = tmp_path / "prop.duckdb"
    subprocess.run(  # noqa: S603 - our own command
        [str(PROP_STREAM), "init", "--db", str(db), "--demo"],
        check=True,
        capture_output=True,
    )
    ticks = tmp_path / "ticks.parquet"
    _breaking_ticks(db, ticks)
    topic = f"late-{uuid.uuid4().hex[:8]}"  # does not exist when serve starts
    printed: list[str] = []
    proc, url = _start(
        ["serve", "--db", str(db), "--source", "kafka", "--kafka-bootstrap",
         kafka_bootstrap, "--topic", topic, "--port", "0"],
        tmp_path,
        printed,
    )  # fmt: skip
    try:
        token = subprocess.run(  # noqa: S603 - our own command
            [str(PROP_STREAM), "session", "alice@example.com", "--db", str(db)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        challenge = client.get("/prop/challenges").json()["items"][0]["id"]
        assert client.get(f"/prop/challenges/{challenge}/breaches").json() == {
            "items": [],
            "total_count": 0,
            "has_more": False,
        }
        produce = [str(PROP_STREAM), "produce", str(ticks), "--kafka-bootstrap",
                   kafka_bootstrap, "--topic", topic, "--partitions", "2"]  # fmt: skip
        subprocess.run(produce, check=True, capture_output=True)  # noqa: S603
        deadline = time.monotonic() + 90
        total = 0
        while time.monotonic() < deadline:
            page = client.get(f"/prop/challenges/{challenge}/breaches").json()
            total = page["total_count"]
            if total:
                break
            time.sleep(0.5)
        client.close()
        assert total > 0
    finally:
        code = proc.stop(90)
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.delete_topics([topic])
        finally:
            admin.close()
    assert code == 0
    stderr = "".join(proc.lines())
    # One clear line for the whole wait, no traceback, and the evaluator lived.
    assert stderr.count(f"topic {topic} does not exist yet") == 1, stderr
    assert "Traceback" not in stderr, stderr


def test_serve_without_a_broker_waits_then_stops_at_once(tmp_path: Path) -> None:
    db = tmp_path / "prop.duckdb"
    subprocess.run(  # noqa: S603 - our own command
        [str(PROP_STREAM), "init", "--db", str(db)], check=True, capture_output=True
    )
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{sock.getsockname()[1]}"
    printed: list[str] = []
    proc, _ = _start(
        ["serve", "--db", str(db), "--source", "kafka", "--kafka-bootstrap", nobody,
         "--topic", "ticks", "--port", "0"],
        tmp_path,
        printed,
    )  # fmt: skip
    proc.wait_for_line(lambda line: "no Kafka broker answers" in line, 60)
    stopping = time.monotonic()
    code = proc.stop(60)
    # "Answers at all" (it takes well under a second; it took 22 s before).
    assert time.monotonic() - stopping < 10
    assert code == 0
    stderr = "".join(proc.lines())
    assert f"no Kafka broker answers at {nobody}" in stderr
    assert "Traceback" not in stderr, stderr


def test_produce_creates_the_topic_with_its_partitions_once(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    ticks = tmp_path / "ticks.csv"
    rows = [
        f"{1000 + i % 7},{1767605400000 + i},{100_000 + i},100000" for i in range(50)
    ]
    ticks.write_text("\n".join(["account_id,ts,equity,balance", *rows]) + "\n")
    topic = f"produce-{uuid.uuid4().hex[:8]}"

    def produce(partitions: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # noqa: S603 - our own command
            [str(PROP_STREAM), "produce", str(ticks), "--kafka-bootstrap",
             kafka_bootstrap, "--topic", topic, "--partitions", partitions],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        first = produce("3")
        assert first.returncode == 0, first.stderr
        lines = first.stderr.splitlines()
        assert lines[-1] == f"prop-stream: produce: 50 ticks to {topic}"
        assert sum(f"created topic {topic} (3 partition" in line for line in lines) == 1
        again = produce("5")  # an existing topic is left as it is
        assert again.returncode == 0, again.stderr
        assert "created topic" not in again.stderr
        described = admin.describe_topics([topic])[0]
        assert len(described["partitions"]) == 3
        consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
        try:
            tps = [TopicPartition(topic, p) for p in range(3)]
            assert sum(consumer.end_offsets(tps).values()) == 100
        finally:
            consumer.close()
    finally:
        with contextlib.suppress(UnknownTopicOrPartitionError):
            admin.delete_topics([topic])
        admin.close()
