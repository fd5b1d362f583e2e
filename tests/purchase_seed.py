"""A demo database, an app and a job worker for the purchase-flow tests."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from api.core.config import ApiSettings
from api.main import create_app
from prop_stream.jobs import JobWorker
from prop_stream.rules import PhaseSpec
from prop_stream.store import (
    Connection,
    connect,
    create_session,
    cursor,
    customer_id_by_email,
    init_database,
    transaction,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ALICE = "alice@example.com"
BOB = "bob@example.com"
#: The demo programs: 1 two-step (499.00), 2 one-step (299.00).
TWO_STEP_ID = 1
ONE_STEP_ID = 2


@dataclass
class FakeEngine:
    """Records what the app and the worker ask the engine (a PhaseRegistry)."""

    registered: list[PhaseSpec] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def register_phase(self, spec: PhaseSpec) -> None:
        with self.lock:
            self.registered.append(spec)

    def remove_phase(self, account_id: int) -> None:
        with self.lock:
            self.removed.append(account_id)


@dataclass
class Shop:
    """A demo database served by an app, with a worker on its connection."""

    path: Path | str
    conn: Connection
    alice: str
    bob: str
    alice_id: int
    bob_id: int
    alice_payer: int
    bob_payer: int
    engine: FakeEngine

    def headers(self, token: str, key: str | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {token}"}
        if key is not None:
            h["Idempotency-Key"] = key
        return h

    def worker(self, **kwargs: object) -> JobWorker:
        return JobWorker(cursor(self.conn), phases=self.engine, **kwargs)  # type: ignore[arg-type]  # test helper passes JobWorker's keywords

    def balance(self, account_id: int) -> Decimal:
        row = (
            cursor(self.conn)
            .execute(
                "SELECT balance FROM trading_accounts WHERE account_id = ?",
                [account_id],
            )
            .fetchone()
        )
        assert row is not None
        return Decimal(row[0])

    def sql(
        self, query: str, params: list[object] | None = None
    ) -> list[tuple[Any, ...]]:
        cur = cursor(self.conn)
        with transaction(cur):
            return cur.execute(query, params or []).fetchall()


def payer_of(conn: Connection, customer_id: int) -> int:
    row = conn.execute(
        "SELECT account_id FROM trading_accounts WHERE customer_id = ? "
        "AND account_group = 'REAL' ORDER BY account_id LIMIT 1",
        [customer_id],
    ).fetchone()
    assert row is not None
    return int(row[0])


def make_shop(path: Path | str) -> Shop:
    init_database(path, demo=True)
    conn = connect(path)
    with transaction(conn):
        alice = create_session(conn, email=ALICE)
        bob = create_session(conn, email=BOB)
    alice_id = customer_id_by_email(conn, email=ALICE)
    bob_id = customer_id_by_email(conn, email=BOB)
    return Shop(
        path=path,
        conn=conn,
        alice=alice,
        bob=bob,
        alice_id=alice_id,
        bob_id=bob_id,
        alice_payer=payer_of(conn, alice_id),
        bob_payer=payer_of(conn, bob_id),
        engine=FakeEngine(),
    )


@pytest.fixture
def shop(store_db: Path | str) -> Iterator[Shop]:
    made = make_shop(store_db)
    try:
        yield made
    finally:
        made.conn.close()


@pytest.fixture
def client(shop: Shop) -> Iterator[TestClient]:
    app = create_app(
        settings=ApiSettings(db=shop.path, cache_sync_interval_s=0),
        conn=shop.conn,
        phases=shop.engine,
    )
    with TestClient(app) as test_client:
        yield test_client


__all__ = [
    "ALICE",
    "BOB",
    "ONE_STEP_ID",
    "TWO_STEP_ID",
    "FakeEngine",
    "Shop",
    "TestClient",
    "client",
    "make_shop",
    "payer_of",
    "shop",
]
