"""`prop-stream serve --source kafka` as an operator watches it: /readyz, /metrics.

One real service on a private broker goes through what production throws at it:
the topic does not exist yet (``/readyz`` names ``topic``), good and bad messages
arrive (``/metrics`` counts every good tick and every dead letter by reason, and
the lag falls to 0), the broker stops (``/readyz`` names ``kafka``) and comes back
(the rest is judged). At the end what the service stored equals the backtest of
the good ticks, row for row.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import polars as pl
import pytest
from kafka import KafkaProducer
from replay_support import assert_matches_backtest, stored_outputs
from service_process import PROP_STREAM, ServiceProcess, run_prop_stream

from integration.conftest import KafkaBroker
from integration.test_serve_kafka import _breaking_ticks
from prop_stream.store import connect

pytestmark = pytest.mark.integration


def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def _scrape(url: str) -> dict[str, float]:
    """``/metrics`` as ``{"name{labels}": value}`` (no comments)."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _lag(metrics: dict[str, float]) -> dict[str, float]:
    return {
        key: value
        for key, value in metrics.items()
        if key.startswith("prop_stream_consumer_lag{")
    }


def _checks(url: str) -> tuple[int, dict[str, str]]:
    answer = httpx.get(f"{url}/readyz", timeout=10)
    body = answer.json()
    return answer.status_code, body.get("checks") or body["error"]["details"]["checks"]


def _bad_messages(accounts: list[int]) -> list[tuple[bytes, bytes]]:
    """One message per dead-letter reason this test expects."""
    future = datetime.now(UTC) + timedelta(days=6)  # a platform clock bug
    account = accounts[0]
    return [
        (b"1", b"{not json"),
        (str(account).encode(), json.dumps({"account_id": account}).encode()),
        (
            str(account).encode(),
            json.dumps(
                {
                    "account_id": account,
                    "ts": future.isoformat().replace("+00:00", "Z"),
                    "equity": 1.0,
                    "balance": 1.0,
                }
            ).encode(),
        ),
    ]


def test_serve_kafka_readiness_metrics_and_a_broker_restart(
    tmp_path: Path, private_kafka_broker: KafkaBroker
) -> None:
    broker = private_kafka_broker
    db = tmp_path / "prop.duckdb"
    assert run_prop_stream(["init", "--db", str(db), "--demo"]).returncode == 0
    ticks_file = tmp_path / "ticks.parquet"
    total = _breaking_ticks(db, ticks_file)
    ticks = pl.read_parquet(ticks_file)
    first, second = ticks.head(total // 2), ticks.tail(total - total // 2)
    first.write_parquet(tmp_path / "first.parquet")
    second.write_parquet(tmp_path / "second.parquet")
    topic = f"ops-{uuid.uuid4().hex[:8]}"  # does not exist when serve starts

    proc = ServiceProcess(
        ["serve", "--db", str(db), "--source", "kafka", "--kafka-bootstrap",
         broker.bootstrap, "--topic", topic, "--port", "0"],
        tmp_path,
        env={"PROP_STREAM_LOG_FORMAT": "json"},
    )  # fmt: skip
    try:
        url = proc.wait_ready()
        _until(lambda: "topic" in _checks(url)[1], 60, "/readyz to name the topic")
        status, checks = _checks(url)
        assert status == 503
        assert topic in checks["topic"]

        def produce(path: Path) -> None:
            done = subprocess.run(  # noqa: S603 - our own command
                [str(PROP_STREAM), "produce", str(path), "--kafka-bootstrap",
                 broker.bootstrap, "--topic", topic, "--partitions", "3"],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr

        produce(tmp_path / "first.parquet")
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        try:
            bad = _bad_messages(sorted(set(ticks["account_id"].to_list())))
            for key, value in bad:
                producer.send(topic, key=key, value=value)
            producer.flush(30)
        finally:
            producer.close(5)

        def caught_up(good: int) -> Callable[[], bool]:
            def check() -> bool:
                metrics = _scrape(url)
                lag = _lag(metrics)
                return (
                    metrics.get("prop_stream_ticks_polled_total") == good
                    and bool(lag)
                    and all(v == 0 for v in lag.values())
                )

            return check

        _until(caught_up(first.height), 90, "the first half judged, lag 0")
        assert _checks(url)[0] == 200

        broker.stop()
        _until(
            lambda: "kafka" in _checks(url)[1], 90, "/readyz to name the lost broker"
        )
        assert _checks(url)[0] == 503
        broker.start()
        produce(tmp_path / "second.parquet")
        _until(caught_up(total), 120, "every good tick judged after the restart")
        _until(lambda: _checks(url)[0] == 200, 60, "/readyz to recover")

        metrics = _scrape(url)
        dead = {
            re.search(r'reason="([^"]+)"', key).group(1): value  # type: ignore[union-attr]  # the family's own label
            for key, value in metrics.items()
            if key.startswith("prop_stream_dead_letters_total{")
        }
        assert dead == {"not_json": 1, "missing_field": 1, "future_ts": 1}
        judged = metrics["prop_stream_ticks_judged_total"]
        skipped = sum(
            v for k, v in metrics.items() if k.startswith("prop_stream_ticks_skipped")
        )
        assert judged + skipped == total
        assert judged > 0
        critical = [
            v
            for k, v in metrics.items()
            if k.startswith("prop_stream_breaches_total{")
            and 'severity="critical"' in k
        ]
        assert sum(critical) > 0
    finally:
        code = proc.stop(90)
    assert code == 0
    text = "".join(proc.lines())
    assert "Traceback" not in text

    out = tmp_path / "backtest"
    rules = _rules_file(db, tmp_path / "rules.json")
    done = run_prop_stream(
        [
            "backtest",
            "--rules",
            str(rules),
            "--ticks",
            str(ticks_file),
            "--out",
            str(out),
        ]
    )
    assert done.returncode == 0, done.stderr
    conn = connect(db, read_only=True)
    try:
        assert_matches_backtest(stored_outputs(conn, history=False), out)
    finally:
        conn.close()


def _rules_file(db: Path, path: Path) -> Path:
    """The store's phases with an account as a backtest rules file."""
    conn = connect(db, read_only=True)
    try:
        rows = conn.execute(
            "SELECT account_id, challenge_id, phase_index, started_at, rules "
            "FROM challenge_phases WHERE account_id IS NOT NULL ORDER BY account_id"
        ).fetchall()
    finally:
        conn.close()
    accounts = [
        {
            "account_id": int(account),
            "challenge_id": str(challenge),
            "phase_index": int(index),
            "started_at": started.isoformat(),
            "rules": json.loads(rules),
        }
        for account, challenge, index, started, rules in rows
    ]
    path.write_text(json.dumps({"accounts": accounts}))
    return path
