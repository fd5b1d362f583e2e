"""The job worker: exactly once, never below zero, failures, refunds, races."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from purchase_seed import ONE_STEP_ID, TWO_STEP_ID, Shop, make_shop, shop

from prop_stream.store import NotFoundError, PurchaseError, cursor, run_in_transaction
from prop_stream.store import job_worker as w
from prop_stream.store import purchases as p

__all__ = ["shop"]

ROOT = Path(__file__).resolve().parents[2]


def buy(shop: Shop, *, program: int = TWO_STEP_ID, key: str | None = None) -> p.Bought:
    _, bought = p.purchase_once(
        cursor(shop.conn),
        customer_id=shop.alice_id,
        program_id=program,
        payer_account_id=shop.alice_payer,
        now=datetime.now(UTC),
        idempotency_key=key,
        request_hash="h" if key else None,
    )
    assert bought is not None
    return bought


def status(shop: Shop, purchase_id: int) -> tuple[int, str | None]:
    record = p.get_purchase(cursor(shop.conn), purchase_id=purchase_id)
    assert record is not None
    return record.status, record.failure_reason


def ledger_balanced(shop: Shop, account_id: int, opening: Decimal) -> None:
    (total,) = shop.sql(
        "SELECT coalesce(sum(amount), 0) FROM ledger_entries WHERE account_id = ?",
        [account_id],
    )[0]
    assert shop.balance(account_id) == opening + Decimal(str(total))


def test_purchase_writes_fee_and_deposit_jobs_in_one_transaction(shop: Shop) -> None:
    bought = buy(shop)
    jobs = shop.sql(
        "SELECT kind, account_id, amount, status FROM jobs WHERE purchase_id = ? "
        "ORDER BY id",
        [bought.purchase_id],
    )
    assert jobs == [
        ("fee_withdrawal", shop.alice_payer, Decimal("499.00"), "pending"),
        ("initial_deposit", bought.account_id, Decimal("100000.00"), "pending"),
    ]
    assert shop.balance(bought.account_id) == Decimal("0.00")
    assert status(shop, bought.purchase_id) == (p.PURCHASE_PENDING, None)


def test_worker_pays_deposits_and_activates(shop: Shop) -> None:
    bought = buy(shop)
    worker = shop.worker()
    worker.run_once()
    assert status(shop, bought.purchase_id) == (p.PURCHASE_ACTIVE, None)
    assert shop.balance(shop.alice_payer) == Decimal("24501.00")
    assert shop.balance(bought.account_id) == Decimal("100000.00")
    assert (worker.stats.applied, worker.stats.activated) == (2, 1)
    assert worker.run_once() == 0  # nothing twice
    ledger_balanced(shop, shop.alice_payer, Decimal("25000.00"))


def test_worker_states_pass_through_paid_and_account_created(shop: Shop) -> None:
    bought = buy(shop)
    fee, deposit = (
        int(r[0])
        for r in shop.sql(
            "SELECT id FROM jobs WHERE purchase_id = ? ORDER BY id",
            [bought.purchase_id],
        )
    )
    conn = cursor(shop.conn)
    now = datetime.now(UTC)
    # The deposit waits for the fee.
    assert run_in_transaction(
        conn, lambda c: w.apply_job(c, job_id=deposit, now=now)
    ).result == ("deferred")
    run_in_transaction(conn, lambda c: w.apply_job(c, job_id=fee, now=now))
    assert status(shop, bought.purchase_id) == (p.PURCHASE_PAID, None)
    run_in_transaction(conn, lambda c: w.apply_job(c, job_id=deposit, now=now))
    assert status(shop, bought.purchase_id) == (p.PURCHASE_ACCOUNT_CREATED, None)
    run_in_transaction(conn, lambda c: w.activate_purchases(c, now=now))
    assert status(shop, bought.purchase_id) == (p.PURCHASE_ACTIVE, None)


def test_outbox_summary_counts_purchases_and_waiting_jobs(shop: Shop) -> None:
    conn = cursor(shop.conn)
    bought_at = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
    assert w.outbox_summary(conn, now=bought_at) == {
        "purchases": {},
        "outbox_pending": 0,
        "outbox_oldest_age_s": 0.0,
    }
    p.purchase_once(
        conn,
        customer_id=shop.alice_id,
        program_id=TWO_STEP_ID,
        payer_account_id=shop.alice_payer,
        now=bought_at,
    )
    waiting = w.outbox_summary(conn, now=bought_at + timedelta(seconds=90))
    assert waiting["purchases"] == {"pending": 1}
    assert waiting["outbox_pending"] == 2  # the fee and the deposit
    assert waiting["outbox_oldest_age_s"] == pytest.approx(90.0)
    # A clock behind the oldest job never makes a negative age.
    behind = w.outbox_summary(conn, now=bought_at - timedelta(seconds=5))
    assert behind["outbox_oldest_age_s"] == 0.0
    shop.worker().run_once()
    assert w.outbox_summary(conn, now=datetime.now(UTC)) == {
        "purchases": {"active": 1},
        "outbox_pending": 0,
        "outbox_oldest_age_s": 0.0,
    }


def test_withdrawal_without_money_fails_purchase_and_cancels_challenge(
    shop: Shop,
) -> None:
    bought = buy(shop)
    shop.sql(
        "UPDATE trading_accounts SET balance = 100 WHERE account_id = ?",
        [shop.alice_payer],
    )
    shop.worker().run_once()
    assert status(shop, bought.purchase_id) == (p.PURCHASE_FAILED, "insufficient_funds")
    assert shop.balance(shop.alice_payer) == Decimal("100.00")  # never below zero
    assert shop.balance(bought.account_id) == Decimal("0.00")  # no deposit
    challenge = shop.sql(
        "SELECT status FROM challenges WHERE id = ?", [bought.challenge_id]
    )
    phases = shop.sql(
        "SELECT DISTINCT status FROM challenge_phases WHERE challenge_id = ?",
        [bought.challenge_id],
    )
    assert challenge == [(4,)]
    assert phases == [("cancelled",)]
    assert shop.engine.removed == [bought.account_id]
    fields = p.lifecycle_fields(p.PURCHASE_FAILED, "insufficient_funds")
    assert (fields.can_retry, fields.next_action) == (True, "top_up_and_retry")


def test_disabled_payer_fails_with_its_reason(shop: Shop) -> None:
    bought = buy(shop)
    shop.sql(
        "UPDATE trading_accounts SET enabled = false WHERE account_id = ?",
        [shop.alice_payer],
    )
    shop.worker().run_once()
    assert status(shop, bought.purchase_id) == (p.PURCHASE_FAILED, "payer_disabled")


def test_retry_after_top_up_starts_a_new_challenge(shop: Shop) -> None:
    bought = buy(shop)
    shop.sql(
        "UPDATE trading_accounts SET balance = 0 WHERE account_id = ?",
        [shop.alice_payer],
    )
    shop.worker().run_once()
    conn = cursor(shop.conn)
    with pytest.raises(PurchaseError) as refused:
        run_in_transaction(
            conn,
            lambda c: p.retry_purchase(
                c,
                customer_id=shop.alice_id,
                purchase_id=bought.purchase_id,
                now=datetime.now(UTC),
            ),
        )
    assert (refused.value.code, refused.value.details["reason"]) == (
        "payer_not_eligible",
        "insufficient_balance",
    )
    shop.sql(
        "UPDATE trading_accounts SET balance = 1000 WHERE account_id = ?",
        [shop.alice_payer],
    )
    again = run_in_transaction(
        conn,
        lambda c: p.retry_purchase(
            c,
            customer_id=shop.alice_id,
            purchase_id=bought.purchase_id,
            now=datetime.now(UTC),
        ),
    )
    assert again.challenge_id != bought.challenge_id
    shop.worker().run_once()
    assert status(shop, bought.purchase_id) == (p.PURCHASE_ACTIVE, None)
    assert shop.balance(shop.alice_payer) == Decimal("501.00")


def test_cancel_after_payment_refunds_once(shop: Shop) -> None:
    bought = buy(shop)
    conn = cursor(shop.conn)
    fee = int(
        shop.sql(
            "SELECT id FROM jobs WHERE purchase_id = ? AND kind = 'fee_withdrawal'",
            [bought.purchase_id],
        )[0][0]
    )
    now = datetime.now(UTC)
    run_in_transaction(conn, lambda c: w.apply_job(c, job_id=fee, now=now))
    cancelled = run_in_transaction(
        conn,
        lambda c: p.cancel_purchase(
            c, customer_id=shop.alice_id, purchase_id=bought.purchase_id, now=now
        ),
    )
    assert cancelled.refund_job_id is not None
    assert cancelled.removed_accounts == (bought.account_id,)
    record = p.get_purchase(conn, purchase_id=bought.purchase_id)
    assert record is not None
    fields = p.lifecycle_fields(
        record.status, record.failure_reason, record.refund_status
    )
    assert (fields.payment_status, fields.can_cancel) == ("refund_pending", False)
    worker = shop.worker()
    worker.run_once()
    worker.run_once()
    assert status(shop, bought.purchase_id) == (p.PURCHASE_REFUNDED, "cancelled")
    assert shop.balance(shop.alice_payer) == Decimal("25000.00")
    assert shop.sql(
        "SELECT kind, count(*) FROM ledger_entries WHERE purchase_id = ? "
        "GROUP BY kind ORDER BY kind",
        [bought.purchase_id],
    ) == [("fee_withdrawal", 1), ("refund", 1)]
    # Cancelling again is refused, and writes no second refund.
    with pytest.raises(PurchaseError, match="can't be cancelled"):
        run_in_transaction(
            conn,
            lambda c: p.cancel_purchase(
                c, customer_id=shop.alice_id, purchase_id=bought.purchase_id, now=now
            ),
        )


def test_other_customers_purchase_is_not_found(shop: Shop) -> None:
    bought = buy(shop)
    with pytest.raises(NotFoundError):
        run_in_transaction(
            cursor(shop.conn),
            lambda c: p.cancel_purchase(
                c,
                customer_id=shop.bob_id,
                purchase_id=bought.purchase_id,
                now=datetime.now(UTC),
            ),
        )


def test_ledger_row_present_means_applied_only_marks(shop: Shop) -> None:
    bought = buy(shop)
    fee = int(
        shop.sql(
            "SELECT id FROM jobs WHERE purchase_id = ? AND kind = 'fee_withdrawal'",
            [bought.purchase_id],
        )[0][0]
    )
    # A ledger row for the job exists (the money moved); the job is still pending.
    shop.sql(
        "INSERT INTO ledger_entries VALUES (?, ?, -499.00, 'fee_withdrawal', ?, now())",
        [fee, shop.alice_payer, bought.purchase_id],
    )
    worker = shop.worker()
    worker.run_once()
    assert worker.stats.already_applied == 1
    assert shop.balance(shop.alice_payer) == Decimal("25000.00")  # not taken again


_KILLER = """
import os, signal, sys
from prop_stream.jobs import JobWorker
from prop_stream.store import connect, cursor
conn = connect(sys.argv[1])
def die(job):
    print("applied", job.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
JobWorker(cursor(conn), fault_hook=die).run_once()
"""


def test_worker_killed_between_applying_and_marking_moves_money_once(
    store_db: Path | str,
) -> None:
    made = make_shop(store_db)
    try:
        bought = buy(made)
    finally:
        made.conn.close()
    result = subprocess.run(  # noqa: S603 - our own interpreter
        [sys.executable, "-c", _KILLER, str(made.path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert result.stdout.startswith("applied")
    again = make_shop_reopen(made)
    try:
        # The kill came before the commit: nothing moved, the job is pending.
        assert again.balance(again.alice_payer) == Decimal("25000.00")
        worker = again.worker()
        worker.run_once()
        worker.run_once()
        assert again.balance(again.alice_payer) == Decimal("24501.00")
        assert status(again, bought.purchase_id) == (p.PURCHASE_ACTIVE, None)
        assert again.sql("SELECT count(*) FROM ledger_entries") == [(2,)]
    finally:
        again.conn.close()


def make_shop_reopen(made: Shop) -> Shop:
    from prop_stream.store import connect

    conn = connect(made.path)
    return Shop(
        path=made.path,
        conn=conn,
        alice=made.alice,
        bob=made.bob,
        alice_id=made.alice_id,
        bob_id=made.bob_id,
        alice_payer=made.alice_payer,
        bob_payer=made.bob_payer,
        engine=made.engine,
    )


def test_forty_concurrent_purchases_never_overdraw(shop: Shop) -> None:
    shop.sql(
        "UPDATE trading_accounts SET balance = 2000 WHERE account_id = ?",
        [shop.alice_payer],
    )
    stop = threading.Event()
    worker = shop.worker(poll_interval_s=0.01)
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()

    def attempt(i: int) -> str:
        try:
            buy(shop, program=ONE_STEP_ID if i % 2 else TWO_STEP_ID, key=f"k{i}")
        except PurchaseError as exc:
            return exc.code
        return "ok"

    try:
        with ThreadPoolExecutor(max_workers=40) as pool:
            results = list(pool.map(attempt, range(40)))
    finally:
        deadline = 200
        while (
            shop.sql("SELECT count(*) FROM jobs WHERE status = 'pending'") != [(0,)]
            and deadline
        ):
            threading.Event().wait(0.05)
            deadline -= 1
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert set(results) <= {"ok", "payer_not_eligible"}
    assert results.count("ok") >= 4
    balance = shop.balance(shop.alice_payer)
    assert balance >= 0
    # Every purchase has its fee job and its deposit job.
    assert shop.sql(
        "SELECT count(*) FROM purchases AS p WHERE (SELECT count(*) FROM jobs AS j "
        "WHERE j.purchase_id = p.id) <> 2"
    ) == [(0,)]
    (paid,) = shop.sql(
        "SELECT coalesce(sum(price), 0) FROM purchases WHERE status = 3"
    )[0]
    assert balance == Decimal("2000.00") - Decimal(str(paid))
    ledger_balanced(shop, shop.alice_payer, Decimal("2000.00"))
