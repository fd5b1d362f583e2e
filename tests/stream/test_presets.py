"""The firm presets: valid rules objects, the same in the docs and the code.

``docs/presets.md`` shows each preset of ``prop_stream.store.presets`` as JSON; the
page and the module must agree, every phase must pass the engine's
``ChallengeRules``, and together the presets must use every variant of every rule.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from prop_stream.rules import validate_rules
from prop_stream.store.presets import PRESETS, Preset

PAGE = Path(__file__).resolve().parents[2] / "docs" / "presets.md"
FIRMS = {
    "FTMO",
    "Topstep",
    "Apex Trader Funding",
    "The5ers",
    "E8 Markets",
    "FundedNext",
}

#: Every value of every enumerated rule, and the optional rules that must appear.
VARIANTS: dict[str, set[Any]] = {
    "daily_reference": {"day_start_equity", "day_start_balance", "day_start_max"},
    "daily_loss_base": {"initial_balance", "day_start"},
    "daily_loss_action": {"fail", "pause"},
    "total_loss_mode": {"static", "trailing", "trailing_eod"},
    "trading_day_basis": {"activity", "deals"},
    "deal_violation_action": {"fail", "flag"},
}
OPTIONAL = (
    "profit_target",
    "max_daily_loss",
    "max_total_loss",
    "max_days",
    "max_best_day_share",
    "warning_level",
    "max_open_lots",
    "min_hold_seconds",
    "weekend_close",
)


def page_presets() -> list[dict[str, Any]]:
    blocks = re.findall(r"```json\n(.*?)\n```", PAGE.read_text(encoding="utf-8"), re.S)
    return [json.loads(block) for block in blocks]


def test_the_page_shows_every_preset_as_the_code_has_it() -> None:
    assert page_presets() == [p.as_json() for p in PRESETS.values()]
    assert {p.firm for p in PRESETS.values()} == FIRMS


@pytest.mark.parametrize("preset", PRESETS.values(), ids=list(PRESETS))
def test_every_phase_is_valid_for_the_engine(preset: Preset) -> None:
    phase_types = [p.phase_type for p in preset.phases]
    # api.md: evaluation phases first, at most one funded phase, last.
    assert phase_types[0] == 0
    assert phase_types.count(1) <= 1
    assert 1 not in phase_types[:-1]
    for phase in preset.phases:
        full = validate_rules(phase.rules)
        for name, value in phase.rules.items():
            assert full[name] == value, (preset.key, phase.name, name)
        if phase.phase_type == 1:
            assert full["profit_target"] is None


def test_the_presets_use_every_variant_the_engine_has() -> None:
    used: dict[str, set[Any]] = {name: set() for name in VARIANTS}
    set_rules: set[str] = set()
    for preset in PRESETS.values():
        for phase in preset.phases:
            full = validate_rules(phase.rules)
            for name in VARIANTS:
                used[name].add(full[name])
            set_rules |= {name for name, value in full.items() if value is not None}
            if full["day_rollover"] != "00:00":
                set_rules.add("day_rollover (not midnight)")
            if full["timezone"] != "UTC":
                set_rules.add("timezone (not UTC)")
    assert used == VARIANTS
    assert set(OPTIONAL) <= set_rules
    assert {"day_rollover (not midnight)", "timezone (not UTC)"} <= set_rules
