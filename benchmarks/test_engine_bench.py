"""Engine throughput: ticks/s in-process at 1k, 100k and 1M accounts, beside a
dense per-account baseline loop on the same ticks.

Two orders of the same ticks: ``by_account`` (sorted by account then time) and
``by_time`` (all accounts interleaved in time order, as a stream delivers them).
Two ways in: ``batches`` judges the whole stream on a fresh engine in batches of
1M ticks (``process_arrow``, the service's path: one metric row per phase per
batch), ``whole`` judges it in one ``process_unordered`` call (the backtest's
path: the core groups the rows by account itself).

Each round runs the engine and then ``prop_stream.rules.dense_baseline`` (the
least a rules engine does per tick, on a dense array of 40-byte states, in
arrival order) on
the same ticks, so the ratio is taken side by side. ``PROP_STREAM_BENCH_SMOKE=1``
shrinks everything for CI.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from prop_stream import PhaseSpec, RuleEngine
from prop_stream.rules import dense_baseline

SMOKE = os.environ.get("PROP_STREAM_BENCH_SMOKE") == "1"
TICKS = 100_000 if SMOKE else 10_000_000
BATCH = 1_000_000
START = datetime(2026, 1, 5, tzinfo=UTC)
RULES = {
    "initial_balance": 100_000,
    "profit_target": 0.1,
    "max_daily_loss": 0.05,
    "max_total_loss": 0.1,
    "total_loss_mode": "trailing",
    "warning_level": 0.8,
    "min_trading_days": 4,
    "timezone": "Europe/Prague",
}


def make_ticks(accounts: int, ticks: int, order: str) -> pa.Table:
    rng = np.random.default_rng(7)
    t0 = int(START.timestamp() * 1_000_000)
    account = rng.integers(1, accounts + 1, ticks)
    ts = t0 + np.sort(rng.integers(0, 3 * 86_400_000_000, ticks))
    # A random walk per tick is enough: the engine's cost does not depend on it.
    equity = 100_000 + np.cumsum(rng.normal(0, 2, ticks)) % 3_000
    if order == "by_account":
        idx = np.lexsort((ts, account))
        account, ts, equity = account[idx], ts[idx], equity[idx]
    return pa.table(
        {
            "account_id": pa.array(account, pa.int64()),
            "ts": pa.array(ts, pa.timestamp("us", "UTC")),
            "equity": equity,
            "balance": np.full(ticks, 100_000.0),
        }
    )


def fresh_engine(accounts: int) -> RuleEngine:
    engine = RuleEngine()
    for account in range(1, accounts + 1):
        engine.register(PhaseSpec(account, f"c-{account}", 0, START, RULES))
    return engine


ACCOUNTS = [1_000, 100_000, 1_000_000]


@pytest.mark.parametrize("path", ["batches", "whole"])
@pytest.mark.parametrize("order", ["by_account", "by_time"])
@pytest.mark.parametrize("accounts", [a // 100 if SMOKE else a for a in ACCOUNTS])
@pytest.mark.benchmark(group="engine-ticks")
def test_engine_throughput(
    benchmark: Any, accounts: int, order: str, path: str
) -> None:
    table = make_ticks(accounts, TICKS, order)
    batches = [table.slice(i, BATCH) for i in range(0, TICKS, BATCH)]

    def judge(engine: RuleEngine) -> list[Any]:
        if path == "whole":
            return [engine.process_unordered(table)[0].counts]
        return [engine.process_arrow(b).counts for b in batches]

    # Correctness first: every tick is accounted for, none unknown or invalid, and
    # the engine judged each phase's ticks (its tick counter matches).
    check = fresh_engine(accounts)
    counts = judge(check)
    assert sum(c.evaluated + c.late + c.inactive for c in counts) == TICKS
    assert sum(c.unknown + c.invalid for c in counts) == 0
    assert check.phases()["ticks"].sum() == sum(c.evaluated for c in counts)
    judged, _ = dense_baseline(table)
    assert judged == TICKS

    baseline: list[float] = []

    def setup() -> tuple[tuple[RuleEngine], dict[str, Any]]:
        return (fresh_engine(accounts),), {}

    def run(engine: RuleEngine) -> None:
        judge(engine)
        # The baseline right after, on the same ticks: a side-by-side ratio.
        started = time.perf_counter()
        dense_baseline(table)
        baseline.append(time.perf_counter() - started)

    rounds = 1 if SMOKE else 3
    benchmark.pedantic(run, setup=setup, rounds=rounds)
    if not SMOKE:
        # The benchmark's time includes the baseline's: take it out.
        engine_s = min(
            t - b for t, b in zip(benchmark.stats.stats.data, baseline, strict=True)
        )
        base_s = min(baseline)
        benchmark.extra_info["ticks_per_s"] = TICKS / engine_s
        benchmark.extra_info["baseline_ticks_per_s"] = TICKS / base_s
        benchmark.extra_info["engine_over_baseline"] = engine_s / base_s
        print(
            f"\n{accounts} accounts {order} {path}: "
            f"engine {TICKS / engine_s / 1e6:.1f}M ticks/s, "
            f"baseline {TICKS / base_s / 1e6:.1f}M, "
            f"ratio {engine_s / base_s:.2f}x"
        )


#: The deal rules on top of :data:`RULES` for the deals case.
DEAL_RULES = {
    **RULES,
    "trading_day_basis": "deals",
    "max_open_lots": 5.0,
    "min_hold_seconds": 1,
    "weekend_close": "FRI 22:00",
    # Flag rather than fail: the random deals scalp now and then, and a failed
    # phase would skip the rest of its events.
    "deal_violation_action": "flag",
}
#: One deal per this many ticks.
TICKS_PER_DEAL = 10


def make_deals(ticks: pa.Table, batch: int) -> list[pa.Table]:
    """One deal per :data:`TICKS_PER_DEAL` ticks, per batch of ``batch`` ticks.

    Each deal takes the account and ``ts`` of a random tick and is delivered right
    before it (``before_tick``); an account's deals alternate ``in`` and ``out`` on
    one position at a time, so positions open and close all along.
    """
    rng = np.random.default_rng(11)
    n = ticks.num_rows
    rows = np.sort(rng.choice(n, n // TICKS_PER_DEAL, replace=False))
    account = ticks.column("account_id").to_numpy()[rows]
    ts = ticks.column("ts").cast(pa.int64()).to_numpy()[rows]
    # The how-many-th deal of its account each deal is (stable by row).
    by_account = np.argsort(account, kind="stable")
    sorted_accounts = account[by_account]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_accounts)) + 1]
    run_lengths = np.diff(np.r_[starts, len(rows)])
    rank_sorted = np.arange(len(rows)) - np.repeat(starts, run_lengths)
    rank = np.empty_like(rank_sorted)
    rank[by_account] = rank_sorted
    deals = pa.table(
        {
            "account_id": pa.array(account, pa.int64()),
            "ts": pa.array(ts, pa.timestamp("us", "UTC")),
            "deal_id": pa.array(rows, pa.int64()),
            "position_id": pa.array(rank // 2, pa.int64()),
            "symbol": pa.array(np.where(rank % 4 < 2, "EURUSD", "XAUUSD")),
            "side": pa.array(np.where(rank % 3 == 0, "buy", "sell")),
            "volume": pa.array(np.full(len(rows), 0.5)),
            "price": pa.array(np.full(len(rows), 1.1)),
            "entry": pa.array(np.where(rank % 2 == 0, "in", "out")),
            "before_tick": pa.array(rows % batch, pa.int64()),
        }
    )
    first_batch = rows // batch
    return [
        deals.filter(pa.array(first_batch == k))
        for k in range((n + batch - 1) // batch)
    ]


def fresh_deal_engine(accounts: int) -> RuleEngine:
    engine = RuleEngine()
    for account in range(1, accounts + 1):
        engine.register(PhaseSpec(account, f"c-{account}", 0, START, DEAL_RULES))
    return engine


@pytest.mark.parametrize("order", ["by_account", "by_time"])
@pytest.mark.parametrize("accounts", [a // 100 if SMOKE else a for a in ACCOUNTS[:2]])
@pytest.mark.benchmark(group="engine-ticks-deals")
def test_engine_throughput_with_deals(
    benchmark: Any, accounts: int, order: str
) -> None:
    """The same ticks with one deal per ten ticks, under every deal rule."""
    table = make_ticks(accounts, TICKS, order)
    batches = [table.slice(i, BATCH) for i in range(0, TICKS, BATCH)]
    deal_batches = make_deals(table, BATCH)

    check = fresh_deal_engine(accounts)
    evaluations = [
        check.process_arrow(b, d) for b, d in zip(batches, deal_batches, strict=True)
    ]
    deals = sum(d.num_rows for d in deal_batches)
    counted = [e.deal_counts for e in evaluations]
    assert sum(c.processed + c.late + c.inactive for c in counted) == deals
    assert sum(c.unknown + c.invalid + c.duplicate for c in counted) == 0
    assert sum(c.processed for c in counted) > deals // 2
    assert check.phases()["deals"].sum() == sum(c.processed for c in counted)

    def setup() -> tuple[tuple[RuleEngine], dict[str, Any]]:
        return (fresh_deal_engine(accounts),), {}

    def run(engine: RuleEngine) -> None:
        for b, d in zip(batches, deal_batches, strict=True):
            engine.process_arrow(b, d)

    benchmark.pedantic(run, setup=setup, rounds=1 if SMOKE else 3)
    if not SMOKE:
        seconds = benchmark.stats.stats.min
        benchmark.extra_info["ticks_per_s"] = TICKS / seconds
        print(
            f"\n{accounts} accounts {order} + deals: "
            f"{TICKS / seconds / 1e6:.1f}M ticks/s, "
            f"{deals / seconds / 1e6:.2f}M deals/s"
        )
