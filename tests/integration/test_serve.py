"""`prop-stream serve` and `demo` as an operator runs them: a real process, HTTP."""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
from service_process import PROP_STREAM, ServiceProcess

pytestmark = pytest.mark.integration


def _start(
    args: list[str], cwd: Path, printed: list[str] | None = None
) -> tuple[ServiceProcess, str]:
    proc = ServiceProcess(args, cwd)
    try:
        url = proc.wait_ready()
    except AssertionError:
        proc.kill()
        raise
    if printed is not None:
        printed.extend(proc.lines())
    return proc, url


def _init_demo(db: Path) -> None:
    init = [str(PROP_STREAM), "init", "--db", str(db), "--demo"]
    subprocess.run(init, check=True)  # noqa: S603 - our own command


def _session(email: str, db: Path) -> str:
    command = [str(PROP_STREAM), "session", email, "--db", str(db)]
    return subprocess.run(  # noqa: S603 - our own command
        command, check=True, capture_output=True, text=True
    ).stdout.strip()


def _stop(proc: ServiceProcess) -> int:
    return proc.stop(timeout_s=90)


def test_serve_demo_source_stores_moving_metrics(tmp_path: Path) -> None:
    db = tmp_path / "svc.duckdb"
    _init_demo(db)
    proc, url = _start(
        ["serve", "--db", str(db), "--source", "demo", "--port", "0"], tmp_path
    )
    try:
        assert httpx.get(f"{url}/healthz").status_code == 200
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200, ready.text
        assert httpx.get(f"{url}/prop/challenges").status_code == 401
        time.sleep(2)
    finally:
        assert _stop(proc) == 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT count(*) FROM metric_history").fetchone()
        snaps = con.execute("SELECT count(*) FROM prop_daily_snapshots").fetchone()
        # A fresh loop checkpoints when it starts and again at a graceful stop.
        checkpoints = con.execute("SELECT count(*) FROM engine_checkpoints").fetchone()
    finally:
        con.close()
    assert rows is not None
    assert rows[0] > 0
    assert snaps is not None
    assert snaps[0] > 0
    assert checkpoints is not None
    assert checkpoints[0] >= 2  # one at start, one at the graceful stop


def test_demo_prints_a_session_that_reads_challenges(tmp_path: Path) -> None:
    printed: list[str] = []
    proc, url = _start(["demo", "--port", "0"], tmp_path, printed)
    try:
        session_line = next(line for line in printed if "session for" in line)
        token = session_line.rsplit(": ", 1)[1].strip()
        resp = httpx.get(
            f"{url}/prop/challenges", headers={"Authorization": f"Bearer {token}"}
        )
        assert resp.status_code == 200
        assert resp.json()["total_count"] > 0
    finally:
        assert _stop(proc) == 0


