"""``prop_stream.backtest``: the command's results as frames, nothing written."""

from __future__ import annotations

import importlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from backtest_data import generate
from polars.testing import assert_frame_equal

import prop_stream
from prop_stream.backtest import ACCOUNTS_SCHEMA, OUTPUT_TABLES, BacktestTables
from prop_stream.cli import main
from prop_stream.exceptions import InputFileError


@pytest.fixture(scope="module")
def inputs(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], pl.DataFrame, Path, dict[str, pl.DataFrame]]:
    rules, ticks = generate(accounts=15, ticks_per_account=200, seed=21)
    root = tmp_path_factory.mktemp("api")
    (root / "rules.json").write_text(json.dumps(rules))
    ticks.write_parquet(root / "ticks.parquet")
    argv = ["backtest", "--rules", str(root / "rules.json"), "--ticks"]
    assert main([*argv, str(root / "ticks.parquet"), "--out", str(root / "out")]) == 0
    expected = {
        n: pl.read_parquet(root / "out" / f"{n}.parquet") for n in OUTPUT_TABLES
    }
    return rules, ticks, root, expected


def assert_tables(result: BacktestTables, expected: dict[str, pl.DataFrame]) -> None:
    assert isinstance(result, BacktestTables)
    for name in OUTPUT_TABLES:
        assert_frame_equal(getattr(result, name), expected[name], check_exact=True)
    assert result.accounts.schema == ACCOUNTS_SCHEMA


