"""The runtime cache follows the evaluator's commits without per-request queries."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import api_seed
import polars as pl
from api_seed import HOURS, T0, Seeded, TestClient, judge, seed_database

from api.cache import RuntimeCache
from api.core.config import ApiSettings
from api.db import Database
from api.main import create_app
from prop_stream.evaluator import LatestMetrics
from prop_stream.rules import TICK_SCHEMA
from prop_stream.store import (
    connect,
    cursor,
    open_account,
    start_challenge,
    transaction,
)

seeded = api_seed.seeded


def test_cache_follows_commits_and_transitions(tmp_path: Path) -> None:
    fresh = seed_database(tmp_path / "live.duckdb")
    conn = connect(fresh.path)
    metrics = LatestMetrics()
    metrics.load(conn)
    app = create_app(
        settings=ApiSettings(db=fresh.path, cache_sync_interval_s=0),
        conn=conn,
        metrics=metrics,
        evaluator_ready=lambda: True,
    )
    headers = fresh.headers(fresh.alice)
    engine = fresh.engine
    sink_conn = cursor(conn)
    account = fresh.accounts[1]
    with TestClient(app) as client:
        before = client.get("/prop/challenges/1", headers=headers).json()
        assert before["phases"][0]["latest_metric"]["equity"] == "102500.50"

        # A later tick, committed and then published as the loop does.
        ts = HOURS[-1] + timedelta(hours=1)
        ticks = pl.DataFrame(
            [{"account_id": account, "ts": ts, "equity": 103_000.0, "balance": 1e5}],
            schema=TICK_SCHEMA,
        )
        metrics.update(judge(sink_conn, engine, ticks))
        moved = client.get("/prop/challenges/1", headers=headers).json()
        assert moved["phases"][0]["latest_metric"]["equity"] == "103000.00"
        assert moved["status_name"] == "active"

        # A loss through the overall floor fails the phase and the challenge.
        ticks = pl.DataFrame(
            [
                {
                    "account_id": account,
                    "ts": ts + timedelta(minutes=5),
                    "equity": 89_000.0,
                    "balance": 1e5,
                }
            ],
            schema=TICK_SCHEMA,
        )
        metrics.update(judge(sink_conn, engine, ticks))
        failed = client.get("/prop/challenges/1", headers=headers).json()
        assert failed["status_name"] == "failed"
        assert failed["phases"][0]["status"] == "failed"
        assert failed["phases"][0]["latest_metric"]["status"] == "failed"
        listed = client.get(
            "/prop/challenges", params={"status": "failed"}, headers=headers
        ).json()
        assert [c["id"] for c in listed["items"]] == [2, 1]
        breaches = client.get(
            "/prop/challenges/1/breaches",
            params={"severity": "critical"},
            headers=headers,
        ).json()
        assert [b["rule"] for b in breaches["items"]] == ["daily_loss", "max_loss"]
    sink_conn.close()
    conn.close()


def test_cache_finds_challenges_created_by_another_writer(tmp_path: Path) -> None:
    fresh = seed_database(tmp_path / "new.duckdb")
    conn = connect(fresh.path)
    app = create_app(
        settings=ApiSettings(db=fresh.path, cache_sync_interval_s=0), conn=conn
    )
    headers = fresh.headers(fresh.alice)
    with TestClient(app) as client:
        writer = cursor(conn)
        with transaction(writer):
            account = open_account(
                writer, customer_id=1, account_group="DEMO", balance=Decimal(50_000)
            )
            new_id = start_challenge(
                writer,
                customer_id=1,
                program_id=2,
                account_id=account,
                started_at=T0 + timedelta(days=3),
            )
        # By id: a miss asks the store.
        found = client.get(f"/prop/challenges/{new_id}", headers=headers)
        assert found.status_code == 200
        assert found.json()["phases"][0]["account_id"] == account
        # Bob still gets a 404 for it.
        other = client.get(
            f"/prop/challenges/{new_id}", headers=fresh.headers(fresh.bob)
        )
        assert other.status_code == 404
        listed = client.get("/prop/challenges", headers=headers).json()
        assert listed["items"][0]["id"] == new_id

        # A change the cache wasn't told about is picked up by sync().
        with transaction(writer):
            writer.execute("UPDATE challenges SET status = 4 WHERE id = ?", [new_id])
        app.state.runtime.cache.sync()
        cancelled = client.get(f"/prop/challenges/{new_id}", headers=headers).json()
        assert cancelled["status_name"] == "cancelled"
        writer.close()
    conn.close()


def test_encoded_body_is_reused_until_a_metric_changes(seeded: Seeded) -> None:
    conn = connect(seeded.path)
    try:
        metrics = LatestMetrics()
        metrics.load(conn)
        app = create_app(
            settings=ApiSettings(db=seeded.path, cache_sync_interval_s=0),
            conn=conn,
            metrics=metrics,
        )
        with TestClient(app) as client:
            cache = app.state.runtime.cache
            first = cache.challenge_body(1, customer_id=1)
            assert first is not None
            assert cache.challenge_body(1, customer_id=1) is first
            assert cache.challenge_body(1, customer_id=2) is None
            row = dict(metrics.get(seeded.accounts[1]) or {})
            row["ts"] = row["ts"] + timedelta(seconds=1)
            metrics.update(pl.DataFrame([row]))
            assert cache.challenge_body(1, customer_id=1) is not first
            assert client.get("/healthz").status_code == 200
    finally:
        conn.close()


def test_api_without_an_evaluator_reads_metrics_from_postgres(pg_url: str) -> None:
    # The `api` role on PostgreSQL: the evaluators commit elsewhere; the API's
    # sync re-reads metrics_latest, so a later commit is served without a restart.
    fresh = seed_database(pg_url)
    conn = connect(pg_url)
    app = create_app(
        settings=ApiSettings(db=pg_url, cache_sync_interval_s=0),
        conn=conn,
        evaluator_ready=lambda: True,
    )
    headers = fresh.headers(fresh.alice)
    writer = cursor(conn)
    try:
        with TestClient(app) as client:
            before = client.get("/prop/challenges/1", headers=headers).json()
            assert before["phases"][0]["latest_metric"]["equity"] == "102500.50"
            ts = HOURS[-1] + timedelta(hours=1)
            ticks = pl.DataFrame(
                [
                    {
                        "account_id": fresh.accounts[1],
                        "ts": ts,
                        "equity": 103_000.0,
                        "balance": 1e5,
                    }
                ],
                schema=TICK_SCHEMA,
            )
            judge(writer, fresh.engine, ticks)  # committed, not published
            stale = client.get("/prop/challenges/1", headers=headers).json()
            assert stale["phases"][0]["latest_metric"]["equity"] == "102500.50"
            app.state.runtime.cache.sync()
            moved = client.get("/prop/challenges/1", headers=headers).json()
            assert moved["phases"][0]["latest_metric"]["equity"] == "103000.00"
    finally:
        writer.close()
        conn.close()


def test_postgres_cache_sync_reads_what_the_store_notified(pg_url: str) -> None:
    # On PostgreSQL the cache keeps no fingerprints: the store's triggers
    # notify each changed challenge, and sync() re-reads those only.
    fresh = seed_database(pg_url)
    conn = connect(pg_url)
    app = create_app(
        settings=ApiSettings(db=pg_url, cache_sync_interval_s=0),
        conn=conn,
        evaluator_ready=lambda: True,
    )
    headers = fresh.headers(fresh.alice)
    writer = cursor(conn)
    try:
        with TestClient(app) as client:
            cache = app.state.runtime.cache
            assert cache.sync() == 0  # nothing changed since the load
            with transaction(writer):
                writer.execute("UPDATE challenges SET status = 4 WHERE id = 1")
            # Not told: the cached body stays until the sync.
            stale = client.get("/prop/challenges/1", headers=headers).json()
            assert stale["status_name"] != "cancelled"
            assert cache.sync() == 1
            cancelled = client.get("/prop/challenges/1", headers=headers).json()
            assert cancelled["status_name"] == "cancelled"
            assert cache.sync() == 0
    finally:
        writer.close()
        conn.close()


def test_refreshed_lists_equal_a_fresh_load(store_db: Path | str) -> None:
    # refresh() re-lists only the customers concerned; after challenges are
    # added for two customers, re-read unchanged and asked for in vain, every
    # customer's list must be what a cache loading everything anew lists.
    seed_database(store_db)
    conn = connect(store_db)
    db = Database(conn)
    cache = RuntimeCache(db, LatestMetrics())
    cache.load()
    writer = cursor(conn)
    try:
        added = []
        for n, customer in enumerate((1, 2, 1, 1, 2)):
            with transaction(writer):
                account = open_account(
                    writer,
                    customer_id=customer,
                    account_group="DEMO",
                    balance=Decimal(10_000),
                )
                added.append(
                    start_challenge(
                        writer,
                        customer_id=customer,
                        program_id=2,
                        account_id=account,
                        started_at=T0 + timedelta(days=3, hours=n),
                    )
                )
            cache.refresh([added[-1]])
        cache.refresh([added[0], 1, added[3]])  # again, unchanged
        gone = 10**9  # an id that never existed
        cache.refresh([gone])

        again = RuntimeCache(db, LatestMetrics())
        again.load()
        for customer in (1, 2, 3):  # alice, bob, nobody
            mine = cache.list_bodies(customer_id=customer, limit=1_000)
            theirs = again.list_bodies(customer_id=customer, limit=1_000)
            assert mine == theirs, customer
        assert cache.list_bodies(customer_id=1, limit=1)[1] == 2 + 3
        cache.close()
        again.close()
    finally:
        writer.close()
        db.close()
        conn.close()
