"""``prop-stream backtest --deals`` and ``prop_stream.backtest(..., deals=...)``.

The backtest of generated ticks and deals equals the plain-Python reference
(``tests/reference_deals.py``) run on the same events merged in the backtest's
order: breaches, the deal columns of ``accounts`` and the hedge flags; the
partitioned path (small ``--max-rows-in-memory``, small chunks) gives the same
files as the in-memory one; bad deal rows and bad rules keys are refused with
one line naming the file, row and field.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import Tick
from reference_deals import Deal, merge_events, run_deal_reference

import prop_stream
from prop_stream.backtest import OUTPUT_TABLES, run_backtest
from prop_stream.cli import main
from prop_stream.exceptions import InputFileError
from prop_stream.rules import PhaseSpec

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
START = datetime(2026, 3, 5, tzinfo=UTC)  # a Thursday
START_US = 1_772_668_800_000_000
ACCOUNTS = (1001, 1002, 1003)
CUSTOMERS = {1001: "alice", 1002: "alice", 1003: "bob"}
DEAL_COLUMNS = ("account_id", "ts", "deal_id", "position_id", "symbol", "side",
                "volume", "price", "entry")  # fmt: skip


def as_ts(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)


def micros(value: datetime) -> int:
    delta = value - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@st.composite
def rule_sets(draw: st.DrawFn) -> dict[str, Any]:
    rules: dict[str, Any] = {"initial_balance": 100_000, "max_total_loss": 0.1}
    if draw(st.booleans()):
        rules["max_open_lots"] = draw(st.sampled_from((1.0, 1.5, 0.5)))
    if draw(st.booleans()):
        rules["min_hold_seconds"] = draw(st.sampled_from((1, 60, 3_600)))
    if draw(st.booleans()):
        rules["weekend_close"] = draw(st.sampled_from(("FRI 17:00", "SAT 00:00")))
    rules["deal_violation_action"] = draw(st.sampled_from(("fail", "flag")))
    rules["trading_day_basis"] = draw(st.sampled_from(("activity", "deals")))
    return rules


@st.composite
def runs(draw: st.DrawFn) -> tuple[list[PhaseSpec], list[Tick], list[Deal]]:
    """Three accounts (two of alice's), ticks and deals over a few days."""
    phases = [PhaseSpec(a, f"c-{a}", 0, START, draw(rule_sets())) for a in ACCOUNTS]
    ticks: list[Tick] = []
    deals: list[Deal] = []
    next_deal = dict.fromkeys(ACCOUNTS, 1)
    for _ in range(draw(st.integers(0, 30))):
        account = draw(st.sampled_from(ACCOUNTS))
        ts = START_US + draw(
            st.sampled_from((-1, 0, 1, 30_000_000, 3_600_000_000, 86_400_000_000))
        ) * draw(st.integers(0, 3))
        if draw(st.booleans()):
            equity = draw(st.sampled_from((100_000.0, 101_000.0, 95_000.0)))
            ticks.append((account, ts, equity, 100_000.0))
            continue
        deal_id = next_deal[account]
        # Sometimes a deal_id again: a duplicate.
        next_deal[account] += draw(st.sampled_from((1, 1, 1, 0)))
        deals.append(
            Deal(
                account_id=account,
                ts=ts,
                deal_id=deal_id,
                position_id=draw(st.integers(1, 2)),
                symbol=draw(st.sampled_from(("EURUSD", "GOLD"))),
                side=draw(st.sampled_from(("buy", "sell"))),
                volume=draw(st.sampled_from((0.01, 0.5, 1.0, 1.005))),
                price=1.1,
                entry=draw(st.sampled_from(("in", "in", "out"))),
            )
        )
    return phases, ticks, deals


def tick_frame(ticks: list[Tick]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "account_id": [t[0] for t in ticks],
            "ts": [as_ts(t[1]) for t in ticks],
            "equity": [t[2] for t in ticks],
            "balance": [t[3] for t in ticks],
        },
        schema={"account_id": pl.Int64(), "ts": pl.Datetime("us", "UTC"),
                "equity": pl.Float64(), "balance": pl.Float64()},
    )  # fmt: skip


def deal_frame(deals: list[Deal]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            name: [as_ts(d.ts) if name == "ts" else getattr(d, name) for d in deals]
            for name in DEAL_COLUMNS
        },
        schema={"account_id": pl.Int64(), "ts": pl.Datetime("us", "UTC"),
                "deal_id": pl.Int64(), "position_id": pl.Int64(),
                "symbol": pl.String(), "side": pl.String(),
                "volume": pl.Float64(), "price": pl.Float64(),
                "entry": pl.String()},
    )  # fmt: skip


def rules_doc(phases: list[PhaseSpec], window: float | None = 60) -> dict[str, Any]:
    return {
        "hedge_window_seconds": window,
        "accounts": [
            {
                "account_id": p.account_id,
                "challenge_id": p.challenge_id,
                "started_at": "2026-03-05T00:00:00Z",
                "rules": dict(p.rules),
                "customer_id": CUSTOMERS[p.account_id],
            }
            for p in phases
        ],
    }


