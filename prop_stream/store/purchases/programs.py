"""A program as a purchase sees it: its price, its phases and whether it is sold."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal

from prop_stream.store.catalog import ProgramIn, ProgramPhaseIn, validate_program
from prop_stream.store.db import Connection
from prop_stream.store.exceptions import InvalidProgramError, NotFoundError
from prop_stream.store.purchases.exceptions import PurchaseError


@dataclass(frozen=True, slots=True)
class PhaseInfo:
    """A program phase as a purchase shows it."""

    phase_index: int
    name: str
    phase_type: int
    account_group: str
    initial_balance: Decimal


@dataclass(frozen=True, slots=True)
class ProgramInfo:
    """What a purchase needs of a program."""

    id: int
    name: str
    price: Decimal
    currency: str
    active: bool
    phases: tuple[PhaseInfo, ...]
    valid: bool
    invalid_reason: str | None


def program_info(conn: Connection, *, program_id: int) -> ProgramInfo:
    """A program, its phases and whether it can be sold.

    Raises:
        NotFoundError: No such program.
    """
    row = conn.execute(
        "SELECT id, name, price, currency, active, description FROM programs "
        "WHERE id = ?",
        [program_id],
    ).fetchone()
    if row is None:
        raise NotFoundError(f"program {program_id} not found")
    phases = conn.execute(
        "SELECT phase_index, name, phase_type, account_group, rules, profit_split "
        "FROM program_phases WHERE program_id = ? ORDER BY phase_index",
        [program_id],
    ).fetchall()
    valid, reason = True, None
    try:
        validate_program(
            conn,
            ProgramIn(
                name=str(row[1]),
                price=Decimal(str(row[2])),
                currency=str(row[3]),
                description=str(row[5]),
                phases=tuple(
                    ProgramPhaseIn(
                        name=str(name),
                        phase_type=int(ptype),
                        account_group=str(group),
                        rules=json.loads(str(rules)),
                        profit_split=None if split is None else Decimal(str(split)),
                    )
                    for _, name, ptype, group, rules, split in phases
                ),
            ),
        )
    except InvalidProgramError as exc:
        valid, reason = False, exc.code
    return ProgramInfo(
        id=int(row[0]),
        name=str(row[1]),
        price=Decimal(str(row[2])),
        currency=str(row[3]),
        active=bool(row[4]),
        phases=tuple(
            PhaseInfo(
                phase_index=int(index),
                name=str(name),
                phase_type=int(ptype),
                account_group=str(group),
                initial_balance=Decimal(
                    str(json.loads(str(rules)).get("initial_balance", 0))
                ).quantize(Decimal("0.01")),
            )
            for index, name, ptype, group, rules, _ in phases
        ),
        valid=valid,
        invalid_reason=reason,
    )


def ensure_sellable(program: ProgramInfo) -> None:
    """Refuse a program that is not for sale or is invalid.

    Raises:
        PurchaseError: ``program_not_available`` or ``program_invalid`` (field
            ``program_id``).
    """
    if not program.active:
        raise PurchaseError(
            "program_not_available",
            f"program {program.id} is not for sale",
            field="program_id",
        )
    if not program.valid:
        raise PurchaseError(
            "program_invalid",
            f"program {program.id} is invalid ({program.invalid_reason})",
            field="program_id",
            details={"reason": program.invalid_reason},
        )


__all__ = ["PhaseInfo", "ProgramInfo", "ensure_sellable", "program_info"]
