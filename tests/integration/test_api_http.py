"""The API over real HTTP: a uvicorn process serving a real DuckDB file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_seed import Seeded, seed_database
from service_process import api_server

pytestmark = pytest.mark.integration

ID_ROUTES = (
    "/prop/challenges/{id}",
    "/prop/challenges/{id}/metrics",
    "/prop/challenges/{id}/breaches",
    "/prop/challenges/{id}/flags",
)


@pytest.fixture(scope="module")
def seeded_file(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    return seed_database(tmp_path_factory.mktemp("http") / "http.duckdb")


@pytest.fixture(scope="module")
def server(seeded_file: Seeded) -> Iterator[str]:
    with api_server(Path(seeded_file.path)) as base:
        yield base


@pytest.fixture
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=10) as client:
        yield client


def test_http_ready_and_documented(http: httpx.Client) -> None:
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "evaluator": "absent"}
    assert http.get("/docs").status_code == 200
    assert (
        "/prop/challenges/{challenge_id}" in http.get("/openapi.json").json()["paths"]
    )


def test_http_owner_reads_the_runtime(http: httpx.Client, seeded_file: Seeded) -> None:
    headers = seeded_file.headers(seeded_file.alice)
    body = http.get("/prop/challenges/1", headers=headers).json()
    assert [p["status"] for p in body["phases"]] == ["active", "pending", "pending"]
    metric = body["phases"][0]["latest_metric"]
    assert metric["equity"] == "102500.50"
    assert body["phases"][0]["progress"]["trading_days"] == 2
    listed = http.get("/prop/challenges", headers=headers).json()
    assert [c["id"] for c in listed["items"]] == [2, 1]
    metrics = http.get("/prop/challenges/1/metrics", headers=headers).json()
    assert metrics["total_count"] == 10
    breaches = http.get(
        "/prop/challenges/2/breaches", params={"severity": "critical"}, headers=headers
    ).json()
    assert [b["rule"] for b in breaches["items"]] == ["daily_loss"]
    programs = http.get("/prop/programs").json()
    assert [p["price"] for p in programs["items"]] == [
        "499.00",
        "299.00",
        "540.00",
        "49.00",
    ]


@pytest.mark.parametrize("route", ID_ROUTES)
def test_http_non_owner_gets_exactly_a_missing_ids_404(
    http: httpx.Client, seeded_file: Seeded, route: str
) -> None:
    headers = seeded_file.headers(seeded_file.bob)
    assert http.get(route.format(id=3), headers=headers).status_code == 200
    theirs = http.get(route.format(id=1), headers=headers)
    missing = http.get(route.format(id=9), headers=headers)
    assert theirs.status_code == missing.status_code == 404
    assert missing.text.replace("9", "1") == theirs.text
    assert theirs.json()["error"]["code"] == "not_found"
    strip = {"date"}
    assert {k: v for k, v in theirs.headers.items() if k not in strip} == {
        k: v for k, v in missing.headers.items() if k not in strip
    }


@pytest.mark.parametrize("route", ["/prop/challenges", *ID_ROUTES])
@pytest.mark.parametrize("case", ["none", "malformed", "unknown", "expired"])
def test_http_needs_a_valid_session(
    http: httpx.Client, seeded_file: Seeded, route: str, case: str
) -> None:
    headers = {
        "none": {},
        "malformed": {"Authorization": f"Token {seeded_file.alice}"},
        "unknown": {"Authorization": "Bearer " + "A" * 43},
        "expired": seeded_file.headers(seeded_file.expired),
    }[case]
    response = http.get(route.format(id=1), headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    "route", ["/prop/challenges", "/prop/challenges/1/metrics", "/prop/programs",
              "/prop/challenges/1/breaches"],
)  # fmt: skip
@pytest.mark.parametrize(
    ("params", "field"),
    [({"limit": 0}, "limit"), ({"limit": 501}, "limit"), ({"offset": -1}, "offset")],
)
def test_http_pagination_limits(
    http: httpx.Client,
    seeded_file: Seeded,
    route: str,
    params: dict[str, int],
    field: str,
) -> None:
    response = http.get(
        route, params=params, headers=seeded_file.headers(seeded_file.alice)
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert (error["code"], error["details"]["field"]) == ("validation_error", field)


def test_http_keep_alive_serves_many_requests(
    http: httpx.Client, seeded_file: Seeded
) -> None:
    headers = seeded_file.headers(seeded_file.alice)
    bodies = {http.get("/prop/challenges/1", headers=headers).text for _ in range(200)}
    assert len(bodies) == 1
