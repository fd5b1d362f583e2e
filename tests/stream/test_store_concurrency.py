"""Purchases and jobs under concurrency, on both backends, with separate connections.

DuckDB has one writing process: purchases on a payer are serialized in it
(``payer_lock``) and its optimistic conflicts refuse a second writer. PostgreSQL
is shared by many processes: the purchase's transaction locks the payer's row and
job workers claim jobs with ``FOR UPDATE SKIP LOCKED``. The PostgreSQL cases
therefore also buy without the in-process lock and from separate processes, so
only the database can keep the count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from purchase_seed import ONE_STEP_ID, Shop, make_shop

from prop_stream.jobs import JobWorker
from prop_stream.store import PurchaseError, cursor, is_postgres, run_in_transaction
from prop_stream.store import purchases as p

ROOT = Path(__file__).resolve().parents[2]
#: A payer with this much affords exactly three One-Step purchases (299.00 each).
THREE_FEES = Decimal("900.00")


@pytest.fixture
def shop(store_db: Path | str) -> Shop:
    made = make_shop(store_db)
    made.sql(
        "UPDATE trading_accounts SET balance = ? WHERE account_id = ?",
        [THREE_FEES, made.alice_payer],
    )
    return made


def _buy(shop: Shop, key: str | None, *, in_process_lock: bool = True) -> str:
    conn = cursor(shop.conn)
    try:
        if in_process_lock:
            p.purchase_once(
                conn,
                customer_id=shop.alice_id,
                program_id=ONE_STEP_ID,
                payer_account_id=shop.alice_payer,
                now=datetime.now(UTC),
                idempotency_key=key,
                request_hash="h" if key else None,
            )
        else:
            run_in_transaction(
                conn,
                lambda c: p.buy_prop_challenge(
                    c,
                    customer_id=shop.alice_id,
                    program_id=ONE_STEP_ID,
                    payer_account_id=shop.alice_payer,
                    now=datetime.now(UTC),
                    idempotency_key=key,
                    request_hash="h" if key else None,
                ),
            )
    except PurchaseError as exc:
        return exc.code
    finally:
        conn.close()
    return "ok"


def _drain(shop: Shop, workers: int = 1) -> list[JobWorker]:
    """Run ``workers`` job workers (own connections) until no job is pending."""
    made = [shop.worker() for _ in range(workers)]
    for _ in range(50):
        with ThreadPoolExecutor(max_workers=workers) as pool:
            changed = sum(pool.map(JobWorker.run_once, made))
        if changed == 0:
            break
    assert shop.sql("SELECT count(*) FROM jobs WHERE status = 'pending'") == [(0,)]
    return made


def _ledger_equals_balances(shop: Shop) -> None:
    """Every account's balance is its opening balance plus its ledger rows."""
    # Payer accounts opened funded; challenge accounts at zero (funded by jobs).
    rows = shop.sql(
        "SELECT a.account_id, a.balance, coalesce(sum(l.amount), 0) "
        "FROM trading_accounts AS a LEFT JOIN ledger_entries AS l "
        "ON l.account_id = a.account_id GROUP BY a.account_id, a.balance"
    )
    for account_id, balance, moved in rows:
        if account_id == shop.alice_payer:
            assert Decimal(balance) == THREE_FEES + Decimal(moved)
        elif moved:  # a purchased challenge's account, opened at zero
            assert Decimal(balance) == Decimal(moved), account_id


def test_forty_concurrent_purchases_on_a_payer_that_affords_three(
    shop: Shop,
) -> None:
    with ThreadPoolExecutor(max_workers=40) as pool:
        results = list(pool.map(lambda i: _buy(shop, f"k{i}"), range(40)))
    assert results.count("ok") == 3, results
    assert set(results) == {"ok", "payer_not_eligible"}
    _drain(shop, workers=2)
    assert shop.sql("SELECT count(*) FROM purchases WHERE status = ?", [3]) == [(3,)]
    assert shop.balance(shop.alice_payer) == THREE_FEES - 3 * Decimal("299.00")
    _ledger_equals_balances(shop)


def test_postgres_row_lock_alone_keeps_the_count(shop: Shop) -> None:
    if not is_postgres(shop.conn):
        pytest.skip("DuckDB relies on the in-process payer lock by design")
    with ThreadPoolExecutor(max_workers=40) as pool:
        results = list(
            pool.map(lambda i: _buy(shop, f"k{i}", in_process_lock=False), range(40))
        )
    assert results.count("ok") == 3, results


