"""Ticks and deals through Kafka into a real `serve`, killed mid-stream: the backtest.

The demo simulator writes a stream of ticks and deals for the demo challenges
(phase rules with every deal rule, half of them ``fail``, half ``flag``),
``prop-stream produce --deals`` sends it to a topic of three partitions with a
malformed deal per DLQ reason among them, ``prop-stream serve --source kafka``
judges it in small batches and is SIGKILLed mid-stream, a second ``serve``
restarts from the checkpoint and finishes. What the store holds then (breaches,
daily snapshots, phase statuses, hedge flags) equals ``prop-stream backtest
--deals`` of the same files, row for row, and every malformed deal is in the DLQ
with its reason.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import polars as pl
import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from replay_support import assert_matches_backtest, stored_outputs
from service_process import PROP_STREAM, ServiceProcess, run_prop_stream

from integration.conftest import KafkaBroker
from prop_stream.evaluator import DemoConfig, DemoSource
from prop_stream.rules import PhaseSpec
from prop_stream.store import connect, init_database, load_position, query_frame

pytestmark = pytest.mark.integration

START = datetime(2026, 1, 9, tzinfo=UTC)  # a Friday: positions cross the weekend
DEMO = DemoConfig(
    seed=11,
    rate=5 / 60,  # one tick a demo minute per account
    batch_ms=20 * 60_000,
    realtime=False,
    epoch=START,
    cycle_s=1_800,
    hedge_every_s=3_600,
)
BATCHES = 150  # 50 demo hours: over the FRI 22:00 weekend close
DEAL_RULES = (
    {
        "max_open_lots": 3.0,
        "min_hold_seconds": 60,
        "weekend_close": "FRI 22:00",
        "deal_violation_action": "flag",
        "trading_day_basis": "deals",
    },
    {
        "max_open_lots": 4.0,
        "min_hold_seconds": 30,
        "weekend_close": "FRI 23:00",
        "deal_violation_action": "fail",
    },
)
FLAG_COLUMNS = (
    "symbol",
    "account_id_1",
    "deal_id_1",
    "ts_1",
    "side_1",
    "account_id_2",
    "deal_id_2",
    "ts_2",
    "side_2",
    "gap_seconds",
)
BAD_DEAL = {
    "type": "deal",
    "ts": "2026-01-09T10:00:00Z",
    "deal_id": 999_999,
    "position_id": 999_999,
    "symbol": "EURUSD",
    "side": "buy",
    "volume": 1.0,
    "price": 1.1,
    "entry": "in",
}
#: One malformed deal per reason, by the reason.
BAD_DEALS: dict[str, dict[str, object]] = {
    "bad_side": {"side": "long"},
    "bad_entry": {"entry": "both"},
    "bad_volume": {"volume": 0.004},
    "bad_price": {"price": 0},
    "bad_symbol": {"symbol": ""},
    "missing_field": {"position_id": None},
    "unknown_type": {"type": "order"},
}


def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _inputs(db: Path, root: Path) -> tuple[Path, Path, Path, list[int]]:
    """Deal rules on the demo phases; their ticks, deals and backtest rules file."""
    conn = connect(db)
    try:
        phases = query_frame(
            conn,
            "SELECT p.account_id, p.challenge_id, p.phase_index, p.started_at, "
            "p.rules, a.customer_id FROM challenge_phases p "
            "JOIN trading_accounts a USING (account_id) "
            "WHERE p.status = 'active' ORDER BY p.account_id",
        )
        for i, row in enumerate(phases.iter_rows(named=True)):
            rules = {**json.loads(row["rules"]), **DEAL_RULES[i % 2]}
            conn.execute(
                "UPDATE challenge_phases SET rules = ? "
                "WHERE challenge_id = ? AND phase_index = ?",
                [json.dumps(rules), row["challenge_id"], row["phase_index"]],
            )
    finally:
        conn.close()
    source = DemoSource(DEMO)
    accounts = []
    for i, row in enumerate(phases.iter_rows(named=True)):
        rules = {**json.loads(row["rules"]), **DEAL_RULES[i % 2]}
        source.track(
            PhaseSpec(
                account_id=row["account_id"],
                challenge_id=str(row["challenge_id"]),
                phase_index=row["phase_index"],
                started_at=row["started_at"],
                rules=rules,
            )
        )
        accounts.append(
            {
                "account_id": row["account_id"],
                "challenge_id": str(row["challenge_id"]),
                "phase_index": row["phase_index"],
                "started_at": row["started_at"].isoformat(),
                "customer_id": str(row["customer_id"]),
                "rules": rules,
            }
        )
    ticks = root / "ticks.parquet"
    deals = root / "deals.parquet"
    source.dump(ticks, range(BATCHES), deals=deals)
    rules_file = root / "rules.json"
    rules_file.write_text(
        json.dumps({"hedge_window_seconds": 60, "accounts": accounts})
    )
    return rules_file, ticks, deals, [int(a["account_id"]) for a in accounts]


def _dlq_reasons(bootstrap: str, topic: str) -> dict[str, int]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
        consumer_timeout_ms=3_000,
    )
    try:
        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek_to_beginning()
        reasons: dict[str, int] = {}
        for record in consumer:
            headers = dict(record.headers)
            reason = headers["error"].decode()
            reasons[reason] = reasons.get(reason, 0) + 1
        return reasons
    finally:
        consumer.close()


@pytest.mark.parametrize("group", [None, "deals-group"], ids=["embedded", "group"])
def test_serve_kafka_ticks_and_deals_killed_mid_stream_equal_the_backtest(
    tmp_path: Path, private_kafka_broker: KafkaBroker, group: str | None
) -> None:
    broker = private_kafka_broker
    db = tmp_path / "prop.duckdb"
    init_database(db, demo=True, now=START)
    rules_file, ticks_file, deals_file, accounts = _inputs(db, tmp_path)
    deals = pl.read_parquet(deals_file)
    assert deals.height > 100
    topic = f"deals-{uuid.uuid4().hex[:8]}"

    done = subprocess.run(  # noqa: S603 - our own command
        [str(PROP_STREAM), "produce", str(ticks_file), "--deals", str(deals_file),
         "--kafka-bootstrap", broker.bootstrap, "--topic", topic,
         "--partitions", "3"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    try:
        for change in BAD_DEALS.values():
            doc = {**BAD_DEAL, "account_id": accounts[0], **change}
            value = json.dumps({k: v for k, v in doc.items() if v is not None})
            producer.send(topic, key=str(accounts[0]).encode(), value=value.encode())
        producer.flush(30)
    finally:
        producer.close(5)

    serve = ["serve", "--db", str(db), "--source", "kafka", "--kafka-bootstrap",
             broker.bootstrap, "--topic", topic, "--port", "0"]  # fmt: skip
    if group is not None:  # a consumer-group member: state and fencing per partition
        serve += ["--group", group]
    env = {
        "PROP_STREAM_MAX_BATCH_RECORDS": "100",  # many batches: the kill lands mid-way
        "PROP_STREAM_CHECKPOINT_EVERY": "4",
        "PROP_STREAM_RISK_MIRROR_INTERVAL_S": "0",
        "PROP_STREAM_HEDGE_WINDOW_SECONDS": "60",
    }
    first = ServiceProcess(serve, tmp_path, env=env)
    try:
        url = first.wait_ready()
        _until(
            lambda: _scrape(url).get("prop_stream_batches_total", 0) >= 10,
            120,
            "ten batches committed",
        )
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(30) == -signal.SIGKILL
    finally:
        first.kill()
    conn = connect(db, read_only=True)
    try:
        killed_at = load_position(conn, source="kafka")
    finally:
        conn.close()

    second = ServiceProcess(serve, tmp_path, env=env)
    try:
        url = second.wait_ready()

        def caught_up() -> bool:
            lag = {
                k: v
                for k, v in _scrape(url).items()
                if k.startswith("prop_stream_consumer_lag{")
            }
            return len(lag) == 3 and all(v == 0 for v in lag.values())

        _until(caught_up, 240, "every tick and deal judged after the restart")
        metrics = _scrape(url)
    finally:
        code = second.stop(90)
    assert code == 0
    assert "Traceback" not in "".join(first.lines() + second.lines())
    assert metrics["prop_stream_deals_polled_total"] > 0
    assert metrics["prop_stream_deals_judged_total"] > 0

    conn = connect(db, read_only=True)
    try:
        end = load_position(conn, source="kafka")
        stored = stored_outputs(conn, history=False)
        flags = query_frame(
            conn,
            f"SELECT {', '.join(FLAG_COLUMNS)} FROM flags "  # noqa: S608 - constants
            "ORDER BY account_id_1, deal_id_1, account_id_2, deal_id_2",
        )
    finally:
        conn.close()
    # The kill landed mid-stream: the first service had not reached the end.
    assert sum(killed_at.values()) < sum(end.values())

    out = tmp_path / "backtest"
    done = run_prop_stream(
        ["backtest", "--rules", str(rules_file), "--ticks", str(ticks_file),
         "--deals", str(deals_file), "--out", str(out)],
        timeout_s=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_matches_backtest(stored, out)
    breaches = pl.read_parquet(out / "breaches.parquet")
    rules = set(breaches["rule"].to_list())
    assert {"max_position_size", "short_hold"} <= rules, rules
    accounts_out = pl.read_parquet(out / "accounts.parquet")
    status = dict(zip(accounts_out["account_id"], accounts_out["status"], strict=True))
    for row in (
        stored["phases"]
        .filter(pl.col("account_id").is_in(accounts))
        .iter_rows(named=True)
    ):
        assert status[row["account_id"]] == row["status"], row
    expected_flags = (
        pl.read_parquet(out / "flags.parquet")
        .select(FLAG_COLUMNS)
        .sort("account_id_1", "deal_id_1", "account_id_2", "deal_id_2")
    )
    assert expected_flags.height > 0
    assert flags.equals(expected_flags.cast(flags.schema))

    reasons = _dlq_reasons(broker.bootstrap, f"{topic}.dlq")
    # At least once: a replay after the kill may write a dead letter again.
    assert set(reasons) == set(BAD_DEALS), reasons