def test_serve_kafka_source_needs_a_bootstrap(tmp_path: Path) -> None:
    out = subprocess.run(  # noqa: S603 - our own command
        [str(PROP_STREAM), "serve", "--db", str(tmp_path / "x.duckdb"), "--source",
         "kafka"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--kafka-bootstrap" in out.stderr


def test_serve_kafka_source_judges_produced_ticks(
    tmp_path: Path, kafka_bootstrap: str, topic_factory: Any
) -> None:
    # prop-stream produce replays a tick file to a topic; serve --source kafka
    # judges it and stores the results.
    db = tmp_path / "svc.duckdb"
    _init_demo(db)
    con = duckdb.connect(str(db), read_only=True)
    try:
        row = con.execute(
            "SELECT account_id, epoch_ms(started_at) FROM challenge_phases "
            "WHERE status = 'active' ORDER BY account_id LIMIT 1"
        ).fetchone()
    finally:
        con.close()
    assert row is not None
    account, start_ms = int(row[0]), int(row[1])
    ticks = tmp_path / "ticks.csv"
    lines = ["account_id,ts,equity,balance"] + [
        f"{account},{start_ms + 1000 * (i + 1)},{100_000 + i},100000" for i in range(50)
    ]
    ticks.write_text("\n".join(lines) + "\n")
    topic = topic_factory()
    produce = [str(PROP_STREAM), "produce", str(ticks), "--kafka-bootstrap",
               kafka_bootstrap, "--topic", topic]  # fmt: skip
    subprocess.run(produce, check=True)  # noqa: S603 - our own command
    proc, url = _start(
        ["serve", "--db", str(db), "--source", "kafka", "--kafka-bootstrap",
         kafka_bootstrap, "--topic", topic, "--port", "0"],
        tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if httpx.get(f"{url}/readyz").status_code == 200:
                break
            time.sleep(0.3)
        assert httpx.get(f"{url}/readyz").status_code == 200
        time.sleep(3)
    finally:
        assert _stop(proc) == 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        latest = con.execute(
            "SELECT equity FROM metrics_latest WHERE account_id = ?", [account]
        ).fetchone()
    finally:
        con.close()
    assert latest == (100_049.0,)  # the last tick of the file


def test_serve_purchase_becomes_a_judged_active_challenge(tmp_path: Path) -> None:
    # The whole flow through the real service: preview, BuyPropChallenge, the job
    # worker pays and deposits, and the demo source judges the new phase.
    db = tmp_path / "svc.duckdb"
    _init_demo(db)
    proc, url = _start(
        ["serve", "--db", str(db), "--source", "demo", "--port", "0"], tmp_path
    )
    try:
        token = _session("bob@example.com", db)
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        ) as client:
            _buy_and_watch(client)
    finally:
        assert _stop(proc) == 0


def _buy_and_watch(client: httpx.Client) -> None:
    program = client.get("/prop/programs").json()["items"][0]
    payers = client.get(
        "/prop/payer-accounts", params={"program_id": program["id"]}
    ).json()["items"]
    payer = next(p for p in payers if p["eligible"])
    body = {"program_id": program["id"], "payer_account_id": payer["account_id"]}
    preview = client.post("/prop/purchases/preview", json=body).json()
    assert preview["eligible"] is True
    bought = client.post(
        "/prop/purchases", json=body, headers={"Idempotency-Key": "k-1"}
    )
    assert bought.status_code == 201, bought.text
    purchase = bought.json()
    again = client.post(
        "/prop/purchases", json=body, headers={"Idempotency-Key": "k-1"}
    )
    assert again.json()["id"] == purchase["id"]

    deadline = time.monotonic() + 60
    metric = None
    while time.monotonic() < deadline:
        state = client.get(f"/prop/purchases/{purchase['id']}").json()
        challenge_id = state.get("challenge_id")
        if state["status_name"] == "active" and challenge_id is not None:
            detail = client.get(f"/prop/challenges/{challenge_id}").json()
            metric = detail["phases"][0]["latest_metric"]
            if metric is not None:
                break
        time.sleep(0.5)
    assert metric is not None, state
    left = client.get(
        "/prop/payer-accounts", params={"program_id": program["id"]}
    ).json()["items"]
    paid = next(p for p in left if p["account_id"] == payer["account_id"])
    price = Decimal(program["price"])
    assert Decimal(paid["balance"]) == Decimal(payer["balance"]) - price


def test_serve_forty_concurrent_purchases_never_overdraw(tmp_path: Path) -> None:
    # Bob's payer can afford three fees; forty purchases race for it over HTTP.
    db = tmp_path / "svc.duckdb"
    _init_demo(db)
    con = duckdb.connect(str(db))
    try:
        price_row = con.execute(
            "SELECT price FROM programs WHERE active ORDER BY id LIMIT 1"
        ).fetchone()
        payer_row = con.execute(
            "SELECT a.account_id FROM trading_accounts a JOIN customers c "
            "ON c.id = a.customer_id WHERE c.email = 'bob@example.com' "
            "AND a.account_group = 'REAL' ORDER BY a.account_id LIMIT 1"
        ).fetchone()
        assert price_row is not None
        assert payer_row is not None
        price, payer = Decimal(price_row[0]), int(payer_row[0])
        start = price * 3 + Decimal("0.50")
        con.execute(
            "UPDATE trading_accounts SET balance = ? WHERE account_id = ?",
            [start, payer],
        )
    finally:
        con.close()
    proc, url = _start(["serve", "--db", str(db), "--port", "0"], tmp_path)
    try:
        token = _session("bob@example.com", db)
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as client:
            program = client.get("/prop/programs").json()["items"][0]
            body = {"program_id": program["id"], "payer_account_id": payer}
            barrier = threading.Barrier(40)

            def buy(i: int) -> int:
                barrier.wait()
                r = client.post(
                    "/prop/purchases", json=body, headers={"Idempotency-Key": f"k{i}"}
                )
                return r.status_code

            with ThreadPoolExecutor(max_workers=40) as pool:
                codes = list(pool.map(buy, range(40)))
            assert codes.count(201) == 3, codes
            assert all(code < 500 for code in codes), codes
            # Let the worker carry out every job.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                items = client.get("/prop/purchases").json()["items"]
                if all(p["payment_status"] != "pending" for p in items):
                    break
                time.sleep(0.3)
    finally:
        assert _stop(proc) == 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        balance = con.execute(
            "SELECT balance FROM trading_accounts WHERE account_id = ?", [payer]
        ).fetchone()
        purchases = con.execute("SELECT count(*) FROM purchases").fetchone()
        jobless = con.execute(
            "SELECT count(*) FROM purchases p WHERE (SELECT count(*) FROM jobs j "
            "WHERE j.purchase_id = p.id) < 2"
        ).fetchone()
    finally:
        con.close()
    assert balance == (start - 3 * price,)  # balanced to the cent, never below 0
    assert purchases == (3,)
    assert jobless == (0,)
