"""Every error the API answers, in the one shape of ``api.md``.

``{"error": {"code": "stable_code", "message": "...", "details": {...}}}``. This is
the only module that turns exceptions into HTTP responses: routes and dependencies
raise :class:`ApiError` (or the helpers below), the store raises its domain errors,
and :func:`install` registers the handlers that render them all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

import duckdb
import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.serialize import dumps
from prop_stream.evaluator.faults import transient_reason
from prop_stream.store import DatabaseLockedError, NotFoundError, PurchaseError

logger = logging.getLogger(__name__)

JSON: Final = "application/json"

_STATUS_CODES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "not_ready",
}


class ApiError(Exception):
    """An error answer.

    Args:
        status_code: The HTTP status.
        code: A stable machine-readable code.
        message: For humans.
        details: Extra data (e.g. the offending ``field``).
        headers: Response headers (e.g. ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = dict(details or {})
        self.headers = dict(headers or {})


def error_body(
    code: str, message: str, details: Mapping[str, Any] | None = None
) -> bytes:
    """The encoded error shape.

    Args:
        code: Stable code.
        message: For humans.
        details: Extra data.

    Returns:
        JSON bytes.
    """
    return dumps(
        {"error": {"code": code, "message": message, "details": dict(details or {})}}
    )


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A response in the error shape.

    Args:
        status_code: The HTTP status.
        code: Stable code.
        message: For humans.
        details: Extra data.
        headers: Response headers.

    Returns:
        The response.
    """
    return Response(
        error_body(code, message, details),
        status_code=status_code,
        media_type=JSON,
        headers=dict(headers) if headers else None,
    )


#: The body of every 401, whatever was wrong with the credentials.
UNAUTHORIZED_HEADERS: Final = {"WWW-Authenticate": "Bearer"}


def unauthorized(message: str) -> ApiError:
    """A 401: no valid customer session.

    Args:
        message: What was wrong (missing header, unknown or expired session).

    Returns:
        The error to raise.
    """
    return ApiError(401, "unauthorized", message, headers=UNAUTHORIZED_HEADERS)


def not_found(kind: str, ident: int) -> ApiError:
    """A 404, the same whether the thing is missing or someone else's.

    Args:
        kind: ``challenge``, ``program``.
        ident: The id asked for.

    Returns:
        The error to raise.
    """
    return ApiError(
        404, "not_found", f"{kind} {ident} not found", details={"id": ident}
    )


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("query", "path", "header", "body", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "request"


def validation_details(
    errors: Sequence[Mapping[str, Any]],
) -> tuple[str, dict[str, Any]]:
    """The message and details of a 422 from pydantic's errors.

    Args:
        errors: ``RequestValidationError.errors()``.

    Returns:
        A message naming the first field, and ``{"field", "errors"}``.
    """
    items = []
    for err in errors:
        loc = tuple(err.get("loc", ()))
        kind = str(err.get("type", ""))
        name = _field(loc)
        message = str(err.get("msg", "invalid value"))
        if kind == "extra_forbidden":
            where = "field" if loc and loc[0] == "body" else "query parameter"
            message = f"unknown {where} {name!r}"
        items.append(
            {
                "field": name,
                "location": str(loc[0]) if loc else "request",
                "type": kind,
                "message": message,
            }
        )
    first = items[0] if items else {"field": "request", "message": "invalid request"}
    message = str(first["message"])
    if first.get("type") != "extra_forbidden":
        message = f"{first['field']}: {message}"
    return message, {
        "field": first["field"],
        "errors": items,
    }


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)  # noqa: S101 - registered for ApiError
    return error_response(
        exc.status_code, exc.code, exc.message, exc.details, exc.headers or None
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)  # noqa: S101 - registered for it
    message, details = validation_details(exc.errors())
    return error_response(422, "validation_error", message, details)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)  # noqa: S101 - registered for it
    code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return error_response(
        exc.status_code, code, message, headers=getattr(exc, "headers", None)
    )


async def _store_not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, "not_found", str(exc))


async def _purchase_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PurchaseError)  # noqa: S101 - registered for it
    details: dict[str, Any] = dict(exc.details)
    if exc.field is not None:
        details["field"] = exc.field
    return error_response(409 if exc.conflict else 400, exc.code, str(exc), details)


async def _store_locked(request: Request, exc: Exception) -> Response:
    return error_response(503, "database_locked", str(exc))


#: Seconds a client should wait before retrying during a transient outage.
RETRY_AFTER_S: Final = 5


async def _storage(request: Request, exc: Exception) -> Response:
    """Database and file errors: 503 when transient, else the 500 path."""
    if transient_reason(exc) is None:
        raise exc
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> Response:
    reason = transient_reason(exc)
    if reason is not None:
        # Disk full, database busy: the request may succeed later. One line,
        # no traceback: the supervisor's log already tells the story.
        logger.warning(
            "%s %s: unavailable: %s", request.method, request.url.path, reason
        )
        return error_response(
            503,
            "unavailable",
            f"temporarily unavailable ({reason.split(':', 1)[0]}); retry later",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error")


def install(app: FastAPI) -> None:
    """Register the handlers that render every error in the one shape.

    Args:
        app: The application.
    """
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(NotFoundError, _store_not_found)
    app.add_exception_handler(PurchaseError, _purchase_error)
    app.add_exception_handler(DatabaseLockedError, _store_locked)
    # Handled here rather than by the catch-all: Starlette re-raises what reaches
    # the catch-all, and a transient outage must not log a traceback per request.
    app.add_exception_handler(duckdb.Error, _storage)
    app.add_exception_handler(psycopg.Error, _storage)
    app.add_exception_handler(OSError, _storage)
    app.add_exception_handler(Exception, _unexpected)
