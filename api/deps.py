"""Dependencies of the routes, as ``Annotated`` aliases.

- :data:`SettingsDep`: the :class:`~api.core.config.ApiSettings`;
- :data:`SessionDep`: a store cursor borrowed for the request (DuckDB);
- :data:`CurrentTrader`: the id of the customer whose bearer token came with the
  request (401 otherwise);
- :data:`CacheDep`: the in-memory :class:`~api.cache.RuntimeCache`.

The hot routes use only async dependencies (no thread-pool hop) and never the
database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPBearer
from starlette.requests import HTTPConnection

from api.cache import RuntimeCache
from api.core.config import ApiSettings, get_settings
from api.core.security import SessionCache, bearer_token, lookup_session
from api.db import Database
from api.errors import unauthorized
from prop_stream.store import Connection, PhaseRegistry
from prop_stream.telemetry import ServiceMetrics


@dataclass(slots=True)
class AppState:
    """What the lifespan builds and the dependencies hand out.

    Attributes:
        db: The store's cursor pool.
        cache: The runtime read model.
        sessions: The session cache.
        evaluator_ready: Whether the evaluator loop runs (None: no evaluator in
            this process).
        phases: The running engine to register purchased phases with (None: no
            evaluator in this process; it finds them in the store when it starts).
        hot_reads: Requests answered by :class:`api.hot.HotReads` (not FastAPI).
        telemetry: The process's metrics (``/metrics``).
        checks: The process's readiness by part (``Supervisor.checks``), for
            ``/readyz``; None falls back to ``evaluator_ready``.
        admin_token: The token of the admin routes (None: no admin routes).
    """

    db: Database
    cache: RuntimeCache
    sessions: SessionCache
    evaluator_ready: Callable[[], bool] | None
    telemetry: ServiceMetrics
    phases: PhaseRegistry | None = None
    hot_reads: int = 0
    checks: Callable[[], Mapping[str, str]] | None = None
    admin_token: str | None = None


def get_state(request: HTTPConnection) -> AppState:
    """The app's runtime state.

    Raises:
        RuntimeError: The lifespan has not run.
    """
    state: AppState | None = getattr(request.app.state, "runtime", None)
    if state is None:
        raise RuntimeError("the API's lifespan has not run")
    return state


class _Bearer(HTTPBearer):
    """``Authorization: Bearer``, declared in OpenAPI; returns the raw token."""

    async def __call__(self, request: HTTPConnection) -> str | None:  # type: ignore[override]  # the token, not a credentials model
        return bearer_token(request.headers.get("authorization"))


_bearer = _Bearer(
    auto_error=False, description="a session token: prop-stream session EMAIL"
)


async def get_current_trader(
    request: Request, token: Annotated[str | None, Depends(_bearer)]
) -> int:
    """The customer of the request's session.

    Args:
        request: The request.
        token: The bearer token, if the header had one (declares the scheme in
            OpenAPI; :func:`customer_of` reads the header itself).

    Returns:
        The customer's id.

    Raises:
        ApiError: 401 without a token, with a malformed header, or with an unknown
            or expired session.
    """
    return customer_of(get_state(request), request.headers.get("authorization"))


def customer_of(state: AppState, authorization: str | None) -> int:
    """The customer of an ``Authorization`` header's session.

    Reads the store when the session is not in memory (blocks: DuckDB).
    :class:`api.limits.BodyLimit` calls it before a body is read.

    Args:
        state: The app's runtime state (its session cache and store).
        authorization: The header's value, if any.

    Returns:
        The customer's id.

    Raises:
        ApiError: 401 without a token, with a malformed header, or with an unknown
            or expired session.
    """
    token = bearer_token(authorization)
    if token is None:
        if authorization:
            raise unauthorized("malformed Authorization header; use 'Bearer <token>'")
        raise unauthorized("missing bearer token")

    def lookup(token_hash: str) -> tuple[int, float] | None:
        with state.db.cursor() as conn:
            return lookup_session(conn, token_hash=token_hash)

    customer = state.sessions.customer(token, lookup=lookup)
    if customer is None:
        raise unauthorized("invalid or expired session")
    return customer


def get_db(request: Request) -> Iterator[Connection]:
    """A store cursor for one request (sync routes only: DuckDB blocks).

    Yields:
        The cursor; it goes back to the pool after the response.
    """
    with get_state(request).db.cursor() as conn:
        yield conn


async def get_cache(request: Request) -> RuntimeCache:
    """The runtime read model."""
    return get_state(request).cache


async def get_app_state(request: Request) -> AppState:
    """The app's runtime state (the engine registry, the cache)."""
    return get_state(request)


def get_app_settings(request: HTTPConnection) -> ApiSettings:
    """The settings the app was built with (``create_app``), else the environment's."""
    settings: ApiSettings | None = getattr(request.app.state, "settings", None)
    return settings if settings is not None else get_settings()


SettingsDep = Annotated[ApiSettings, Depends(get_app_settings)]
SessionDep = Annotated[Connection, Depends(get_db)]
CurrentTrader = Annotated[int, Depends(get_current_trader)]
CacheDep = Annotated[RuntimeCache, Depends(get_cache)]
StateDep = Annotated[AppState, Depends(get_app_state)]
