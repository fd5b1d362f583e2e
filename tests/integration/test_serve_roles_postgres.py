"""Purchases over HTTP on two API processes and two job processes, one PostgreSQL.

The store-level proof is ``tests/stream/test_store_concurrency.py``; this drives
the real processes: two ``prop-stream serve --role api`` and two ``--role jobs``
on one database. Only PostgreSQL can keep the count here (each process has its
own connections and no lock is shared between processes): the purchase's
transaction locks the payer's row, the idempotency key is unique per customer,
and the job workers claim jobs with ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from purchase_seed import ONE_STEP_ID, Shop, make_shop
from service_process import ServiceProcess

pytestmark = pytest.mark.integration

#: A payer with this much affords exactly three One-Step purchases (299.00 each).
THREE_FEES = Decimal("900.00")
FEE = Decimal("299.00")
PURCHASE_ACTIVE = 3


def _rows(url: str, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def shop(pg_url: str) -> Iterator[Shop]:
    made = make_shop(pg_url)
    try:
        made.sql(
            "UPDATE trading_accounts SET balance = ? WHERE account_id = ?",
            [THREE_FEES, made.alice_payer],
        )
        yield made
    finally:
        made.conn.close()


@pytest.fixture
def services(pg_url: str, shop: Shop, tmp_path: Path) -> Iterator[dict[str, list[str]]]:
    """Two API and two jobs processes on ``pg_url``; their base URLs by role."""
    procs: list[tuple[str, ServiceProcess]] = []
    try:
        for role in ("api", "api", "jobs", "jobs"):
            where = tmp_path / f"{role}-{len(procs)}"
            where.mkdir()
            procs.append(
                (
                    role,
                    ServiceProcess(
                        ["serve", "--db", pg_url, "--role", role, "--port", "0"],
                        where,
                    ),
                )
            )
        urls: dict[str, list[str]] = {"api": [], "jobs": []}
        for role, proc in procs:
            urls[role].append(proc.wait_ready())
        yield urls
        for _, proc in procs:
            assert proc.stop(60) == 0
            assert "Traceback" not in "".join(proc.lines())
    finally:
        for _, proc in procs:
            proc.kill()


def _buy(api: str, shop: Shop, key: str) -> httpx.Response:
    return httpx.post(
        f"{api}/prop/purchases",
        json={"program_id": ONE_STEP_ID, "payer_account_id": shop.alice_payer},
        headers=shop.headers(shop.alice, key),
        timeout=60,
    )


def test_two_api_and_two_jobs_processes_keep_purchases_and_ledger(
    pg_url: str, shop: Shop, services: dict[str, list[str]]
) -> None:
    apis = services["api"]
    assert len(apis) == 2
    for api in apis:
        assert httpx.get(f"{api}/readyz", timeout=10).status_code == 200

    # 40 purchases at once, alternating between the two API processes, each with
    # its own key: the payer affords three.
    with ThreadPoolExecutor(max_workers=40) as pool:
        answers = list(pool.map(lambda i: _buy(apis[i % 2], shop, f"k{i}"), range(40)))
    codes = Counter(a.status_code for a in answers)
    assert codes[201] == 3, [(a.status_code, a.text) for a in answers]
    assert set(codes) == {201, 400}, codes
    refused = {a.json()["error"]["code"] for a in answers if a.status_code == 400}
    assert refused == {"payer_not_eligible"}, refused

    # One key sent to both API processes at the same moment: one purchase. The
    # payer can't afford a fourth, so top it up for one more first.
    shop.sql(
        "UPDATE trading_accounts SET balance = balance + ? WHERE account_id = ?",
        [FEE, shop.alice_payer],
    )
    start = threading.Barrier(2)

    def same_key(api: str) -> httpx.Response:
        start.wait(30)
        return _buy(api, shop, "same-key")

    with ThreadPoolExecutor(max_workers=2) as pool:
        twins = list(pool.map(same_key, apis))
    assert sorted(t.status_code for t in twins) == [201, 201], [t.text for t in twins]
    assert twins[0].json()["id"] == twins[1].json()["id"]
    assert sum(t.headers.get("Idempotent-Replayed") == "true" for t in twins) == 1
    keyed = _rows(
        pg_url,
        "SELECT count(*) FROM purchases WHERE idempotency_key = 'same-key'",
    )
    assert keyed == [(1,)]

    # The jobs processes apply the outbox: four purchases become active.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pending = _rows(pg_url, "SELECT count(*) FROM jobs WHERE status = 'pending'")[
            0
        ][0]
        active = _rows(
            pg_url,
            "SELECT count(*) FROM purchases WHERE status = %s",
            [PURCHASE_ACTIVE],
        )[0][0]
        if pending == 0 and active == 4:
            break
        time.sleep(0.2)
    assert _rows(pg_url, "SELECT count(*) FROM purchases") == [(4,)]
    assert active == 4
    assert pending == 0
    assert _rows(pg_url, "SELECT count(*) FROM jobs WHERE status = 'failed'") == [(0,)]
    assert shop.balance(shop.alice_payer) == THREE_FEES + FEE - 4 * FEE
    _ledger_equals_balances(pg_url, shop)


def _ledger_equals_balances(url: str, shop: Shop) -> None:
    """Every account's balance is its opening balance plus its ledger rows."""
    rows = _rows(
        url,
        "SELECT a.account_id, a.balance, coalesce(sum(l.amount), 0) "
        "FROM trading_accounts AS a LEFT JOIN ledger_entries AS l "
        "ON l.account_id = a.account_id GROUP BY a.account_id, a.balance",
    )
    moved_any = False
    for account_id, balance, moved in rows:
        if account_id == shop.alice_payer:
            # Opened at three fees, topped up by one outside the ledger.
            assert Decimal(balance) == THREE_FEES + FEE + Decimal(moved)
            assert Decimal(moved) == -4 * FEE
        elif moved:  # a purchased challenge's account, opened at zero
            moved_any = True
            assert Decimal(balance) == Decimal(moved), account_id
    assert moved_any
