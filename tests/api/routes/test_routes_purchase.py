"""The purchase routes through TestClient on a real demo database."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from purchase_seed import ONE_STEP_ID, TWO_STEP_ID, Shop, TestClient, client, shop

__all__ = ["client", "shop"]

LIFECYCLE = (
    "status_name",
    "next_action",
    "payment_status",
    "activation_status",
    "failure_reason",
    "can_retry",
    "can_cancel",
)


def body(shop: Shop, program: int = TWO_STEP_ID) -> dict[str, int]:
    return {"program_id": program, "payer_account_id": shop.alice_payer}


def test_full_flow_preview_buy_worker_active_challenge(
    shop: Shop, client: TestClient
) -> None:
    h = shop.headers(shop.alice)
    preview = client.post("/prop/purchases/preview", json=body(shop), headers=h)
    assert preview.status_code == 200
    assert preview.json()["eligible"] is True
    assert preview.json()["withdrawal"]["balance_after"] == "24501.00"
    bought = client.post("/prop/purchases", json=body(shop), headers=h)
    assert bought.status_code == 201
    purchase = bought.json()
    assert [purchase[k] for k in LIFECYCLE] == [
        "pending",
        "wait_for_payment",
        "pending",
        "pending",
        None,
        False,
        True,
    ]
    assert purchase["price"] == "499.00"
    challenge = client.get(f"/prop/challenges/{purchase['challenge_id']}", headers=h)
    assert challenge.status_code == 200
    first = challenge.json()["phases"][0]
    assert first["status"] == "active"
    assert [s.account_id for s in shop.engine.registered] == [first["account_id"]]
    shop.worker().run_once()
    after = client.get(f"/prop/purchases/{purchase['id']}", headers=h).json()
    assert [after[k] for k in LIFECYCLE] == [
        "active",
        "open_challenge",
        "paid",
        "active",
        None,
        False,
        False,
    ]
    assert shop.balance(shop.alice_payer) == Decimal("24501.00")
    listed = client.get("/prop/purchases", headers=h).json()
    assert listed["total_count"] == 1
    assert listed["items"][0]["id"] == purchase["id"]


def test_idempotency_key_replays_and_conflicts(shop: Shop, client: TestClient) -> None:
    h = shop.headers(shop.alice, "order-1")
    first = client.post("/prop/purchases", json=body(shop), headers=h)
    second = client.post("/prop/purchases", json=body(shop), headers=h)
    assert second.status_code == 201
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
    assert shop.sql("SELECT count(*) FROM purchases") == [(1,)]
    other = client.post("/prop/purchases", json=body(shop, ONE_STEP_ID), headers=h)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_mismatch"
    # The key is per customer: bob may use the same one.
    bob = client.post(
        "/prop/purchases",
        json={"program_id": TWO_STEP_ID, "payer_account_id": shop.bob_payer},
        headers=shop.headers(shop.bob, "order-1"),
    )
    assert bob.status_code == 201
    assert bob.json()["id"] != first.json()["id"]


def test_idempotency_key_concurrent_retries_make_one_purchase(
    shop: Shop, client: TestClient
) -> None:
    # Eight retries of one request race each other: one purchase, one pair of
    # jobs, and every answer is that purchase (or a 409 while it is in flight).
    h = shop.headers(shop.alice, "race-1")
    barrier = threading.Barrier(8)

    def buy(_: int) -> tuple[int, int | None]:
        barrier.wait()
        r = client.post("/prop/purchases", json=body(shop), headers=h)
        return r.status_code, r.json().get("id")

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(buy, range(8)))
    assert {code for code, _ in answers} <= {201, 409}
    ids = {pid for code, pid in answers if code == 201}
    assert len(ids) == 1
    assert shop.sql("SELECT count(*) FROM purchases") == [(1,)]
    assert shop.sql("SELECT count(*) FROM jobs") == [(2,)]


def test_payer_accounts_reasons(shop: Shop, client: TestClient) -> None:
    shop.sql("INSERT INTO account_groups VALUES ('REAL-EUR', 'REAL', 'EUR', 30)")
    shop.sql(
        "INSERT INTO trading_accounts (customer_id, account_group, currency, balance,"
        " enabled) VALUES (?, 'REAL-EUR', 'EUR', 5000, true), "
        "(?, 'REAL', 'USD', 5000, false), (?, 'REAL', 'USD', 10, true), "
        "(?, 'DEMO', 'USD', 5000, true)",
        [shop.alice_id] * 4,
    )
    r = client.get(
        f"/prop/payer-accounts?program_id={TWO_STEP_ID}",
        headers=shop.headers(shop.alice),
    )
    assert r.status_code == 200
    reasons = [(i["eligible"], i["reason"]) for i in r.json()["items"]]
    assert reasons == [
        (True, None),
        (False, "wrong_currency"),
        (False, "disabled"),
        (False, "insufficient_balance"),
        (False, "not_real"),
    ]
    # Challenge accounts are not payers.
    ids = {i["account_id"] for i in r.json()["items"]}
    assert not ids & {s[0] for s in shop.sql("SELECT account_id FROM challenge_phases")}
    assert (
        client.get(
            "/prop/payer-accounts?program_id=999", headers=shop.headers(shop.alice)
        ).status_code
        == 404
    )


def test_ineligible_payer_is_400_naming_the_field(
    shop: Shop, client: TestClient
) -> None:
    shop.sql(
        "UPDATE trading_accounts SET balance = 1 WHERE account_id = ?",
        [shop.alice_payer],
    )
    r = client.post(
        "/prop/purchases", json=body(shop), headers=shop.headers(shop.alice)
    )
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "payer_not_eligible"
    assert error["details"]["field"] == "payer_account_id"
    assert error["details"]["reason"] == "insufficient_balance"


def test_failure_retry_and_cancel_over_http(shop: Shop, client: TestClient) -> None:
    h = shop.headers(shop.alice)
    purchase = client.post("/prop/purchases", json=body(shop), headers=h).json()
    shop.sql(
        "UPDATE trading_accounts SET balance = 0 WHERE account_id = ?",
        [shop.alice_payer],
    )
    # serve wires the worker's on_change to the API's cache, as here.
    cache = client.app.state.runtime.cache  # type: ignore[attr-defined]  # starlette app state
    shop.worker(on_change=cache.refresh).run_once()
    failed = client.get(f"/prop/purchases/{purchase['id']}", headers=h).json()
    assert [failed[k] for k in LIFECYCLE] == [
        "failed",
        "top_up_and_retry",
        "failed",
        "cancelled",
        "insufficient_funds",
        True,
        True,
    ]
    challenge = client.get(f"/prop/challenges/{purchase['challenge_id']}", headers=h)
    assert challenge.json()["status_name"] == "cancelled"
    refused = client.post(f"/prop/purchases/{purchase['id']}/retry", headers=h)
    assert refused.status_code == 409
    shop.sql(
        "UPDATE trading_accounts SET balance = 600 WHERE account_id = ?",
        [shop.alice_payer],
    )
    retried = client.post(f"/prop/purchases/{purchase['id']}/retry", headers=h)
    assert retried.status_code == 200
    assert retried.json()["status_name"] == "pending"
    assert retried.json()["challenge_id"] != purchase["challenge_id"]
    cancelled = client.post(f"/prop/purchases/{purchase['id']}/cancel", headers=h)
    assert cancelled.status_code == 200
    assert [cancelled.json()[k] for k in LIFECYCLE] == [
        "failed",
        "none",
        "cancelled",
        "cancelled",
        "cancelled",
        False,
        False,
    ]
    again = client.post(f"/prop/purchases/{purchase['id']}/cancel", headers=h)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "not_cancellable"
    assert shop.balance(shop.alice_payer) == Decimal("600.00")


def test_active_purchase_cannot_be_cancelled_or_retried(
    shop: Shop, client: TestClient
) -> None:
    h = shop.headers(shop.alice)
    purchase = client.post("/prop/purchases", json=body(shop), headers=h).json()
    shop.worker().run_once()
    for action in ("cancel", "retry"):
        r = client.post(f"/prop/purchases/{purchase['id']}/{action}", headers=h)
        assert r.status_code == 409


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"program_id": 1, "payer_account_id": 5000001, "extra": 1}, "extra"),
        ({"program_id": "1", "payer_account_id": 5000001}, "program_id"),
        ({"program_id": 1}, "payer_account_id"),
        ({"program_id": 0, "payer_account_id": 5000001}, "program_id"),
        ({"program_id": 1.5, "payer_account_id": 5000001}, "program_id"),
    ],
)
def test_bad_body_is_422_naming_the_field(
    shop: Shop, client: TestClient, payload: dict[str, object], field: str
) -> None:
    r = client.post("/prop/purchases", json=payload, headers=shop.headers(shop.alice))
    assert r.status_code == 422
    assert r.json()["error"]["details"]["field"] == field


def test_bad_idempotency_key_is_422(shop: Shop, client: TestClient) -> None:
    r = client.post(
        "/prop/purchases",
        json=body(shop),
        headers=shop.headers(shop.alice, "has space"),
    )
    assert r.status_code == 422
    assert r.json()["error"]["details"]["field"] == "Idempotency-Key"


def test_ownership_is_404_everywhere(shop: Shop, client: TestClient) -> None:
    alice = shop.headers(shop.alice)
    bob = shop.headers(shop.bob)
    purchase = client.post("/prop/purchases", json=body(shop), headers=alice).json()
    pid = purchase["id"]
    for method, path in (
        ("GET", f"/prop/purchases/{pid}"),
        ("POST", f"/prop/purchases/{pid}/retry"),
        ("POST", f"/prop/purchases/{pid}/cancel"),
    ):
        r = client.request(method, path, headers=bob)
        assert r.status_code == 404, path
    # Bob can't pay from, or preview with, alice's account.
    stolen = {"program_id": TWO_STEP_ID, "payer_account_id": shop.alice_payer}
    assert client.post("/prop/purchases", json=stolen, headers=bob).status_code == 404
    assert (
        client.post("/prop/purchases/preview", json=stolen, headers=bob).status_code
        == 404
    )
    assert client.get("/prop/purchases", headers=bob).json()["total_count"] == 0
    payers = client.get(f"/prop/payer-accounts?program_id={TWO_STEP_ID}", headers=bob)
    assert shop.alice_payer not in {i["account_id"] for i in payers.json()["items"]}
    assert shop.balance(shop.alice_payer) == Decimal("25000.00")


ROUTES = (
    ("POST", "/prop/purchases/preview"),
    ("GET", "/prop/payer-accounts?program_id=1"),
    ("POST", "/prop/purchases"),
    ("GET", "/prop/purchases"),
    ("GET", "/prop/purchases/1"),
    ("POST", "/prop/purchases/1/retry"),
    ("POST", "/prop/purchases/1/cancel"),
)


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("auth", [None, "Bearer nope", "Basic abc"])
def test_every_route_needs_a_session(
    client: TestClient, method: str, path: str, auth: str | None
) -> None:
    headers = {} if auth is None else {"Authorization": auth}
    r = client.request(method, path, headers=headers, json=None)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"


def test_list_pagination_and_422(shop: Shop, client: TestClient) -> None:
    h = shop.headers(shop.alice)
    ids = [
        client.post("/prop/purchases", json=body(shop), headers=h).json()["id"]
        for _ in range(3)
    ]
    page = client.get("/prop/purchases?limit=2", headers=h).json()
    assert [i["id"] for i in page["items"]] == ids[::-1][:2]
    assert (page["total_count"], page["has_more"]) == (3, True)
    assert client.get("/prop/purchases?limit=0", headers=h).status_code == 422
    assert client.get("/prop/purchases?sort=x", headers=h).status_code == 422
