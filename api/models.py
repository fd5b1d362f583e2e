"""Response and query models of the API (``XPublic``, ``XsPublic``, ``XQuery``).

The hot routes encode their bodies themselves (:mod:`api.serialize`); these models
describe the same JSON in the OpenAPI document at ``/docs`` and validate query
strings. Money fields are decimal strings, timestamps ISO 8601 UTC.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

#: Largest page size (``api.md``).
MAX_LIMIT = 500
#: Page size when none is asked for.
DEFAULT_LIMIT = 50
#: Largest id or offset accepted (DuckDB BIGINT).
MAX_INT64 = 2**63 - 1

_CANONICAL_INT: Final = re.compile(r"0|[1-9][0-9]*")


def canonical_id(value: object) -> object:
    """Refuse an id in a path unless it is written as canonical decimal digits.

    pydantic's integer parsing alone takes ``01``, ``+1``, ``1_0``, `` 1`` and
    ``1.0`` as ids: one thing would have several URLs. Use it as a
    ``BeforeValidator`` on a path parameter; the range is checked after it.

    Args:
        value: The raw path value.

    Returns:
        The value, unchanged.

    Raises:
        PydanticCustomError: ``int_canonical`` (a ``422`` naming the field).
    """
    if isinstance(value, str) and _CANONICAL_INT.fullmatch(value) is None:
        raise PydanticCustomError(
            "int_canonical",
            "Input should be an integer in canonical decimal form "
            "(digits only: no sign, leading zero, space, separator or fraction)",
        )
    return value


ChallengeStatusName = Literal["pending", "active", "passed", "failed", "cancelled"]
PhaseStatus = Literal["pending", "active", "passed", "failed", "cancelled"]
RuleName = Literal[
    "time_limit",
    "max_loss",
    "daily_loss",
    "max_loss_warning",
    "daily_loss_warning",
    "max_position_size",
    "short_hold",
    "weekend_hold",
]
Severity = Literal["warning", "critical"]
Money = str


# ------------------------------------------------------------------- queries


class PageQuery(BaseModel):
    """``limit`` and ``offset`` of a list; unknown query parameters are refused."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="page size")
    offset: int = Field(0, ge=0, le=MAX_INT64, description="items skipped")


class NoQuery(BaseModel):
    """A route that takes no query parameters refuses every one."""

    model_config = ConfigDict(extra="forbid")


class ChallengesQuery(PageQuery):
    """Query of ``GET /prop/challenges``."""

    status: ChallengeStatusName | None = Field(
        None, description="only challenges with this status name"
    )


class MetricsQuery(PageQuery):
    """Query of ``GET /prop/challenges/{id}/metrics``."""

    from_: datetime | None = Field(
        None,
        alias="from",
        description="only metrics at or after this time (ISO 8601)",
    )
    to: datetime | None = Field(
        None, description="only metrics before this time (ISO 8601)"
    )
    phase_index: int | None = Field(None, ge=0, le=2**31 - 1)


class BreachesQuery(PageQuery):
    """Query of ``GET /prop/challenges/{id}/breaches``."""

    phase_index: int | None = Field(None, ge=0, le=2**31 - 1)
    rule: RuleName | None = None
    severity: Severity | None = None


class FlagsQuery(PageQuery):
    """Query of ``GET /prop/challenges/{id}/flags``."""

    symbol: str | None = Field(None, min_length=1, max_length=64)


# ----------------------------------------------------------------- responses


class ErrorBody(BaseModel):
    """The inside of every error response."""

    code: str = Field(description="stable code, e.g. not_found")
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorPublic(BaseModel):
    """The one error shape: ``{"error": {"code", "message", "details"}}``."""

    error: ErrorBody


class ProgramPhasePublic(BaseModel):
    """A phase of a program."""

    phase_index: int
    name: str
    phase_type: int = Field(description="0 evaluation, 1 funded")
    account_group: str
    rules: dict[str, Any] = Field(description="rule names of rules.md")
    profit_split: str | None = Field(description="funded phase only; '0.8' is 80%")


