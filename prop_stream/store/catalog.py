"""Reference data: account groups, customers, trading accounts, programs.

Store functions take keyword-only arguments and run in the caller's transaction:
they never begin or commit one, so several can be made atomic together with
:func:`prop_stream.store.db.transaction`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, Literal

from prop_stream.exceptions import RuleConfigError
from prop_stream.rules import validate_rules
from prop_stream.store.db import Connection
from prop_stream.store.exceptions import InvalidProgramError, NotFoundError

GroupKind = Literal["DEMO", "REAL"]

#: ``phase_type`` of an evaluation phase.
EVALUATION: Final = 0
#: ``phase_type`` of the funded phase.
FUNDED: Final = 1

_CENT: Final = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class ProgramPhaseIn:
    """One phase of a program to save.

    Attributes:
        name: Shown to the trader ("Evaluation", "Verification", "Funded").
        phase_type: 0 evaluation, 1 funded.
        account_group: The group its trading account is opened in.
        rules: Rule names of ``rules.md`` to values.
        profit_split: The trader's share of profit (0.8 means 80%); funded only.
    """

    name: str
    phase_type: int
    account_group: str
    rules: Mapping[str, Any]
    profit_split: Decimal | None = None


@dataclass(frozen=True, slots=True)
class ProgramIn:
    """A program to save: price and its ordered phases.

    Attributes:
        name: The program's name.
        price: The fee, in ``currency``.
        currency: ISO 4217 code.
        phases: The phases, in order; ``phase_index`` is the position.
        description: Free text.
        active: Whether it can be bought.
    """

    name: str
    price: Decimal
    currency: str
    phases: Sequence[ProgramPhaseIn] = field(default_factory=tuple)
    description: str = ""
    active: bool = True


def create_account_group(
    conn: Connection, *, name: str, kind: GroupKind, currency: str, leverage: int
) -> None:
    """Add an account group.

    Args:
        conn: The connection.
        name: Its name, unique.
        kind: ``DEMO`` or ``REAL``.
        currency: ISO 4217 code of its accounts.
        leverage: e.g. 100 for 1:100.
    """
    conn.execute(
        "INSERT INTO account_groups (name, kind, currency, leverage) "
        "VALUES (?, ?, ?, ?)",
        [name, kind, currency, leverage],
    )


def create_customer(conn: Connection, *, email: str) -> int:
    """Add a customer.

    Args:
        conn: The connection.
        email: Unique e-mail address (stored lower-case).

    Returns:
        The customer's id.
    """
    row = conn.execute(
        "INSERT INTO customers (email) VALUES (?) RETURNING id",
        [email.strip().lower()],
    ).fetchone()
    assert row is not None  # noqa: S101 - INSERT ... RETURNING returns the row
    return int(row[0])


def customer_id_by_email(conn: Connection, *, email: str) -> int:
    """Look up a customer by e-mail address.

    Raises:
        NotFoundError: No customer has that address.
    """
    row = conn.execute(
        "SELECT id FROM customers WHERE email = ?", [email.strip().lower()]
    ).fetchone()
    if row is None:
        raise NotFoundError(f"no customer with e-mail {email!r}")
    return int(row[0])


def open_account(
    conn: Connection,
    *,
    customer_id: int,
    account_group: str,
    balance: Decimal = Decimal(0),
    enabled: bool = True,
) -> int:
    """Open a trading account in a group; its currency is the group's.

    Args:
        conn: The connection.
        customer_id: The owner.
        account_group: The group's name.
        balance: The opening balance (rounded to the cent).
        enabled: Whether it can trade and pay.

    Returns:
        The new account's login (``account_id``).

    Raises:
        NotFoundError: The group does not exist.
    """
    group = conn.execute(
        "SELECT currency FROM account_groups WHERE name = ?", [account_group]
    ).fetchone()
    if group is None:
        raise NotFoundError(f"no account group {account_group!r}")
    row = conn.execute(
        "INSERT INTO trading_accounts "
        "(customer_id, account_group, currency, balance, enabled) "
        "VALUES (?, ?, ?, ?, ?) RETURNING account_id",
        [customer_id, account_group, group[0], balance.quantize(_CENT), enabled],
    ).fetchone()
    assert row is not None  # noqa: S101 - INSERT ... RETURNING returns the row
    return int(row[0])


def account_ids(conn: Connection) -> list[int]:
    """Every trading account's login, whatever its group, state or phases.

    The Kafka source's directory of known accounts: a tick of any other account
    is an ``unknown_account`` dead letter.

    Args:
        conn: The connection.

    Returns:
        The logins, ascending.
    """
    rows = conn.execute(
        "SELECT account_id FROM trading_accounts ORDER BY account_id"
    ).fetchall()
    return [int(row[0]) for row in rows]


def known_account_ids(conn: Connection, account_ids: Sequence[int]) -> list[int]:
    """Which of ``account_ids`` are trading accounts (one indexed query).

    The Kafka source's lookup for the accounts a poll would dead-letter as
    unknown, opened since it last read :func:`account_ids`.

    Args:
        conn: The connection.
        account_ids: The logins to look up.

    Returns:
        Those the store has, ascending.
    """
    if not account_ids:
        return []
    rows = conn.execute(
        "SELECT account_id FROM trading_accounts "
        "WHERE account_id IN (SELECT unnest(?)) ORDER BY account_id",
        [[int(a) for a in account_ids]],
    ).fetchall()
    return [int(row[0]) for row in rows]


def validate_program(conn: Connection, program: ProgramIn) -> list[dict[str, object]]:
    """Check a program against the rules of ``api.md``.

    A program needs at least one evaluation phase, at most one funded phase, the
    funded phase last and in a ``REAL`` group with a ``profit_split``; every phase's
    group must exist and its rules must be valid; an evaluation phase needs a
    ``profit_target`` (it could never pass otherwise) and a funded phase has none.

    Args:
        conn: The connection (account groups are looked up).
        program: The program.

    Returns:
        Each phase's complete rule set, defaults filled in.

    Raises:
        InvalidProgramError: The first problem found; ``code`` is stable.
    """
    if program.price < 0 or program.price != program.price.quantize(_CENT):
        raise InvalidProgramError(
            "invalid_price",
            f"price must be >= 0 with at most 2 decimals, got {program.price}",
            field="price",
        )
    if not program.phases:
        raise InvalidProgramError(
            "no_phases", "a program needs at least one phase", field="phases"
        )
    kinds = dict(conn.execute("SELECT name, kind FROM account_groups").fetchall())
    funded = [i for i, p in enumerate(program.phases) if p.phase_type == FUNDED]
    full_rules: list[dict[str, object]] = []
    for index, phase in enumerate(program.phases):
        where = f"phases[{index}]"
        if phase.phase_type not in (EVALUATION, FUNDED):
            raise InvalidProgramError(
                "invalid_phase_type",
                f"{where}.phase_type must be 0 (evaluation) or 1 (funded), "
                f"got {phase.phase_type}",
                field=f"{where}.phase_type",
            )
        if phase.account_group not in kinds:
            raise InvalidProgramError(
                "unknown_account_group",
                f"{where}.account_group: no account group {phase.account_group!r}",
                field=f"{where}.account_group",
            )
        try:
            rules = validate_rules(phase.rules)
        except RuleConfigError as exc:
            name = getattr(exc, "field", "") or ""
            raise InvalidProgramError(
                "invalid_rules",
                f"{where}.rules: {exc}",
                field=f"{where}.rules.{name}" if name else f"{where}.rules",
            ) from exc
        full_rules.append(rules)
        if phase.phase_type == EVALUATION:
            if rules.get("profit_target") is None:
                raise InvalidProgramError(
                    "evaluation_phase_without_target",
                    f"{where}: an evaluation phase needs a profit_target",
                    field=f"{where}.rules.profit_target",
                )
            if phase.profit_split is not None:
                raise InvalidProgramError(
                    "profit_split_not_funded",
                    f"{where}: only the funded phase has a profit_split",
                    field=f"{where}.profit_split",
                )
    if len(funded) == len(program.phases):
        raise InvalidProgramError(
            "no_evaluation_phase",
            "a program needs at least one evaluation phase",
            field="phases",
        )
    if len(funded) > 1:
        raise InvalidProgramError(
            "too_many_funded_phases",
            f"a program has at most one funded phase, got {len(funded)} "
            f"(phases {', '.join(map(str, funded))})",
            field=f"phases[{funded[1]}].phase_type",
        )
    if funded:
        index = funded[0]
        phase = program.phases[index]
        where = f"phases[{index}]"
        if index != len(program.phases) - 1:
            raise InvalidProgramError(
                "funded_phase_not_last",
                f"the funded phase must be the last one; it is {where} of "
                f"{len(program.phases)}",
                field=f"{where}.phase_type",
            )
        if kinds[phase.account_group] != "REAL":
            raise InvalidProgramError(
                "funded_phase_not_real",
                f"{where}.account_group: the funded phase runs in a REAL group, "
                f"{phase.account_group!r} is {kinds[phase.account_group]}",
                field=f"{where}.account_group",
            )
        if full_rules[index].get("profit_target") is not None:
            raise InvalidProgramError(
                "funded_phase_with_target",
                f"{where}: a funded phase has no profit_target",
                field=f"{where}.rules.profit_target",
            )
        split = phase.profit_split
        if split is None or not Decimal(0) < split <= Decimal(1):
            raise InvalidProgramError(
                "invalid_profit_split",
                f"{where}.profit_split: the funded phase needs a ratio in (0, 1], "
                f"got {split}",
                field=f"{where}.profit_split",
            )
    return full_rules


def create_program(conn: Connection, *, program: ProgramIn) -> int:
    """Validate and save a program with its phases.

    Args:
        conn: The connection; wrap the call in a transaction.
        program: The program.

    Returns:
        The program's id.

    Raises:
        InvalidProgramError: The program is invalid; nothing was saved.
    """
    validate_program(conn, program)
    row = conn.execute(
        "INSERT INTO programs (name, description, price, currency, active) "
        "VALUES (?, ?, ?, ?, ?) RETURNING id",
        [
            program.name,
            program.description,
            program.price,
            program.currency,
            program.active,
        ],
    ).fetchone()
    assert row is not None  # noqa: S101 - INSERT ... RETURNING returns the row
    program_id = int(row[0])
    for index, phase in enumerate(program.phases):
        conn.execute(
            "INSERT INTO program_phases (program_id, phase_index, name, phase_type, "
            "account_group, rules, profit_split) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                program_id,
                index,
                phase.name,
                phase.phase_type,
                phase.account_group,
                json.dumps(dict(phase.rules)),
                phase.profit_split,
            ],
        )
    return program_id


def account_enabled(conn: Connection, *, account_id: int) -> bool | None:
    """Whether a trading account is enabled; None when there is no such account."""
    row = conn.execute(
        "SELECT enabled FROM trading_accounts WHERE account_id = ?", [account_id]
    ).fetchone()
    return None if row is None else bool(row[0])


def disable_accounts(conn: Connection, *, account_ids: Sequence[int]) -> None:
    """Disable trading accounts (they can no longer trade or pay)."""
    if account_ids:
        conn.execute(
            "UPDATE trading_accounts SET enabled = false "
            "WHERE account_id IN (SELECT unnest(?::BIGINT[]))",
            [list(account_ids)],
        )
