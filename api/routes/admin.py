"""The operator's admin routes: ``prop-stream session`` / ``export`` on a live service.

Only the token ``serve`` wrote to ``PATH.admin.json`` (mode 0600) is accepted, and
only from a client on the service's own machine (a loopback address, or the
address the server itself listens on). See :mod:`prop_stream.admin`. The routes
are left out of the OpenAPI document: they are not the terminal's API.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

from api.deps import get_state
from api.errors import ApiError, unauthorized
from api.routes.responses import json_bytes
from api.serialize import dumps
from prop_stream.store import transaction
from prop_stream.store.export import ExportResult, export_parquet
from prop_stream.store.sessions import create_session

BodyT = TypeVar("BodyT", bound=BaseModel)

#: The longest session an operator can issue (about ten years).
MAX_TTL_S = 10 * 366 * 86_400.0


def require_admin(request: Request) -> None:
    """Let through only the admin token, from this machine.

    Raises:
        ApiError: 404 when the process has no admin token (not ``serve``), 403
            from another machine, 401 with a wrong token.
    """
    expected = get_state(request).admin_token
    if expected is None:
        raise ApiError(404, "not_found", "not found")
    client = request.client.host if request.client else ""
    server = request.scope.get("server")
    own = server[0] if server else None
    if not _local(client, own):
        raise ApiError(403, "forbidden", "admin routes answer this machine only")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise unauthorized("invalid admin token")


def _local(client: str, own: str | None) -> bool:
    if own is not None and client == own:
        return True
    try:
        return ipaddress.ip_address(client).is_loopback
    except ValueError:
        return False


router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    include_in_schema=False,
    dependencies=[Depends(require_admin)],
)


class SessionIn(BaseModel):
    """A session to issue."""

    email: str = Field(min_length=1, max_length=320)
    ttl_s: float = Field(gt=0, le=MAX_TTL_S)


class ExportIn(BaseModel):
    """Where to export."""

    out: str = Field(min_length=1)


async def _body(request: Request, model: type[BodyT]) -> BodyT:
    """The request's JSON body as ``model``, read only after the admin check.

    The routes take no body parameter on purpose: FastAPI reads and parses a
    declared body before it solves the dependencies, so an anonymous caller's
    body would be parsed before ``require_admin`` refuses it.
    """
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]
        ) from exc


@router.post("/session")
async def admin_session(request: Request) -> Response:
    """Issue a session token for a customer (``prop-stream session``)."""
    body = await _body(request, SessionIn)
    state = get_state(request)

    def issue() -> str:
        with state.db.cursor() as cur, transaction(cur):
            return create_session(
                cur, email=body.email, ttl=timedelta(seconds=body.ttl_s)
            )

    token = await asyncio.to_thread(issue)
    return json_bytes(dumps({"token": token}))


@router.post("/export")
async def admin_export(request: Request) -> Response:
    """Export the history tables to Parquet (``prop-stream export``)."""
    body = await _body(request, ExportIn)
    state = get_state(request)

    def export() -> ExportResult:
        with state.db.cursor() as cur:
            return export_parquet(cur, Path(body.out))

    try:
        result = await asyncio.to_thread(export)
    except OSError as exc:
        raise ApiError(
            400, "export_failed", f"export to {body.out} failed: {exc}"
        ) from exc
    return json_bytes(dumps({"out": str(result.out_dir), "rows": result.rows}))
