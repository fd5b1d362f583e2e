"""The backtest without a table sort equals the backtest of the sorted ticks.

The backtest's contract: the ticks are stably sorted by (``account_id``, ``ts``)
over the files concatenated in path order, then judged. The reference here does
exactly that in polars (concatenate, stable sort) and feeds the sorted frame to
:meth:`RuleEngine.process` in chunks, as the backtest did before the Rust core
ordered the ticks itself; the backtest (in memory, through partitions, and from a
frame) must give the same tables bit for bit.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from prop_stream import PhaseSpec, RuleEngine, TickBatchError
from prop_stream.backtest import OUTPUT_TABLES, read_rules, run_backtest
from prop_stream.backtest import run as run_module
from prop_stream.backtest.flags import FLAGS_SCHEMA
from prop_stream.backtest.frames import backtest
from prop_stream.cli import main

START = datetime(2026, 1, 5, tzinfo=UTC)
ACCOUNTS = (1001, 1002, 1003, 1004, 1005)

_RULES: list[dict[str, Any]] = [
    {"max_total_loss": 0.05, "max_daily_loss": 0.03, "warning_level": 0.5},
    {
        "max_total_loss": 0.06,
        "total_loss_mode": "trailing",
        "profit_target": 0.04,
        "min_trading_days": 1,
    },
    {
        "max_daily_loss": 0.02,
        "daily_loss_action": "pause",
        "daily_reference": "day_start_max",
        "warning_level": 0.5,
        "timezone": "America/New_York",
    },
    {"max_total_loss": 0.08, "total_loss_mode": "trailing_eod"},
    {"max_daily_loss": 0.04, "daily_loss_base": "day_start", "warning_level": 0.7},
]


def rules_doc() -> dict[str, Any]:
    return {
        "accounts": [
            {
                "account_id": account,
                "challenge_id": f"c-{account}",
                "phase_index": 0,
                # The last account starts later: its first ticks are late.
                "started_at": (START + timedelta(hours=12 * (i == 4))).isoformat(),
                "rules": {"initial_balance": 100_000, **rules},
            }
            for i, (account, rules) in enumerate(zip(ACCOUNTS, _RULES, strict=True))
        ]
    }


@st.composite
def tick_files(draw: st.DrawFn) -> list[pl.DataFrame]:
    """Ticks on few distinct timestamps (many ties, within and across files),
    wide equity swings (warnings, pauses, passes and failures), an unknown
    account, split into one to four files."""
    n = draw(st.integers(1, 160))
    rows = draw(
        st.lists(
            st.tuples(
                st.sampled_from((*ACCOUNTS, 4242)),
                st.integers(0, 30),  # hour of the test window: many equal ts
                st.integers(-80, 80),  # equity offset, in 100 $
                st.integers(-20, 20),  # balance offset, in 100 $
            ),
            min_size=n,
            max_size=n,
        )
    )
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    frame = pl.DataFrame(
        {
            "account_id": [r[0] for r in rows],
            "ts": [START + timedelta(hours=r[1] * 3) for r in rows],
            "equity": [100_000.0 + 100.0 * r[2] for r in rows],
            "balance": [100_000.0 + 100.0 * r[3] for r in rows],
        },
        schema={
            "account_id": pl.Int64,
            "ts": pl.Datetime("us", "UTC"),
            "equity": pl.Float64,
            "balance": pl.Float64,
        },
    )
    bounds = [0, *cuts, n]
    return [frame[a:b] for a, b in itertools.pairwise(bounds)]


def write_files(root: Path, parts: list[pl.DataFrame]) -> Path:
    ticks = root / "ticks"
    ticks.mkdir()
    for i, part in enumerate(parts):
        # Path order is the tiebreak: zero-padded names sort as numbers do.
        part.write_parquet(ticks / f"part-{i:03d}.parquet")
    return ticks


def reference(rules: Path, parts: list[pl.DataFrame]) -> dict[str, pl.DataFrame]:
    """The tables of the old way: a stable polars sort, then the engine in chunks."""
    ordered = pl.concat(parts).sort(["account_id", "ts"], maintain_order=True)
    engine = RuleEngine()
    for spec in read_rules(rules):
        engine.register(spec)
    upserts = run_module._Upserts()
    for offset in range(0, ordered.height, 7):
        upserts.add(engine.process(ordered.slice(offset, 7)))
    return run_module.BacktestTables(
        breaches=run_module._breaches_table(upserts.breaches()),
        accounts=run_module._accounts_table(engine.phases()),
        daily=run_module._daily_table(upserts.daily()),
        flags=pl.DataFrame(schema=FLAGS_SCHEMA),
    ).as_dict()


def read_outputs(out: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(out / f"{name}.parquet") for name in OUTPUT_TABLES}


def assert_tables_equal(
    got: dict[str, pl.DataFrame], expected: dict[str, pl.DataFrame]
) -> None:
    for name in OUTPUT_TABLES:
        assert_frame_equal(got[name], expected[name], check_exact=True)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(parts=tick_files(), max_rows=st.sampled_from((1, 5, 10**9)))
def test_backtest_equals_sorted_in_polars(
    tmp_path_factory: pytest.TempPathFactory,
    parts: list[pl.DataFrame],
    max_rows: int,
) -> None:
    root = tmp_path_factory.mktemp("order")
    rules = root / "rules.json"
    rules.write_text(json.dumps(rules_doc()))
    ticks = write_files(root, parts)
    expected = reference(rules, parts)

    out = root / "out"
    result = run_backtest(rules, ticks, out, max_rows_in_memory=max_rows)
    total = sum(p.height for p in parts)
    # 1 and 5 rows in memory force the partitioned (larger than memory) path.
    assert (result.partitions > 0) == (total > max_rows)
    assert_tables_equal(read_outputs(out), expected)
    # The notebook API, from the same frame in memory.
    tables = backtest(rules, pl.concat(parts))
    assert_tables_equal(tables.as_dict(), expected)


def test_ties_at_equal_ts_across_files_keep_path_order(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(rules_doc()))
    moment = START + timedelta(hours=1)
    # One account, one instant, in three files; the files' rows are reversed in
    # account order so that the grouping must move them.
    parts = [
        pl.DataFrame(
            {
                "account_id": [1002, 1001],
                "ts": [moment, moment],
                "equity": [100_000.0 + k, 100_100.0 + k],
                "balance": [100_000.0, 100_000.0],
            },
            schema_overrides={"ts": pl.Datetime("us", "UTC")},
        )
        for k in (1.0, 2.0, 3.0)
    ]
    ticks = write_files(tmp_path, parts)
    for max_rows in (1, 2, 10**9):
        out = tmp_path / f"out-{max_rows}"
        run_backtest(rules, ticks, out, max_rows_in_memory=max_rows)
        daily = read_outputs(out)["daily"].filter(pl.col("account_id") == 1001)
        assert daily.select("daily_start_equity", "close_equity").row(0) == (
            100_101.0,
            100_103.0,
        )
        assert_tables_equal(read_outputs(out), reference(rules, parts))


def _engine(accounts: int) -> RuleEngine:
    engine = RuleEngine()
    for account in range(1, accounts + 1):
        engine.register(
            PhaseSpec(account, f"c-{account}", 0, START, {"initial_balance": 1e5})
        )
    return engine


def _ticks(order: np.ndarray[Any, np.dtype[np.int64]]) -> pl.DataFrame:
    n = len(order)
    return pl.DataFrame(
        {
            "account_id": (order % 50) + 1,
            "ts": [START + timedelta(seconds=int(s)) for s in order],
            "equity": np.full(n, 100_000.0),
            "balance": np.full(n, 100_000.0),
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )


def test_only_out_of_order_accounts_are_sorted() -> None:
    in_order = _ticks(np.arange(1_000))
    evaluation, order = _engine(50).process_unordered(in_order)
    assert (order.runs, order.sorted_runs) == (50, 0)
    assert evaluation.counts.evaluated == 1_000

    # Swap two ticks of account 1 (rows 0 and 50): only that account is sorted.
    swapped = np.arange(1_000)
    swapped[[0, 50]] = swapped[[50, 0]]
    evaluation, order = _engine(50).process_unordered(_ticks(swapped))
    assert (order.runs, order.sorted_runs) == (50, 1)
    assert (evaluation.counts.evaluated, evaluation.counts.late) == (1_000, 0)


def test_seq_column_orders_ties_and_is_checked() -> None:
    moment = START + timedelta(hours=1)
    frame = pl.DataFrame(
        {
            "account_id": [1, 1, 1],
            "ts": [moment] * 3,
            "equity": [100_003.0, 100_001.0, 100_002.0],
            "balance": [100_000.0] * 3,
            "seq": pl.Series([3, 1, 2], dtype=pl.UInt64),
        },
        schema_overrides={"ts": pl.Datetime("us", "UTC")},
    )
    engine = _engine(1)
    evaluation, order = engine.process_unordered(frame, seq_column="seq")
    assert order.sorted_runs == 1
    assert evaluation.daily.select("daily_start_equity", "close_equity").row(0) == (
        100_001.0,
        100_003.0,
    )
    with pytest.raises(TickBatchError, match="seq"):
        _engine(1).process_unordered(
            frame.with_columns(pl.col("seq").cast(pl.Int64)), seq_column="seq"
        )
    with pytest.raises(TickBatchError, match="missing column nope"):
        _engine(1).process_unordered(frame, seq_column="nope")
    with pytest.raises(TickBatchError, match="equity"):
        _engine(1).process_unordered(frame.drop("equity"))


def _wide_engine(accounts: int) -> RuleEngine:
    engine = RuleEngine()
    for account in range(1, accounts + 1):
        rules = {"initial_balance": 100_000, **_RULES[account % len(_RULES)]}
        engine.register(PhaseSpec(account, f"c-{account}", 0, START, rules))
    return engine


def _split_input(accounts: int, n: int) -> pl.DataFrame:
    """Ticks large enough for the core to split the phases among threads (at
    least 2^16 rows and 1,024 phases a thread): interleaved in time with wide
    swings (breaches, pauses, passes, failures), one account in ten shuffled."""
    rng = np.random.default_rng(5)
    account = rng.integers(1, accounts + 1, n)
    seconds = np.sort(rng.integers(0, 5 * 86_400, n))
    shuffled = np.flatnonzero(account % 10 == 0)
    seconds[shuffled] = rng.permutation(seconds[shuffled])
    return pl.DataFrame(
        {
            "account_id": account,
            "ts": pl.Series(START.timestamp() * 1e6 + seconds * 1e6).cast(pl.Int64),
            "equity": 100_000.0 + rng.normal(0, 1_500, n).round(2),
            "balance": 100_000.0,
        }
    ).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))


def test_threads_give_the_outputs_of_one_thread() -> None:
    accounts = 4_096
    frame = _split_input(accounts, 200_000)
    expected, expected_order = _wide_engine(accounts).process_unordered(
        frame, threads=1
    )
    assert expected.breaches.height
    assert expected.transitions.height
    assert expected_order.sorted_runs > 0
    for threads in (2, 3):
        engine = _wide_engine(accounts)
        got, order = engine.process_unordered(frame, threads=threads)
        assert order == expected_order
        assert got.counts == expected.counts
        for name in ("breaches", "metrics", "daily", "transitions"):
            assert_frame_equal(getattr(got, name), getattr(expected, name))
    # And the one-thread outputs are those of the sorted ticks in one batch
    # (in another row order: blocks of rows in arrival order, not accounts).
    reference = _wide_engine(accounts).process(
        frame.sort("account_id", "ts", maintain_order=True)
    )
    for name in ("breaches", "daily", "transitions"):
        got, want = getattr(expected, name), getattr(reference, name)
        assert_frame_equal(got.sort(got.columns), want.sort(want.columns))


def test_backtest_threads_option_changes_nothing_but_the_threads(
    tmp_path: Path,
) -> None:
    accounts = 2_048
    doc = {
        "accounts": [
            {
                "account_id": a,
                "challenge_id": f"c-{a}",
                "started_at": START.isoformat(),
                "rules": {"initial_balance": 100_000, **_RULES[a % len(_RULES)]},
            }
            for a in range(1, accounts + 1)
        ]
    }
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(doc))
    ticks = tmp_path / "ticks.parquet"
    _split_input(accounts, 100_000).write_parquet(ticks)
    one = run_backtest(rules, ticks, tmp_path / "one", threads=1)
    assert one.breaches
    assert one.passed + one.failed
    argv = ["backtest", "--rules", str(rules), "--ticks", str(ticks), "--out"]
    assert main([*argv, str(tmp_path / "two"), "--threads", "2"]) == 0
    assert main([*argv, str(tmp_path / "none"), "--threads", "0"]) == 2
    assert not (tmp_path / "none").exists()
    for name in OUTPUT_TABLES:
        assert_frame_equal(
            pl.read_parquet(tmp_path / "two" / f"{name}.parquet"),
            pl.read_parquet(tmp_path / "one" / f"{name}.parquet"),
        )
    tables = backtest(doc, pl.read_parquet(ticks), threads=2)
    assert_frame_equal(
        tables.daily, pl.read_parquet(tmp_path / "one" / "daily.parquet")
    )
