from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import api_seed
import pytest
from api_seed import HOURS, Seeded, TestClient

from prop_stream.store import connect

# The shared module-scoped fixtures (a seeded DuckDB file and a TestClient).
client = api_seed.client
seeded = api_seed.seeded

MONEY = re.compile(r"^-?\d+\.\d{2}$")
MONEY_FIELDS = (
    "equity",
    "balance",
    "profit",
    "daily_start_equity",
    "daily_start_balance",
    "daily_pnl",
    "daily_loss_limit",
    "daily_floor",
    "daily_room",
    "max_loss_limit",
    "overall_floor",
    "overall_room",
    "hwm",
    "best_day_profit",
    "profit_target_level",
)


def get(client: TestClient, seeded: Seeded, url: str, **params: Any) -> Any:
    response = client.get(url, params=params, headers=seeded.headers(seeded.alice))
    assert response.status_code == 200, response.text
    return response.json()


def test_challenge_has_every_phase_in_order(client: TestClient, seeded: Seeded) -> None:
    body = get(client, seeded, "/prop/challenges/1")
    assert body["id"] == 1
    assert (body["status"], body["status_name"]) == (1, "active")
    assert body["program_name"] == "Two-Step Evaluation 100K"
    assert body["current_phase_index"] == 0
    assert body["created_at"] == "2026-11-02T08:00:00Z"
    phases = body["phases"]
    assert [p["phase_index"] for p in phases] == [0, 1, 2]
    assert [p["name"] for p in phases] == ["Evaluation", "Verification", "Funded"]
    assert [p["status"] for p in phases] == ["active", "pending", "pending"]
    assert phases[0]["account_id"] == seeded.accounts[1]
    assert phases[1]["account_id"] is None
    assert phases[0]["started_at"] == "2026-11-02T08:00:00Z"
    assert phases[1]["started_at"] is None
    assert phases[2]["profit_split"] == "0.8"
    assert phases[0]["rules"]["min_trading_days"] == 4
    assert phases[1]["latest_metric"] is None


def test_latest_metric_is_the_last_committed_one(
    client: TestClient, seeded: Seeded
) -> None:
    metric = get(client, seeded, "/prop/challenges/1")["phases"][0]["latest_metric"]
    assert metric["ts"] == HOURS[-1].isoformat().replace("+00:00", "Z")
    assert metric["equity"] == "102500.50"
    assert metric["balance"] == "100000.00"
    assert metric["profit"] == "2500.50"
    assert metric["day"] == "2026-11-03"
    assert metric["trading_days"] == 2
    for name in MONEY_FIELDS:
        value = metric[name]
        assert value is None or (isinstance(value, str) and MONEY.match(value)), name


def test_progress_matches_the_engine(client: TestClient, seeded: Seeded) -> None:
    phase = get(client, seeded, "/prop/challenges/1")["phases"][0]
    progress = phase["progress"]
    # 100k, 8% target: 2,500.50 of 8,000 made; 2 of 4 trading days.
    assert progress["profit_progress"] == pytest.approx(2500.5 / 8000)
    assert progress["trading_days_progress"] == 0.5
    assert (progress["trading_days"], progress["min_trading_days"]) == (2, 4)
    assert progress["profit_target_level"] == "108000.00"
    # Day 2 started at 101,200: 5,000 daily limit, floor 96,200; static 10% floor.
    assert progress["daily_loss_limit"] == "5000.00"
    assert progress["daily_room"] == "6300.50"
    assert progress["max_loss_limit"] == "10000.00"
    assert progress["overall_room"] == "12500.50"
    assert (progress["days_elapsed"], progress["max_days"]) == (1, 30)


def test_progress_before_the_first_tick(client: TestClient, seeded: Seeded) -> None:
    response = client.get("/prop/challenges/5", headers=seeded.headers(seeded.bob))
    phase = response.json()["phases"][0]
    assert phase["status"] == "active"
    assert phase["latest_metric"] is None
    assert phase["progress"] == {
        "profit_progress": 0.0,
        "trading_days_progress": 0.0,
        "trading_days": 0,
        "min_trading_days": 4,
        "profit": "0.00",
        "profit_target_level": "108000.00",
        "daily_room": "5000.00",
        "daily_loss_limit": "5000.00",
        "overall_room": "10000.00",
        "max_loss_limit": "10000.00",
        "days_elapsed": None,
        "max_days": 30,
        "trading_day_basis": "activity",
        "open_lots": None,
        "max_open_lots": None,
    }


def test_failed_phase_fails_the_challenge(client: TestClient, seeded: Seeded) -> None:
    body = get(client, seeded, "/prop/challenges/2")
    assert (body["status"], body["status_name"]) == (3, "failed")
    phase = body["phases"][0]
    assert phase["status"] == "failed"
    assert phase["ended_at"] == HOURS[2].isoformat().replace("+00:00", "Z")
    assert phase["latest_metric"]["status"] == "failed"
    assert phase["latest_metric"]["equity"] == "47000.00"
    assert phase["progress"]["daily_room"] == "-1000.00"


