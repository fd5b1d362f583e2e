"""The hedge window setting and the deal counters of ``/metrics``."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from prop_stream.config import StreamSettings
from prop_stream.evaluator import LoopStats
from prop_stream.telemetry import Probes, ServiceMetrics


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 60.0),
        ("15", 15.0),
        ("0", 0.0),
        ("", None),
        ("null", None),
        ("NULL", None),
    ],
)
def test_hedge_window_setting(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: float | None
) -> None:
    if value is None:
        monkeypatch.delenv("PROP_STREAM_HEDGE_WINDOW_SECONDS", raising=False)
    else:
        monkeypatch.setenv("PROP_STREAM_HEDGE_WINDOW_SECONDS", value)
    assert StreamSettings().hedge_window_seconds == expected


@pytest.mark.parametrize("value", ["-1", "soon", "inf", "nan"])
def test_hedge_window_setting_refuses_bad_values(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("PROP_STREAM_HEDGE_WINDOW_SECONDS", value)
    with pytest.raises(ValidationError, match="hedge_window_seconds"):
        StreamSettings()


def test_metrics_count_deals_polled_judged_and_skipped_by_reason() -> None:
    stats = LoopStats(deals=12, deals_judged=9, deals_unmatched=2)
    stats.deals_skipped.update({"late": 1, "duplicate": 2})
    text = ServiceMetrics(Probes(loop_stats=lambda: stats)).exposition().decode()
    lines = set(text.splitlines())
    assert "prop_stream_deals_polled_total 12.0" in lines
    assert "prop_stream_deals_judged_total 9.0" in lines
    assert "prop_stream_deals_unmatched_total 2.0" in lines
    assert 'prop_stream_deals_skipped_total{reason="late"} 1.0' in lines
    assert 'prop_stream_deals_skipped_total{reason="duplicate"} 2.0' in lines
    assert 'prop_stream_deals_skipped_total{reason="invalid"} 0.0' in lines
