"""The HTTP limits of ``api/limits.py`` and the canonical ids, in process.

The same limits over real HTTP against a real uvicorn (memory, slow clients,
the server protocol) are in ``tests/integration/test_api_limits.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import api_seed
import pytest
from api_seed import Seeded, TestClient
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException
from starlette.types import Message, Scope

from api import limits
from api.core.config import ApiSettings
from api.limits import BodyLimit, RequestDeadlineProtocol, uvicorn_options
from api.models import canonical_id
from prop_stream.store import DatabaseLockedError

# The shared module-scoped fixtures (a seeded DuckDB file and a TestClient).
client = api_seed.client
seeded = api_seed.seeded

LIMIT = 1024 * 1024
NON_CANONICAL = ["01", "00", "+1", "1_0", "%201", "1%20", "1.0", "0x1", "1e0", "-1"]
#: Every route with an id in its path: (method, path with {id}, the field).
ID_ROUTES = [
    ("GET", "/prop/challenges/{id}", "challenge_id"),
    ("GET", "/prop/challenges/{id}/metrics", "challenge_id"),
    ("GET", "/prop/challenges/{id}/breaches", "challenge_id"),
    ("GET", "/prop/challenges/{id}/flags", "challenge_id"),
    ("GET", "/prop/programs/{id}", "program_id"),
    ("GET", "/prop/purchases/{id}", "purchase_id"),
    ("POST", "/prop/purchases/{id}/retry", "purchase_id"),
    ("POST", "/prop/purchases/{id}/cancel", "purchase_id"),
]


def _error(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    error: dict[str, Any] = body["error"]
    return error


# ------------------------------------------------------------- canonical ids


@pytest.mark.parametrize("raw", ["0", "1", "42", "9223372036854775807", "1" * 30])
def test_canonical_id_passes_canonical_digits_on(raw: str) -> None:
    assert canonical_id(raw) == raw  # the range is checked after it


@pytest.mark.parametrize(
    "raw", ["01", "+1", "1_0", " 1", "1 ", "1.0", "0x1", "", "-1", "\u0661"]
)
def test_canonical_id_refuses_other_spellings(raw: str) -> None:
    with pytest.raises(PydanticCustomError) as info:
        canonical_id(raw)
    assert info.value.type == "int_canonical"


def test_route_table_covers_every_id_path(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    with_ids = {
        (method.upper(), path.replace(f"{{{field}}}", "{id}"))
        for path, item in paths.items()
        for method in item
        for field in ("challenge_id", "program_id", "purchase_id")
        if f"{{{field}}}" in path
    }
    assert with_ids == {(method, path) for method, path, _ in ID_ROUTES}


@pytest.mark.parametrize(("method", "route", "field"), ID_ROUTES)
@pytest.mark.parametrize("raw", NON_CANONICAL)
def test_non_canonical_id_is_422_naming_the_field(
    client: TestClient, seeded: Seeded, method: str, route: str, field: str, raw: str
) -> None:
    response = client.request(
        method, route.format(id=raw), headers=seeded.headers(seeded.alice)
    )
    assert response.status_code == 422, response.text
    error = _error(response)
    assert error["code"] == "validation_error"
    assert error["details"]["field"] == field
    assert field in error["message"]


@pytest.mark.parametrize(("method", "route", "field"), ID_ROUTES)
def test_canonical_id_reaches_the_route(
    client: TestClient, seeded: Seeded, method: str, route: str, field: str
) -> None:
    response = client.request(
        method, route.format(id=1), headers=seeded.headers(seeded.alice)
    )
    assert response.status_code in (200, 404, 409), response.text


# ----------------------------------------------------------------- redirects


@pytest.mark.parametrize(
    "path", ["/prop/challenges/", "/prop/programs/", "/healthz/", "/prop/purchases/"]
)
def test_trailing_slash_never_redirects_to_the_host_header(
    client: TestClient, seeded: Seeded, path: str
) -> None:
    response = client.get(
        path,
        headers={**seeded.headers(seeded.alice), "Host": "evil.example"},
        follow_redirects=False,
    )
    assert "location" not in response.headers
    assert response.status_code == 404
    assert _error(response)["code"] == "not_found"


# ------------------------------------------------------- body limit, session


def test_content_length_over_the_limit_is_413(
    client: TestClient, seeded: Seeded
) -> None:
    response = client.post(
        "/prop/purchases",
        content=b"{" + b" " * LIMIT + b"}",
        headers={**seeded.headers(seeded.alice), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.headers["connection"] == "close"
    assert _error(response)["code"] == "payload_too_large"


def test_chunked_body_over_the_limit_is_413(client: TestClient, seeded: Seeded) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"{"
        for _ in range(20):
            yield b" " * 65536
        yield b"}"

    response = client.post(
        "/prop/purchases",
        content=chunks(),
        headers={**seeded.headers(seeded.alice), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert _error(response)["code"] == "payload_too_large"


def test_chunked_body_under_the_limit_is_parsed(
    client: TestClient, seeded: Seeded
) -> None:
    response = client.post(
        "/prop/purchases/preview",
        content=iter([b"{", b' "program_id": ', b"2", b"}"]),
        headers={**seeded.headers(seeded.alice), "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["program_id"] == 2


def test_hot_read_with_an_oversized_body_is_413_not_served_from_memory(
    client: TestClient, seeded: Seeded
) -> None:
    headers = seeded.headers(seeded.alice)
    assert client.get("/prop/challenges/1", headers=headers).status_code == 200
    hot_before = client.app.state.runtime.hot_reads  # type: ignore[attr-defined]  # FastAPI app
    assert client.get("/prop/challenges/1", headers=headers).status_code == 200
    assert client.app.state.runtime.hot_reads == hot_before + 1  # type: ignore[attr-defined]  # FastAPI app
    response = client.request(
        "GET", "/prop/challenges/1", content=b"x" * (2 * LIMIT), headers=headers
    )
    assert response.status_code == 413
    assert _error(response)["code"] == "payload_too_large"
    small = client.request("GET", "/prop/challenges/1", content=b"x", headers=headers)
    assert small.status_code == 200  # through FastAPI: same answer
    assert client.app.state.runtime.hot_reads == hot_before + 1  # type: ignore[attr-defined]  # FastAPI app


@pytest.mark.parametrize("case", ["none", "malformed", "unknown", "expired"])
def test_body_without_a_valid_session_is_401(
    client: TestClient, seeded: Seeded, case: str
) -> None:
    headers = {
        "none": {},
        "malformed": {"Authorization": f"Token {seeded.alice}"},
        "unknown": {"Authorization": "Bearer " + "B" * 43},
        "expired": seeded.headers(seeded.expired),
    }[case]
    response = client.post("/prop/purchases/preview", json={"x": 1}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["connection"] == "close"
    assert _error(response)["code"] == "unauthorized"


def test_public_routes_take_anonymous_requests_with_and_without_a_body(
    client: TestClient,
) -> None:
    for path in ("/healthz", "/readyz", "/prop/programs", "/prop/programs/1"):
        assert client.get(path).status_code == 200, path
        assert client.request("GET", path, content=b"ignored").status_code == 200


class _Recorder:
    """An ASGI app behind :class:`BodyLimit` that reads the whole body."""

    def __init__(self) -> None:
        self.called = False
        self.body = b""

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.called = True
        more = True
        while more:
            message = await receive()
            self.body += message.get("body", b"")
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _run(
    client: TestClient, headers: dict[str, str], chunks: list[bytes], limit: int
) -> tuple[_Recorder, list[Message], int]:
    """Send a POST /prop/purchases/preview straight to a BodyLimit over the app."""
    recorder = _Recorder()
    middleware = BodyLimit(recorder, max_body_bytes=limit)
    reads = 0
    sent: list[Message] = []
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/prop/purchases/preview",
        "raw_path": b"/prop/purchases/preview",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "app": client.app,
    }

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        body = chunks[reads - 1] if reads <= len(chunks) else b""
        return {"type": "http.request", "body": body, "more_body": reads < len(chunks)}

    async def send(message: Message) -> None:
        sent.append(message)

    async def call() -> None:
        await middleware(scope, receive, send)

    try:
        asyncio.run(call())
    except HTTPException as exc:  # what FastAPI's handler would render
        sent.append({"type": "raised", "status": exc.status_code})
    return recorder, sent, reads


def test_anonymous_body_is_refused_before_a_byte_is_read(client: TestClient) -> None:
    recorder, sent, reads = _run(
        client, {"Content-Length": "10"}, [b"0123456789"], LIMIT
    )
    assert (recorder.called, reads) == (False, 0)
    assert sent[0]["status"] == 401
    assert json.loads(sent[1]["body"])["error"]["code"] == "unauthorized"


def test_oversized_content_length_is_refused_before_the_session(
    client: TestClient,
) -> None:
    recorder, sent, reads = _run(
        client, {"Content-Length": str(50_000_000)}, [b"x"], LIMIT
    )
    assert (recorder.called, reads, sent[0]["status"]) == (False, 0, 413)


def test_valid_session_body_reaches_the_app_counted(
    client: TestClient, seeded: Seeded
) -> None:
    auth = {"Authorization": f"Bearer {seeded.alice}", "Transfer-Encoding": "chunked"}
    recorder, sent, reads = _run(client, auth, [b"ab", b"cd", b"ef"], 6)
    assert (recorder.body, reads, sent[0]["status"]) == (b"abcdef", 3, 204)
    # One byte over: the read that passes the limit raises the 413, no more reads.
    recorder, sent, reads = _run(client, auth, [b"ab", b"cd", b"efg", b"h"], 6)
    raised = [{"type": "raised", "status": 413}]
    assert (recorder.body, reads, sent) == (b"abcd", 3, raised)


def test_a_locked_store_during_the_session_check_is_503(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def locked(state: object, authorization: str | None) -> int:
        raise DatabaseLockedError("x.duckdb", "database is locked")

    monkeypatch.setattr(limits, "customer_of", locked)
    auth = {"Authorization": "Bearer " + "C" * 43, "Content-Length": "2"}
    recorder, sent, reads = _run(client, auth, [b"{}"], LIMIT)
    assert (recorder.called, reads, sent[0]["status"]) == (False, 0, 503)
    assert json.loads(sent[1]["body"])["error"]["code"] == "database_locked"


# --------------------------------------------------------- uvicorn's protocol


def test_uvicorn_options_configure_the_deadline_protocol() -> None:
    options = uvicorn_options(
        ApiSettings(request_deadline_s=7.5, max_header_bytes=4096)
    )
    protocol = options["http"]
    assert isinstance(protocol, type)
    assert issubclass(protocol, RequestDeadlineProtocol)
    assert (protocol.request_deadline_s, protocol.header_limit) == (7.5, 4096)


def test_other_uvicorn_version_falls_back_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(limits, "TESTED_UVICORN", "0.0.1")
    monkeypatch.setattr(limits, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="api.limits"):
        first = uvicorn_options(ApiSettings())
        second = uvicorn_options(ApiSettings())
    assert first == second == {"http": "auto"}
    warnings = [r for r in caplog.records if r.name == "api.limits"]
    assert len(warnings) == 1
    assert "0.0.1" in warnings[0].getMessage()
