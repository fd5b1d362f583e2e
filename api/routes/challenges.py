"""``GET /prop/challenges``: the customer's challenges, from memory."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from api.deps import CacheDep, CurrentTrader
from api.models import ChallengesPublic, ChallengesQuery
from api.routes.responses import AUTH_ERRORS, json_bytes
from api.serialize import page_of_bodies
from prop_stream.store import CHALLENGE_STATUS_NAMES

router = APIRouter(prefix="/prop/challenges", tags=["challenges"])

_STATUS_BY_NAME = {name: status for status, name in CHALLENGE_STATUS_NAMES.items()}


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
