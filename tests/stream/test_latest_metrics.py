"""LatestMetrics against a plain dict model: newest row wins, rows are stable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from prop_stream.evaluator import LatestMetrics

T0 = datetime(2026, 11, 2, tzinfo=UTC)

_row = st.tuples(
    st.integers(min_value=1, max_value=12),  # account
    st.integers(min_value=0, max_value=20),  # seconds after T0
    st.integers(min_value=0, max_value=10**6),  # equity tag
)
_step = st.one_of(
    st.lists(_row, min_size=0, max_size=15).map(lambda rows: ("update", rows)),
    st.integers(min_value=1, max_value=12).map(lambda a: ("forget", a)),
)


def _frame(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "account_id": [a for a, _, _ in rows],
            "challenge_id": [str(a) for a, _, _ in rows],
            "ts": [T0 + timedelta(seconds=s) for _, s, _ in rows],
            "equity": [float(e) for _, _, e in rows],
        },
        schema={
            "account_id": pl.Int64,
            "challenge_id": pl.String,
            "ts": pl.Datetime("us", "UTC"),
            "equity": pl.Float64,
        },
    )


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(_step, max_size=40))
def test_latest_metrics_matches_a_dict_of_newest_rows(
    steps: list[tuple[str, Any]],
) -> None:
    metrics = LatestMetrics()
    model: dict[int, dict[str, Any]] = {}
    for kind, arg in steps:
        if kind == "forget":
            metrics.forget(arg)
            model.pop(arg, None)
            continue
        for account, seconds, equity in arg:
            current = model.get(account)
            ts = T0 + timedelta(seconds=seconds)
            if current is None or ts >= current["ts"]:
                model[account] = {
                    "account_id": account,
                    "challenge_id": account,
                    "ts": ts,
                    "equity": float(equity),
                }
        metrics.update(_frame(arg))
        assert len(metrics) == len(model)
        for account in range(1, 13):
            row = metrics.get(account)
            assert (None if row is None else dict(row)) == model.get(account)
            assert (account in metrics) == (account in model)
    assert {a: dict(r) for a, r in metrics.snapshot().items()} == model
    assert {a: dict(r) for a, r in metrics.many(range(1, 13)).items()} == model


def test_a_row_is_the_same_object_until_the_account_changes() -> None:
    metrics = LatestMetrics()
    metrics.update(_frame([(1, 1, 10), (2, 1, 20)]))
    first = metrics.get(1)
    assert first is metrics.get(1)
    version = metrics.version
    metrics.update(_frame([(2, 2, 21)]))
    assert metrics.get(1) is first
    assert metrics.version > version
    metrics.update(_frame([(1, 2, 11)]))
    second = metrics.get(1)
    assert second is not first
    assert second is not None
    assert second["equity"] == 11.0


def test_an_older_row_changes_nothing() -> None:
    metrics = LatestMetrics()
    metrics.update(_frame([(1, 5, 10)]))
    version = metrics.version
    metrics.update(_frame([(1, 4, 99)]))
    row = metrics.get(1)
    assert row is not None
    assert row["equity"] == 10.0
    assert metrics.version == version


def test_frames_no_row_points_at_are_let_go() -> None:
    metrics = LatestMetrics()
    for second in range(200):
        metrics.update(_frame([(1, second, second), (2, second, second)]))
    metrics.update(_frame([(3, 0, 7)]))
    assert metrics.frames_held <= 65
    row = metrics.get(3)
    assert row is not None
    assert row["equity"] == 7.0
