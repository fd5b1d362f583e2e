"""Shared pieces of the routers: JSON responses and documented error answers."""

from __future__ import annotations

from typing import Any, Final

from fastapi.responses import Response

from api.models import ErrorPublic

JSON: Final = "application/json"


def json_bytes(body: bytes, status_code: int = 200) -> Response:
    """A response for an already encoded JSON body.

    Args:
        body: The JSON bytes.
        status_code: The HTTP status.

    Returns:
        The response.
    """
    return Response(body, status_code=status_code, media_type=JSON)


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorPublic, "description": description}


#: Error answers of a route that needs a session.
AUTH_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    401: _error("no valid session (missing, malformed, unknown or expired token)"),
    422: _error("a query or path value out of range, or an unknown query parameter"),
}
#: Error answers of a route that reads one thing by id.
ID_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    **AUTH_ERRORS,
    404: _error("no such id, or not the customer's: the same answer"),
}
#: Error answers of a public route.
PUBLIC_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    422: _error("a query or path value out of range, or an unknown query parameter"),
}
