"""Deal rules and hedge flags over real HTTP, on challenges bought over HTTP.

A program with every deal rule is saved in the store (the engine's
``ChallengeRules`` validates it) and served by a real uvicorn; alice buys three
challenges and bob one through ``POST /prop/purchases``. Then, as the evaluator
would, the job worker pays and deposits, the real engine judges ticks and deals
for the purchased accounts, and the service's sink commits them, with the hedge
join of :func:`prop_stream.store.flags.record_deal_opens`. Served again, each of
alice's challenges shows its deal-rule breach and its failed phase, the two
hedged ones their flag, to alice only: bob gets 404, no session 401.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from service_process import api_server

from prop_stream.jobs import JobWorker
from prop_stream.rules import TICK_SCHEMA, RuleEngine
from prop_stream.sinks.duckdb_sink import DuckDBSink
from prop_stream.store import (
    EVALUATION,
    ProgramIn,
    ProgramPhaseIn,
    active_phase_specs,
    connect,
    create_program,
    create_session,
    init_database,
    transaction,
)
from prop_stream.store.flags import record_deal_opens

pytestmark = pytest.mark.integration

DEAL_RULES: dict[str, Any] = {
    "initial_balance": 10_000,
    "profit_target": 0.1,
    "max_total_loss": 0.1,
    "max_open_lots": 2,
    "min_hold_seconds": 60,
    "weekend_close": "FRI 22:00",
    "deal_violation_action": "fail",
    "trading_day_basis": "deals",
}
PROGRAM = ProgramIn(
    name="Deal rules 10K",
    description="every deal rule",
    price=Decimal("100.00"),
    currency="USD",
    phases=(
        ProgramPhaseIn(
            name="Evaluation",
            phase_type=EVALUATION,
            account_group="DEMO",
            rules=DEAL_RULES,
        ),
    ),
)


def _buy(base: str, token: str, program_id: int, key: str) -> int:
    """Buy a challenge over HTTP; its id."""
    headers = {"Authorization": f"Bearer {token}"}
    payer = next(
        p
        for p in httpx.get(
            f"{base}/prop/payer-accounts",
            params={"program_id": program_id},
            headers=headers,
        ).json()["items"]
        if p["eligible"]
    )
    body = {"program_id": program_id, "payer_account_id": payer["account_id"]}
    bought = httpx.post(
        f"{base}/prop/purchases",
        json=body,
        headers={**headers, "Idempotency-Key": key},
        timeout=30,
    )
    assert bought.status_code == 201, bought.text
    challenge = bought.json()["challenge_id"]
    assert challenge is not None
    return int(challenge)


def _next_weekly(after: datetime, weekday: int, hour: int) -> datetime:
    """The first instant after ``after`` on ``weekday`` (Mon 0) at ``hour`` UTC."""
    day = after.replace(hour=hour, minute=0, second=0, microsecond=0)
    day += timedelta(days=(weekday - day.weekday()) % 7)
    return day if day > after else day + timedelta(days=7)


def _deals(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(
        [{**row, "before_tick": 0} for row in rows],
        schema={
            "account_id": pl.Int64(),
            "ts": pl.Datetime("us", "UTC"),
            "deal_id": pl.Int64(),
            "position_id": pl.Int64(),
            "symbol": pl.String(),
            "side": pl.String(),
            "volume": pl.Float64(),
            "price": pl.Float64(),
            "entry": pl.String(),
            "before_tick": pl.Int64(),
        },
    )


def _judge(db: Path, challenges: list[int]) -> dict[int, int]:
    """Pay the purchases, judge ticks and deals, commit: the evaluator's work.

    Args:
        db: The store.
        challenges: The bought challenges: alice's three, then bob's.

    Returns:
        Challenge id to its account.
    """
    conn = connect(db)
    try:
        worker = JobWorker(conn)
        deadline = time.monotonic() + 30
        while worker.run_once() and time.monotonic() < deadline:
            pass
        specs = [
            s for s in active_phase_specs(conn) if int(s.challenge_id) in challenges
        ]
        assert len(specs) == len(challenges)
        engine = RuleEngine()
        for spec in specs:
            engine.register(spec)
        accounts = {int(s.challenge_id): s.account_id for s in specs}
        start = max(s.started_at for s in specs).astimezone(UTC)
        t1 = start + timedelta(hours=1)
        weekend = _next_weekly(t1 + timedelta(minutes=5), 4, 22)
        ticks = pl.DataFrame(
            [
                {"account_id": a, "ts": t1, "equity": 10_000.0, "balance": 10_000.0}
                for a in sorted(accounts.values())
            ],
            schema=TICK_SCHEMA,
        )
        a, b, c, d = (accounts[k] for k in challenges)
        deals = _deals(
            [
                # a: 3 lots open > max_open_lots 2.
                {"account_id": a, "ts": t1 + timedelta(seconds=1), "deal_id": 1,
                 "position_id": 1, "symbol": "EURUSD", "side": "buy",
                 "volume": 3.0, "price": 1.08, "entry": "in"},
                # b: sells EURUSD 20 s after a's buy (a hedge), closes after 10 s.
                {"account_id": b, "ts": t1 + timedelta(seconds=21), "deal_id": 1,
                 "position_id": 1, "symbol": "EURUSD", "side": "sell",
                 "volume": 1.0, "price": 1.08, "entry": "in"},
                {"account_id": b, "ts": t1 + timedelta(seconds=31), "deal_id": 2,
                 "position_id": 1, "symbol": "EURUSD", "side": "buy",
                 "volume": 1.0, "price": 1.08, "entry": "out"},
                # c: holds 1 lot of gold into the weekend.
                {"account_id": c, "ts": t1 + timedelta(seconds=2), "deal_id": 1,
                 "position_id": 1, "symbol": "XAUUSD", "side": "buy",
                 "volume": 1.0, "price": 2000.0, "entry": "in"},
                # d (bob): sells EURUSD with a's buy, but bob is another customer.
                {"account_id": d, "ts": t1 + timedelta(seconds=1), "deal_id": 1,
                 "position_id": 1, "symbol": "EURUSD", "side": "sell",
                 "volume": 1.0, "price": 1.08, "entry": "in"},
            ]
        ).sort("account_id", "ts", maintain_order=True)  # fmt: skip
        after = pl.DataFrame(
            [{"account_id": c, "ts": weekend + timedelta(hours=1),
              "equity": 10_000.0, "balance": 10_000.0}],
            schema=TICK_SCHEMA,
        )  # fmt: skip
        sink = DuckDBSink(conn, source="test")
        sink.setup()
        empty = ticks.clear()
        for step, (tick_batch, deal_batch) in enumerate(
            ((ticks, None), (empty, deals), (after, None))
        ):
            evaluation = engine.process(tick_batch, deal_batch)
            sink.add(evaluation, position={"0": step})
            sink.flush()
            with transaction(conn):
                record_deal_opens(conn, evaluation.deal_opens, 60)
        return accounts
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    db = tmp_path_factory.mktemp("deals-http") / "svc.duckdb"
    init_database(db, demo=True)
    conn = connect(db)
    try:
        with transaction(conn):
            program_id = create_program(conn, program=PROGRAM)
        alice = create_session(conn, email="alice@example.com")
        bob = create_session(conn, email="bob@example.com")
    finally:
        conn.close()
    with api_server(db) as base:
        listed = httpx.get(f"{base}/prop/programs/{program_id}").json()
        bought = [_buy(base, alice, program_id, f"a{i}") for i in range(3)]
        bought.append(_buy(base, bob, program_id, "b0"))
    accounts = _judge(db, bought)
    conn = connect(db)
    try:
        views = {
            "rules": conn.execute(
                "SELECT rule, severity, sum(breaches) FROM risk_breaches_by_day_rule "
                "WHERE rule IN ('max_position_size', 'short_hold', 'weekend_hold') "
                "GROUP BY ALL ORDER BY rule"
            ).fetchall(),
            "flags": conn.execute(
                "SELECT c.email, f.flags, f.accounts FROM risk_flags_by_customer_day "
                "AS f JOIN customers AS c ON c.id = f.customer_id"
            ).fetchall(),
        }
    finally:
        conn.close()
    with api_server(db) as base:
        yield {
            "base": base,
            "alice": alice,
            "bob": bob,
            "challenges": bought,
            "accounts": accounts,
            "program": listed,
            "views": views,
        }


def _get(served: dict[str, Any], path: str, token: str | None, **params: Any) -> Any:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.get(
        f"{served['base']}{path}", params=params, headers=headers, timeout=10
    )


def _wait_status(served: dict[str, Any], challenge: int, status: str) -> Any:
    # The API's cache syncs from the store every 0.2 s: poll with a deadline.
    deadline = time.monotonic() + 30
    while True:
        body = _get(served, f"/prop/challenges/{challenge}", served["alice"]).json()
        if body["phases"][0]["status"] == status or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def test_the_programs_api_returns_the_deal_rules(served: dict[str, Any]) -> None:
    rules = served["program"]["phases"][0]["rules"]
    for name, value in DEAL_RULES.items():
        assert rules[name] == value, name


@pytest.mark.parametrize(
    ("index", "rule", "threshold", "actual"),
    [
        (0, "max_position_size", "2.0", "3.0"),
        (1, "short_hold", "60.0", "10.0"),
        (2, "weekend_hold", "0.0", "1.0"),
    ],
)
def test_each_deal_rule_fails_its_challenge_for_its_owner(
    served: dict[str, Any], index: int, rule: str, threshold: str, actual: str
) -> None:
    challenge = served["challenges"][index]
    body = _wait_status(served, challenge, "failed")
    assert body["phases"][0]["status"] == "failed"
    assert body["status_name"] == "failed"
    breaches = _get(
        served, f"/prop/challenges/{challenge}/breaches", served["alice"]
    ).json()
    assert [(b["rule"], b["severity"], b["action"]) for b in breaches["items"]] == [
        (rule, "critical", "phase_failed")
    ]
    assert (breaches["items"][0]["threshold"], breaches["items"][0]["actual"]) == (
        threshold,
        actual,
    )
    by_rule = _get(
        served, f"/prop/challenges/{challenge}/breaches", served["alice"], rule=rule
    ).json()
    assert by_rule["total_count"] == 1


def test_the_hedge_flag_shows_on_both_challenges_to_their_owner(
    served: dict[str, Any],
) -> None:
    a, b = (served["accounts"][c] for c in served["challenges"][:2])
    for challenge in served["challenges"][:2]:
        flags = _get(
            served, f"/prop/challenges/{challenge}/flags", served["alice"]
        ).json()
        assert flags["total_count"] == 1
        flag = flags["items"][0]
        assert (flag["account_id_1"], flag["account_id_2"]) == (min(a, b), max(a, b))
        assert flag["symbol"] == "EURUSD"
        assert flag["gap_seconds"] == 20.0
        assert {flag["side_1"], flag["side_2"]} == {"buy", "sell"}
        assert (flag["severity"], flag["action"]) == ("warning", "review")
    # The gold position pairs with nothing; bob's sell is another customer's.
    third = served["challenges"][2]
    assert (
        _get(served, f"/prop/challenges/{third}/flags", served["alice"]).json()[
            "total_count"
        ]
        == 0
    )
    bobs = served["challenges"][3]
    assert (
        _get(served, f"/prop/challenges/{bobs}/flags", served["bob"]).json()[
            "total_count"
        ]
        == 0
    )


def test_bobs_position_is_open_and_his_phase_active(served: dict[str, Any]) -> None:
    bobs = served["challenges"][3]
    body = _get(served, f"/prop/challenges/{bobs}", served["bob"]).json()
    phase = body["phases"][0]
    assert phase["status"] == "active"
    assert phase["progress"]["trading_day_basis"] == "deals"
    assert phase["progress"]["max_open_lots"] == 2
    # His 1-lot EURUSD sell is still open (the metric after the deals' batch).
    assert phase["progress"]["open_lots"] == 1.0
    assert phase["latest_metric"]["open_positions"] == 1
    assert phase["progress"]["trading_days"] == 1  # the day of his in deal


@pytest.mark.parametrize("route", ["", "/breaches", "/flags", "/metrics"])
def test_others_get_404_and_no_session_401(served: dict[str, Any], route: str) -> None:
    challenge = served["challenges"][0]
    path = f"/prop/challenges/{challenge}{route}"
    assert _get(served, path, served["alice"]).status_code == 200
    other = _get(served, path, served["bob"])
    missing = _get(served, f"/prop/challenges/999999{route}", served["bob"])
    assert other.status_code == missing.status_code == 404
    assert other.json()["error"]["code"] == "not_found"
    assert _get(served, path, None).status_code == 401


def test_the_risk_views_count_the_deal_breaches_and_the_flag(
    served: dict[str, Any],
) -> None:
    assert served["views"]["rules"] == [
        ("max_position_size", "critical", 1),
        ("short_hold", "critical", 1),
        ("weekend_hold", "critical", 1),
    ]
    assert served["views"]["flags"] == [("alice@example.com", 1, 2)]
