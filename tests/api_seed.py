"""A real DuckDB file for the API tests: demo data, engine outputs, sessions.

``seed_database`` runs ``prop-stream init --demo``'s work, judges a few batches of
ticks with the real engine and writes them with the service's sink, so the API
reads exactly what the evaluator would have committed.

Demo challenges: alice owns 1 (two-step) and 2 (one-step); bob owns 3, 4 (one-step)
and 5. Challenge 1 gets a daily-loss warning that resolves; challenge 2 fails on
its daily loss; challenge 3 gets a few ticks; 4 and 5 none. Alice's accounts of
challenges 1 and 2 open opposite EURUSD deals 30 s apart (one hedge flag, see
:data:`DEAL_OPENS`); the rest of the deals pair with nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from pg_support import BACKENDS, fresh_database

from api.core.config import ApiSettings
from api.main import create_app
from prop_stream.rules import TICK_SCHEMA, RuleEngine
from prop_stream.sinks.duckdb_sink import DuckDBSink
from prop_stream.store import (
    Connection,
    active_phase_specs,
    connect,
    create_session,
    init_database,
)
from prop_stream.store.flags import record_deal_opens

with warnings.catch_warnings():
    # starlette's TestClient warns that it wants httpx2; httpx is what we have.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

#: When the demo challenges start (a Monday, 09:00 in Prague).
T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
#: The ticks' times: five hours on the first day, five on the next.
HOURS = [T0 + timedelta(hours=h) for h in range(1, 6)] + [
    T0 + timedelta(days=1, hours=h) for h in range(1, 6)
]
#: Challenge 1's equity at each hour (100k account, 5% daily, 10% overall, warn at
#: 80%): a 4,000 dip on the first day fires a daily-loss warning, which resolves.
EQUITY_1 = [
    100_000.0,
    100_500.0,
    96_000.0,
    99_000.0,
    101_000.25,
    101_200.0,
    101_800.0,
    102_000.0,
    102_300.0,
    102_500.5,
]
#: Challenge 2 (50k, 4% daily) loses 3% an hour: it fails at the third tick.
EQUITY_2 = [50_000.0 * (1 - 0.03 * k) for k in range(len(HOURS))]
#: Challenge 3 (bob, 100k) moves a little on the first day only.
EQUITY_3 = [100_000.0, 100_100.0, 100_200.0]

#: Processed ``in`` deals recorded for hedge flags: (challenge, deal_id, ts,
#: symbol, side). Only the first two pair (alice's two accounts, EURUSD, opposite
#: sides, 30 s apart): XAUUSD is on one side, bob's deal is another customer's.
DEAL_OPENS = [
    (1, 1, HOURS[1], "EURUSD", "buy"),
    (2, 7, HOURS[1] + timedelta(seconds=30), "EURUSD", "sell"),
    (1, 2, HOURS[3], "XAUUSD", "buy"),
    (2, 8, HOURS[3], "XAUUSD", "buy"),
    (3, 1, HOURS[1], "EURUSD", "sell"),
]

ALICE = "alice@example.com"
BOB = "bob@example.com"


@dataclass
class Seeded:
    """What :func:`seed_database` made.

    Attributes:
        path: The DuckDB file or the PostgreSQL URL.
        alice: Alice's session token.
        bob: Bob's session token.
        expired: An expired session token of alice's.
        accounts: Challenge id to its first phase's account.
        batches: The engine's metric frames, one per batch.
        engine: The engine after the seeded ticks (to judge more).
    """

    path: Path | str
    alice: str
    bob: str
    expired: str
    accounts: dict[int, int]
    batches: list[pl.DataFrame] = field(default_factory=list)
    engine: RuleEngine = field(default_factory=RuleEngine)

    def headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


def ticks_for(accounts: dict[int, int], hour: int) -> pl.DataFrame:
    rows = []
    for challenge, series in ((1, EQUITY_1), (2, EQUITY_2), (3, EQUITY_3)):
        if hour < len(series):
            initial = 100_000.0 if challenge != 2 else 50_000.0
            rows.append(
                {
                    "account_id": accounts[challenge],
                    "ts": HOURS[hour],
                    "equity": series[hour],
                    "balance": initial,
                }
            )
    return pl.DataFrame(rows, schema=TICK_SCHEMA)


def judge(conn: Connection, engine: RuleEngine, ticks: pl.DataFrame) -> pl.DataFrame:
    """Judge a batch and commit it with the service's sink; return its metrics."""
    evaluation = engine.process(ticks)
    sink = DuckDBSink(conn, source="test")
    sink.setup()
    sink.add(evaluation, position={"0": 0})
    sink.flush()
    return evaluation.metrics


def seed_database(path: Path | str) -> Seeded:
    init_database(path, demo=True, now=T0)
    conn = connect(path)
    try:
        specs = active_phase_specs(conn)
        accounts = {int(s.challenge_id): s.account_id for s in specs}
        engine = RuleEngine()
        for spec in specs:
            engine.register(spec)
        batches = [
            judge(conn, engine, ticks_for(accounts, hour)) for hour in range(len(HOURS))
        ]
        opens = pl.DataFrame(
            {
                "account_id": [accounts[c] for c, *_ in DEAL_OPENS],
                "deal_id": [d for _, d, *_ in DEAL_OPENS],
                "ts": [t for _, _, t, *_ in DEAL_OPENS],
                "symbol": [s for *_, s, _ in DEAL_OPENS],
                "side": [side for *_, side in DEAL_OPENS],
            },
            schema_overrides={"ts": pl.Datetime("us", "UTC")},
        )
        record_deal_opens(conn, opens.to_arrow(), 60)
        now = datetime.now(UTC)
        seeded = Seeded(
            path=path,
            alice=create_session(conn, email=ALICE),
            bob=create_session(conn, email=BOB),
            expired=create_session(
                conn,
                email=ALICE,
                ttl=timedelta(hours=1),
                now=now - timedelta(hours=2),
            ),
            accounts=accounts,
            batches=batches,
            engine=engine,
        )
    finally:
        conn.close()
    return seeded


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    if request.param == "duckdb":
        yield seed_database(tmp_path_factory.mktemp("api") / "api.duckdb")
        return
    with fresh_database(request.getfixturevalue("pg_server")) as url:
        yield seed_database(url)


@pytest.fixture(scope="module")
def client(seeded: Seeded) -> Iterator[TestClient]:
    app = create_app(settings=ApiSettings(db=seeded.path, cache_sync_interval_s=0))
    with TestClient(app) as test_client:
        yield test_client


__all__ = [
    "ALICE",
    "BOB",
    "HOURS",
    "T0",
    "Seeded",
    "TestClient",
    "client",
    "judge",
    "seed_database",
    "seeded",
    "ticks_for",
]