@settings(max_examples=60, deadline=None)
@given(runs(), st.sampled_from([None, 0.0, 60.0, 86_400.0]))
def test_the_backtest_of_ticks_and_deals_equals_the_reference(
    run: tuple[list[PhaseSpec], list[Tick], list[Deal]], window: float | None
) -> None:
    phases, ticks, deals = run
    expected = run_deal_reference(
        phases, merge_events(ticks, deals), customers=CUSTOMERS,
        hedge_window_seconds=window,
    )  # fmt: skip
    got = prop_stream.backtest(
        rules_doc(phases, window), tick_frame(ticks), deal_frame(deals)
    )
    breaches = [
        (r["account_id"], r["rule"], r["severity"], r["threshold"], r["actual"],
         r["action"], micros(r["ts"]), r["resolved"])
        for r in got.breaches.iter_rows(named=True)
    ]  # fmt: skip
    assert sorted(breaches) == sorted(
        (b.account_id, b.rule, b.severity, b.threshold, b.actual, b.action, b.ts,
         b.resolved)
        for b in expected.breaches.values()
    )  # fmt: skip
    accounts = {r["account_id"]: r for r in got.accounts.iter_rows(named=True)}
    for account, row in expected.deal_phases.items():
        mine = accounts[account]
        assert (
            mine["deals"], mine["late_deals"], mine["duplicate_deals"],
            mine["unmatched_deals"], mine["open_lots"], mine["open_positions"],
        ) == (
            row.deals, row.late_deals, row.duplicate_deals, row.unmatched_deals,
            row.open_lots, row.open_positions,
        )  # fmt: skip
    for account, phase in expected.phases.items():
        mine = accounts[account]
        assert (mine["status"], mine["trading_days"], mine["ticks"]) == (
            phase.status,
            phase.trading_days,
            phase.ticks,
        )
    flags = [
        {**r, "ts_1": micros(r["ts_1"]), "ts_2": micros(r["ts_2"])}
        for r in got.flags.iter_rows(named=True)
    ]
    assert flags == [asdict(f) for f in expected.flags]


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(runs())
def test_partitions_and_chunks_change_nothing(
    tmp_path_factory: pytest.TempPathFactory,
    run: tuple[list[PhaseSpec], list[Tick], list[Deal]],
) -> None:
    phases, ticks, deals = run
    tmp = tmp_path_factory.mktemp("deals")
    rules = tmp / "rules.json"
    rules.write_text(json.dumps(rules_doc(phases)))
    tick_frame(ticks).write_parquet(tmp / "ticks.parquet")
    (tmp / "deals").mkdir()
    half = len(deals) // 2
    deal_frame(deals[:half]).write_csv(tmp / "deals" / "a.csv")
    deal_frame(deals[half:]).write_parquet(tmp / "deals" / "b.parquet")
    whole = run_backtest(rules, tmp / "ticks.parquet", tmp / "one", deals=tmp / "deals")
    split = run_backtest(
        rules, tmp / "ticks.parquet", tmp / "two", deals=tmp / "deals",
        max_rows_in_memory=3, chunk_rows=2,
    )  # fmt: skip
    assert split.partitions >= 2 or len(ticks) + len(deals) <= 3
    assert (whole.deals, whole.flags) == (split.deals, split.flags)
    for name in OUTPUT_TABLES:
        assert pl.read_parquet(tmp / "one" / f"{name}.parquet").equals(
            pl.read_parquet(tmp / "two" / f"{name}.parquet")
        ), name
        assert (tmp / "one" / f"{name}.csv").read_text() == (
            tmp / "two" / f"{name}.csv"
        ).read_text()


# ------------------------------------------------------------------- refusals

