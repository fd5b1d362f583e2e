"""Firm presets: well-known prop firms' public rules as rules objects.

Each preset is one program of a firm (its phases and each phase's rules, with the
rule names of ``rules.md``), written from the firm's public rules as commonly
published; firms change their terms often, so check the current terms before
using one. ``docs/presets.md`` shows every preset next to the rule it encodes
(a test keeps the page and this module equal, and validates every phase through
the engine's ``ChallengeRules``). The demo data uses two of them
(:mod:`prop_stream.store.demo`).

Where a firm's rule has no exact counterpart in the engine, the nearest one is
used and the page says so; ``warning_level`` is a risk-desk choice, never a firm
rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

#: ``phase_type`` of an evaluation phase and of a funded phase (api.md).
_EVALUATION: Final = 0
_FUNDED: Final = 1


@dataclass(frozen=True, slots=True)
class PresetPhase:
    """One phase of a preset program.

    Attributes:
        name: The phase's name.
        phase_type: 0 evaluation, 1 funded.
        rules: Rule names of ``rules.md`` to values.
    """

    name: str
    phase_type: int
    rules: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Preset:
    """One firm's program as rules objects.

    Attributes:
        key: Short name (``ftmo``, ``topstep``, ...).
        firm: The firm.
        program: The program the preset encodes.
        phases: Its phases, in order.
    """

    key: str
    firm: str
    program: str
    phases: tuple[PresetPhase, ...]

    def as_json(self) -> dict[str, Any]:
        """The preset as the JSON object ``docs/presets.md`` shows."""
        return {
            "firm": self.firm,
            "program": self.program,
            "phases": [
                {"name": p.name, "phase_type": p.phase_type, "rules": p.rules}
                for p in self.phases
            ],
        }


_FTMO_COMMON: Final[dict[str, Any]] = {
    "initial_balance": 100_000,
    "max_daily_loss": 0.05,
    "daily_reference": "day_start_balance",
    "daily_loss_base": "initial_balance",
    "max_total_loss": 0.10,
    "total_loss_mode": "static",
    "trading_day_basis": "deals",
    "weekend_close": "FRI 22:45",
    "deal_violation_action": "fail",
    "timezone": "Europe/Prague",
    "day_rollover": "00:00",
}

FTMO: Final = Preset(
    key="ftmo",
    firm="FTMO",
    program="FTMO Challenge 100K (two-step, standard account)",
    phases=(
        PresetPhase(
            "FTMO Challenge",
            _EVALUATION,
            {**_FTMO_COMMON, "profit_target": 0.10, "min_trading_days": 4},
        ),
        PresetPhase(
            "Verification",
            _EVALUATION,
            {**_FTMO_COMMON, "profit_target": 0.05, "min_trading_days": 4},
        ),
        PresetPhase("FTMO Account", _FUNDED, dict(_FTMO_COMMON)),
    ),
)

TOPSTEP: Final = Preset(
    key="topstep",
    firm="Topstep",
    program="Trading Combine 50K (futures)",
    phases=(
        PresetPhase(
            "Trading Combine",
            _EVALUATION,
            {
                "initial_balance": 50_000,
                "profit_target": 0.06,
                "max_daily_loss": 0.02,
                "daily_reference": "day_start_balance",
                "daily_loss_base": "initial_balance",
                "daily_loss_action": "pause",
                "max_total_loss": 0.04,
                "total_loss_mode": "trailing_eod",
                "max_best_day_share": 0.5,
                "min_trading_days": 2,
                "max_open_lots": 5,
                "weekend_close": "FRI 15:10",
                "deal_violation_action": "fail",
                "timezone": "America/Chicago",
                "day_rollover": "17:00",
            },
        ),
        PresetPhase(
            "Express Funded Account",
            _FUNDED,
            {
                "initial_balance": 50_000,
                "max_daily_loss": 0.02,
                "daily_reference": "day_start_balance",
                "daily_loss_action": "pause",
                "max_total_loss": 0.04,
                "total_loss_mode": "trailing_eod",
                "max_open_lots": 5,
                "weekend_close": "FRI 15:10",
                "timezone": "America/Chicago",
                "day_rollover": "17:00",
            },
        ),
    ),
)

APEX: Final = Preset(
    key="apex",
    firm="Apex Trader Funding",
    program="50K Evaluation (futures)",
    phases=(
        PresetPhase(
            "Evaluation",
            _EVALUATION,
            {
                "initial_balance": 50_000,
                "profit_target": 0.06,
                "max_total_loss": 0.05,
                "total_loss_mode": "trailing",
                "min_trading_days": 7,
                "max_days": 30,
                "max_open_lots": 10,
                "weekend_close": "FRI 16:59",
                "deal_violation_action": "fail",
                "timezone": "America/New_York",
                "day_rollover": "18:00",
            },
        ),
        PresetPhase(
            "Performance Account",
            _FUNDED,
            {
                "initial_balance": 50_000,
                "max_total_loss": 0.05,
                "total_loss_mode": "trailing",
                "max_open_lots": 10,
                "weekend_close": "FRI 16:59",
                "timezone": "America/New_York",
                "day_rollover": "18:00",
            },
        ),
    ),
)

_THE5ERS_COMMON: Final[dict[str, Any]] = {
    "initial_balance": 100_000,
    "max_daily_loss": 0.05,
    "daily_reference": "day_start_max",
    "daily_loss_base": "day_start",
    "max_total_loss": 0.10,
    "timezone": "Europe/Athens",
    "warning_level": 0.8,
}

THE5ERS: Final = Preset(
    key="the5ers",
    firm="The5ers",
    program="High Stakes 100K (two-step)",
    phases=(
        PresetPhase(
            "Step 1",
            _EVALUATION,
            {**_THE5ERS_COMMON, "profit_target": 0.08, "min_trading_days": 3},
        ),
        PresetPhase(
            "Step 2",
            _EVALUATION,
            {**_THE5ERS_COMMON, "profit_target": 0.05, "min_trading_days": 3},
        ),
        PresetPhase("Funded", _FUNDED, dict(_THE5ERS_COMMON)),
    ),
)

E8: Final = Preset(
    key="e8",
    firm="E8 Markets",
    program="E8 One 100K (one-step)",
    phases=(
        PresetPhase(
            "Evaluation",
            _EVALUATION,
            {
                "initial_balance": 100_000,
                "profit_target": 0.09,
                "max_daily_loss": 0.04,
                "daily_reference": "day_start_balance",
                "max_total_loss": 0.06,
                "total_loss_mode": "trailing",
                "max_best_day_share": 0.4,
                "min_hold_seconds": 60,
                "deal_violation_action": "flag",
                "timezone": "Europe/Athens",
            },
        ),
    ),
)

_FUNDEDNEXT_COMMON: Final[dict[str, Any]] = {
    "initial_balance": 100_000,
    "max_daily_loss": 0.05,
    "daily_reference": "day_start_equity",
    "daily_loss_base": "initial_balance",
    "max_total_loss": 0.10,
    "min_hold_seconds": 30,
    "deal_violation_action": "flag",
    "timezone": "Europe/Athens",
}

FUNDEDNEXT: Final = Preset(
    key="fundednext",
    firm="FundedNext",
    program="Stellar 2-Step 100K",
    phases=(
        PresetPhase(
            "Phase 1",
            _EVALUATION,
            {
                **_FUNDEDNEXT_COMMON,
                "profit_target": 0.08,
                "min_trading_days": 5,
                "trading_day_basis": "activity",
            },
        ),
        PresetPhase(
            "Phase 2",
            _EVALUATION,
            {
                **_FUNDEDNEXT_COMMON,
                "profit_target": 0.05,
                "min_trading_days": 5,
                "trading_day_basis": "activity",
            },
        ),
        PresetPhase("FundedNext Account", _FUNDED, dict(_FUNDEDNEXT_COMMON)),
    ),
)

#: Every preset by key, in the order of ``docs/presets.md``.
PRESETS: Final[dict[str, Preset]] = {
    p.key: p for p in (FTMO, TOPSTEP, APEX, THE5ERS, E8, FUNDEDNEXT)
}
