"""The selling half of ``api.md``: preview, payer accounts, BuyPropChallenge.

Every route needs a customer session and shows only the customer's things: a
purchase or payer account of someone else's answers ``404``, exactly as a missing
one. The routes are sync (DuckDB blocks) and borrow a cursor per request.

After a purchase (or a retry) commits, its first phase is registered with the
running engine (``AppState.phases``) and the challenge is put in the runtime
cache, so ``GET /prop/challenges/{id}`` shows it at once and its ticks are judged
from the next batch on.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, Header, Path, Query
from fastapi.responses import Response
from pydantic import BeforeValidator

from api import crud
from api.deps import CurrentTrader, SessionDep, StateDep
from api.models import (
    MAX_INT64,
    ErrorPublic,
    NoQuery,
    PageQuery,
    PayerAccountsPublic,
    PayerAccountsQuery,
    PurchaseCreate,
    PurchasePreviewCreate,
    PurchasePreviewPublic,
    PurchasePublic,
    PurchasesPublic,
    canonical_id,
)
from api.routes.responses import AUTH_ERRORS, ID_ERRORS, json_bytes
from api.serialize import dumps, page
from prop_stream.store import Bought, Connection

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/prop/purchases", tags=["purchases"])
payers_router = APIRouter(prefix="/prop/payer-accounts", tags=["purchases"])

PurchaseId = Annotated[
    int,
    BeforeValidator(canonical_id),
    Path(ge=1, le=MAX_INT64, description="purchase id"),
]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorPublic, "description": description}


_BODY_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    **ID_ERRORS,
    400: _error("the payer can't pay (reason in details) or the program isn't sold"),
    404: _error("no such program, or a payer account that isn't the customer's"),
}
_STATE_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    **ID_ERRORS,
    409: _error("not allowed in the purchase's state (can_retry / can_cancel)"),
}

#: ``Idempotency-Key``: printable ASCII without spaces, at most 255 characters.
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[!-~]+$",
        description="the same key and body answer the first purchase",
    ),
]


def _started(state: StateDep, session: Connection, bought: Bought) -> None:
    """After the commit: judge the new phase, show the new challenge."""
    if state.phases is not None:
        state.phases.register_phase(
            crud.first_phase_spec(session=session, bought=bought)
        )
    state.cache.refresh([bought.challenge_id])


@router.post("/preview", response_model=PurchasePreviewPublic, responses=_BODY_ERRORS)
def preview_purchase(
    trader: CurrentTrader,
    session: SessionDep,
    preview_in: Annotated[PurchasePreviewCreate, Body()],
    query: Annotated[NoQuery, Query()],
) -> Response:
    """What buying a program would do: the fee, the payer, the phases.

    Says whether the payer is eligible, and why not (``reason``).
    """
    return json_bytes(
        dumps(
            crud.preview_purchase(
                session=session, customer_id=trader, preview_in=preview_in
            )
        )
    )


@router.post(
    "",
    response_model=PurchasePublic,
    status_code=201,
    responses={**_BODY_ERRORS, 409: _error("Idempotency-Key reused with another body")},
)
def create_purchase(
    trader: CurrentTrader,
    session: SessionDep,
    state: StateDep,
    purchase_in: Annotated[PurchaseCreate, Body()],
    query: Annotated[NoQuery, Query()],
    idempotency_key: IdempotencyKey = None,
) -> Response:
    """BuyPropChallenge: pay, open the first phase's account, start the challenge.

    The purchase starts ``pending``; the job worker withdraws the fee and deposits
    the first phase's balance. A repeated ``Idempotency-Key`` with the same body
    answers the first purchase (header ``Idempotent-Replayed: true``).
    """
    body, bought = crud.create_purchase(
        session=session,
        customer_id=trader,
        purchase_in=purchase_in,
        idempotency_key=idempotency_key,
    )
    response = json_bytes(dumps(body), status_code=201)
    if bought is None:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        _started(state, session, bought)
    return response


@router.get("", response_model=PurchasesPublic, responses=AUTH_ERRORS)
def list_purchases(
    trader: CurrentTrader, session: SessionDep, query: Annotated[PageQuery, Query()]
) -> Response:
    """The customer's purchases, newest first."""
    items, total = crud.list_purchases(
        session=session, customer_id=trader, limit=query.limit, offset=query.offset
    )
    return json_bytes(page(items, total=total, offset=query.offset))


@router.get("/{purchase_id}", response_model=PurchasePublic, responses=ID_ERRORS)
def read_purchase(
    purchase_id: PurchaseId,
    trader: CurrentTrader,
    session: SessionDep,
    query: Annotated[NoQuery, Query()],
) -> Response:
    """One purchase with its lifecycle fields."""
    return _purchase(session, trader, purchase_id)


@router.post(
    "/{purchase_id}/retry", response_model=PurchasePublic, responses=_STATE_ERRORS
)
def retry_purchase(
    purchase_id: PurchaseId,
    trader: CurrentTrader,
    session: SessionDep,
    state: StateDep,
    query: Annotated[NoQuery, Query()],
) -> Response:
    """Retry a purchase whose payment failed (``can_retry``); else ``409``."""
    bought = crud.retry_purchase(
        session=session, customer_id=trader, purchase_id=purchase_id
    )
    _started(state, session, bought)
    return _purchase(session, trader, purchase_id)


@router.post(
    "/{purchase_id}/cancel", response_model=PurchasePublic, responses=_STATE_ERRORS
)
def cancel_purchase(
    purchase_id: PurchaseId,
    trader: CurrentTrader,
    session: SessionDep,
    state: StateDep,
    query: Annotated[NoQuery, Query()],
) -> Response:
    """Cancel a purchase (``can_cancel``); a paid fee is refunded. Else ``409``."""
    cancelled = crud.cancel_purchase(
        session=session, customer_id=trader, purchase_id=purchase_id
    )
    if state.phases is not None:
        for account_id in cancelled.removed_accounts:
            state.phases.remove_phase(account_id)
    state.cache.refresh(cancelled.challenge_ids)
    return _purchase(session, trader, purchase_id)


@payers_router.get("", response_model=PayerAccountsPublic, responses=_BODY_ERRORS)
def list_payer_accounts(
    trader: CurrentTrader,
    session: SessionDep,
    query: Annotated[PayerAccountsQuery, Query()],
) -> Response:
    """The customer's accounts that could pay for a program, and why the others can't.

    ``reason``: ``disabled``, ``not_real``, ``wrong_currency``,
    ``insufficient_balance`` (fees already queued count against the balance).
    """
    return json_bytes(
        dumps(
            crud.payer_accounts(
                session=session, customer_id=trader, program_id=query.program_id
            )
        )
    )


def _purchase(session: Connection, customer_id: int, purchase_id: int) -> Response:
    """The purchase object of ``api.md`` as the response (404 if not theirs)."""
    return json_bytes(
        dumps(
            crud.read_purchase(
                session=session, customer_id=customer_id, purchase_id=purchase_id
            )
        )
    )
