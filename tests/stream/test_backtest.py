"""The backtest command end to end: golden outputs, input forms, sorting paths.

Expected values are worked out by hand from ``shared/spec/rules.md`` and
``docs/rules.md``; the comments next to each tick say why.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from prop_stream.backtest import (
    ACCOUNTS_SCHEMA,
    BREACHES_SCHEMA,
    DAILY_SCHEMA,
    FLAGS_SCHEMA,
    OUTPUT_TABLES,
    run_backtest,
)
from prop_stream.cli import main

TICK_COLUMNS = ("account_id", "ts", "equity", "balance")


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


START = "2026-01-05T00:00:00Z"

RULES: dict[str, Any] = {
    "accounts": [
        {
            "account_id": 1001,
            "challenge_id": "c-static",
            "phase_index": 0,
            "started_at": START,
            "rules": {"initial_balance": 100_000, "max_total_loss": 0.10},
        },
        {
            "account_id": 1002,
            "challenge_id": "c-pass",
            "phase_index": 1,
            "started_at": START,
            "rules": {
                "initial_balance": 50_000,
                "profit_target": 0.10,
                "min_trading_days": 2,
            },
        },
        {
            "account_id": 1003,
            "challenge_id": "c-pause",
            "phase_index": 0,
            "started_at": START,
            "rules": {
                "initial_balance": 100_000,
                "max_daily_loss": 0.05,
                "daily_loss_action": "pause",
                "timezone": "Europe/Prague",
            },
        },
        {
            "account_id": 1004,
            "challenge_id": "c-idle",
            "phase_index": 0,
            "started_at": START,
            "rules": {"initial_balance": 25_000},
        },
        {
            "account_id": 1005,
            "challenge_id": "c-ties",
            "phase_index": 0,
            "started_at": START,
            "rules": {"initial_balance": 100_000},
        },
    ]
}

# (account_id, ts, equity, balance), deliberately not sorted by account or time.
TICKS: list[tuple[int, str, float, float]] = [
    # 1001, static overall floor F_m = cent(100000 - 10000) = 90000.
    (1001, "2026-01-05T09:00:00Z", 100_000.0, 100_000.0),  # no activity
    (1002, "2026-01-05T09:00:00Z", 50_000.0, 50_000.0),  # no activity
    (1003, "2026-01-04T23:00:00Z", 100_000.0, 100_000.0),  # before started_at: late
    (1001, "2026-01-05T10:00:00Z", 90_000.0, 100_000.0),  # on the floor: no breach
    (1003, "2026-01-05T08:00:00Z", 100_000.0, 100_000.0),  # opens 01-05 (Prague)
    (1005, "2026-01-05T12:00:00Z", 100_500.0, 100_000.0),  # tie, first in file
    (1002, "2026-01-05T10:00:00Z", 52_000.0, 50_000.0),  # trading day 1
    (1003, "2026-01-05T09:00:00Z", 94_999.99, 100_000.0),  # < F_d 95000: pause
    (1005, "2026-01-05T12:00:00Z", 100_700.0, 100_000.0),  # tie, second: wins
    (1001, "2026-01-05T11:00:00Z", 89_999.99, 100_000.0),  # < 90000: fails
    (1003, "2026-01-05T08:30:00Z", 100_000.0, 100_000.0),  # sorted in, not late
    (1002, "2026-01-05T11:00:00Z", 55_000.0, 55_000.0),  # target, 1 day < 2
    (1001, "2026-01-05T12:00:00Z", 100_000.0, 100_000.0),  # phase failed: inactive
    (1003, "2026-01-05T22:30:00Z", 90_000.0, 100_000.0),  # 23:30 local, paused
    (9999, "2026-01-05T12:00:00Z", 1.0, 1.0),  # unknown account
    (1002, "2026-01-06T09:00:00Z", 55_000.0, 55_000.0),  # new day, no activity
    (1003, "2026-01-05T23:30:00Z", 91_000.0, 100_000.0),  # 00:30 local: 01-06
    (1002, "2026-01-06T10:00:00Z", 55_100.0, 55_000.0),  # day 2 active: passes
    (1002, "2026-01-06T11:00:00Z", 56_000.0, 56_000.0),  # passed: inactive
]

EXPECTED_BREACHES = [
    # account, challenge, phase, rule, severity, threshold, actual, action, ts
    (1001, "c-static", 0, "max_loss", "critical", 10_000.0, 100_000 - 89_999.99,
     "phase_failed", ts("2026-01-05T11:00:00Z"), False),
    (1003, "c-pause", 0, "daily_loss", "critical", 0.05 * 100_000,
     100_000 - 94_999.99, "trading_paused", ts("2026-01-05T09:00:00Z"), False),
]  # fmt: skip

NO_DEALS = (0, 0, 0, 0, 0.0, 0)
EXPECTED_ACCOUNTS = [
    # account, challenge, phase, status, status_ts, equity, balance, hwm,
    # daily_start_equity, trading_days, ticks, late_ticks; no deals: the deal
    # columns are 0 (deals, late, duplicate, unmatched, open lots, positions).
    (1001, "c-static", 0, "failed", ts("2026-01-05T11:00:00Z"), 89_999.99,
     100_000.0, 100_000.0, 100_000.0, 1, 3, 0, *NO_DEALS),
    (1002, "c-pass", 1, "passed", ts("2026-01-06T10:00:00Z"), 55_100.0,
     55_000.0, 50_000.0, 55_000.0, 2, 5, 0, *NO_DEALS),
    (1003, "c-pause", 0, "active", None, 91_000.0, 100_000.0, 100_000.0,
     91_000.0, 2, 5, 1, *NO_DEALS),
    (1004, "c-idle", 0, "active", None, None, None, None, None, 0, 0, 0, *NO_DEALS),
    (1005, "c-ties", 0, "active", None, 100_700.0, 100_000.0, 100_000.0,
     100_500.0, 1, 2, 0, *NO_DEALS),
]  # fmt: skip

EXPECTED_DAILY = [
    # account, day, daily_start_equity, daily_start_balance, min, close
    (1001, date(2026, 1, 5), 100_000.0, 100_000.0, 89_999.99, 89_999.99),
    (1002, date(2026, 1, 5), 50_000.0, 50_000.0, 50_000.0, 55_000.0),
    (1002, date(2026, 1, 6), 55_000.0, 55_000.0, 55_000.0, 55_100.0),
    (1003, date(2026, 1, 5), 100_000.0, 100_000.0, 90_000.0, 90_000.0),
    (1003, date(2026, 1, 6), 91_000.0, 100_000.0, 91_000.0, 91_000.0),
    (1005, date(2026, 1, 5), 100_500.0, 100_000.0, 100_500.0, 100_700.0),
]


def tick_frame(rows: list[tuple[int, str, float, float]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "account_id": [r[0] for r in rows],
            "ts": [ts(r[1]) for r in rows],
            "equity": [r[2] for r in rows],
            "balance": [r[3] for r in rows],
        },
        schema={
            "account_id": pl.Int64,
            "ts": pl.Datetime("us", "UTC"),
            "equity": pl.Float64,
            "balance": pl.Float64,
        },
    )


def write_csv(path: Path, rows: list[tuple[int, str, float, float]]) -> Path:
    lines = ["account_id,ts,equity,balance"]
    lines += [f"{a},{t},{e!r},{b!r}" for a, t, e, b in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_rules(path: Path, doc: dict[str, Any] = RULES) -> Path:
    path.write_text(json.dumps(doc, indent=2))
    return path


def read_outputs(out: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(out / f"{name}.parquet") for name in OUTPUT_TABLES}


def assert_same_outputs(left: Path, right: Path) -> None:
    for name in OUTPUT_TABLES:
        assert_frame_equal(
            pl.read_parquet(left / f"{name}.parquet"),
            pl.read_parquet(right / f"{name}.parquet"),
        )
        assert (left / f"{name}.csv").read_text() == (right / f"{name}.csv").read_text()


def backtest(rules: Path, ticks: Path | str, out: Path, *extra: str) -> None:
    argv = ["backtest", "--rules", str(rules), "--ticks", str(ticks), "--out"]
    assert main([*argv, str(out), *extra]) == 0


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    return write_rules(tmp_path / "rules.json")


@pytest.fixture
def csv_ticks(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "ticks.csv", TICKS)


@pytest.fixture
def golden_out(tmp_path: Path, rules_file: Path, csv_ticks: Path) -> Path:
    out = tmp_path / "golden"
    backtest(rules_file, csv_ticks, out)
    return out


def test_backtest_golden_breaches(golden_out: Path) -> None:
    expected = pl.DataFrame(EXPECTED_BREACHES, schema=BREACHES_SCHEMA, orient="row")
    assert_frame_equal(read_outputs(golden_out)["breaches"], expected)


def test_backtest_golden_accounts(golden_out: Path) -> None:
    expected = pl.DataFrame(EXPECTED_ACCOUNTS, schema=ACCOUNTS_SCHEMA, orient="row")
    # An account without ticks has no equity; its hwm is the engine's to report.
    got = read_outputs(golden_out)["accounts"]
    idle = pl.col("account_id") == 1004
    assert_frame_equal(
        got.with_columns(hwm=pl.when(~idle).then(pl.col("hwm"))), expected
    )


def test_backtest_golden_daily(golden_out: Path) -> None:
    expected = pl.DataFrame(EXPECTED_DAILY, schema=DAILY_SCHEMA, orient="row")
    assert_frame_equal(read_outputs(golden_out)["daily"], expected)


def test_backtest_golden_counts(
    tmp_path: Path, rules_file: Path, csv_ticks: Path
) -> None:
    result = run_backtest(rules_file, csv_ticks, tmp_path / "out")
    assert (result.accounts, result.rows) == (5, len(TICKS))
    counts = (result.evaluated, result.late, result.unknown, result.inactive)
    assert counts == (15, 1, 1, 2)
    assert (result.breaches, result.passed, result.failed) == (2, 1, 1)
    assert result.partitions == 0
    assert sorted(p.name for p in result.outputs) == sorted(
        f"{n}.{ext}" for n in OUTPUT_TABLES for ext in ("parquet", "csv")
    )


def test_backtest_csv_matches_parquet_rows(golden_out: Path) -> None:
    for name in OUTPUT_TABLES:
        parquet = pl.read_parquet(golden_out / f"{name}.parquet")
        csv = pl.read_csv(golden_out / f"{name}.csv", schema=parquet.schema)
        assert list(csv.columns) == list(parquet.columns)
        # Full precision: every float reads back bit for bit.
        assert_frame_equal(csv, parquet, check_exact=True)


def test_backtest_csv_timestamps_are_utc_z(golden_out: Path) -> None:
    iso_z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
    for name, column in (("breaches", "ts"), ("accounts", "status_ts")):
        values = pl.read_csv(golden_out / f"{name}.csv", infer_schema=False)[column]
        present = values.drop_nulls().to_list()
        assert present
        assert all(iso_z.match(v) for v in present), present
    breaches = (golden_out / "breaches.csv").read_text().splitlines()
    assert breaches[0] == (
        "account_id,challenge_id,phase_index,rule,severity,threshold,actual,"
        "action,ts,resolved"
    )
    assert breaches[1].endswith(",phase_failed,2026-01-05T11:00:00.000000Z,false")


def test_backtest_output_columns_are_the_contract(golden_out: Path) -> None:
    outputs = read_outputs(golden_out)
    assert outputs["breaches"].schema == BREACHES_SCHEMA
    assert outputs["accounts"].schema == ACCOUNTS_SCHEMA
    assert outputs["daily"].schema == DAILY_SCHEMA
    assert list(BREACHES_SCHEMA) == [
        "account_id", "challenge_id", "phase_index", "rule", "severity",
        "threshold", "actual", "action", "ts", "resolved",
    ]  # fmt: skip
    assert list(ACCOUNTS_SCHEMA) == [
        "account_id", "challenge_id", "phase_index", "status", "status_ts",
        "equity", "balance", "hwm", "daily_start_equity", "trading_days", "ticks",
        "late_ticks", "deals", "late_deals", "duplicate_deals", "unmatched_deals",
        "open_lots", "open_positions",
    ]  # fmt: skip
    assert outputs["flags"].schema == FLAGS_SCHEMA
    assert list(FLAGS_SCHEMA) == [
        "customer_id", "symbol", "account_id_1", "deal_id_1", "ts_1", "side_1",
        "account_id_2", "deal_id_2", "ts_2", "side_2", "gap_seconds",
    ]  # fmt: skip
    assert list(DAILY_SCHEMA) == [
        "account_id", "day", "daily_start_equity", "daily_start_balance",
        "min_equity", "close_equity",
    ]  # fmt: skip


def test_backtest_parquet_input_equals_csv_input(
    tmp_path: Path, rules_file: Path, golden_out: Path
) -> None:
    parquet = tmp_path / "ticks.parquet"
    tick_frame(TICKS).write_parquet(parquet)
    backtest(rules_file, parquet, tmp_path / "from-parquet")
    assert_same_outputs(golden_out, tmp_path / "from-parquet")


@pytest.mark.parametrize(
    "ts_column",
    [
        pytest.param(pl.col("ts").dt.replace_time_zone(None), id="naive"),
        pytest.param(pl.col("ts").dt.convert_time_zone("Asia/Tokyo"), id="tokyo"),
        pytest.param(pl.col("ts").dt.cast_time_unit("ns"), id="ns"),
        pytest.param(pl.col("ts").dt.epoch("ms"), id="epoch-ms"),
        pytest.param(pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ"), id="iso-text"),
    ],
)
def test_backtest_parquet_ts_types(
    tmp_path: Path, rules_file: Path, golden_out: Path, ts_column: pl.Expr
) -> None:
    parquet = tmp_path / "ticks.parquet"
    frame = tick_frame(TICKS).with_columns(
        ts_column.alias("ts"), pl.col("account_id").cast(pl.Int32)
    )
    frame.write_parquet(parquet)
    backtest(rules_file, parquet, tmp_path / "out")
    assert_same_outputs(golden_out, tmp_path / "out")


def test_backtest_csv_epoch_ms_and_offsets(
    tmp_path: Path, rules_file: Path, golden_out: Path
) -> None:
    def respell(i: int, text: str) -> str:
        moment = ts(text)
        if i % 3 == 0:
            return str(int(moment.timestamp() * 1000))
        if i % 3 == 1:  # an offset, and no fraction
            return moment.astimezone(timezone(timedelta(hours=-5))).isoformat()
        return moment.replace(tzinfo=None).isoformat(sep=" ")  # naive is UTC

    rows = [(a, respell(i, t), e, b) for i, (a, t, e, b) in enumerate(TICKS)]
    ticks = write_csv(tmp_path / "respelled.csv", rows)
    assert "1767603600000" in ticks.read_text()  # epoch ms of 2026-01-05T09:00Z
    backtest(rules_file, ticks, tmp_path / "out")
    assert_same_outputs(golden_out, tmp_path / "out")


def test_backtest_extra_columns_are_ignored(
    tmp_path: Path, rules_file: Path, golden_out: Path
) -> None:
    frame = tick_frame(TICKS).with_columns(
        symbol=pl.lit("EURUSD"), note=pl.lit(None, pl.String)
    )
    frame.select("symbol", *TICK_COLUMNS, "note").write_parquet(tmp_path / "t.parquet")
    backtest(rules_file, tmp_path / "t.parquet", tmp_path / "out")
    assert_same_outputs(golden_out, tmp_path / "out")


def test_backtest_directory_of_mixed_files(
    tmp_path: Path, rules_file: Path, golden_out: Path
) -> None:
    # Path order is file order: ties in `ts` (account 1005) keep it.
    ticks = tmp_path / "dir"
    (ticks / "b").mkdir(parents=True)
    write_csv(ticks / "a-first.csv", TICKS[:6])
    tick_frame(TICKS[6:12]).write_parquet(ticks / "b" / "part-0.parquet")
    write_csv(ticks / "c-last.CSV", TICKS[12:])
    (ticks / "_SUCCESS").write_text("")
    (ticks / ".hidden.csv").write_text("garbage\n")
    (ticks / "README.txt").write_text("ignored")
    backtest(rules_file, ticks, tmp_path / "out")
    assert_same_outputs(golden_out, tmp_path / "out")


def test_backtest_glob(tmp_path: Path, rules_file: Path, golden_out: Path) -> None:
    ticks = tmp_path / "glob"
    ticks.mkdir()
    for i in range(0, len(TICKS), 4):
        write_csv(ticks / f"ticks-{i:03d}.csv", TICKS[i : i + 4])
    (ticks / "other-000.csv").write_text("not,a,tick,file\n")
    backtest(rules_file, str(ticks / "ticks-*.csv"), tmp_path / "out")
    assert_same_outputs(golden_out, tmp_path / "out")


def test_backtest_ties_keep_file_order_across_files(
    tmp_path: Path, rules_file: Path
) -> None:
    ticks = tmp_path / "ties"
    ticks.mkdir()
    moment = "2026-01-05T12:00:00Z"
    write_csv(ticks / "1.csv", [(1005, moment, 100_100.0, 100_000.0)])
    write_csv(ticks / "2.csv", [(1005, moment, 100_200.0, 100_000.0)])
    write_csv(ticks / "3.csv", [(1005, moment, 100_300.0, 100_000.0)])
    for extra in ((), ("--max-rows-in-memory", "1")):
        out = tmp_path / f"out{len(extra)}"
        backtest(rules_file, ticks, out, *extra)
        (row,) = read_outputs(out)["daily"].rows(named=True)
        assert (row["daily_start_equity"], row["close_equity"]) == (
            100_100.0,
            100_300.0,
        )


def random_ticks(seed: int, n: int) -> list[tuple[int, str, float, float]]:
    """Ticks with distinct timestamps per account, so any sort gives one order."""
    rng = random.Random(seed)
    rows = []
    for account in (1001, 1002, 1003, 1005):
        stamps = rng.sample(range(0, 3 * 86_400), n)
        balance = 100_000.0 if account != 1002 else 50_000.0
        for second in sorted(stamps):
            if rng.random() < 0.2:
                balance += rng.choice((-500.0, 250.0, 1_000.0))
            equity = balance + rng.uniform(-3_000, 3_000)
            moment = datetime.fromtimestamp(1_767_571_200 + second + 0.125, UTC)
            rows.append((account, moment.isoformat(), equity, balance))
    return rows


def test_backtest_unsorted_equals_sorted(tmp_path: Path, rules_file: Path) -> None:
    rows = random_ticks(7, 300)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    backtest(rules_file, write_csv(tmp_path / "s.csv", rows), tmp_path / "sorted")
    backtest(rules_file, write_csv(tmp_path / "u.csv", shuffled), tmp_path / "unsorted")
    assert_same_outputs(tmp_path / "sorted", tmp_path / "unsorted")
    assert read_outputs(tmp_path / "sorted")["daily"].height > 4


@pytest.mark.parametrize("max_rows", [1, 7, 100])
def test_backtest_partitioned_equals_in_memory(
    tmp_path: Path, rules_file: Path, max_rows: int
) -> None:
    rows = random_ticks(11, 200) + TICKS
    random.Random(5).shuffle(rows)
    ticks = tick_frame(rows)
    ticks.write_parquet(tmp_path / "ticks.parquet")
    memory = run_backtest(rules_file, tmp_path / "ticks.parquet", tmp_path / "mem")
    spill = tmp_path / "spill"
    spill.mkdir()
    parted = run_backtest(
        rules_file,
        tmp_path / "ticks.parquet",
        tmp_path / "part",
        max_rows_in_memory=max_rows,
        tmp_dir=spill,
    )
    assert memory.partitions == 0
    assert parted.partitions >= 2
    assert list(spill.iterdir()) == []  # temporary partitions are cleaned up
    assert_same_outputs(tmp_path / "mem", tmp_path / "part")
    assert (memory.evaluated, memory.late, memory.unknown, memory.inactive) == (
        parted.evaluated,
        parted.late,
        parted.unknown,
        parted.inactive,
    )


def test_backtest_golden_through_partitions(
    tmp_path: Path, rules_file: Path, csv_ticks: Path, golden_out: Path
) -> None:
    backtest(rules_file, csv_ticks, tmp_path / "out", "--max-rows-in-memory", "3")
    assert_same_outputs(golden_out, tmp_path / "out")


@pytest.mark.parametrize("chunk_rows", [1, 2, 5])
def test_backtest_chunking_does_not_change_outputs(
    tmp_path: Path, rules_file: Path, csv_ticks: Path, golden_out: Path, chunk_rows: int
) -> None:
    run_backtest(rules_file, csv_ticks, tmp_path / "out", chunk_rows=chunk_rows)
    assert_same_outputs(golden_out, tmp_path / "out")


def test_backtest_warning_resolution_keeps_last_row(
    tmp_path: Path,
) -> None:
    # W_m = cent(100000 - 0.5 * 10000) = 95000: fires at <= 95000, resolves above.
    rules = write_rules(
        tmp_path / "rules.json",
        {
            "accounts": [
                {
                    "account_id": 7,
                    "challenge_id": "c-7",
                    "started_at": START,
                    "rules": {
                        "initial_balance": 100_000,
                        "max_total_loss": 0.1,
                        "warning_level": 0.5,
                    },
                }
            ]
        },
    )
    rows = [
        (7, "2026-01-05T09:00:00Z", 95_000.0, 100_000.0),  # fires (seq 1)
        (7, "2026-01-05T10:00:00Z", 95_000.01, 100_000.0),  # resolves seq 1
        (7, "2026-01-05T11:00:00Z", 94_000.0, 100_000.0),  # fires again (seq 2)
    ]
    for chunk_rows in (1, 3):
        out = tmp_path / f"out{chunk_rows}"
        run_backtest(
            rules, write_csv(tmp_path / "t.csv", rows), out, chunk_rows=chunk_rows
        )
        breaches = read_outputs(out)["breaches"]
        assert breaches.select("rule", "actual", "action", "ts", "resolved").rows() == [
            ("max_loss_warning", 5_000.0, "notify", ts(rows[0][1]), True),
            ("max_loss_warning", 6_000.0, "notify", ts(rows[2][1]), False),
        ]
        assert breaches["threshold"].to_list() == [0.5 * 10_000.0] * 2


def test_backtest_header_only_csv(tmp_path: Path, rules_file: Path) -> None:
    ticks = write_csv(tmp_path / "empty.csv", [])
    backtest(rules_file, ticks, tmp_path / "out")
    outputs = read_outputs(tmp_path / "out")
    assert outputs["breaches"].height == 0
    assert outputs["daily"].height == 0
    assert outputs["accounts"]["account_id"].to_list() == [1001, 1002, 1003, 1004, 1005]
    assert outputs["accounts"]["status"].unique().to_list() == ["active"]
    assert outputs["accounts"]["equity"].null_count() == 5


def test_backtest_replaces_previous_outputs(
    tmp_path: Path, rules_file: Path, csv_ticks: Path, golden_out: Path
) -> None:
    out = tmp_path / "again"
    backtest(rules_file, write_csv(tmp_path / "one.csv", TICKS[:1]), out)
    (out / "keep.txt").write_text("mine")
    backtest(rules_file, csv_ticks, out)
    assert_same_outputs(golden_out, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_backtest_module_entry_point(
    tmp_path: Path, rules_file: Path, csv_ticks: Path, golden_out: Path
) -> None:
    out = tmp_path / "sub"
    proc = subprocess.run(  # noqa: S603 - our own interpreter and arguments
        [sys.executable, "-m", "prop_stream.cli", "backtest", "--rules",
         str(rules_file), "--ticks", str(csv_ticks), "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert_same_outputs(golden_out, out)
