from __future__ import annotations

from collections.abc import Callable

import api_seed
import pytest
from api_seed import Seeded, TestClient

from api.core.config import ApiSettings
from api.main import create_app

# The shared module-scoped fixtures (a seeded DuckDB file and a TestClient).
client = api_seed.client
seeded = api_seed.seeded


def test_healthz_answers_ok(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_readyz_without_evaluator_is_ready(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "evaluator": "absent"},
    }


def _boom() -> bool:
    raise RuntimeError("probe failed")


@pytest.mark.parametrize(
    ("probe", "status", "evaluator"),
    [
        (lambda: True, 200, "ok"),
        (lambda: False, 503, "not_running"),
        (_boom, 503, "not_running"),
    ],
)
def test_readyz_follows_the_evaluator(
    seeded: Seeded, probe: Callable[[], bool], status: int, evaluator: str
) -> None:
    app = create_app(
        settings=ApiSettings(db=seeded.path, cache_sync_interval_s=0),
        evaluator_ready=probe,
    )
    with TestClient(app) as test_client:
        response = test_client.get("/readyz")
    assert response.status_code == status
    body = response.json()
    checks = body["checks"] if status == 200 else body["error"]["details"]["checks"]
    assert checks == {"database": "ok", "evaluator": evaluator}
    if status == 503:
        assert body["error"]["code"] == "not_ready"


def test_openapi_documents_the_runtime_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {
        "/prop/challenges",
        "/prop/challenges/{challenge_id}",
        "/prop/challenges/{challenge_id}/metrics",
        "/prop/challenges/{challenge_id}/breaches",
        "/prop/programs",
        "/prop/programs/{program_id}",
        "/healthz",
        "/readyz",
    } <= set(spec["paths"])
    assert "HTTPBearer" in spec["components"]["securitySchemes"] or any(
        scheme.get("scheme") == "bearer"
        for scheme in spec["components"]["securitySchemes"].values()
    )
    assert client.get("/docs").status_code == 200


def test_unknown_path_is_a_404_in_the_error_shape(client: TestClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_wrong_method_is_a_405_in_the_error_shape(client: TestClient) -> None:
    response = client.post("/healthz")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("parts", "status"),
    [
        ({"evaluator": "ok", "jobs": "ok"}, 200),
        ({"evaluator": "ok", "jobs": "ok", "kafka": "no broker answers at h:1"}, 503),
        ({"evaluator": "disk full: No space left on device", "jobs": "ok"}, 503),
        ({"jobs": "ok"}, 200),  # no evaluator in this process: "absent"
    ],
)
def test_readyz_names_each_part_and_why(
    seeded: Seeded, parts: dict[str, str], status: int
) -> None:
    app = create_app(
        settings=ApiSettings(db=seeded.path, cache_sync_interval_s=0),
        checks=lambda: parts,
    )
    with TestClient(app) as test_client:
        response = test_client.get("/readyz")
    assert response.status_code == status
    body = response.json()
    checks = body["checks"] if status == 200 else body["error"]["details"]["checks"]
    assert checks == {"database": "ok", "evaluator": "absent", **parts}


def test_metrics_count_requests_by_route_template(seeded: Seeded) -> None:
    app = create_app(settings=ApiSettings(db=seeded.path, cache_sync_interval_s=0))
    with TestClient(app) as test_client:
        for _ in range(3):
            assert test_client.get("/prop/challenges/123456").status_code == 401
        assert test_client.get("/nope/42").status_code == 404
        assert test_client.request("BREW", "/healthz").status_code == 405
        text = test_client.get("/metrics").text
    assert (
        'prop_stream_http_requests_total{method="GET",'
        'route="/prop/challenges/{challenge_id}",status="401"} 3.0'
    ) in text
    assert (
        'prop_stream_http_requests_total{method="GET",route="unmatched",status="404"}'
        " 1.0"
    ) in text
    assert 'method="other"' in text
    assert "123456" not in text
    assert "prop_stream_http_request_duration_seconds_bucket" in text
