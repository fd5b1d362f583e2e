"""The hot read (api/hot.py) answers exactly what the FastAPI route answers.

Two apps over one database, one with the middleware and one without, get the
same requests; every answer must match in status, body and the headers the
terminal reads. The hot app must really answer the common case itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api_seed import Seeded, TestClient, seeded
from fastapi import FastAPI

from api.core.config import ApiSettings
from api.main import create_app

__all__ = ["seeded"]


@pytest.fixture(scope="module")
def apps(seeded: Seeded) -> Iterator[tuple[TestClient, TestClient]]:
    hot = create_app(settings=ApiSettings(db=seeded.path, cache_sync_interval_s=0))
    plain = create_app(
        settings=ApiSettings(db=seeded.path, cache_sync_interval_s=0, hot_reads=False)
    )
    with TestClient(hot) as hot_client, TestClient(plain) as plain_client:
        yield hot_client, plain_client


def _hot_count(client: TestClient) -> int:
    app = client.app
    assert isinstance(app, FastAPI)
    return int(app.state.runtime.hot_reads)


def _answer(
    client: TestClient, path: str, headers: dict[str, str]
) -> tuple[object, ...]:
    response = client.get(path, headers=headers)
    return (
        response.status_code,
        response.content,
        response.headers.get("content-type"),
        response.headers.get("content-length"),
        response.headers.get("www-authenticate"),
    )


PATHS = [
    "/prop/challenges/1",
    "/prop/challenges/2",
    "/prop/challenges/3",
    "/prop/challenges/999999",
    "/prop/challenges/0",
    "/prop/challenges/01",
    "/prop/challenges/-1",
    "/prop/challenges/9223372036854775807",
    "/prop/challenges/9223372036854775808",
    "/prop/challenges/99999999999999999999",
    "/prop/challenges/1/",
    "/prop/challenges/1?limit=5",
    "/prop/challenges/1?",
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("who", ["alice", "bob", "expired", "unknown", "none", "bad"])
def test_hot_and_plain_apps_answer_alike(
    apps: tuple[TestClient, TestClient], seeded: Seeded, path: str, who: str
) -> None:
    hot, plain = apps
    headers = {
        "alice": seeded.headers(seeded.alice),
        "bob": seeded.headers(seeded.bob),
        "expired": seeded.headers(seeded.expired),
        "unknown": seeded.headers("x" * 43),
        "none": {},
        "bad": {"Authorization": f"Token {seeded.alice}"},
    }[who]
    # Twice: the first request may fill the session cache, the second may be hot.
    for _ in range(2):
        assert _answer(hot, path, headers) == _answer(plain, path, headers)


def test_the_owner_s_read_is_answered_by_the_middleware(
    apps: tuple[TestClient, TestClient], seeded: Seeded
) -> None:
    hot, plain = apps
    headers = seeded.headers(seeded.alice)
    hot.get("/prop/challenges/1", headers=headers)  # the session is now in memory
    before = _hot_count(hot)
    for _ in range(5):
        response = hot.get("/prop/challenges/1", headers=headers)
        assert response.status_code == 200
        assert response.json()["id"] == 1
    assert _hot_count(hot) == before + 5
    # Someone else's challenge and a query string go to FastAPI.
    hot.get("/prop/challenges/3", headers=headers)
    hot.get("/prop/challenges/1?x=1", headers=headers)
    assert _hot_count(hot) == before + 5
    assert _hot_count(plain) == 0


def test_other_methods_and_paths_pass_through(
    apps: tuple[TestClient, TestClient], seeded: Seeded
) -> None:
    hot, plain = apps
    headers = seeded.headers(seeded.alice)
    for method, path in [
        ("HEAD", "/prop/challenges/1"),
        ("POST", "/prop/challenges/1"),
        ("GET", "/prop/challenges/1/metrics"),
        ("GET", "/prop/challenges"),
    ]:
        a = hot.request(method, path, headers=headers)
        b = plain.request(method, path, headers=headers)
        assert (a.status_code, a.content) == (b.status_code, b.content)


def test_an_error_in_the_hot_path_passes_the_request_on(
    apps: tuple[TestClient, TestClient],
    seeded: Seeded,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hot, plain = apps
    headers = seeded.headers(seeded.alice)
    expected = _answer(plain, "/prop/challenges/1", headers)
    hot.get("/prop/challenges/1", headers=headers)  # the session is now in memory
    app = hot.app
    assert isinstance(app, FastAPI)
    cache = app.state.runtime.cache
    real = cache.challenge_body
    calls: list[int] = []

    def flaky(challenge_id: int, *, customer_id: int) -> bytes | None:
        calls.append(challenge_id)
        if len(calls) == 1:
            raise RuntimeError("the cache broke once")
        return real(challenge_id, customer_id=customer_id)  # type: ignore[no-any-return]

    monkeypatch.setattr(cache, "challenge_body", flaky)
    before = _hot_count(hot)
    assert _answer(hot, "/prop/challenges/1", headers) == expected
    assert calls == [1, 1]  # the middleware's failed try, then the route's
    assert _hot_count(hot) == before
