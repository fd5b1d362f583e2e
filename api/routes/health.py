"""``/healthz`` (the process answers) and ``/readyz`` (it can do its job)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.deps import get_state
from api.errors import error_response
from api.models import ErrorPublic, HealthPublic
from api.routes.responses import json_bytes
from api.serialize import dumps

router = APIRouter(tags=["health"])


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
    """Ready: the database answers and the evaluator loop runs (when there is one).

    ``checks.evaluator`` is ``absent`` when this process runs no evaluator.
    """
    state = get_state(request)
    checks = {"database": "ok" if state.db.ping() else "unavailable"}
    if state.evaluator_ready is None:
        checks["evaluator"] = "absent"
    else:
        try:
            running = bool(state.evaluator_ready())
        except Exception:  # a failing probe means "not ready"
            running = False
        checks["evaluator"] = "ok" if running else "not_running"
    if checks["database"] != "ok" or checks["evaluator"] == "not_running":
        return error_response(503, "not_ready", "not ready", {"checks": checks})
    return json_bytes(dumps({"status": "ready", "checks": checks}))