class ProgramPublic(BaseModel):
    """A program with its phases and the computed ``profit_split``."""

    id: int
    name: str
    description: str
    price: Money
    currency: str
    active: bool
    profit_split: str | None = Field(
        description="read from the funded phase; null if there is none"
    )
    phases: list[ProgramPhasePublic]


class ProgramsPublic(BaseModel):
    """A page of programs."""

    items: list[ProgramPublic]
    total_count: int
    has_more: bool


class MetricPublic(BaseModel):
    """A phase's metric after one tick (rules.md "Outputs")."""

    ts: datetime
    day: str
    status: PhaseStatus
    equity: Money
    balance: Money
    profit: Money
    daily_start_equity: Money
    daily_start_balance: Money
    daily_pnl: Money
    daily_loss_limit: Money | None
    daily_floor: Money | None
    daily_room: Money | None
    max_loss_limit: Money | None
    overall_floor: Money | None
    overall_room: Money | None
    hwm: Money
    best_day_profit: Money
    profit_target_level: Money | None
    daily_paused: bool
    trading_days: int
    days_elapsed: int
    profit_progress: float | None
    trading_days_progress: float
    open_lots: float | None = Field(
        description="lots of the open positions; null before deals were recorded"
    )
    open_positions: int | None


class MetricHistoryPublic(MetricPublic):
    """One metric of a challenge's history."""

    phase_index: int
    account_id: int


class MetricsPublic(BaseModel):
    """A page of metric history, newest first."""

    items: list[MetricHistoryPublic]
    total_count: int
    has_more: bool


class ProgressPublic(BaseModel):
    """Profit and trading-days progress, daily and overall room left."""

    profit_progress: float | None = Field(description="0..1; null without a target")
    trading_days_progress: float
    trading_days: int
    min_trading_days: int
    profit: Money
    profit_target_level: Money | None
    daily_room: Money | None
    daily_loss_limit: Money | None
    overall_room: Money | None
    max_loss_limit: Money | None
    days_elapsed: int | None
    max_days: int | None
    trading_day_basis: Literal["activity", "deals"] = Field(
        description="what makes a trading day: ticks (activity) or an in deal"
    )
    open_lots: float | None
    max_open_lots: float | None


class ChallengePhasePublic(BaseModel):
    """A runtime phase of a challenge."""

    phase_index: int
    name: str
    phase_type: int
    account_group: str
    status: PhaseStatus
    account_id: int | None
    started_at: datetime | None
    ended_at: datetime | None
    profit_split: str | None
    rules: dict[str, Any]
    latest_metric: MetricPublic | None
    progress: ProgressPublic


class ChallengePublic(BaseModel):
    """A challenge with every runtime phase."""

    id: int
    program_id: int
    program_name: str
    purchase_id: int | None
    status: int
    status_name: ChallengeStatusName
    created_at: datetime
    updated_at: datetime
    ended_at: datetime | None
    current_phase_index: int
    phases: list[ChallengePhasePublic]


class ChallengesPublic(BaseModel):
    """A page of challenges, newest first."""

    items: list[ChallengePublic]
    total_count: int
    has_more: bool


class BreachPublic(BaseModel):
    """A breach of a rule (rules.md "Outputs")."""

    id: int
    challenge_id: int
    phase_index: int
    account_id: int
    breach_seq: int
    rule: RuleName
    severity: Severity
    threshold: str = Field(
        description=(
            "money; days for time_limit; lots for max_position_size and "
            "weekend_hold; seconds for short_hold"
        )
    )
    actual: str = Field(
        description=(
            "money; days for time_limit; lots for max_position_size and "
            "weekend_hold; seconds for short_hold"
        )
    )
    action: Literal["phase_failed", "trading_paused", "notify"]
    ts: datetime
    resolved: bool
    resolved_ts: datetime | None


class BreachesPublic(BaseModel):
    """A page of breaches, newest first."""

    items: list[BreachPublic]
    total_count: int
    has_more: bool


