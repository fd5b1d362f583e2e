"""The Kafka tick source against a real broker: replay, restarts, DLQ, duplicates."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import polars as pl
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import UnknownTopicOrPartitionError
from kafka.net.transport import KafkaTCPTransport
from kafka.protocol.frame import KafkaBytes
from kafka.structs import TopicPartition
from kafka_support import close_failed_connects
from replay_support import (
    assert_matches_backtest,
    demo_backtest_inputs,
    stored_outputs,
)

from integration.conftest import KafkaBroker, TopicFactory, create_topic
from prop_stream.backtest import run_backtest
from prop_stream.config import StreamSettings
from prop_stream.evaluator import DemoConfig, EvaluatorLoop
from prop_stream.evaluator.service import KafkaTickSource, build_loop, build_source
from prop_stream.kafka import ARROW_ENCODING, encode_arrow, produce_file, raw
from prop_stream.kafka.raw import RawPartitionRecords
from prop_stream.sinks import DuckDBSink
from prop_stream.store import (
    Connection,
    connect,
    create_customer,
    cursor,
    init_database,
    open_account,
    query_frame,
    transaction,
)
from prop_stream.store.catalog import account_ids

pytestmark = pytest.mark.integration

START = datetime(2026, 1, 5, tzinfo=UTC)
DEMO = DemoConfig(
    seed=11, rate=5 / 60, batch_ms=20 * 60_000, realtime=False, epoch=START
)
BATCHES = 120
BATCH_TICKS = 400  # small polls: many batches, so kills land mid-stream
CHECKPOINT_EVERY = 5


@dataclass(frozen=True)
class Replay:
    """A template database, its phases' ticks and the backtest of them."""

    db: Path
    ticks: Path
    backtest: Path
    accounts: list[int]


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Replay:
    root = tmp_path_factory.mktemp("kafka-replay")
    db = root / "template.duckdb"
    init_database(db, demo=True, now=START)
    rules_file, ticks, accounts = demo_backtest_inputs(
        db, root, config=DEMO, batches=BATCHES, active_only=True
    )
    run_backtest(rules_file, ticks, root / "backtest")
    return Replay(db, ticks, root / "backtest", accounts)


def _copy_db(replay: Replay, path: Path) -> Path:
    shutil.copy(replay.db, path)
    return path


def _loop(
    conn: Connection, source: KafkaTickSource, *, batch: int = BATCH_TICKS
) -> EvaluatorLoop:
    return EvaluatorLoop(
        cursor(conn),
        source,
        DuckDBSink(cursor(conn), source=source.name, checkpoints_kept=3),
        max_batch_records=batch,
        poll_timeout_s=0.2,
        checkpoint_every=CHECKPOINT_EVERY,
    )


def _source(
    bootstrap: str, topic: str, dlq: str | None = None, *, raw_records: bool = True
) -> KafkaTickSource:
    return KafkaTickSource(
        bootstrap=bootstrap,
        topic=topic,
        dlq_topic=dlq or "no-dlq-expected",
        dlq_unknown_accounts=dlq is not None,
        group_id=None,
        partition_refresh_s=1.0,
        raw_records=raw_records,
        consumer_config={"request_timeout_ms": 10_000},
    )