def test_backtest_api_paths_equal_command(
    inputs: tuple[dict[str, Any], pl.DataFrame, Path, dict[str, pl.DataFrame]],
) -> None:
    _, _, root, expected = inputs
    before = sorted(root.rglob("*"))
    result = prop_stream.backtest(root / "rules.json", str(root / "ticks.parquet"))
    assert_tables(result, expected)
    assert sorted(root.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("form", ["polars", "lazy", "arrow", "epoch_ms", "naive"])
def test_backtest_api_frames_equal_command(
    inputs: tuple[dict[str, Any], pl.DataFrame, Path, dict[str, pl.DataFrame]],
    form: str,
) -> None:
    rules, ticks, _, expected = inputs
    given: Any = {
        "polars": ticks,
        "lazy": ticks.lazy(),
        "arrow": ticks.to_arrow(),
        "epoch_ms": ticks.with_columns(pl.col("ts").dt.epoch("ms")),
        "naive": ticks.with_columns(pl.col("ts").dt.replace_time_zone(None)),
    }[form]
    if form == "epoch_ms":  # milliseconds lose the microseconds of the input
        ticks = ticks.with_columns(pl.col("ts").dt.truncate("1ms"))
        expected = prop_stream.backtest(rules, ticks).as_dict()
    assert_tables(prop_stream.backtest(rules, given), expected)


def test_backtest_api_partitioned_path_equals_command(
    inputs: tuple[dict[str, Any], pl.DataFrame, Path, dict[str, pl.DataFrame]],
) -> None:
    _, _, root, expected = inputs
    result = prop_stream.backtest(
        root / "rules.json", root / "ticks.parquet", max_rows_in_memory=500
    )
    assert_tables(result, expected)


def test_backtest_api_deals_missing_columns_are_named(
    inputs: tuple[dict[str, Any], pl.DataFrame, Path, dict[str, pl.DataFrame]],
) -> None:
    rules, ticks, _, _ = inputs
    with pytest.raises(InputFileError, match=r"deals: missing column\(s\): account_id"):
        prop_stream.backtest(rules, ticks, deals=pl.DataFrame({"deal_id": [1]}))


def test_backtest_api_result_is_frozen(
    inputs: tuple[dict[str, Any], pl.DataFrame, Path, dict[str, pl.DataFrame]],
) -> None:
    rules, ticks, _, _ = inputs
    result = prop_stream.backtest(rules, ticks)
    with pytest.raises(AttributeError):
        result.accounts = pl.DataFrame()  # type: ignore[misc]  # frozen on purpose


RULES_1: dict[str, Any] = {
    "accounts": [
        {
            "account_id": 1,
            "challenge_id": "c",
            "started_at": "2026-01-05T00:00:00Z",
            "rules": {"initial_balance": 1000},
        }
    ]
}
TS = datetime(2026, 1, 5, 9, tzinfo=UTC)


@pytest.mark.parametrize(
    ("ticks", "message"),
    [
        (
            pl.DataFrame({"account_id": [1], "ts": [TS], "equity": [1.0]}),
            "ticks: missing column(s): balance",
        ),
        (
            pl.DataFrame(
                {"account_id": [1, 1], "ts": [TS, TS], "equity": [1.0, None]},
                schema_overrides={"equity": pl.Float64},
            ).with_columns(balance=pl.lit(1.0)),
            "ticks: column equity, row 2: missing value",
        ),
        (
            pl.DataFrame(
                {"account_id": [1], "ts": [TS], "equity": [float("nan")]}
            ).with_columns(balance=pl.lit(1.0)),
            "ticks: column equity, row 1: nan is not a finite number",
        ),
        (
            pl.DataFrame(
                {"account_id": [1.5], "ts": [TS], "equity": [1.0], "balance": [1.0]}
            ),
            "ticks: column account_id: has type Float64, expected an integer",
        ),
        (
            pl.DataFrame(
                {"account_id": [1], "ts": ["yesterday"], "equity": [1.0]}
            ).with_columns(balance=pl.lit(1.0)),
            "ticks: column ts, row 1: can't read 'yesterday' as a timestamp",
        ),
        (42, "ticks: can't read int as a table"),
    ],
)
def test_backtest_api_bad_ticks_name_column_and_row(ticks: Any, message: str) -> None:
    with pytest.raises(InputFileError) as info:
        prop_stream.backtest(RULES_1, ticks)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"accounts": []}, "rules: accounts: must list at least one account"),
        (
            {"accounts": [{**RULES_1["accounts"][0], "rules": {}}]},
            "rules: account 1: rules.initial_balance",
        ),
        ([1, 2], "rules: must be a path or a dict"),
    ],
)
def test_backtest_api_bad_rules_name_the_field(rules: Any, message: str) -> None:
    ticks = pl.DataFrame(
        {"account_id": [1], "ts": [TS], "equity": [1.0], "balance": [1.0]}
    )
    with pytest.raises(InputFileError) as info:
        prop_stream.backtest(rules, ticks)
    assert str(info.value).startswith(message)


def test_backtest_api_pyarrow_record_batch() -> None:
    batch = pa.record_batch(
        {"account_id": [1], "ts": [TS], "equity": [900.0], "balance": [1000.0]}
    )
    result = prop_stream.backtest(RULES_1, batch)
    assert result.accounts["ticks"].to_list() == [1]


def test_backtest_name_is_the_function_after_subpackage_imports() -> None:
    # Importing the subpackage of the same name must not hide the function.
    importlib.import_module("prop_stream.backtest.report")
    importlib.import_module("prop_stream.backtest")
    assert callable(prop_stream.backtest)
    assert prop_stream.backtest.__module__ == "prop_stream.backtest.frames"


def test_backtest_api_started_at_as_datetime() -> None:
    given = {"accounts": [{**RULES_1["accounts"][0], "started_at": TS}]}
    ticks = pl.DataFrame(
        {"account_id": [1, 1], "ts": [TS - timedelta(seconds=1), TS]}
    ).with_columns(equity=pl.lit(1000.0), balance=pl.lit(1000.0))
    result = prop_stream.backtest(given, ticks)
    assert result.accounts.select("ticks", "late_ticks").row(0) == (1, 1)
    naive = {
        "accounts": [{**RULES_1["accounts"][0], "started_at": TS.replace(tzinfo=None)}]
    }
    with pytest.raises(InputFileError, match="started_at"):
        prop_stream.backtest(naive, ticks)
