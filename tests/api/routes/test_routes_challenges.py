from __future__ import annotations

import api_seed
import pytest
from api_seed import Seeded, TestClient

# The shared module-scoped fixtures (a seeded DuckDB file and a TestClient).
client = api_seed.client
seeded = api_seed.seeded

#: Every route that needs a session.
PRIVATE_ROUTES = [
    "/prop/challenges",
    "/prop/challenges/1",
    "/prop/challenges/1/metrics",
    "/prop/challenges/1/breaches",
]


def test_challenges_list_the_customers_own_newest_first(
    client: TestClient, seeded: Seeded
) -> None:
    alice = client.get("/prop/challenges", headers=seeded.headers(seeded.alice))
    bob = client.get("/prop/challenges", headers=seeded.headers(seeded.bob))
    assert alice.status_code == bob.status_code == 200
    assert [c["id"] for c in alice.json()["items"]] == [2, 1]
    assert [c["id"] for c in bob.json()["items"]] == [5, 4, 3]
    assert alice.json()["total_count"] == 2
    assert alice.json()["has_more"] is False
    first = alice.json()["items"][1]
    assert first["status_name"] == "active"
    assert len(first["phases"]) == 3


@pytest.mark.parametrize(
    ("status", "ids"),
    [("failed", [2]), ("active", [1]), ("passed", []), ("cancelled", [])],
)
def test_challenges_filter_by_status_name(
    client: TestClient, seeded: Seeded, status: str, ids: list[int]
) -> None:
    body = client.get(
        "/prop/challenges",
        params={"status": status},
        headers=seeded.headers(seeded.alice),
    ).json()
    assert [c["id"] for c in body["items"]] == ids
    assert body["total_count"] == len(ids)
    assert all(c["status_name"] == status for c in body["items"])


def test_challenges_paginate(client: TestClient, seeded: Seeded) -> None:
    headers = seeded.headers(seeded.bob)
    page = client.get("/prop/challenges", params={"limit": 2}, headers=headers).json()
    rest = client.get(
        "/prop/challenges", params={"limit": 2, "offset": 2}, headers=headers
    ).json()
    past = client.get("/prop/challenges", params={"offset": 10}, headers=headers).json()
    assert ([c["id"] for c in page["items"]], page["has_more"]) == ([5, 4], True)
    assert ([c["id"] for c in rest["items"]], rest["has_more"]) == ([3], False)
    assert past == {"items": [], "total_count": 3, "has_more": False}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"offset": -1}, "offset"),
        ({"status": "won"}, "status"),
        ({"status": "1"}, "status"),
        ({"sort": "id"}, "sort"),
    ],
)
def test_challenges_refuse_bad_query(
    client: TestClient, seeded: Seeded, params: dict[str, object], field: str
) -> None:
    response = client.get(
        "/prop/challenges", params=params, headers=seeded.headers(seeded.alice)
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert error["details"]["field"] == field
    assert field in error["message"]


def test_limit_500_is_accepted(client: TestClient, seeded: Seeded) -> None:
    response = client.get(
        "/prop/challenges", params={"limit": 500}, headers=seeded.headers(seeded.bob)
    )
    assert response.status_code == 200


@pytest.mark.parametrize("route", PRIVATE_ROUTES)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic YWxpY2U6c2VjcmV0",
        "Bearer not-a-session",
        "Bearer two words",
        "EXPIRED",
    ],
)
def test_private_routes_need_a_valid_session(
    client: TestClient, seeded: Seeded, route: str, authorization: str | None
) -> None:
    headers = {}
    if authorization == "EXPIRED":
        headers = seeded.headers(seeded.expired)
    elif authorization is not None:
        headers = {"Authorization": authorization}
    response = client.get(route, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "unauthorized"
    assert set(body["error"]) == {"code", "message", "details"}


def test_bearer_scheme_is_case_insensitive(client: TestClient, seeded: Seeded) -> None:
    response = client.get(
        "/prop/challenges", headers={"Authorization": f"bearer {seeded.alice}"}
    )
    assert response.status_code == 200
