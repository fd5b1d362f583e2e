"""The backtest report in a real browser: loads cleanly, draws, reacts.

Set ``PROP_STREAM_REPORT_SCREENSHOT=PATH`` to keep the screenshot for a look.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from backtest_data import generate

from integration.chromium import chromium_or_skip, open_page
from prop_stream.cli import main

pytestmark = pytest.mark.integration

_CANVAS = """(() => {
  const c = document.querySelector('#chart canvas');
  if (!c) return null;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let painted = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i]) painted++;
  return {width: c.width, height: c.height, painted: painted};
})()"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rules, ticks = generate(accounts=40, ticks_per_account=1500, seed=9)
    root = tmp_path_factory.mktemp("browser")
    (root / "rules.json").write_text(json.dumps(rules))
    ticks.write_parquet(root / "ticks.parquet")
    argv = ["backtest", "--rules", str(root / "rules.json"), "--ticks"]
    argv += [str(root / "ticks.parquet"), "--out", str(root / "out"), "--report"]
    assert main(argv) == 0
    return root / "out" / "report.html"


def test_report_loads_without_errors_and_draws(report: Path, tmp_path: Path) -> None:
    binary = chromium_or_skip()
    with open_page(binary, tmp_path / "profile", report.as_uri()) as page:
        assert page.wait_for("document.body.dataset.chart") == "drawn"
        canvas = page.evaluate(_CANVAS)
        assert canvas is not None
        assert canvas["width"] > 0
        assert canvas["height"] > 0
        assert canvas["painted"] > 1000  # lines were drawn, not an empty canvas
        cards = page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('[data-count]')]"
            ".map(c => [c.dataset.count, +c.querySelector('b').textContent]))"
        )
        listed = page.evaluate("document.querySelectorAll('#list li').length")
        assert cards["accounts"] == listed == 40
        assert cards["passed"] + cards["failed"] + cards["active"] == 40

        # Search, then a click draws that account.
        page.evaluate(
            "(() => { const s = document.getElementById('search');"
            " s.value = '5007'; s.dispatchEvent(new Event('input')); })()"
        )
        assert page.evaluate("document.querySelectorAll('#list li').length") == 1
        page.evaluate(
            "document.querySelector('#list li[data-account=\"5007\"]').click()"
        )
        assert page.wait_for("document.getElementById('chart').dataset.drawn") == "5007"
        assert page.evaluate(_CANVAS)["painted"] > 1000

        shot = page.screenshot(tmp_path / "report.png")
        assert shot.read_bytes().startswith(b"\x89PNG")
        keep = os.environ.get("PROP_STREAM_REPORT_SCREENSHOT")
        if keep:
            shutil.copyfile(shot, keep)
        assert page.errors() == []


def test_report_draws_account_from_hash(report: Path, tmp_path: Path) -> None:
    binary = chromium_or_skip()
    url = report.as_uri() + "#account=5003"
    with open_page(binary, tmp_path / "profile", url) as page:
        assert page.wait_for("document.getElementById('chart').dataset.drawn") == "5003"
        assert page.errors() == []


def test_report_account_without_ticks(tmp_path: Path) -> None:
    binary = chromium_or_skip()
    rules = {
        "accounts": [
            {
                "account_id": n,
                "challenge_id": f"c-{n}",
                "started_at": "2026-01-05T00:00:00Z",
                "rules": {"initial_balance": 1000, "max_total_loss": 0.1},
            }
            for n in (1, 2)
        ]
    }
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    (tmp_path / "ticks.csv").write_text(
        "account_id,ts,equity,balance\n1,2026-01-05T09:00:00Z,950,1000\n"
    )
    argv = ["backtest", "--rules", str(tmp_path / "rules.json"), "--ticks"]
    argv += [str(tmp_path / "ticks.csv"), "--out", str(tmp_path / "out"), "--report"]
    assert main(argv) == 0
    url = (tmp_path / "out" / "report.html").as_uri() + "#account=2"
    with open_page(binary, tmp_path / "profile", url) as page:
        assert page.wait_for("document.body.dataset.chart") == "empty"
        assert "No evaluated ticks" in page.evaluate(
            "document.getElementById('chart').textContent"
        )
        page.evaluate("document.querySelector('#list li[data-account=\"1\"]').click()")
        assert page.wait_for("document.body.dataset.chart === 'drawn'")
        assert page.errors() == []


def test_browser_harness_sees_console_errors(tmp_path: Path) -> None:
    # The assertions above mean something only if errors do get through.
    binary = chromium_or_skip()
    page_file = tmp_path / "bad.html"
    page_file.write_text(
        "<!DOCTYPE html><body><script>console.error('boom');"
        "document.body.dataset.done = '1'; throw new Error('bad');</script></body>"
    )
    with open_page(binary, tmp_path / "profile", page_file.as_uri()) as page:
        page.wait_for("document.body && document.body.dataset.done")
        errors = page.errors()
    assert len(errors) == 2
    assert "boom" in errors[0] or "boom" in errors[1]