GOOD = "1001,2026-03-05T09:00:00Z,1,1,EURUSD,buy,1.0,1.08,in"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("1001,2026-03-05T09:00:00Z,1,1,EURUSD,hold,1.0,1.08,in",
         "column side, line 3: must be buy or sell, got 'hold'"),
        ("1001,2026-03-05T09:00:00Z,1,1,EURUSD,buy,1.0,1.08,inn",
         "column entry, line 3: must be in or out, got 'inn'"),
        ("1001,2026-03-05T09:00:00Z,1,1,EURUSD,buy,0,1.08,in",
         "column volume, line 3: must be a finite number of lots >= 0.01"),
        ("1001,2026-03-05T09:00:00Z,1,1,EURUSD,buy,0.005,1.08,in",
         "column volume, line 3"),
        ("1001,2026-03-05T09:00:00Z,1,1,EURUSD,buy,1,-1,in",
         "column price, line 3: must be a finite number > 0, got -1.0"),
        ("1001,2026-03-05T09:00:00Z,1,1,EURUSD,buy,1,inf,in",
         "column price, line 3: must be a finite number > 0, got inf"),
        ("1001,2026-03-05T09:00:00Z,1,1,,buy,1,1.08,in",
         "column symbol, line 3: missing value"),
        ("1001,2026-03-05T09:00:00Z,x,1,EURUSD,buy,1,1.08,in",
         "column deal_id, line 3: can't read 'x' as a 64-bit integer"),
        ("1001,,1,1,EURUSD,buy,1,1.08,in", "column ts, line 3: missing value"),
    ],
)  # fmt: skip
def test_a_bad_deal_row_is_refused_naming_file_row_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], row: str, message: str
) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(rules_doc([PhaseSpec(1001, "c", 0, START, {
        "initial_balance": 100_000})])))  # fmt: skip
    ticks = tmp_path / "ticks.csv"
    ticks.write_text("account_id,ts,equity,balance\n1001,2026-03-05T09:00:00Z,1,1\n")
    deals = tmp_path / "deals.csv"
    deals.write_text(",".join(DEAL_COLUMNS) + f"\n{GOOD}\n{row}\n")
    out = tmp_path / "out"
    code = main(["backtest", "--rules", str(rules), "--ticks", str(ticks),
                 "--deals", str(deals), "--out", str(out)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{deals}: {message}" in err[0]
    assert not out.exists()


def test_a_bad_parquet_deal_is_named_by_row(tmp_path: Path) -> None:
    frame = deal_frame(
        [Deal(1001, START_US, 1, 1, "EURUSD", "buy", 1.0, 1.1, "in"),
         Deal(1001, START_US, 2, 1, "EURUSD", "buy", float("nan"), 1.1, "in")]
    )  # fmt: skip
    with pytest.raises(InputFileError, match=r"deals: column volume, row 2: must be"):
        prop_stream.backtest(
            rules_doc([PhaseSpec(1001, "c", 0, START, {"initial_balance": 1})]),
            tick_frame([]),
            frame,
        )
    path = tmp_path / "d.parquet"
    frame.write_parquet(path)
    with pytest.raises(InputFileError, match=rf"{path}: column volume, row 2"):
        prop_stream.backtest(
            rules_doc([PhaseSpec(1001, "c", 0, START, {"initial_balance": 1})]),
            tick_frame([]),
            path,
        )


def test_a_missing_deal_column_is_named(tmp_path: Path) -> None:
    frame = deal_frame([]).drop("entry")
    with pytest.raises(InputFileError, match=r"missing column.*entry"):
        prop_stream.backtest(
            rules_doc([PhaseSpec(1001, "c", 0, START, {"initial_balance": 1})]),
            tick_frame([]),
            frame,
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hedge_window_seconds": -1}, "hedge_window_seconds: must be a number >= 0"),
        ({"hedge_window_seconds": "60"}, "hedge_window_seconds: must be a number"),
        ({"hedge_window_seconds": True}, "hedge_window_seconds: must be a number"),
        ({"customer_id": ""}, "account 1001: customer_id: must be a non-empty string"),
        ({"customer_id": 7}, "account 1001: customer_id: must be a non-empty string"),
    ],
)
def test_bad_hedge_settings_are_refused(change: dict[str, Any], message: str) -> None:
    doc = rules_doc([PhaseSpec(1001, "c", 0, START, {"initial_balance": 1})])
    if "customer_id" in change:
        doc["accounts"][0].update(change)
    else:
        doc.update(change)
    with pytest.raises(InputFileError, match=message):
        prop_stream.backtest(doc, tick_frame([]))


def test_without_deals_flags_are_empty_and_deal_columns_zero() -> None:
    got = prop_stream.backtest(
        rules_doc([PhaseSpec(1001, "c", 0, START, {"initial_balance": 100_000})]),
        tick_frame([(1001, START_US + 1, 100_000.0, 100_000.0)]),
    )
    assert got.flags.height == 0
    row = got.accounts.row(0, named=True)
    assert (row["deals"], row["open_lots"], row["open_positions"]) == (0, 0.0, 0)


def test_cli_with_deals_writes_flags_and_summarizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    phases = [
        PhaseSpec(a, f"c-{a}", 0, START, {"initial_balance": 100_000})
        for a in (1001, 1002)
    ]
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(rules_doc(phases)))
    ticks = tmp_path / "ticks.csv"
    ticks.write_text("account_id,ts,equity,balance\n1001,2026-03-05T09:00:00Z,1,1\n")
    deals = tmp_path / "deals.csv"
    deals.write_text(
        ",".join(DEAL_COLUMNS)
        + f"\n{GOOD}\n1002,2026-03-05T09:00:30Z,7,3,EURUSD,sell,2.0,1.08,in\n"
    )
    out = tmp_path / "out"
    code = main(["backtest", "--rules", str(rules), "--ticks", str(ticks),
                 "--deals", str(deals), "--out", str(out)])  # fmt: skip
    assert code == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "2 deals processed, 1 hedge flag," in line
    flags = pl.read_csv(out / "flags.csv")
    assert flags.select("account_id_1", "deal_id_1", "account_id_2", "deal_id_2",
                        "gap_seconds", "customer_id").rows() == [
        (1001, 1, 1002, 7, 30.0, "alice")
    ]  # fmt: skip
    accounts = pl.read_parquet(out / "accounts.parquet").sort("account_id")
    assert accounts["deals"].to_list() == [1, 1]
    assert accounts["open_lots"].to_list() == [1.0, 2.0]
    assert accounts["open_positions"].to_list() == [1, 1]
