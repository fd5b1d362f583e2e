"""HTTP metrics and the access log, as one pure ASGI middleware.

Outermost in the stack, so it sees every answer (the hot reads of
:mod:`api.hot` included) with its status and duration:

- ``prop_stream_http_requests_total{method, route, status}`` and the duration
  histogram ``prop_stream_http_request_duration_seconds{method, route}``, where
  ``route`` is the route's template (``/prop/challenges/{challenge_id}``), never
  the raw path, so ids don't make new series (``unmatched`` for paths no route
  has);
- one access-log line per request on the ``prop_stream.access`` logger with the
  method, path (no query string), route, status, duration and client address —
  never a header, so never a token.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prop_stream.logs import ACCESS_LOGGER
from prop_stream.logs import access_log as process_access_log
from prop_stream.telemetry import ServiceMetrics

access_log = logging.getLogger(ACCESS_LOGGER)

#: Set by a middleware that answers ahead of the router (api/hot.py).
ROUTE_KEY: Final = "prop_stream.route"
_UNMATCHED: Final = "unmatched"
_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
)


class RequestTelemetry:
    """Counts, times and logs every HTTP request.

    Args:
        app: The application behind it.
        metrics: Where the counters live.
        access_log_enabled: Write the access log (one line per request).
    """

    def __init__(
        self, app: ASGIApp, *, metrics: ServiceMetrics, access_log_enabled: bool = True
    ) -> None:
        self.app = app
        self._http = metrics.http
        self._log = access_log_enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; count, time and log its answer."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - began
            route = _route(scope)
            method = scope["method"]
            if method not in _METHODS:
                method = "other"  # any token is a method: don't let clients make series
            self._http.observe(method, route, status, elapsed)
            if self._log:
                self._access(scope, method, route, status, elapsed)

    @staticmethod
    def _access(
        scope: Scope, method: str, route: str, status: int, elapsed: float
    ) -> None:
        client = scope.get("client")
        fast = process_access_log()
        if fast is not None:
            fast.record(
                method,
                scope["path"],
                route,
                status,
                elapsed * 1000,
                client[0] if client else None,
            )
        elif access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s %d %.1f ms",
                method,
                scope["path"],
                status,
                elapsed * 1000,
                extra={
                    "method": method,
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "client": client[0] if client else None,
                },
            )


def _route(scope: Scope) -> str:
    own = scope.get(ROUTE_KEY)
    if own is not None:
        return str(own)
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path is not None else _UNMATCHED
