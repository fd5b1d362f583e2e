"""The ``/prop/challenges`` resource: the customer's challenges and their runtime.

``GET /prop/challenges`` lists them and ``GET /prop/challenges/{id}`` reads one,
both from the in-memory cache the evaluator keeps current (``api/cache.py``; the
second is also answered before routing by ``api/hot.py``, with the same bytes);
``/metrics``, ``/breaches`` and ``/flags`` read their history through
``api/crud.py``. All need a customer session and answer ``404`` for a challenge
that is missing or someone else's, with the same body.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from pydantic import BeforeValidator

from api import crud
from api.deps import CacheDep, CurrentTrader, SessionDep
from api.errors import not_found
from api.models import (
    MAX_INT64,
    BreachesPublic,
    BreachesQuery,
    ChallengePublic,
    ChallengesPublic,
    ChallengesQuery,
    FlagsPublic,
    FlagsQuery,
    MetricsPublic,
    MetricsQuery,
    NoQuery,
    canonical_id,
)
from api.routes.responses import AUTH_ERRORS, ID_ERRORS, json_bytes
from api.serialize import page, page_of_bodies
from prop_stream.store import CHALLENGE_STATUS_NAMES

router = APIRouter(prefix="/prop/challenges", tags=["challenges"])

_STATUS_BY_NAME = {name: status for status, name in CHALLENGE_STATUS_NAMES.items()}

ChallengeId = Annotated[
    int,
    BeforeValidator(canonical_id),
    Path(ge=1, le=MAX_INT64, description="challenge id"),
]


@router.get("", response_model=ChallengesPublic, responses=AUTH_ERRORS)
async def list_challenges(
    trader: CurrentTrader,
    cache: CacheDep,
    query: Annotated[ChallengesQuery, Query()],
) -> Response:
    """The customer's challenges, newest first, each with every runtime phase.

    Filter with ``status`` (a status name: ``pending``, ``active``, ``passed``,
    ``failed``, ``cancelled``).
    """
    status = None if query.status is None else _STATUS_BY_NAME[query.status]
    bodies, total = cache.list_bodies(
        customer_id=trader, status=status, limit=query.limit, offset=query.offset
    )
    return json_bytes(page_of_bodies(bodies, total=total, offset=query.offset))


@router.get("/{challenge_id}", response_model=ChallengePublic, responses=ID_ERRORS)
async def read_challenge(
    challenge_id: ChallengeId,
    trader: CurrentTrader,
    cache: CacheDep,
    query: Annotated[NoQuery, Query()],
) -> Response:
    """One challenge with every runtime phase, its latest metric and progress.

    Served from memory the evaluator keeps current (no database query).
    """
    body = cache.challenge_body(challenge_id, customer_id=trader)
    if body is None:
        raise not_found("challenge", challenge_id)
    return json_bytes(body)


@router.get(
    "/{challenge_id}/metrics", response_model=MetricsPublic, responses=ID_ERRORS
)
def list_metrics(
    challenge_id: ChallengeId,
    trader: CurrentTrader,
    cache: CacheDep,
    session: SessionDep,
    query: Annotated[MetricsQuery, Query()],
) -> Response:
    """The challenge's metric history, newest first.

    ``from`` (inclusive) and ``to`` (exclusive) bound ``ts``; ``phase_index``
    keeps one phase.
    """
    if not cache.owns(challenge_id, customer_id=trader):
        raise not_found("challenge", challenge_id)
    items, total = crud.list_metrics(
        session=session,
        challenge_id=challenge_id,
        limit=query.limit,
        offset=query.offset,
        from_=query.from_,
        to=query.to,
        phase_index=query.phase_index,
    )
    return json_bytes(page(items, total=total, offset=query.offset))


@router.get(
    "/{challenge_id}/breaches", response_model=BreachesPublic, responses=ID_ERRORS
)
def list_breaches(
    challenge_id: ChallengeId,
    trader: CurrentTrader,
    cache: CacheDep,
    session: SessionDep,
    query: Annotated[BreachesQuery, Query()],
) -> Response:
    """The challenge's breaches, newest first; filter by phase, rule, severity."""
    if not cache.owns(challenge_id, customer_id=trader):
        raise not_found("challenge", challenge_id)
    items, total = crud.list_breaches(
        session=session,
        challenge_id=challenge_id,
        limit=query.limit,
        offset=query.offset,
        phase_index=query.phase_index,
        rule=query.rule,
        severity=query.severity,
    )
    return json_bytes(page(items, total=total, offset=query.offset))


@router.get("/{challenge_id}/flags", response_model=FlagsPublic, responses=ID_ERRORS)
def list_flags(
    challenge_id: ChallengeId,
    trader: CurrentTrader,
    cache: CacheDep,
    session: SessionDep,
    query: Annotated[FlagsQuery, Query()],
) -> Response:
    """Hedge flags of the challenge's accounts, newest first; filter by symbol.

    A flag pairs an ``in`` deal of one of the challenge's accounts with an
    opposite ``in`` deal of another of the customer's accounts on the same symbol
    within the firm's window (rules.md, "Cross-account hedging"). It is a review
    flag: it never fails a phase by itself.
    """
    if not cache.owns(challenge_id, customer_id=trader):
        raise not_found("challenge", challenge_id)
    items, total = crud.list_flags(
        session=session,
        challenge_id=challenge_id,
        limit=query.limit,
        offset=query.offset,
        symbol=query.symbol,
    )
    return json_bytes(page(items, total=total, offset=query.offset))
