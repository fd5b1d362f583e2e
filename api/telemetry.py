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
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prop_stream.telemetry import ServiceMetrics

access_log = logging.getLogger("prop_stream.access")

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
        self._metrics = metrics
        self._log = access_log_enabled
        # The labelled children, looked up once per (method, route, status):
        # prometheus-client's labels() takes a lock and builds a key each call.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

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
            key = (method, route, status)
            children = self._children.get(key)
            if children is None:
                children = (
                    self._metrics.http_requests.labels(method, route, str(status)),
                    self._metrics.http_seconds.labels(method, route),
                )
                self._children[key] = children
            children[0].inc()
            children[1].observe(elapsed)
            if self._log and access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
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