class FlagPublic(BaseModel):
    """A hedge flag (rules.md "Cross-account hedging").

    Two ``in`` deals of two of the customer's accounts, on the same symbol, of
    opposite sides, within the firm's window; severity ``warning``, action
    ``review``.
    """

    symbol: str
    account_id_1: int = Field(description="the smaller account")
    deal_id_1: int
    ts_1: datetime
    side_1: Literal["buy", "sell"]
    account_id_2: int
    deal_id_2: int
    ts_2: datetime
    side_2: Literal["buy", "sell"]
    gap_seconds: float = Field(ge=0, description="|ts_1 - ts_2| in seconds")
    severity: Literal["warning"]
    action: Literal["review"]


class FlagsPublic(BaseModel):
    """A page of hedge flags, newest first."""

    items: list[FlagPublic]
    total_count: int
    has_more: bool


class HealthPublic(BaseModel):
    """``/healthz`` and ``/readyz``."""

    status: str
    checks: dict[str, str] = Field(default_factory=dict)


# ----------------------------------------------------------------- purchases

PurchaseStatusName = Literal[
    "pending", "paid", "account_created", "active", "failed", "refunded"
]
PayerReason = Literal["disabled", "not_real", "wrong_currency", "insufficient_balance"]
Id = Annotated[int, Field(ge=1, le=MAX_INT64)]


class PurchaseCreate(BaseModel):
    """Body of ``POST /prop/purchases`` (BuyPropChallenge)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    program_id: Id = Field(description="the program to buy")
    payer_account_id: Id = Field(
        description="the customer's REAL account that pays the fee"
    )


class PurchasePreviewCreate(BaseModel):
    """Body of ``POST /prop/purchases/preview``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    program_id: Id = Field(description="the program")
    payer_account_id: Id | None = Field(
        None, description="the payer to check (default: the first eligible one)"
    )


class PayerAccountsQuery(BaseModel):
    """Query of ``GET /prop/payer-accounts``."""

    model_config = ConfigDict(extra="forbid")

    program_id: int = Field(ge=1, le=MAX_INT64, description="the program to pay for")


class PurchasePublic(BaseModel):
    """A purchase with its lifecycle fields (``docs/api.md``, "Purchases")."""

    id: int
    program_id: int
    program_name: str
    payer_account_id: int
    challenge_id: int | None = Field(description="its latest challenge")
    price: Money
    currency: str
    status: int = Field(description="0..5, see status_name")
    status_name: PurchaseStatusName
    next_action: str = Field(description="what the terminal should do next")
    payment_status: str
    activation_status: str
    failure_reason: str | None = Field(description="stable code, null unless failed")
    can_retry: bool
    can_cancel: bool
    created_at: datetime
    updated_at: datetime


class PurchasesPublic(BaseModel):
    """A page of purchases, newest first."""

    items: list[PurchasePublic]
    total_count: int
    has_more: bool


class PayerAccountPublic(BaseModel):
    """One of the customer's accounts, and whether it can pay for the program."""

    account_id: int
    account_group: str
    kind: Literal["DEMO", "REAL"]
    currency: str
    balance: Money
    available: Money = Field(description="balance less fees already queued")
    eligible: bool
    reason: PayerReason | None


class PayerAccountsPublic(BaseModel):
    """The customer's payer accounts for a program."""

    program_id: int
    price: Money
    currency: str
    items: list[PayerAccountPublic]


class WithdrawalPublic(BaseModel):
    """What a purchase would withdraw."""

    account_id: int
    amount: Money
    currency: str
    balance: Money
    balance_after: Money


class PreviewPhasePublic(BaseModel):
    """A phase of the program, with the balance its account starts with."""

    phase_index: int
    name: str
    phase_type: int
    account_group: str
    initial_balance: Money


class PurchasePreviewPublic(BaseModel):
    """``POST /prop/purchases/preview``: what a purchase would do."""

    program_id: int
    program_name: str
    price: Money
    currency: str
    payer_account_id: int | None
    eligible: bool
    reason: str | None = Field(
        description="why not: a payer reason, no_eligible_account, "
        "program_not_available, program_invalid"
    )
    withdrawal: WithdrawalPublic | None
    initial_balance: Money = Field(description="the first phase's account")
    phases: list[PreviewPhasePublic]