def _end_offsets(bootstrap: str, topic: str) -> dict[str, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = consumer.partitions_for_topic(topic)
        ends = consumer.end_offsets([TopicPartition(topic, p) for p in parts])
    finally:
        consumer.close()
    return {f"{tp.topic}:{tp.partition}": int(off) for tp, off in ends.items()}


def _drain(
    loop: EvaluatorLoop,
    source: KafkaTickSource,
    ends: dict[str, int],
    timeout: float = 120.0,
) -> None:
    loop.start()
    deadline = time.monotonic() + timeout
    while any(source.position().get(k, 0) < v for k, v in ends.items()):
        assert time.monotonic() < deadline, (source.position(), ends)
        loop.run_once()
    loop.checkpoint()


def _history_duplicates(conn: Connection) -> int:
    row = conn.execute(
        "SELECT count(*) - count(DISTINCT (account_id, ts)) FROM metric_history"
    ).fetchone()
    assert row is not None
    return int(row[0])


def _run_clean(
    replay: Replay, path: Path, bootstrap: str, topic: str
) -> dict[str, pl.DataFrame]:
    conn = connect(_copy_db(replay, path))
    source = _source(bootstrap, topic)
    loop = _loop(conn, source)
    try:
        _drain(loop, source, _end_offsets(bootstrap, topic))
        out = stored_outputs(conn, history=False)
        assert _history_duplicates(conn) == 0
    finally:
        source.close()
        conn.close()
    return out


# ------------------------------------------------------------------- the tests


@pytest.mark.parametrize("encoding", ["json", "batch"])
def test_kafka_replay_matches_backtest(
    tmp_path: Path,
    replay: Replay,
    kafka_bootstrap: str,
    topic_factory: TopicFactory,
    encoding: str,
) -> None:
    topic = topic_factory(partitions=3)
    sent = produce_file(
        replay.ticks,
        bootstrap=kafka_bootstrap,
        topic=topic,
        encoding="json" if encoding == "json" else "batch",
        batch_rows=500,
    )
    assert sent == pl.read_parquet(replay.ticks).height
    out = _run_clean(replay, tmp_path / "prop.duckdb", kafka_bootstrap, topic)
    assert_matches_backtest(out, replay.backtest)
    conn = connect(tmp_path / "prop.duckdb", read_only=True)
    stored = query_frame(
        conn, "SELECT partition, next_offset FROM source_offsets WHERE source='kafka'"
    )
    conn.close()
    assert dict(stored.iter_rows()) == _end_offsets(kafka_bootstrap, topic)


def test_kafka_duplicate_delivery_changes_nothing_but_counters(
    tmp_path: Path, replay: Replay, kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    once = topic_factory(partitions=2)
    twice = topic_factory(partitions=2)
    produce_file(replay.ticks, bootstrap=kafka_bootstrap, topic=once)
    for _ in range(2):
        produce_file(replay.ticks, bootstrap=kafka_bootstrap, topic=twice)
    expected = _run_clean(replay, tmp_path / "once.duckdb", kafka_bootstrap, once)

    conn = connect(_copy_db(replay, tmp_path / "twice.duckdb"))
    source = _source(kafka_bootstrap, twice)
    loop = _loop(conn, source)
    _drain(loop, source, _end_offsets(kafka_bootstrap, twice))
    got = stored_outputs(conn, history=False)
    assert _history_duplicates(conn) == 0
    source.close()
    conn.close()
    close_failed_connects()
    for name, frame in expected.items():
        assert got[name].equals(frame), name
    ticks = pl.read_parquet(replay.ticks).height
    assert loop.stats.ticks == 2 * ticks
    # The second copy is older than what each phase has seen: late, or for
    # phases that ended, unknown to the engine.
    assert loop.stats.late + loop.stats.unknown + loop.stats.inactive > 0


_WORKER = textwrap.dedent(
    """
    import sys, time
    from prop_stream.evaluator import EvaluatorLoop
    from prop_stream.evaluator.service import KafkaTickSource
    from prop_stream.sinks import DuckDBSink
    from prop_stream.store import connect, cursor

    db, bootstrap, topic, batch, every = sys.argv[1:6]
    conn = connect(db)
    source = KafkaTickSource(bootstrap=bootstrap, topic=topic, group_id=None)
    loop = EvaluatorLoop(
        cursor(conn), source, DuckDBSink(cursor(conn), source="kafka"),
        max_batch_records=int(batch), poll_timeout_s=0.2,
        checkpoint_every=int(every),
    )
    loop.start()
    print("started", loop.stats.batch_seq, flush=True)
    while True:
        if loop.run_once():
            print(loop.stats.batch_seq, flush=True)
    """
)


def _run_and_kill(db: Path, bootstrap: str, topic: str, after: int) -> int:
    """Start a worker, SIGKILL it after ``after`` batches; return its last batch."""
    proc = subprocess.Popen(  # noqa: S603 - this interpreter, our own script
        [
            sys.executable,
            "-c",
            _WORKER,
            str(db),
            bootstrap,
            topic,
            str(BATCH_TICKS),
            str(CHECKPOINT_EVERY),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout is not None
    last = -1
    seen = 0
    try:
        for line in proc.stdout:
            if line.startswith("started"):
                continue
            last = int(line)
            seen += 1
            if seen >= after:
                break
        os.kill(proc.pid, signal.SIGKILL)  # wherever it is, maybe mid-commit
        proc.wait(30)
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return last


def test_kafka_sigkill_restarts_equal_a_clean_run(
    tmp_path: Path, replay: Replay, kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory(partitions=3)
    produce_file(replay.ticks, bootstrap=kafka_bootstrap, topic=topic)
    expected = _run_clean(replay, tmp_path / "clean.duckdb", kafka_bootstrap, topic)

    db = _copy_db(replay, tmp_path / "killed.duckdb")
    rng = random.Random(5)
    lasts = [
        _run_and_kill(db, kafka_bootstrap, topic, rng.randint(1, 6)) for _ in range(4)
    ]
    assert max(lasts) > 0
    conn = connect(db)
    source = _source(kafka_bootstrap, topic)
    loop = _loop(conn, source)
    loop.start()
    assert loop.stats.restored_from is not None
    _drain(loop, source, _end_offsets(kafka_bootstrap, topic))
    got = stored_outputs(conn, history=False)
    assert _history_duplicates(conn) == 0
    source.close()
    conn.close()
    close_failed_connects()
    for name, frame in expected.items():
        assert got[name].equals(frame), name
    assert_matches_backtest(got, replay.backtest)


def _dlq_records(bootstrap: str, topic: str, count: int) -> list[dict[str, str]]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    out: list[dict[str, str]] = []
    deadline = time.monotonic() + 30
    while len(out) < count and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            for record in records:
                headers = {k: v.decode() for k, v in record.headers}
                headers["value"] = (record.value or b"")[:40].decode("latin-1")
                out.append(headers)
    consumer.close()
    return out


@pytest.mark.parametrize(
    ("raw_records", "compression"),
    [(True, None), (True, "gzip"), (False, None)],
    ids=["raw", "raw-gzip-fallback", "kafka-python"],
)
def test_kafka_bad_messages_go_to_the_dlq_and_good_ones_flow(
    tmp_path: Path,
    replay: Replay,
    kafka_bootstrap: str,
    topic_factory: TopicFactory,
    raw_records: bool,
    compression: str | None,
) -> None:
    topic = topic_factory(partitions=1)
    dlq = topic_factory(partitions=1)
    account = replay.accounts[0]
    good = {"account_id": account, "equity": 100_000.0, "balance": 100_000.0}
    bad_batch_rows = pl.DataFrame(
        {
            "account_id": [account, 999_999],
            "ts": [datetime(2026, 1, 5, 10, tzinfo=UTC)] * 2,
            "equity": [1.0, 2.0],
            "balance": [1.0, 2.0],
        }
    )
    messages: list[tuple[bytes | None, list[tuple[str, bytes]], str | None]] = [
        (orjson.dumps({**good, "ts": "2026-01-05T09:30:00Z"}), [], None),
        (b"not json", [], "not_json"),
        (b"[1, 2]", [], "not_object"),
        (orjson.dumps({"account_id": account, "ts": 1}), [], "missing_field"),
        (orjson.dumps({**good, "ts": 1, "equity": "x"}), [], "mistyped_field"),
        (
            b'{"account_id": %d, "ts": 1, "equity": NaN, "balance": 1}' % account,
            [],
            "not_finite",
        ),
        (orjson.dumps({**good, "ts": "yesterday"}), [], "bad_ts"),
        (
            orjson.dumps({**good, "account_id": 999_999, "ts": 1767605460000}),
            [],
            "unknown_account",
        ),
        (b"\x00garbage", [("encoding", ARROW_ENCODING.encode())], "bad_batch"),
        (b"{}", [("encoding", b"avro")], "unknown_encoding"),
        (
            encode_arrow(bad_batch_rows),
            [("encoding", ARROW_ENCODING.encode())],
            "unknown_account",
        ),
        (orjson.dumps({**good, "ts": 1767605520000, "extra": [1]}), [], None),
    ]
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, compression_type=compression
    )
    for value, headers, _ in messages:
        producer.send(topic, key=str(account).encode(), value=value, headers=headers)
    producer.flush()
    producer.close()

    conn = connect(_copy_db(replay, tmp_path / "prop.duckdb"))
    source = _source(kafka_bootstrap, topic, dlq, raw_records=raw_records)
    loop = _loop(conn, source)
    _drain(loop, source, _end_offsets(kafka_bootstrap, topic))
    history = query_frame(
        conn, "SELECT ts FROM metric_history WHERE account_id = ?", [account]
    )
    source.close()
    conn.close()
    reasons = [reason for _, _, reason in messages if reason is not None]
    assert source.stats.ticks == 3  # two JSON ticks and one batch row
    assert sorted(source.stats.rejected.elements()) == sorted(reasons)
    assert source.dead_letters == dict(Counter(reasons))
    dead = _dlq_records(kafka_bootstrap, dlq, len(reasons))
    assert [d["error"] for d in dead] == reasons
    offsets = [i for i, (_, _, r) in enumerate(messages) if r is not None]
    assert [int(d["source.offset"]) for d in dead] == offsets
    assert {d["source.topic"] for d in dead} == {topic}
    assert dead[0]["value"] == "not json"
    assert dead[-1]["rows"] == "1"
    assert history.height >= 1


@pytest.mark.parametrize("lookup", [True, False], ids=["lookup", "directory-only"])
def test_kafka_unknown_accounts_are_those_the_store_lacks(
    tmp_path: Path,
    replay: Replay,
    kafka_bootstrap: str,
    topic_factory: TopicFactory,
    lookup: bool,
) -> None:
    topic = topic_factory(partitions=1)
    dlq = topic_factory(partitions=1)
    db = _copy_db(replay, tmp_path / "prop.duckdb")
    conn = connect(db)
    with transaction(conn):
        payer = create_customer(conn, email="payer@example.com")
        # In the store, judged by no phase: its ticks are not dead letters.
        idle = open_account(
            conn, customer_id=payer, account_group="DEMO", balance=Decimal(10)
        )
    settings = StreamSettings(
        db=db,
        source="kafka",
        kafka_bootstrap=kafka_bootstrap,
        kafka_topic=topic,
        kafka_dlq_topic=dlq,
        poll_timeout_s=0.2,
    )
    assert settings.kafka_dlq_unknown_accounts  # the default
    source = build_source(settings)
    assert isinstance(source, KafkaTickSource)
    loop = build_loop(settings, conn, source=source)
    if not lookup:
        # A directory without a lookup: the poll reads all of it instead.
        source.set_account_directory(functools.partial(account_ids, cursor(conn)))

    def send(*accounts: int) -> None:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        for account in accounts:
            tick: dict[str, float] = {
                "account_id": account,
                "ts": 1767605460000 + account % 1000,
                "equity": 100_000.0,
                "balance": 100_000.0,
            }
            producer.send(topic, key=str(account).encode(), value=orjson.dumps(tick))
        producer.flush()
        producer.close()

    judged = replay.accounts[0]
    send(judged, idle, 999_991)
    _drain(loop, source, _end_offsets(kafka_bootstrap, topic))
    assert source.stats.rejected["unknown_account"] == 1
    assert loop.stats.unknown == 1  # the idle account's tick, counted

    # An account opened while the service runs (here by another connection,
    # as an API process or another evaluator would) is known at its first
    # tick, before the loop's next directory refresh: the poll looks the
    # accounts it would dead-letter up in the store.
    other = connect(db)
    with transaction(other):
        opened = open_account(
            other, customer_id=payer, account_group="DEMO", balance=Decimal(10)
        )
    other.close()
    send(opened, 999_992)
    _drain(loop, source, _end_offsets(kafka_bootstrap, topic))
    source.close()
    conn.close()
    assert loop.stats.unknown == 2  # the opened account's tick reached the engine
    assert source.stats.rejected["unknown_account"] == 2
    dead = _dlq_records(kafka_bootstrap, dlq, 2)
    assert [d["error"] for d in dead] == ["unknown_account"] * 2
    assert ['"account_id":99999' in d["value"] for d in dead] == [True, True]


def test_kafka_broker_restart_mid_replay_is_waited_for(
    tmp_path: Path,
    replay: Replay,
    private_kafka_broker: KafkaBroker,
    kafka_bootstrap: str,
    topic_factory: TopicFactory,
) -> None:
    broker = private_kafka_broker
    bootstrap = broker.bootstrap
    topic = "ticks"
    create_topic(bootstrap, topic, partitions=2)
    produce_file(replay.ticks, bootstrap=bootstrap, topic=topic)
    ends = _end_offsets(bootstrap, topic)

    reference = topic_factory(partitions=2)
    produce_file(replay.ticks, bootstrap=kafka_bootstrap, topic=reference)
    expected = _run_clean(replay, tmp_path / "clean.duckdb", kafka_bootstrap, reference)

    conn = connect(_copy_db(replay, tmp_path / "prop.duckdb"))
    source = _source(bootstrap, topic)
    loop = _loop(conn, source, batch=200)
    loop.start()
    for _ in range(10):
        loop.run_once()
    assert source.healthy()
    broker.stop()
    unhealthy = False
    for _ in range(10):
        loop.run_once()  # buffered records may still come
        unhealthy = unhealthy or not source.healthy()
    assert unhealthy
    broker.start()
    _drain(loop, source, ends)
    deadline = time.monotonic() + 30
    while not source.healthy():
        assert time.monotonic() < deadline
        loop.run_once()
    got = stored_outputs(conn, history=False)
    assert _history_duplicates(conn) == 0
    source.close()
    conn.close()
    close_failed_connects()
    for name, frame in expected.items():
        assert got[name].equals(frame), name


# ------------------------------------------------- waits, lag, future_ts, scope

SOURCE_LOG = "prop_stream.kafka.source"


def _delete_topics(bootstrap: str, *names: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        for name in names:
            with contextlib.suppress(UnknownTopicOrPartitionError):
                admin.delete_topics([name])
    finally:
        admin.close()


def _poll_all(source: KafkaTickSource, expected: int, timeout: float = 60) -> int:
    got = 0
    deadline = time.monotonic() + timeout
    while got < expected:
        assert time.monotonic() < deadline, (got, expected)
        ticks, _ = source.poll(5_000, 0.2)
        got += ticks.height
    return got


def test_kafka_source_waits_for_a_topic_that_does_not_exist_yet(
    replay: Replay, kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic = f"test-missing-{uuid.uuid4().hex[:8]}"
    source = _source(kafka_bootstrap, topic)
    caplog.set_level(logging.INFO, logger=SOURCE_LOG)
    try:
        polls = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            ticks, _ = source.poll(1000, 0.2)
            assert ticks.height == 0
            polls += 1
        assert source.not_ready() == {"topic": f"topic {topic} does not exist"}
        assert not source.healthy()
        waiting = [r for r in caplog.records if "does not exist yet" in r.message]
        assert [r.getMessage() for r in waiting] == [
            f"topic {topic} does not exist yet on {kafka_bootstrap}; waiting for it"
        ]
        assert polls > 5  # it kept polling, one line for the whole wait

        # The topic appears (produce creates it) and its ticks are judged.
        sent = produce_file(
            replay.ticks, bootstrap=kafka_bootstrap, topic=topic, partitions=2
        )
        assert _poll_all(source, sent) == sent
        assert source.not_ready() == {}
        assert source.lag() == {0: 0, 1: 0}
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []
    finally:
        source.close()
        _delete_topics(kafka_bootstrap, topic)


def test_kafka_lag_counts_what_the_source_has_not_handed_out(
    replay: Replay, kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory(partitions=3)
    sent = produce_file(replay.ticks, bootstrap=kafka_bootstrap, topic=topic)
    source = _source(kafka_bootstrap, topic)
    try:
        source.poll(100, 5.0)
        # kafka-python notes a partition's high watermark when it parses that
        # partition's fetched records, one record per poll here: on a loaded
        # machine that takes a while (a deadline for "at all", not a speed).
        deadline = time.monotonic() + 120
        while len(source.lag()) < 3:  # a fetch response from every partition
            assert time.monotonic() < deadline
            source.poll(1, 0.5)
        consumed = sum(source.position().values())
        assert 0 < consumed < sent
        assert sum(source.lag().values()) == sent - consumed
        _poll_all(source, sent - consumed)
        assert source.lag() == {0: 0, 1: 0, 2: 0}
    finally:
        source.close()


def test_kafka_lag_of_a_partition_emptied_by_retention_is_zero(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    # Nothing is ever read from it, so the lag counts from its log start (10),
    # not from offset 0.
    topic = topic_factory(partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(10):
        producer.send(topic, key=b"1", value=b"%d" % i)
    producer.flush()
    producer.close()
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.delete_records({TopicPartition(topic, 0): 10})
    finally:
        admin.close()
    source = _source(kafka_bootstrap, topic)
    try:
        deadline = time.monotonic() + 30
        while not source.lag():
            assert time.monotonic() < deadline
            ticks, _ = source.poll(1000, 0.2)
            assert ticks.height == 0
        assert source.lag() == {0: 0}
    finally:
        source.close()


@pytest.mark.parametrize("raw_records", [True, False], ids=["raw", "kafka-python"])
def test_kafka_future_tick_is_dead_lettered_and_later_ticks_are_judged(
    tmp_path: Path,
    replay: Replay,
    kafka_bootstrap: str,
    topic_factory: TopicFactory,
    raw_records: bool,
) -> None:
    topic = topic_factory(partitions=1)
    dlq = f"{topic}.dlq"  # not created: the source creates it on first use
    account = replay.accounts[0]
    now = START + timedelta(hours=12)  # the service's clock
    last = now + timedelta(seconds=299)  # within the 300 s bound

    def tick(ts: datetime, equity: float) -> bytes:
        value = {
            "account_id": account,
            "ts": ts.isoformat().replace("+00:00", "Z"),
            "equity": equity,
            "balance": 100_000.0,
        }
        return orjson.dumps(value)

    batch = pl.DataFrame(
        {
            "account_id": [account, account],
            "ts": [START + timedelta(hours=3), now + timedelta(days=6)],
            "equity": [100_350.0, 1.0],
            "balance": [100_000.0, 100_000.0],
        }
    )
    arrow = [("encoding", ARROW_ENCODING.encode())]
    messages: list[tuple[bytes, list[tuple[str, bytes]]]] = [
        (tick(START + timedelta(hours=1), 100_100.0), []),
        (tick(now + timedelta(days=6), 100_200.0), []),  # a platform clock bug
        (tick(START + timedelta(hours=2), 100_300.0), []),
        (encode_arrow(batch), arrow),  # its second row is 6 days ahead too
        (tick(last, 100_400.0), []),
    ]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for value, headers in messages:
        producer.send(topic, key=str(account).encode(), value=value, headers=headers)
    producer.flush()
    producer.close()

    conn = connect(_copy_db(replay, tmp_path / "prop.duckdb"))
    source = KafkaTickSource(
        bootstrap=kafka_bootstrap,
        topic=topic,
        dlq_topic=dlq,
        group_id=None,
        raw_records=raw_records,
        clock=now.timestamp,
    )
    try:
        loop = _loop(conn, source)
        _drain(loop, source, _end_offsets(kafka_bootstrap, topic))
        latest = conn.execute(
            "SELECT ts, equity FROM metrics_latest WHERE account_id = ?", [account]
        ).fetchone()
    finally:
        source.close()
        conn.close()
    try:
        assert latest == (last, 100_400.0)  # judged after the future ones
        assert loop.stats.late == 0
        assert source.stats.ticks == 4
        assert source.dead_letters == {"future_ts": 2}
        dead = _dlq_records(kafka_bootstrap, dlq, 2)
        assert [(d["error"], d["source.offset"]) for d in dead] == [
            ("future_ts", "1"),
            ("future_ts", "3"),
        ]
        assert "is after" in dead[0]["error.detail"]
        assert dead[1]["rows"] == "1"  # only the batch's future row
    finally:
        _delete_topics(kafka_bootstrap, dlq)


def test_kafka_raw_path_leaves_other_clients_in_the_process_alone(
    replay: Replay, kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    library_recv = KafkaTCPTransport.__dict__["_sock_recv"]
    library_read = KafkaBytes.__dict__["read"]
    topic = topic_factory(partitions=2)
    sent = produce_file(replay.ticks, bootstrap=kafka_bootstrap, topic=topic)
    ours = _source(kafka_bootstrap, topic)
    plain = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None)
    try:
        assert ours.raw_records
        _poll_all(ours, sent)
        ours_consumer = ours._consumer
        assert ours_consumer is not None
        ours_conns = list(ours_consumer._manager._conns.values())
        # Ours: its own objects carry the fast path...
        assert "PartitionRecords" in vars(ours_consumer._fetcher)
        assert any("_sock_recv" in vars(c.transport) for c in ours_conns)
        assert any("_process_response" in vars(c.parser) for c in ours_conns)

        # ... while a plain consumer made after it reads with the library's own.
        tps = [TopicPartition(topic, p) for p in range(2)]
        plain.assign(tps)
        plain.seek_to_beginning(*tps)
        records: list[object] = []
        deadline = time.monotonic() + 60
        while len(records) < sent:
            assert time.monotonic() < deadline
            for batch in plain.poll(timeout_ms=500).values():
                records.extend(batch)
        assert all(type(r) is ConsumerRecord for r in records)
        assert "PartitionRecords" not in vars(plain._fetcher)
        plain_conns = list(plain._manager._conns.values())
        assert plain_conns
        for conn in plain_conns:
            assert "_sock_recv" not in vars(conn.transport)
            assert "_process_response" not in vars(conn.parser)
        assert KafkaTCPTransport.__dict__["_sock_recv"] is library_recv
        assert KafkaBytes.__dict__["read"] is library_read
        assert Fetcher.__dict__["PartitionRecords"] is not RawPartitionRecords
    finally:
        plain.close()
        ours.close()


def test_kafka_untested_kafka_python_falls_back_to_the_same_results(
    tmp_path: Path,
    replay: Replay,
    kafka_bootstrap: str,
    topic_factory: TopicFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = topic_factory(partitions=3)
    produce_file(replay.ticks, bootstrap=kafka_bootstrap, topic=topic)
    fast = _run_clean(replay, tmp_path / "fast.duckdb", kafka_bootstrap, topic)

    monkeypatch.setattr(raw, "installed_kafka_python", lambda: "3.9.0")
    monkeypatch.setattr(raw, "_warned_versions", set())
    caplog.set_level(logging.WARNING, logger="prop_stream.kafka.raw")
    assert not _source(kafka_bootstrap, topic).raw_records
    fallback = _run_clean(replay, tmp_path / "fallback.duckdb", kafka_bootstrap, topic)
    warned = [r for r in caplog.records if r.name == "prop_stream.kafka.raw"]
    assert len(warned) == 1
    assert "kafka-python 3.9.0" in warned[0].getMessage()
    for name, frame in fast.items():
        assert fallback[name].equals(frame), name
    assert_matches_backtest(fallback, replay.backtest)


def test_kafka_broker_outage_is_waited_out_with_a_line_per_retry(
    replay: Replay,
    private_kafka_broker: KafkaBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = private_kafka_broker
    bootstrap = broker.bootstrap
    sent = produce_file(replay.ticks, bootstrap=bootstrap, topic="ticks")
    source = _source(bootstrap, "ticks")
    caplog.set_level(logging.INFO, logger=SOURCE_LOG)
    try:
        _poll_all(source, sent)
        assert source.not_ready() == {}
        broker.stop()
        polls = 0
        began = time.monotonic()
        expected = {"kafka": f"no broker answers at {bootstrap}"}
        # Poll for at least 6 s and until the source names the outage (under
        # load kafka-python may take longer to give up on the broker).
        while time.monotonic() - began < 6 or source.not_ready() != expected:
            assert time.monotonic() - began < 60, source.not_ready()
            ticks, _ = source.poll(1000, 0.1)
            assert ticks.height == 0
            polls += 1
        elapsed = time.monotonic() - began
        lost = [r for r in caplog.records if "lost the Kafka broker" in r.message]
        # Retries back off (1 s, 2 s, 4 s, ...): a line per retry, not per poll.
        assert 1 <= len(lost) <= 2 + math.log2(elapsed)
        assert polls > 3 * len(lost)
        assert all(r.exc_info is None for r in caplog.records)

        # close() from another thread (the service's SIGTERM) ends a poll at once.
        done = threading.Event()

        def loop() -> None:
            while source.not_ready() != {"kafka": "the Kafka source is closed"}:
                source.poll(1000, 0.5)
            done.set()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        time.sleep(0.3)  # let it wait inside a poll
        source.close()
        assert done.wait(10.0)  # answers at all (it takes milliseconds)
    finally:
        source.close()
        close_failed_connects()