# ---------------------------------------------------------------- ownership

ID_ROUTES = ["/prop/challenges/{id}", "/prop/challenges/{id}/metrics",
             "/prop/challenges/{id}/breaches",
             "/prop/challenges/{id}/flags"]  # fmt: skip


@pytest.mark.parametrize("route", ID_ROUTES)
def test_someone_elses_challenge_is_exactly_a_missing_one(
    client: TestClient, seeded: Seeded, route: str
) -> None:
    headers = seeded.headers(seeded.bob)
    mine = client.get(route.format(id=3), headers=headers)
    assert mine.status_code == 200
    # Alice's challenge 1 and challenge 9, which doesn't exist, asked by bob:
    # the same status, headers and body but for the id.
    theirs = client.get(route.format(id=1), headers=headers)
    missing = client.get(route.format(id=9), headers=headers)
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"]["code"] == "not_found"
    assert missing.text.replace("9", "1") == theirs.text
    assert dict(theirs.headers) == dict(missing.headers)


@pytest.mark.parametrize("route", ID_ROUTES)
def test_a_404_names_only_the_id_asked_for(
    client: TestClient, seeded: Seeded, route: str
) -> None:
    response = client.get(route.format(id=1), headers=seeded.headers(seeded.bob))
    assert response.json() == {
        "error": {
            "code": "not_found",
            "message": "challenge 1 not found",
            "details": {"id": 1},
        }
    }


@pytest.mark.parametrize("route", ID_ROUTES)
@pytest.mark.parametrize("ident", ["0", "-3", "x", str(2**63)])
def test_invalid_challenge_id_is_a_422(
    client: TestClient, seeded: Seeded, route: str, ident: str
) -> None:
    response = client.get(route.format(id=ident), headers=seeded.headers(seeded.alice))
    assert response.status_code == 422
    assert response.json()["error"]["details"]["field"] == "challenge_id"


# ------------------------------------------------------------------ metrics


def test_metrics_history_newest_first(client: TestClient, seeded: Seeded) -> None:
    body = get(client, seeded, "/prop/challenges/1/metrics")
    assert body["total_count"] == len(HOURS)
    stamps = [m["ts"] for m in body["items"]]
    assert stamps == sorted(stamps, reverse=True)
    assert body["items"][0]["equity"] == "102500.50"
    assert body["items"][-1]["equity"] == "100000.00"
    assert {m["phase_index"] for m in body["items"]} == {0}
    assert {m["account_id"] for m in body["items"]} == {seeded.accounts[1]}


def test_metrics_paginate(client: TestClient, seeded: Seeded) -> None:
    first = get(client, seeded, "/prop/challenges/1/metrics", limit=4)
    last = get(client, seeded, "/prop/challenges/1/metrics", limit=4, offset=8)
    assert (len(first["items"]), first["has_more"]) == (4, True)
    assert (len(last["items"]), last["has_more"]) == (2, False)
    assert last["items"][-1]["equity"] == "100000.00"


def test_metrics_time_range(client: TestClient, seeded: Seeded) -> None:
    # from is inclusive, to exclusive: the second day's first three hours.
    body = get(
        client,
        seeded,
        "/prop/challenges/1/metrics",
        **{"from": HOURS[5].isoformat(), "to": HOURS[8].isoformat()},
    )
    assert [m["equity"] for m in body["items"]] == [
        "102000.00",
        "101800.00",
        "101200.00",
    ]
    assert body["total_count"] == 3
    later = get(
        client,
        seeded,
        "/prop/challenges/1/metrics",
        **{"from": (HOURS[-1] + timedelta(seconds=1)).isoformat()},
    )
    assert later == {"items": [], "total_count": 0, "has_more": False}


