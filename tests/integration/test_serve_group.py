"""`prop-stream serve --group G` as a consumer-group member on a real broker.

One service (DuckDB, so one process) joins group ``G`` over a 3-partition topic.
A second member, a plain kafka-python consumer with the same cooperative-sticky
assignor, joins mid-stream: the group rebalances, the service has partitions
revoked (and checkpoints them), more ticks arrive, the second member leaves,
and the service is assigned them again: it takes each partition's next epoch,
loads the partition's checkpoint and replays from the stored position. At the
end what the service stored equals the backtest of the ticks, row for row.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from kafka import KafkaConsumer
from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
from replay_support import assert_matches_backtest, stored_outputs
from service_process import PROP_STREAM, ServiceProcess, run_prop_stream

from integration.conftest import TopicFactory
from integration.test_serve_kafka import _breaking_ticks
from integration.test_serve_kafka_ops import _lag, _rules_file, _scrape
from prop_stream.store import connect

pytestmark = pytest.mark.integration

PARTITIONS = 3


def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _log(proc: ServiceProcess) -> list[dict[str, object]]:
    out = []
    for line in proc.lines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _messages(proc: ServiceProcess, start: str) -> list[str]:
    return [
        str(r.get("message", r.get("msg", "")))
        for r in _log(proc)
        if str(r.get("message", r.get("msg", ""))).startswith(start)
    ]


def test_serve_in_a_group_hands_partitions_over_and_back_equal_to_backtest(
    tmp_path: Path, kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    db = tmp_path / "prop.duckdb"
    assert run_prop_stream(["init", "--db", str(db), "--demo"]).returncode == 0
    ticks_file = tmp_path / "ticks.parquet"
    total = _breaking_ticks(db, ticks_file)
    ticks = pl.read_parquet(ticks_file).sort("ts", maintain_order=True)
    half = total // 2
    ticks.head(half).write_parquet(tmp_path / "first.parquet")
    ticks.tail(total - half).write_parquet(tmp_path / "second.parquet")
    topic = topic_factory(partitions=PARTITIONS)
    group = f"group-{topic}"

    def produce(path: Path) -> None:
        done = subprocess.run(  # noqa: S603 - our own command
            [str(PROP_STREAM), "produce", str(path), "--kafka-bootstrap",
             kafka_bootstrap, "--topic", topic],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    proc = ServiceProcess(
        ["serve", "--db", str(db), "--source", "kafka", "--kafka-bootstrap",
         kafka_bootstrap, "--topic", topic, "--group", group, "--port", "0"],
        tmp_path,
        env={"PROP_STREAM_LOG_FORMAT": "json"},
    )  # fmt: skip
    other: KafkaConsumer | None = None
    try:
        url = proc.wait_ready()

        def caught_up() -> bool:
            lag = _lag(_scrape(url))
            return len(lag) == PARTITIONS and all(v == 0 for v in lag.values())

        produce(tmp_path / "first.parquet")
        _until(caught_up, 120, "the first half judged on every partition")
        assert len(_messages(proc, "partition ")) >= PARTITIONS

        # A second member joins: cooperative-sticky moves some partitions to it.
        other = KafkaConsumer(
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            enable_auto_commit=False,
            partition_assignment_strategy=(CooperativeStickyAssignor,),
        )
        other.subscribe([topic])
        deadline = time.monotonic() + 90
        while not other.assignment():
            assert time.monotonic() < deadline, "the second member got nothing"
            other.poll(timeout_ms=200)
        moved = {tp.partition for tp in other.assignment()}
        assert 0 < len(moved) < PARTITIONS
        _until(
            lambda: any(
                "revoked" in m for m in _messages(proc, f"consumer group {group}")
            ),
            60,
            "the service to have partitions revoked",
        )
        produce(tmp_path / "second.parquet")  # partly for the partitions away
        for _ in range(5):
            other.poll(timeout_ms=200)  # stay a live member for a while
        other.close(autocommit=False)
        other = None

        def taken_again() -> bool:
            taken = _messages(proc, "partition ")
            again = [m for m in taken if "taken with epoch 2" in m]
            return len(again) >= len(moved)

        _until(taken_again, 90, "the moved partitions to come back")
        _until(caught_up, 120, "every tick judged after the hand-back")
    finally:
        if other is not None:
            other.close(autocommit=False)
        code = proc.stop(90)
    assert code == 0
    text = "".join(proc.lines())
    assert "Traceback" not in text
    assert "commit fenced" not in text  # a clean hand-over refuses nothing

    out = tmp_path / "backtest"
    rules = _rules_file(db, tmp_path / "rules.json")
    done = run_prop_stream(
        ["backtest", "--rules", str(rules), "--ticks", str(ticks_file),
         "--out", str(out)]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    conn = connect(db, read_only=True)
    try:
        assert_matches_backtest(stored_outputs(conn, history=False), out)
        offsets = conn.execute(
            "SELECT sum(next_offset) FROM source_offsets WHERE source = 'kafka'"
        ).fetchall()[0][0]
        assert offsets == total  # one message per tick, every one committed
        epochs = dict(
            conn.execute(
                'SELECT "partition", epoch FROM partition_epochs ORDER BY 1'
            ).fetchall()
        )
        assert len(epochs) == PARTITIONS
        for number in moved:
            assert epochs[f"{topic}:{number}"] == 2
        staged = conn.execute("SELECT count(*) FROM tick_archive_staging").fetchall()
        archived = list((tmp_path / "prop.duckdb.archive").rglob("*.parquet"))
        # Every tick archived once (staged or moved; the mover runs every 300 s).
        if not archived:
            assert staged[0][0] == total
    finally:
        conn.close()
