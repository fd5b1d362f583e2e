"""The README's Kafka commands, as written there, on a fresh private broker.

The commands are read from README.md (the "With Kafka" block and the
``init``/``session`` commands of the paragraph before it), so this test breaks
when the README changes. Only the placeholders are filled in (``H:P``, ``T``;
``TICKS.parquet`` is written into the working directory first) and ``serve``
gets ``--port 0``, since a fixed port may be taken on a shared machine.
"""

from __future__ import annotations

import os
import re
import shlex
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
from kafka.admin import KafkaAdminClient

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
    before = text[:at].rstrip().rsplit("\n\n", 1)[-1].replace("\n", " ")
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
