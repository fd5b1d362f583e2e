"""Demo reference data for ``prop-stream init --demo``.

Two account groups (``DEMO`` and ``REAL``, USD), four programs (a two-step
evaluation with a funded phase, a one-step one, and the FTMO and Topstep presets
of :mod:`prop_stream.store.presets`, with their deal rules), customers
``alice@example.com`` and ``bob@example.com`` with a funded ``REAL`` payer account
each, and a few active challenges whose first phase runs on a ``DEMO`` account, so
the demo tick source has accounts to move.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from prop_stream.store.catalog import (
    EVALUATION,
    FUNDED,
    ProgramIn,
    ProgramPhaseIn,
    create_account_group,
    create_customer,
    create_program,
    open_account,
)
from prop_stream.store.db import Connection
from prop_stream.store.lifecycle import start_challenge
from prop_stream.store.presets import FTMO, TOPSTEP, Preset

DEMO_GROUP: Final = "DEMO"
REAL_GROUP: Final = "REAL"
DEMO_CUSTOMERS: Final = ("alice@example.com", "bob@example.com")
#: What each demo customer's REAL payer account holds.
PAYER_BALANCE: Final = Decimal("25000.00")

_LOSSES: Final[dict[str, Any]] = {
    "max_daily_loss": 0.05,
    "max_total_loss": 0.10,
    "warning_level": 0.8,
    "timezone": "Europe/Prague",
}

TWO_STEP: Final = ProgramIn(
    name="Two-Step Evaluation 100K",
    description="Reach 8%, then 5%, without losing 5% in a day or 10% overall; "
    "then trade a funded account for an 80% profit split.",
    price=Decimal("499.00"),
    currency="USD",
    phases=(
        ProgramPhaseIn(
            name="Evaluation",
            phase_type=EVALUATION,
            account_group=DEMO_GROUP,
            rules={
                "initial_balance": 100_000,
                "profit_target": 0.08,
                "min_trading_days": 4,
                "max_days": 30,
                **_LOSSES,
            },
        ),
        ProgramPhaseIn(
            name="Verification",
            phase_type=EVALUATION,
            account_group=DEMO_GROUP,
            rules={
                "initial_balance": 100_000,
                "profit_target": 0.05,
                "min_trading_days": 4,
                "max_days": 60,
                **_LOSSES,
            },
        ),
        ProgramPhaseIn(
            name="Funded",
            phase_type=FUNDED,
            account_group=REAL_GROUP,
            rules={"initial_balance": 100_000, **_LOSSES},
            profit_split=Decimal("0.8"),
        ),
    ),
)

ONE_STEP: Final = ProgramIn(
    name="One-Step 50K",
    description="Reach 10% with a trailing 6% drawdown and a 4% daily limit.",
    price=Decimal("299.00"),
    currency="USD",
    phases=(
        ProgramPhaseIn(
            name="Evaluation",
            phase_type=EVALUATION,
            account_group=DEMO_GROUP,
            rules={
                "initial_balance": 50_000,
                "profit_target": 0.10,
                "max_daily_loss": 0.04,
                "max_total_loss": 0.06,
                "total_loss_mode": "trailing",
                "min_trading_days": 3,
                "max_best_day_share": 0.5,
                "warning_level": 0.8,
            },
        ),
    ),
)


def preset_program(
    preset: Preset, *, price: Decimal, profit_split: Decimal
) -> ProgramIn:
    """A program of the demo's groups from a firm preset.

    Args:
        preset: The preset.
        price: The program's price (USD).
        profit_split: The funded phase's split.

    Returns:
        The program: evaluation phases on ``DEMO``, the funded phase on ``REAL``.
    """
    return ProgramIn(
        name=f"{preset.firm} {preset.program}",
        description=(
            f"The {preset.firm} preset of docs/presets.md (as published by the "
            "firm; check the current terms)."
        ),
        price=price,
        currency="USD",
        phases=tuple(
            ProgramPhaseIn(
                name=phase.name,
                phase_type=phase.phase_type,
                account_group=REAL_GROUP if phase.phase_type == FUNDED else DEMO_GROUP,
                rules=dict(phase.rules),
                profit_split=profit_split if phase.phase_type == FUNDED else None,
            )
            for phase in preset.phases
        ),
    )


FTMO_100K: Final = preset_program(
    FTMO, price=Decimal("540.00"), profit_split=Decimal("0.8")
)
TOPSTEP_50K: Final = preset_program(
    TOPSTEP, price=Decimal("49.00"), profit_split=Decimal("0.9")
)
#: The demo's programs, in id order.
DEMO_PROGRAMS: Final = (TWO_STEP, ONE_STEP, FTMO_100K, TOPSTEP_50K)

#: (customer index, program) of the demo challenges.
_CHALLENGES: Final = ((0, 0), (0, 1), (1, 0), (1, 1), (1, 0))


def seed_demo(conn: Connection, *, now: datetime | None = None) -> bool:
    """Add the demo reference data, unless it is already there.

    Args:
        conn: The connection; wrap the call in a transaction.
        now: When the demo challenges start (default: now).

    Returns:
        False when the demo data was already there (nothing was added).
    """
    exists = conn.execute(
        "SELECT count(*) FROM customers WHERE email = ?", [DEMO_CUSTOMERS[0]]
    ).fetchone()
    if exists and exists[0]:
        return False
    started = now or datetime.now(UTC)
    create_account_group(
        conn, name=DEMO_GROUP, kind="DEMO", currency="USD", leverage=100
    )
    create_account_group(
        conn, name=REAL_GROUP, kind="REAL", currency="USD", leverage=30
    )
    programs = [create_program(conn, program=p) for p in DEMO_PROGRAMS]
    customers = []
    for email in DEMO_CUSTOMERS:
        customer_id = create_customer(conn, email=email)
        open_account(
            conn,
            customer_id=customer_id,
            account_group=REAL_GROUP,
            balance=PAYER_BALANCE,
        )
        customers.append(customer_id)
    for customer, program in _CHALLENGES:
        spec = DEMO_PROGRAMS[program]
        account_id = open_account(
            conn,
            customer_id=customers[customer],
            account_group=spec.phases[0].account_group,
            balance=Decimal(str(spec.phases[0].rules["initial_balance"])),
        )
        start_challenge(
            conn,
            customer_id=customers[customer],
            program_id=programs[program],
            account_id=account_id,
            started_at=started,
        )
    return True