def test_metrics_phase_filter(client: TestClient, seeded: Seeded) -> None:
    body = get(client, seeded, "/prop/challenges/1/metrics", phase_index=1)
    assert body["total_count"] == 0


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"offset": -1}, "offset"),
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-13-01T00:00:00Z"}, "to"),
        ({"phase_index": -1}, "phase_index"),
        ({"since": "2026-11-02"}, "since"),
    ],
)
def test_metrics_refuse_bad_query(
    client: TestClient, seeded: Seeded, params: dict[str, object], field: str
) -> None:
    response = client.get(
        "/prop/challenges/1/metrics",
        params=params,
        headers=seeded.headers(seeded.alice),
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"]["field"] == field


# ----------------------------------------------------------------- breaches


def _stored_breaches(seeded: Seeded) -> list[tuple[Any, ...]]:
    conn = connect(seeded.path)
    try:
        return conn.execute(
            "SELECT challenge_id, rule, severity, resolved FROM breaches "
            "ORDER BY ts DESC, breach_seq DESC"
        ).fetchall()
    finally:
        conn.close()


def test_breaches_newest_first(client: TestClient, seeded: Seeded) -> None:
    body = get(client, seeded, "/prop/challenges/1/breaches")
    items = body["items"]
    assert body["total_count"] == len(items) >= 1
    warning = items[-1]
    assert warning["rule"] == "daily_loss_warning"
    assert warning["severity"] == "warning"
    assert warning["action"] == "notify"
    assert warning["resolved"] is True
    assert warning["resolved_ts"] == HOURS[3].isoformat().replace("+00:00", "Z")
    assert warning["threshold"] == "4000.00"
    assert warning["actual"] == "4000.00"
    assert warning["account_id"] == seeded.accounts[1]
    assert [b["ts"] for b in items] == sorted((b["ts"] for b in items), reverse=True)


def test_breaches_of_a_failed_challenge(client: TestClient, seeded: Seeded) -> None:
    items = get(client, seeded, "/prop/challenges/2/breaches")["items"]
    critical = [b for b in items if b["severity"] == "critical"]
    assert [(b["rule"], b["action"]) for b in critical] == [
        ("daily_loss", "phase_failed")
    ]
    assert critical[0]["threshold"] == "2000.00"
    assert critical[0]["actual"] == "3000.00"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"severity": "critical"}, 1),
        ({"severity": "warning"}, None),
        ({"rule": "daily_loss"}, 1),
        ({"rule": "max_loss"}, 0),
        ({"phase_index": 0}, None),
        ({"phase_index": 1}, 0),
        ({"rule": "daily_loss", "severity": "warning"}, 0),
    ],
)
def test_breaches_filters(
    client: TestClient,
    seeded: Seeded,
    params: dict[str, object],
    expected: int | None,
) -> None:
    body = get(client, seeded, "/prop/challenges/2/breaches", **params)
    stored = [row for row in _stored_breaches(seeded) if row[0] == 2]
    if expected is None:
        expected = len(
            [
                row
                for row in stored
                if params.get("severity", row[2]) == row[2]
                and params.get("rule", row[1]) == row[1]
            ]
        )
    assert body["total_count"] == expected
    assert len(body["items"]) == expected
    for item in body["items"]:
        for key, value in params.items():
            assert item[key] == value


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"offset": -1}, "offset"),
        ({"rule": "drawdown"}, "rule"),
        ({"severity": "fatal"}, "severity"),
        ({"phase_index": "first"}, "phase_index"),
        ({"resolved": "true"}, "resolved"),
    ],
)
def test_breaches_refuse_bad_query(
    client: TestClient, seeded: Seeded, params: dict[str, object], field: str
) -> None:
    response = client.get(
        "/prop/challenges/1/breaches",
        params=params,
        headers=seeded.headers(seeded.alice),
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"]["field"] == field


def test_challenge_route_refuses_query_parameters(
    client: TestClient, seeded: Seeded
) -> None:
    response = client.get(
        "/prop/challenges/1",
        params={"fields": "id"},
        headers=seeded.headers(seeded.alice),
    )
    assert response.status_code == 422
    assert response.json()["error"]["message"] == "unknown query parameter 'fields'"


# -------------------------------------------------------------------- flags


def test_flags_of_a_challenge_are_its_accounts_hedges(
    client: TestClient, seeded: Seeded
) -> None:
    one = seeded.accounts[1]
    two = seeded.accounts[2]
    expected = {
        "symbol": "EURUSD",
        "account_id_1": min(one, two),
        "account_id_2": max(one, two),
        "gap_seconds": 30.0,
        "severity": "warning",
        "action": "review",
    }
    for challenge in (1, 2):
        body = get(client, seeded, f"/prop/challenges/{challenge}/flags")
        assert (body["total_count"], body["has_more"]) == (1, False)
        flag = body["items"][0]
        assert {k: flag[k] for k in expected} == expected
        deals = {
            (flag["account_id_1"], flag["deal_id_1"], flag["side_1"]),
            (flag["account_id_2"], flag["deal_id_2"], flag["side_2"]),
        }
        assert deals == {(one, 1, "buy"), (two, 7, "sell")}
    assert get(client, seeded, "/prop/challenges/1/flags", symbol="XAUUSD") == {
        "items": [],
        "total_count": 0,
        "has_more": False,
    }
    # Bob's challenge: his deal pairs with no one (alice is another customer).
    response = client.get(
        "/prop/challenges/3/flags", headers=seeded.headers(seeded.bob)
    )
    assert response.json()["total_count"] == 0


def test_flags_refuse_unknown_parameters(client: TestClient, seeded: Seeded) -> None:
    response = client.get(
        "/prop/challenges/1/flags",
        params={"rule": "max_loss"},
        headers=seeded.headers(seeded.alice),
    )
    assert response.status_code == 422
