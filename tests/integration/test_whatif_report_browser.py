"""The what-if report in a real browser: both floors drawn for a changed account.

The report of a run with a tighter daily limit, with the run of the original
rules as its baseline (what ``prop-stream whatif --report`` writes), opened in
headless Chromium on a changed account.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from backtest_data import generate

import prop_stream
from integration.chromium import chromium_or_skip, open_page
from prop_stream.backtest import parse_rules
from prop_stream.backtest.report import write_report

pytestmark = pytest.mark.integration

_LABELS = """[...document.querySelectorAll('#chart .u-legend .u-label')]
  .map(e => e.textContent)"""


def test_whatif_report_draws_the_floors_before_and_after(tmp_path: Path) -> None:
    rules, ticks = generate(accounts=40, ticks_per_account=1500, seed=9)
    tighter: dict[str, Any] = copy.deepcopy(rules)
    for account in tighter["accounts"]:
        account["rules"]["max_daily_loss"] = 0.01
    before = prop_stream.backtest(rules, ticks)
    after = prop_stream.backtest(tighter, ticks)
    changed = (
        before.accounts.select("account_id", "status")
        .join(after.accounts.select("account_id", "status"), on="account_id")
        .filter(pl.col("status") != pl.col("status_right"))["account_id"]
        .to_list()
    )
    assert changed
    path = write_report(
        tmp_path / "report.html",
        parse_rules(tighter),
        [ticks.lazy()],
        after,
        max_rows_in_memory=10_000_000,
        baseline=(parse_rules(rules), before),
        compare=set(changed),
    )
    account = changed[0]
    binary = chromium_or_skip()
    url = f"{path.as_uri()}#account={account}"
    with open_page(binary, tmp_path / "profile", url) as page:
        drawn = "document.getElementById('chart').dataset.drawn"
        assert page.wait_for(drawn) == str(account)
        labels = page.evaluate(_LABELS)
        assert "daily floor" in labels
        assert "daily floor (before)" in labels
        info = page.evaluate("document.getElementById('info').textContent")
        assert "before the change:" in info
        assert page.errors() == []
