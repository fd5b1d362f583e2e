"""The backtest report: LTTB, the floors it draws, and what the page embeds."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from backtest_data import generate
from polars.testing import assert_frame_equal, assert_series_equal

import prop_stream
from prop_stream.backtest import BacktestTables, parse_rules
from prop_stream.backtest.report import (
    derive_floors,
    lttb_indices,
    render_report,
    report_data,
)
from prop_stream.cli import main
from prop_stream.rules import RuleEngine

# ------------------------------------------------------------------------- LTTB


def lttb_reference(x: list[float], y: list[float], n_out: int) -> list[int]:
    """Plain LTTB, one bucket at a time (Steinarsson 2013, same buckets)."""
    n = len(x)
    if n <= n_out:
        return list(range(n))
    buckets = n_out - 2
    every = (n - 2) / buckets
    bounds = [1 + int(np.floor(b * every)) for b in range(buckets)] + [n - 1]
    chosen = [0]
    for b in range(buckets):
        lo, hi = bounds[b], bounds[b + 1]
        if b + 1 < buckets:
            nlo, nhi = bounds[b + 1], bounds[b + 2]
            avg_x = sum(x[nlo:nhi]) / (nhi - nlo)
            avg_y = sum(y[nlo:nhi]) / (nhi - nlo)
        else:
            avg_x, avg_y = x[n - 1], y[n - 1]
        a = chosen[-1]
        best, best_area = lo, -1.0
        for i in range(lo, hi):
            area = abs((x[a] - avg_x) * (y[i] - y[a]) - (x[a] - x[i]) * (avg_y - y[a]))
            if area > best_area:
                best, best_area = i, area
        chosen.append(best)
    chosen.append(n - 1)
    return chosen


def one(x: list[float], y: list[float], n_out: int) -> list[int]:
    kept = lttb_indices(
        np.asarray(x, dtype=np.float64),
        np.asarray(y, dtype=np.float64),
        np.array([0, len(x)], dtype=np.int64),
        np.array([n_out], dtype=np.int64),
    )
    return [int(i) for i in kept]


def test_lttb_keeps_first_and_last_and_bounds_size() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(size=1000).cumsum()
    kept = one(list(range(1000)), y.tolist(), 50)
    assert len(kept) == 50
    assert kept[0] == 0
    assert kept[-1] == 999
    assert kept == sorted(set(kept))


def test_lttb_picks_each_buckets_spike() -> None:
    # 10 buckets of 10 points between the ends, one spike in each, alternating
    # up and down: the spike is the largest triangle in its bucket.
    n = 102
    y = [0.0] * n
    spikes = [1 + 10 * b + (3 * b) % 10 for b in range(10)]
    for b, i in enumerate(spikes):
        y[i] = 100.0 if b % 2 == 0 else -100.0
    assert one([float(i) for i in range(n)], y, 12) == [0, *spikes, n - 1]


@pytest.mark.parametrize("n_out", [3, 4, 17, 100])
def test_lttb_equals_plain_loop(n_out: int) -> None:
    rng = np.random.default_rng(n_out)
    x = np.sort(rng.uniform(0, 1e6, 777)).tolist()
    y = rng.normal(size=777).cumsum().tolist()
    assert one(x, y, n_out) == lttb_reference(x, y, n_out)


def test_lttb_many_series_equal_each_alone() -> None:
    rng = np.random.default_rng(3)
    lengths = [1, 2, 3, 10, 500, 64, 2000]
    budgets = [3, 3, 3, 5, 40, 64, 7]
    xs, ys, expected, offset = [], [], [], 0
    for length, budget in zip(lengths, budgets, strict=True):
        x = np.sort(rng.uniform(0, 100, length))
        y = rng.normal(size=length)
        xs.append(x)
        ys.append(y)
        expected += [offset + i for i in lttb_reference(x.tolist(), y.tolist(), budget)]
        offset += length
    offsets = np.cumsum([0, *lengths]).astype(np.int64)
    got = lttb_indices(
        np.concatenate(xs),
        np.concatenate(ys),
        offsets,
        np.array(budgets, dtype=np.int64),
    )
    assert got.tolist() == expected


def test_lttb_short_series_kept_whole() -> None:
    assert one([1.0, 2.0], [5.0, 6.0], 3) == [0, 1]
    assert one([], [], 3) == []


# ----------------------------------------------------------------------- floors


@pytest.fixture(scope="module")
def generated() -> tuple[dict[str, Any], pl.DataFrame, BacktestTables]:
    rules, ticks = generate(accounts=25, ticks_per_account=400, seed=11)
    return rules, ticks, prop_stream.backtest(rules, ticks)


def engine_metrics_per_tick(rules: dict[str, Any], ticks: pl.DataFrame) -> pl.DataFrame:
    """The engine's own floors after every tick: its metric rows.

    The engine reports one metric row per phase and call, so each call gets at
    most one tick per account: call ``r`` takes every account's ``r``-th tick.
    Accounts are independent, so this is the same run as one call.
    """
    engine = RuleEngine()
    for spec in parse_rules(rules):
        engine.register(spec)
    ordered = ticks.sort(["account_id", "ts"], maintain_order=True).with_columns(
        _rank=pl.int_range(pl.len()).over("account_id")
    )
    rows = []
    for rank, batch in ordered.group_by("_rank", maintain_order=True):
        out = engine.process(batch.drop("_rank"))
        rows.append(out.metrics.with_columns(_rank=pl.lit(rank[0])))
    return (
        pl.concat(rows, how="vertical_relaxed")
        .sort(["account_id", "_rank"])
        .drop("_rank")
    )


def test_derive_floors_equal_engine_metrics(
    generated: tuple[dict[str, Any], pl.DataFrame, BacktestTables],
) -> None:
    rules, ticks, tables = generated
    floors = derive_floors(ticks, parse_rules(rules), tables)
    metrics = engine_metrics_per_tick(rules, ticks)
    assert floors.height == metrics.height == tables.accounts["ticks"].sum()
    for ours, theirs in [
        ("account_id", "account_id"),
        ("ts", "ts"),
        ("equity", "equity"),
        ("day", "day"),
        ("daily_limit", "daily_loss_limit"),
        ("daily_floor", "daily_floor"),
        ("hwm", "hwm"),
        ("overall_limit", "max_loss_limit"),
        ("overall_floor", "overall_floor"),
        ("target", "profit_target_level"),
    ]:
        assert_series_equal(
            floors[ours],
            metrics[theirs].cast(floors[ours].dtype),
            check_names=False,
            check_exact=True,
        )
    # Every rule that moves a floor is exercised.
    assert floors["daily_floor"].null_count() < floors.height
    assert floors.filter(pl.col("hwm") > pl.col("initial_balance")).height > 0


def test_derive_floors_agree_with_backtest_outputs(
    generated: tuple[dict[str, Any], pl.DataFrame, BacktestTables],
) -> None:
    rules, ticks, tables = generated
    floors = derive_floors(ticks, parse_rules(rules), tables)
    last = floors.group_by("account_id", maintain_order=True).agg(pl.col("hwm").last())
    expected = tables.accounts.filter(pl.col("ticks") > 0).select("account_id", "hwm")
    assert_frame_equal(last, expected, check_exact=True)
    first = floors.group_by("account_id", "day", maintain_order=True).agg(
        pl.col("equity").first().alias("daily_start_equity")
    )
    assert_frame_equal(first, tables.daily.select(first.columns), check_exact=True)
    # Breach thresholds are the limits at the breach tick, and a failing breach
    # is on a tick below its floor.
    at = floors.group_by("account_id", "ts", maintain_order=True).agg(pl.all().last())
    joined = tables.breaches.join(at, on=["account_id", "ts"], how="left")
    for rule, limit, floor in [
        ("daily_loss", "daily_limit", "daily_floor"),
        ("max_loss", "overall_limit", "overall_floor"),
    ]:
        rows = joined.filter(pl.col("rule") == rule)
        assert rows.height > 0
        assert_series_equal(
            rows["threshold"], rows[limit], check_names=False, check_exact=True
        )
        assert (rows["equity"] < rows[floor]).all()


# ------------------------------------------------------------------------- page


def embedded(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    match = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S
    )
    assert match is not None
    data: dict[str, Any] = json.loads(match.group(1))
    return data


@pytest.fixture(scope="module")
def report_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Any], BacktestTables]:
    rules, ticks = generate(accounts=30, ticks_per_account=600, seed=5)
    root = tmp_path_factory.mktemp("report")
    (root / "rules.json").write_text(json.dumps(rules))
    ticks.write_parquet(root / "ticks.parquet")
    argv = ["backtest", "--rules", str(root / "rules.json")]
    argv += ["--ticks", str(root / "ticks.parquet"), "--out", str(root / "out")]
    assert main([*argv, "--report"]) == 0
    return root / "out" / "report.html", rules, prop_stream.backtest(rules, ticks)


def test_report_summary_counts_equal_accounts_table(
    report_run: tuple[Path, dict[str, Any], BacktestTables],
) -> None:
    path, _, tables = report_run
    summary = embedded(path)["summary"]
    status = tables.accounts["status"].value_counts()
    counts = dict(status.iter_rows())
    assert summary["accounts"] == tables.accounts.height
    for name in ("passed", "failed", "active"):
        assert summary[name] == counts.get(name, 0)
    failing = tables.breaches.filter(pl.col("action") == "phase_failed")
    by_rule = dict(failing.group_by("rule").len().iter_rows())
    assert {r["rule"]: r["count"] for r in summary["failures_by_rule"]} == by_rule
    assert sum(d["count"] for d in summary["days_to_fail"]) == counts["failed"]
    with_ticks = tables.accounts.filter(pl.col("ticks") > 0).height
    assert sum(b["count"] for b in summary["max_drawdown"]) == with_ticks


def test_report_accounts_points_bounded_and_exact_where_needed(
    report_run: tuple[Path, dict[str, Any], BacktestTables],
) -> None:
    path, _, tables = report_run
    data = embedded(path)
    bound = data["limits"]["points_per_account"]
    ids = [str(i) for i in tables.accounts["account_id"]]
    assert [a["id"] for a in data["accounts"]] == ids
    days = dict(tables.daily.group_by("account_id").len().iter_rows())
    marks = dict(tables.breaches.group_by("account_id").len().iter_rows())
    for account, row in zip(
        data["accounts"], tables.accounts.iter_rows(named=True), strict=True
    ):
        n = len(account["t"])
        account_id = int(account["id"])
        extra = days.get(account_id, 0) + marks.get(account_id, 0)
        assert n <= min(row["ticks"], bound + extra)
        assert len(account["equity"]) == n
        assert account["t"] == sorted(account["t"])
        assert account["status"] == row["status"]
        assert len(account["breaches"]) == marks.get(account_id, 0)
        if row["status_ts"] is not None:
            # The pass or fail tick is the last point drawn.
            assert account["t0"] + account["t"][-1] == account["end"]


def expand(steps: list[list[float]] | None, n: int) -> list[float | None]:
    if steps is None:
        return [None] * n
    out: list[float | None] = []
    k = 0
    for i in range(n):
        while k + 1 < len(steps) and steps[k + 1][0] <= i:
            k += 1
        out.append(steps[k][1])
    return out


def test_report_floor_steps_are_the_derived_floors(
    report_run: tuple[Path, dict[str, Any], BacktestTables],
) -> None:
    path, rules, tables = report_run
    data = embedded(path)
    ticks = generate(accounts=30, ticks_per_account=600, seed=5)[1]
    floors = derive_floors(ticks, parse_rules(rules), tables).with_columns(
        ms=pl.col("ts").dt.epoch("ms")
    )
    checked = 0
    for account in data["accounts"]:
        n = len(account["t"])
        mine = floors.filter(pl.col("account_id") == int(account["id"]))
        for name in ("daily_floor", "overall_floor"):
            drawn = expand(account[name], n)
            for t, value in zip(account["t"], drawn, strict=True):
                at = mine.filter(pl.col("ms") == account["t0"] + t)[name].to_list()
                assert value in at
                checked += 1
    assert checked > 1000


def test_report_total_points_bound(
    generated: tuple[dict[str, Any], pl.DataFrame, BacktestTables],
) -> None:
    rules, ticks, tables = generated
    data = report_data(parse_rules(rules), [ticks.lazy()], tables, total_points=250)
    assert data["limits"]["points_per_account"] == 10  # 250 // 25 accounts
    extra = tables.daily.height + tables.breaches.height
    drawn = sum(len(a["t"]) for a in data["accounts"])
    assert drawn <= 250 + extra
    assert max(len(a["t"]) for a in data["accounts"]) > 3


def test_report_is_self_contained(
    report_run: tuple[Path, dict[str, Any], BacktestTables],
) -> None:
    text = report_run[0].read_text(encoding="utf-8")
    assert "uPlot v1.6.32" in text or "(v1.6.32)" in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "__DATA__" not in text
    assert "/*__UPLOT_JS__*/" not in text


def test_report_escapes_user_text() -> None:
    data = {
        "accounts": [
            {"challenge": "</script><script>alert(1)</script>/*__UPLOT_JS__*/"}
        ]
    }
    page = render_report(data)
    assert "</script><script>alert(1)" not in page
    payload = re.search(r'id="report-data">(.*?)</script>', page, re.S)
    assert payload is not None
    assert json.loads(payload.group(1)) == data


def test_backtest_report_only_when_asked(tmp_path: Path) -> None:
    rules, ticks = generate(accounts=3, ticks_per_account=20)
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    ticks.write_parquet(tmp_path / "ticks.parquet")
    argv = ["backtest", "--rules", str(tmp_path / "rules.json")]
    argv += ["--ticks", str(tmp_path / "ticks.parquet"), "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert not (tmp_path / "o" / "report.html").exists()


def test_report_partitioned_equals_in_memory(tmp_path: Path) -> None:
    rules, ticks = generate(accounts=12, ticks_per_account=150, seed=3)
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    ticks.write_parquet(tmp_path / "ticks.parquet")
    pages = []
    for limit in ("100000", "500"):
        out = tmp_path / limit
        argv = ["backtest", "--rules", str(tmp_path / "rules.json"), "--ticks"]
        argv += [str(tmp_path / "ticks.parquet"), "--out", str(out), "--report"]
        assert main([*argv, "--max-rows-in-memory", limit]) == 0
        data = embedded(out / "report.html")
        data.pop("generated")
        pages.append(data)
    assert pages[0] == pages[1]


def test_report_utc_instants() -> None:
    # `end` and breach times are epoch milliseconds, UTC.
    rules: dict[str, Any] = {
        "accounts": [
            {
                "account_id": 1,
                "challenge_id": "c",
                "started_at": "2026-01-05T00:00:00Z",
                "rules": {"initial_balance": 1000, "max_total_loss": 0.1},
            }
        ]
    }
    ticks = pl.DataFrame(
        {
            "account_id": [1, 1],
            "ts": [
                datetime(2026, 1, 5, 9, tzinfo=UTC),
                datetime(2026, 1, 5, 10, 30, tzinfo=UTC),
            ],
            "equity": [1000.0, 850.0],
            "balance": [1000.0, 1000.0],
        }
    )
    tables = prop_stream.backtest(rules, ticks)
    data = report_data(parse_rules(rules), [ticks.lazy()], tables)
    (account,) = data["accounts"]
    end = int(datetime(2026, 1, 5, 10, 30, tzinfo=UTC).timestamp() * 1000)
    assert account["end"] == end
    assert account["breaches"][0]["t"] == end
    assert account["breaches"][0]["equity"] == 850.0
    assert account["overall_floor"] == [[0, 900.0]]  # steps: [point, value]
    assert account["daily_floor"] is None
    assert account["max_drawdown"] == pytest.approx(0.15)
    assert data["summary"]["days_to_fail"] == [{"day": 0, "count": 1}]


def test_report_idle_account_and_no_ticks(tmp_path: Path) -> None:
    rules: dict[str, Any] = {
        "accounts": [
            {
                "account_id": n,
                "challenge_id": f"c-{n}",
                "started_at": "2026-01-05T00:00:00Z",
                "rules": {"initial_balance": 1000, "max_days": 1},
            }
            for n in (1, 2)
        ]
    }
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    (tmp_path / "ticks.csv").write_text(
        "account_id,ts,equity,balance\n"
        "1,2026-01-05T09:00:00Z,1000,1000\n"
        "1,2026-01-06T09:00:00Z,990,1000\n"
    )
    (tmp_path / "empty.csv").write_text("account_id,ts,equity,balance\n")
    pages = {}
    for name in ("ticks", "empty"):
        argv = ["backtest", "--rules", str(tmp_path / "rules.json"), "--ticks"]
        argv += [str(tmp_path / f"{name}.csv"), "--out", str(tmp_path / name)]
        assert main([*argv, "--report"]) == 0
        pages[name] = embedded(tmp_path / name / "report.html")
    first, idle = pages["ticks"]["accounts"]
    assert first["status"] == "failed"
    assert first["breaches"][0]["rule"] == "time_limit"
    assert first["daily_floor"] is None
    assert first["overall_floor"] is None
    assert (idle["t"], idle["max_drawdown"], idle["t0"]) == ([], None, None)
    summary = pages["empty"]["summary"]
    assert (summary["active"], summary["max_drawdown"]) == (2, [])
    assert all(a["t"] == [] for a in pages["empty"]["accounts"])


@pytest.mark.parametrize(
    ("zone", "rollover", "around"),
    [
        ("Europe/Prague", "02:30", "2026-03-29T00:00:00Z"),  # rollover in the gap
        ("Europe/Prague", "02:30", "2026-10-25T00:00:00Z"),  # ... in the fold
        ("America/New_York", "17:00", "2026-03-08T00:00:00Z"),
        ("Australia/Lord_Howe", "00:00", "2026-04-05T00:00:00Z"),  # 30 min shift
    ],
)
def test_derive_floors_days_across_dst_equal_engine(
    zone: str, rollover: str, around: str
) -> None:
    start = datetime.fromisoformat(around)
    rules: dict[str, Any] = {
        "accounts": [
            {
                "account_id": 1,
                "challenge_id": "dst",
                "started_at": (start - timedelta(days=1)).isoformat(),
                "rules": {
                    "initial_balance": 10_000,
                    "max_daily_loss": 0.5,
                    "timezone": zone,
                    "day_rollover": rollover,
                },
            }
        ]
    }
    n = 3 * 24 * 12  # every 5 minutes for three days
    ticks = pl.DataFrame(
        {
            "account_id": [1] * n,
            "ts": [
                start - timedelta(hours=12) + timedelta(minutes=5 * i) for i in range(n)
            ],
            "equity": [10_000.0 + (i % 17) * 10 for i in range(n)],
            "balance": [10_000.0] * n,
        }
    )
    tables = prop_stream.backtest(rules, ticks)
    floors = derive_floors(ticks, parse_rules(rules), tables)
    metrics = engine_metrics_per_tick(rules, ticks)
    assert_series_equal(floors["day"], metrics["day"], check_names=False)
    assert_series_equal(
        floors["daily_floor"],
        metrics["daily_floor"],
        check_names=False,
        check_exact=True,
    )


def test_report_account_ids_beyond_javascript_integers() -> None:
    big = 2**62 + 1  # not exactly representable as a JavaScript number
    rules: dict[str, Any] = {
        "accounts": [
            {
                "account_id": big,
                "challenge_id": "c",
                "started_at": "2026-01-05T00:00:00Z",
                "rules": {"initial_balance": 1000},
            }
        ]
    }
    ticks = pl.DataFrame(
        {
            "account_id": [big],
            "ts": [datetime(2026, 1, 5, 9, tzinfo=UTC)],
            "equity": [1000.0],
            "balance": [1000.0],
        }
    )
    tables = prop_stream.backtest(rules, ticks)
    (account,) = report_data(parse_rules(rules), [ticks.lazy()], tables)["accounts"]
    assert account["id"] == str(big)
    assert account["t"] == [0]
