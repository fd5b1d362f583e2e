from __future__ import annotations

import pytest

from api.core.security import SessionCache, bearer_token
from prop_stream.store import hash_token


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER abc ", "abc"),
        ("Bearer a b", None),
    ],
)
def test_bearer_token_parses_the_header(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_session_cache_trusts_memory_until_ttl_and_expiry() -> None:
    clock = Clock()
    calls: list[str] = []
    expires = clock.now + 100

    def lookup(token_hash: str) -> tuple[int, float] | None:
        calls.append(token_hash)
        return (7, expires) if token_hash == hash_token("good") else None

    cache = SessionCache(ttl_s=30, negative_ttl_s=5, clock=clock)
    assert cache.customer("good", lookup=lookup) == 7
    assert cache.customer("good", lookup=lookup) == 7
    assert len(calls) == 1
    clock.now += 31  # past the ttl: asks the store again
    assert cache.customer("good", lookup=lookup) == 7
    assert len(calls) == 2
    clock.now = expires  # expired: refused, whatever memory says
    assert cache.customer("good", lookup=lookup) is None


def test_session_cache_remembers_unknown_tokens_briefly() -> None:
    clock = Clock()
    calls: list[str] = []

    def lookup(token_hash: str) -> tuple[int, float] | None:
        calls.append(token_hash)
        return None

    cache = SessionCache(ttl_s=30, negative_ttl_s=5, clock=clock)
    assert cache.customer("bad", lookup=lookup) is None
    assert cache.customer("bad", lookup=lookup) is None
    assert len(calls) == 1
    clock.now += 6
    assert cache.customer("bad", lookup=lookup) is None
    assert len(calls) == 2


def test_session_cache_refuses_a_session_expired_in_the_store() -> None:
    clock = Clock()
    cache = SessionCache(clock=clock)
    assert cache.customer("old", lookup=lambda _: (3, clock.now - 1)) is None
    assert len(cache) == 0


def test_session_cache_invalidate_and_size_bound() -> None:
    clock = Clock()
    cache = SessionCache(max_size=10, clock=clock)
    answer: tuple[int, float] | None = (1, clock.now + 1_000)
    assert cache.customer("t", lookup=lambda _: answer) == 1
    answer = None
    assert cache.customer("t", lookup=lambda _: answer) == 1  # from memory
    cache.invalidate("t")
    assert cache.customer("t", lookup=lambda _: answer) is None
    for i in range(50):
        cache.customer(f"k{i}", lookup=lambda _: None)
    assert len(cache) <= 10
    cache.clear()
    assert len(cache) == 0
