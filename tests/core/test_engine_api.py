"""The engine's Python API: registration, batches, grouping paths, snapshots."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from prop_stream import (
    BREACH_KEY,
    DAILY_KEY,
    PhaseSpec,
    RuleConfigError,
    RuleEngine,
    SnapshotError,
    TickBatchError,
    normalize_ticks,
    validate_rules,
)
from prop_stream.rules import rules_key

START = datetime(2026, 3, 27, tzinfo=UTC)
RULES = {
    "initial_balance": 10_000,
    "profit_target": 0.08,
    "max_daily_loss": 0.04,
    "daily_loss_action": "pause",
    "max_total_loss": 0.08,
    "total_loss_mode": "trailing_eod",
    "warning_level": 0.5,
    "min_trading_days": 2,
    "timezone": "Europe/Prague",
    "day_rollover": "02:30",
}


def _engine(accounts: int, grouping: str = "auto") -> RuleEngine:
    engine = RuleEngine(grouping=grouping)  # type: ignore[arg-type]  # tests pass str
    for a in range(accounts):
        engine.register(PhaseSpec(a, f"c-{a}", 0, START, RULES))
    return engine


def _stream(accounts: int, n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    acc = rng.integers(0, accounts + 2, n)  # two unknown accounts
    ts = np.sort(rng.integers(0, 4 * 86_400_000_000, n))
    # A few out-of-order ticks make late ones.
    ts[rng.integers(0, n, n // 50)] -= 3_600_000_000
    equity = 10_000 + rng.normal(0, 1, n).cumsum() * 15
    balance = np.where(rng.random(n) < 0.3, equity, 10_000.0)
    return pl.DataFrame(
        {
            "account_id": acc,
            "ts": pl.Series(ts + int(START.timestamp() * 1e6)).cast(
                pl.Datetime("us", "UTC")
            ),
            "equity": equity,
            "balance": balance,
        }
    )


def _final(engine: RuleEngine, frames: list[pl.DataFrame]) -> dict[str, pl.DataFrame]:
    outs = [engine.process(f) for f in frames]
    breaches = pl.concat([o.breaches for o in outs]).unique(
        subset=list(BREACH_KEY), keep="last", maintain_order=True
    )
    daily = pl.concat([o.daily for o in outs]).unique(
        subset=list(DAILY_KEY), keep="last", maintain_order=True
    )
    return {
        "breaches": breaches.sort(BREACH_KEY),
        "daily": daily.sort(DAILY_KEY),
        "transitions": pl.concat([o.transitions for o in outs]).sort("account_id"),
        "phases": engine.phases().sort("account_id"),
    }


@pytest.mark.parametrize("accounts", [3, 5000])
def test_engine_grouping_paths_agree(accounts: int) -> None:
    ticks = _stream(accounts, 60_000, seed=accounts)
    batches = [ticks.slice(i, 7_000) for i in range(0, ticks.height, 7_000)]
    grouped = _final(_engine(accounts, "always"), batches)
    direct = _final(_engine(accounts, "never"), batches)
    assert grouped["breaches"].height > 0
    for name, frame in grouped.items():
        assert frame.equals(direct[name]), name


@pytest.mark.parametrize(
    "spread",
    [
        # Compact ids (the engine's table lookup) and ids far apart (its hash map),
        # including the ends of the int64 range.
        lambda a: a,
        lambda a: 7_000_000 + a,
        lambda a: a * 1_000_003 - 40_000_000,
        lambda a: [-(2**63), 2**63 - 1, 0, -1, 1][a] if a < 5 else a * 2**40,
    ],
    ids=["compact", "offset", "spread", "extremes"],
)
def test_account_ids_map_to_their_phases_however_spread(
    spread: Callable[[int], int],
) -> None:
    accounts = 300
    ticks = _stream(accounts, 20_000, seed=11)  # accounts 0..301: two unknown
    ids = {a: spread(a) for a in range(accounts + 2)}
    mapped = ticks.with_columns(
        pl.col("account_id").replace_strict(ids, return_dtype=pl.Int64)
    )
    engine = RuleEngine()
    for a in range(accounts):
        engine.register(PhaseSpec(ids[a], f"c-{a}", 0, START, RULES))
    # Neighbours of every registered id (inside and just outside the id range)
    # have no phase.
    strays = [ids[a] + d for a in (0, accounts - 1) for d in (-1, 1)]
    strays = [s for s in strays if s not in ids.values() and -(2**63) <= s < 2**63]
    stray_ticks = pl.DataFrame(
        {
            "account_id": strays,
            "ts": [START + timedelta(hours=1)] * len(strays),
            "equity": [10_000.0] * len(strays),
            "balance": [10_000.0] * len(strays),
        },
        schema=mapped.schema,
    )
    batches = [mapped.slice(i, 5_000) for i in range(0, mapped.height, 5_000)]
    counts = engine.process(stray_ticks).counts
    assert counts.unknown == len(strays)
    assert counts.evaluated == 0
    got = _final(engine, batches)
    base = _final(
        _engine(accounts), [ticks.slice(i, 5_000) for i in range(0, 20_000, 5_000)]
    )
    back = {v: k for k, v in ids.items()}
    keys = {
        "breaches": list(BREACH_KEY),
        "daily": list(DAILY_KEY),
        "transitions": ["account_id"],
        "phases": ["account_id"],
    }
    assert got["breaches"].height > 0
    for name, frame in got.items():
        restored = frame.with_columns(
            pl.col("account_id").replace_strict(back, return_dtype=pl.Int64)
        ).sort(keys[name])
        assert restored.equals(base[name].sort(keys[name])), name


def test_engine_snapshot_restore_continues_exactly() -> None:
    ticks = _stream(50, 20_000, seed=3)
    head, tail = ticks.slice(0, 9_000), ticks.slice(9_000)
    whole = _engine(50)
    expected = _final(whole, [head, tail])
    first = _engine(50)
    first_part = _final(first, [head])
    restored = RuleEngine.restore(first.snapshot())
    second_part = _final(restored, [tail])
    breaches = (
        pl.concat([first_part["breaches"], second_part["breaches"]])
        .unique(subset=list(BREACH_KEY), keep="last", maintain_order=True)
        .sort(BREACH_KEY)
    )
    assert breaches.equals(expected["breaches"])
    assert second_part["phases"].equals(expected["phases"])


def test_engine_register_twice_is_refused() -> None:
    engine = _engine(1)
    with pytest.raises(RuleConfigError) as info:
        engine.register(PhaseSpec(0, "other", 0, START, RULES))
    assert info.value.field == "account_id"


def test_equal_rule_sets_are_built_once_but_judged_by_their_own_values() -> None:
    # The engine builds each distinct rule set once; values equal in Python but
    # of another type (True == 1) must still be validated on their own.
    engine = RuleEngine()
    engine.register(PhaseSpec(1, "c1", 0, START, {**RULES, "initial_balance": 1}))
    engine.register(PhaseSpec(2, "c2", 0, START, {**RULES, "initial_balance": 1}))
    with pytest.raises(RuleConfigError) as info:
        engine.register(
            PhaseSpec(3, "c3", 0, START, {**RULES, "initial_balance": True})
        )
    assert info.value.field == "initial_balance"
    # Two phases sharing a built rule set are judged independently.
    engine.register(PhaseSpec(4, "c4", 0, START, dict(RULES)))
    engine.register(PhaseSpec(5, "c5", 0, START, dict(RULES)))
    ticks = pl.DataFrame(
        {
            "account_id": [4, 5],
            "ts": [START + timedelta(hours=1)] * 2,
            "equity": [10_000.0, 9_000.0],
            "balance": [10_000.0, 10_000.0],
        }
    )
    out = engine.process(ticks)
    assert out.breaches["account_id"].to_list() == [5]


def test_rules_key_keeps_types_apart_and_gives_up_on_unhashable_values() -> None:
    assert rules_key({"a": 1, "b": "x"}) == rules_key({"a": 1, "b": "x"})
    assert rules_key({"a": 1}) != rules_key({"a": 1.0})
    assert rules_key({"a": 1}) != rules_key({"a": True})
    assert rules_key({"a": 1}) != rules_key({"b": 1})
    assert rules_key({"a": [1]}) is None


def test_engine_remove_forgets_phase() -> None:
    engine = _engine(3)
    assert engine.remove(1)
    assert not engine.remove(1)
    assert 1 not in engine
    assert len(engine) == 2
    out = engine.process(_stream(3, 300, seed=1))
    assert set(out.metrics["account_id"]) <= {0, 2}
    # The account can hold a new phase afterwards.
    engine.register(PhaseSpec(1, "c-new", 1, START, RULES))
    assert 1 in engine


def test_engine_rejects_bad_snapshot() -> None:
    with pytest.raises(SnapshotError):
        RuleEngine.restore(b"not a snapshot")
    data = _engine(2).snapshot()
    with pytest.raises(SnapshotError):
        RuleEngine.restore(data[:-3])


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pl.DataFrame({"account_id": [1], "ts": [START]}), "equity"),
        (
            pl.DataFrame(
                {"account_id": [1], "ts": [START], "equity": [None], "balance": [1.0]},
                schema_overrides={"equity": pl.Float64},
            ),
            "nulls",
        ),
        (
            pl.DataFrame(
                {"account_id": [1], "ts": ["x"], "equity": [1.0], "balance": [1.0]}
            ),
            "ts",
        ),
    ],
)
def test_engine_bad_batch_names_column(frame: pl.DataFrame, message: str) -> None:
    with pytest.raises(TickBatchError, match=message):
        _engine(1).process(frame)


def test_engine_counts_invalid_and_unknown_ticks() -> None:
    engine = _engine(1)
    ts = [START + timedelta(hours=h) for h in range(4)]
    out = engine.process(
        pl.DataFrame(
            {
                "account_id": [0, 0, 99, 0],
                "ts": ts,
                "equity": [10_000.0, float("nan"), 1.0, float("inf")],
                "balance": [10_000.0, 10_000.0, 1.0, 10_000.0],
            }
        )
    )
    assert (out.counts.evaluated, out.counts.invalid, out.counts.unknown) == (1, 2, 1)


def test_engine_epoch_millis_and_naive_ts_are_utc() -> None:
    ms = int(START.timestamp() * 1000) + 3_600_000
    a = _engine(1).process(
        pl.DataFrame(
            {"account_id": [0], "ts": [ms], "equity": [9_000.0], "balance": [1e4]}
        )
    )
    b = _engine(1).process(
        pl.DataFrame(
            {
                "account_id": [0],
                "ts": [START.replace(tzinfo=None) + timedelta(hours=1)],
                "equity": [9_000.0],
                "balance": [1e4],
            }
        )
    )
    assert a.metrics.equals(b.metrics)


def test_validate_rules_fills_defaults() -> None:
    rules = validate_rules({"initial_balance": 5_000})
    assert rules["total_loss_mode"] == "static"
    assert rules["day_rollover"] == "00:00"
    assert rules["profit_target"] is None


def test_engine_releases_the_gil_while_judging() -> None:
    # While one thread is inside the engine, another Python thread keeps running.
    # With the GIL held it could not record a single step inside that window.
    n = 8_000_000
    rng = np.random.default_rng(5)
    table = normalize_ticks(
        pl.DataFrame(
            {
                "account_id": np.zeros(n, dtype=np.int64),
                "ts": pl.Series(
                    np.arange(n) * 1000 + int(START.timestamp() * 1e6)
                ).cast(pl.Datetime("us", "UTC")),
                "equity": 10_000 + rng.normal(0, 1, n),
                "balance": np.full(n, 10_000.0),
            }
        )
    )
    engine = RuleEngine()
    engine.register(PhaseSpec(0, "c", 0, START, {"initial_balance": 10_000}))
    window: list[float] = []
    steps: list[float] = []
    started = threading.Event()

    def judge() -> None:
        started.set()
        window.append(time.perf_counter())
        engine.process_arrow(table)
        window.append(time.perf_counter())

    worker = threading.Thread(target=judge)
    worker.start()
    started.wait()
    while worker.is_alive():
        steps.append(time.perf_counter())
    worker.join()
    assert gil_free_share(window[0], window[1], steps) > 0.5


def gil_free_share(start: float, end: float, steps: list[float]) -> float:
    """Share of [start, end] with no gap longer than half of it in `steps`.

    A call that holds the GIL leaves one gap as long as itself in the other thread's
    steps; one that releases it leaves only scheduling gaps.
    """
    points = [start, *(t for t in steps if start < t < end), end]
    longest = max(b - a for a, b in itertools.pairwise(points))
    return 1 - longest / (end - start)


def test_gil_free_share_detects_a_gil_holding_call() -> None:
    # sorted() of floats runs in C without releasing the GIL: the check must fail.
    data = [float(i % 7919) for i in range(2_000_000)]
    window: list[float] = []
    steps: list[float] = []
    started = threading.Event()

    def hold() -> None:
        started.set()
        window.append(time.perf_counter())
        sorted(data)
        window.append(time.perf_counter())

    worker = threading.Thread(target=hold)
    worker.start()
    started.wait()
    while worker.is_alive():
        steps.append(time.perf_counter())
    worker.join()
    assert gil_free_share(window[0], window[1], steps) < 0.5