_BUYER = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from prop_stream.store import PurchaseError, connect
from prop_stream.store import purchases as p
url, customer, payer, program, prefix, n = sys.argv[1:7]
def buy(i):
    conn = connect(url)
    try:
        pid, made = p.purchase_once(
            conn, customer_id=int(customer), program_id=int(program),
            payer_account_id=int(payer), now=datetime.now(UTC),
            idempotency_key=prefix if prefix.startswith("same") else f"{prefix}{i}",
            request_hash="h")
        return [pid, made is not None]
    except PurchaseError as exc:
        return exc.code
    finally:
        conn.close()
with ThreadPoolExecutor(max_workers=int(n)) as pool:
    print(json.dumps(list(pool.map(buy, range(int(n))))))
"""


def _processes(shop: Shop, prefixes: list[str], n: int) -> list[object]:
    procs = [
        subprocess.Popen(  # noqa: S603 - our own interpreter and script
            [
                sys.executable,
                "-c",
                _BUYER,
                str(shop.path),
                str(shop.alice_id),
                str(shop.alice_payer),
                str(ONE_STEP_ID),
                prefix,
                str(n),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for prefix in prefixes
    ]
    results: list[object] = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        results += json.loads(out)
    return results


def test_two_processes_buy_forty_times_on_a_payer_that_affords_three(
    shop: Shop,
) -> None:
    if not is_postgres(shop.conn):
        pytest.skip("one process owns a DuckDB file")
    results = _processes(shop, ["a", "b"], 20)
    assert len(results) == 40
    assert sum(1 for r in results if isinstance(r, list)) == 3, results
    assert {r for r in results if isinstance(r, str)} == {"payer_not_eligible"}
    _drain(shop, workers=2)
    assert shop.balance(shop.alice_payer) == THREE_FEES - 3 * Decimal("299.00")
    _ledger_equals_balances(shop)


def test_one_idempotency_key_at_once_makes_one_purchase(shop: Shop) -> None:
    if is_postgres(shop.conn):
        # Two processes, ten requests each, all with one key and one body.
        results = _processes(shop, ["same-key", "same-key"], 10)
    else:
        with ThreadPoolExecutor(max_workers=20) as pool:
            results = list(pool.map(lambda _: _buy(shop, "same-key"), range(20)))
    purchases = shop.sql("SELECT id FROM purchases")
    assert len(purchases) == 1
    if is_postgres(shop.conn):
        assert all(isinstance(r, list) for r in results), results
        ids = {r[0] for r in results if isinstance(r, list)}
        assert ids == {purchases[0][0]}
        assert sum(1 for r in results if isinstance(r, list) and r[1]) == 1
    else:
        assert set(results) == {"ok"}
    _drain(shop)
    _ledger_equals_balances(shop)


def test_jobs_with_four_workers_are_applied_once(store_db: Path | str) -> None:
    made = make_shop(store_db)
    for i in range(12):
        _buy(made, f"w{i}")
    jobs = made.sql("SELECT count(*) FROM jobs")[0][0]
    assert jobs == 24
    stop = threading.Event()
    workers = [made.worker(poll_interval_s=0.005) for _ in range(4)]
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
    for thread in threads:
        thread.start()
    try:
        for _ in range(2000):
            if made.sql(
                "SELECT count(*) FROM purchases WHERE status <> ?", [p.PURCHASE_ACTIVE]
            ) == [(0,)]:
                break
            threading.Event().wait(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not any(t.is_alive() for t in threads)
    assert all(w.error is None for w in workers)
    # No worker tripped over another's job (a second debit refused by the
    # ledger's key would count an error and an attempt).
    assert sum(w.stats.errors for w in workers) == 0
    assert made.sql("SELECT coalesce(sum(attempts), 0) FROM jobs") == [(0,)]
    # Each job applied by exactly one worker, its money moved once.
    assert sum(w.stats.applied for w in workers) == 24
    assert made.sql("SELECT count(*) FROM ledger_entries") == [(24,)]
    assert made.sql("SELECT count(*) FROM jobs WHERE status = 'done'") == [(24,)]
    assert made.balance(made.alice_payer) == Decimal("25000.00") - 12 * Decimal(
        "299.00"
    )
    made.conn.close()
