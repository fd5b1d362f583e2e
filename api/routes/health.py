"""``/healthz`` (the process answers), ``/readyz`` (it can do its job), ``/metrics``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.deps import get_state
from api.errors import error_response
from api.models import ErrorPublic, HealthPublic
from api.routes.responses import json_bytes
from api.serialize import dumps
from prop_stream.telemetry import CONTENT_TYPE

router = APIRouter(tags=["health"])

#: What a check says when it is fine, or when this process does not run it.
_FINE = frozenset({"ok", "absent"})


@router.get("/healthz", response_model=HealthPublic)
async def healthz() -> Response:
    """Alive: the process serves HTTP."""
    return json_bytes(dumps({"status": "ok", "checks": {}}))


@router.get(
    "/readyz",
    response_model=HealthPublic,
    responses={503: {"model": ErrorPublic, "description": "not ready"}},
)
def readyz(request: Request) -> Response:
    """Ready: the database answers and every component of this process runs.

    ``checks`` names each part: ``database``, ``evaluator`` (``absent`` when this
    process runs none), the supervised components (``jobs``, ``cache``, ...) and
    what they need (``kafka``, ``topic``); a part that is not ready says why
    (``docs/operations.md`` lists every reason).
    """
    state = get_state(request)
    checks = {"database": "ok" if state.db.ping() else "unavailable"}
    if state.checks is not None:
        try:
            checks.update(state.checks())
        except Exception as exc:  # a failing probe means "not ready"
            checks["evaluator"] = f"readiness probe failed: {exc}"
        checks.setdefault("evaluator", "absent")
    elif state.evaluator_ready is None:
        checks["evaluator"] = "absent"
    else:
        try:
            running = bool(state.evaluator_ready())
        except Exception:  # a failing probe means "not ready"
            running = False
        checks["evaluator"] = "ok" if running else "not_running"
    if any(value not in _FINE for value in checks.values()):
        return error_response(503, "not_ready", "not ready", {"checks": checks})
    return json_bytes(dumps({"status": "ready", "checks": checks}))


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "metrics"}},
)
async def metrics(request: Request) -> Response:
    """The process's metrics in the Prometheus text format (docs/operations.md)."""
    telemetry = get_state(request).telemetry
    # Store-wide numbers are queried while scraping: off the event loop.
    body = await asyncio.to_thread(telemetry.exposition)
    return Response(body, media_type=CONTENT_TYPE)
