"""``GET /prop/programs``: what can be bought, with the computed ``profit_split``.

Public reference data: no session needed.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from pydantic import BeforeValidator

from api import crud
from api.deps import SessionDep
from api.errors import not_found
from api.models import (
    MAX_INT64,
    NoQuery,
    PageQuery,
    ProgramPublic,
    ProgramsPublic,
    canonical_id,
)
from api.routes.responses import PUBLIC_ERRORS, json_bytes
from api.serialize import dumps, page

router = APIRouter(prefix="/prop/programs", tags=["programs"])


@router.get("", response_model=ProgramsPublic, responses=PUBLIC_ERRORS)
def list_programs(
    session: SessionDep, query: Annotated[PageQuery, Query()]
) -> Response:
    """The active programs, by id, each with its phases and ``profit_split``."""
    items, total = crud.list_programs(
        session=session, limit=query.limit, offset=query.offset
    )
    return json_bytes(page(items, total=total, offset=query.offset))


@router.get(
    "/{program_id}",
    response_model=ProgramPublic,
    responses={
        **PUBLIC_ERRORS,
        404: {"model": PUBLIC_ERRORS[422]["model"], "description": "no such program"},
    },
)
def read_program(
    program_id: Annotated[int, BeforeValidator(canonical_id), Path(ge=1, le=MAX_INT64)],
    session: SessionDep,
    query: Annotated[NoQuery, Query()],
) -> Response:
    """One program with its phases and rules (inactive ones too)."""
    program = crud.get_program(session=session, program_id=program_id)
    if program is None:
        raise not_found("program", program_id)
    return json_bytes(dumps(program))
