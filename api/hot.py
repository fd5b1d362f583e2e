"""The hot read in front of FastAPI: ``GET /prop/challenges/{id}`` from memory.

The terminal polls one challenge's runtime state far more often than anything
else. The route in :mod:`api.routes.challenges` answers it from the in-memory
:class:`~api.cache.RuntimeCache` already, but FastAPI's routing, dependency
solving and response classes cost about ten times the lookup itself. This ASGI
middleware answers the common case before any of that:

- ``GET``, the path ``/prop/challenges/<id>`` with a canonical id in range, no
  query string and no body (``Content-Length`` or ``Transfer-Encoding``: those
  go on to :class:`api.limits.BodyLimit`, which refuses what is too large);
- a bearer token whose session the :class:`~api.core.security.SessionCache`
  holds, unexpired, in memory;
- a challenge of that customer in the cache.

It sends exactly what the route would send (status 200, the same body bytes,
``content-type`` and ``content-length``). Everything else (a missing or unknown
token, a session not looked up yet, someone else's or a missing challenge, a
query string, any other path or method, or an error while looking) goes to
FastAPI unchanged, which answers it, errors included, and fills the caches for
the next request.
``tests/api/test_hot_reads.py`` checks both paths give the same answers.
"""

from __future__ import annotations

import logging
import re
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from api.core.security import bearer_token
from api.models import MAX_INT64
from api.telemetry import ROUTE_KEY

logger = logging.getLogger(__name__)

_PATH: Final = re.compile(r"/prop/challenges/([1-9][0-9]{0,18})")
_JSON: Final = b"application/json"
#: The route template it answers for (metrics and the access log).
ROUTE: Final = "/prop/challenges/{challenge_id}"
_BODY_HEADERS: Final = (b"content-length", b"transfer-encoding")


class HotReads:
    """ASGI middleware serving ``GET /prop/challenges/{id}`` from memory.

    Args:
        app: The application behind it (FastAPI's middleware stack).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer the hot read when memory can; pass everything else on."""
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and not scope.get("query_string")
        ):
            try:
                body = _body(scope)
            except Exception:  # FastAPI answers it, in the API's error shape
                logger.debug("hot read passed on after an error", exc_info=True)
                body = None
            if body is not None:
                scope[ROUTE_KEY] = ROUTE
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-length", str(len(body)).encode()),
                            (b"content-type", _JSON),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _body(scope: Scope) -> bytes | None:
    match = _PATH.fullmatch(scope["path"])
    if match is None:
        return None
    challenge_id = int(match.group(1))
    if challenge_id > MAX_INT64:
        return None
    state = getattr(scope["app"].state, "runtime", None)
    if state is None:
        return None
    authorization = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name in _BODY_HEADERS:
            return None  # a body: api.limits.BodyLimit, behind, judges it
    token = bearer_token(authorization)
    if token is None:
        return None
    customer = state.sessions.cached_customer(token)
    if customer is None:
        return None
    body: bytes | None = state.cache.challenge_body(challenge_id, customer_id=customer)
    if body is not None:
        state.hot_reads += 1
    return body
