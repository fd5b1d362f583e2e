"""What a client may send: body size, session before body, a total request deadline.

Two layers, each where the check is cheapest:

- :class:`BodyLimit`, a pure ASGI middleware in front of the app. A request
  without a body (every ``GET`` the terminal sends) costs one scan of its
  headers. A request with a body is refused with ``413`` when its
  ``Content-Length`` is over the limit, with ``401`` when it needs a session and
  has no valid one (before any byte of the body is read), and otherwise reaches
  the app through a ``receive`` that counts the bytes actually received, so a
  chunked body is refused with ``413`` as soon as it passes the limit. The app
  never holds more than the limit of a body.
- :func:`uvicorn_options`, the options of ``uvicorn.Config`` that the composition
  root (:mod:`api.serve`) passes on: an ``httptools`` protocol of ours,
  :class:`RequestDeadlineProtocol`, that disconnects a client whose request has
  not arrived whole (headers and body) within ``request_deadline_s`` of its first
  byte, however steadily it trickles, and answers ``431`` to headers over
  ``max_header_bytes``. uvicorn's own timeouts cover neither: its keep-alive
  timeout only runs between requests.

The protocol subclasses uvicorn's ``HttpToolsProtocol`` (not a public API), so it
is used only with the uvicorn version it was tested with (:data:`TESTED_UVICORN`);
with any other version uvicorn's default protocol is used and one warning says
the deadline is off. (``httptools`` comes with ``uvicorn[standard]``.)
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar, Final, Literal, TypedDict

import anyio.to_thread
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.core.config import ApiSettings
from api.core.security import bearer_token
from api.deps import AppState, customer_of, get_current_trader
from api.errors import ApiError, error_body
from prop_stream.store import DatabaseLockedError

logger = logging.getLogger(__name__)

#: The uvicorn version :class:`RequestDeadlineProtocol` was tested with.
TESTED_UVICORN: Final = "0.54.0"

_CONTENT_LENGTH: Final = b"content-length"
_TRANSFER_ENCODING: Final = b"transfer-encoding"
_AUTHORIZATION: Final = b"authorization"
_BODY_HEADERS: Final = (_CONTENT_LENGTH, _TRANSFER_ENCODING)
#: Sent with every refusal of a body that was not read: the rest of it is not
#: wanted, and the connection must not be reused to parse it as a request.
_CLOSE: Final = {"Connection": "close"}


def too_large(limit: int) -> str:
    """The message of a ``413``.

    Args:
        limit: The body limit in bytes.

    Returns:
        The message.
    """
    return f"request body larger than {limit} bytes"


class BodyLimit:
    """ASGI middleware: the body limit, and the session checked before any body.

    Args:
        app: The application behind it.
        max_body_bytes: The largest body accepted.
        public_routes: The routes that need no session (:func:`public_routes`).
            A request with a body that matches none of them fully (a route that
            needs a session, a missing path, a wrong method) must come with a
            valid session before a byte of its body is read.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        public_routes: Sequence[BaseRoute] = (),
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.public_routes = tuple(public_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass a request without a body on; check one with a body first."""
        if scope["type"] == "http":
            for name, _ in scope["headers"]:
                if name in _BODY_HEADERS:
                    await self._with_body(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _with_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        length: int | None = None
        chunked = False
        authorization: str | None = None
        for name, value in scope["headers"]:
            if name == _CONTENT_LENGTH:
                try:
                    length = int(value)
                except ValueError:
                    # uvicorn's parsers refuse it first; never trust that here.
                    await _refuse(send, 400, "bad_request", "invalid Content-Length")
                    return
            elif name == _TRANSFER_ENCODING:
                chunked = True
            elif name == _AUTHORIZATION:
                authorization = value.decode("latin-1")
        if not chunked and not length:
            await self.app(scope, receive, send)  # Content-Length: 0, no body
            return
        limit = self.max_body_bytes
        if length is not None and length > limit:
            await _refuse(send, 413, "payload_too_large", too_large(limit))
            return
        if not self._is_public(scope):
            error = await _session_error(scope, authorization)
            if error is not None:
                await _refuse(
                    send,
                    error.status_code,
                    error.code,
                    error.message,
                    headers=error.headers,
                )
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI re-raises an HTTPException from reading the body;
                    # the app's handler renders it in the error shape.
                    raise HTTPException(413, too_large(limit), headers=_CLOSE)
            return message

        await self.app(scope, counted, send)

    def _is_public(self, scope: Scope) -> bool:
        for route in self.public_routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return True
        return False


def public_routes(routes: Iterable[BaseRoute]) -> list[BaseRoute]:
    """The routes among ``routes`` that need no session.

    An :class:`~fastapi.routing.APIRoute` needs one when any of its dependencies
    (however deep) is :func:`api.deps.get_current_trader`; a plain Starlette
    ``Route`` (``/docs``, ``/openapi.json``) needs none. Anything else (a mount,
    an included router) is left out, so it counts as needing a session.

    Args:
        routes: The app's routes and its routers' routes.

    Returns:
        The public ones.
    """
    public: list[BaseRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            if not _depends_on_session(route):
                public.append(route)
        elif isinstance(route, Route):
            public.append(route)
    return public


def _depends_on_session(route: APIRoute) -> bool:
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop()
        if dependant.call is get_current_trader:
            return True
        pending.extend(dependant.dependencies)
    return False


async def _session_error(scope: Scope, authorization: str | None) -> ApiError | None:
    """The ``401`` (or ``503``) a request gets for its session; None when valid."""
    state: AppState | None = getattr(scope["app"].state, "runtime", None)
    if state is None:
        return None  # no lifespan yet: the app answers (its dependencies raise)
    token = bearer_token(authorization)
    if token is not None and state.sessions.cached_customer(token) is not None:
        return None
    try:
        # A session not in memory is read from the store: off the event loop.
        await anyio.to_thread.run_sync(customer_of, state, authorization)
    except ApiError as exc:
        return exc
    except DatabaseLockedError as exc:
        # The app's handlers sit behind this middleware: answer as they would.
        return ApiError(503, "database_locked", str(exc))
    return None


async def _refuse(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Answer in the error shape and close the connection (the body is unread)."""
    body = error_body(code, message)
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    raw.extend((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class UvicornOptions(TypedDict):
    """The options :func:`uvicorn_options` gives ``uvicorn.Config``."""

    http: type[asyncio.Protocol] | Literal["auto"]


def uvicorn_options(settings: ApiSettings) -> UvicornOptions:
    """The ``uvicorn.Config`` options that enforce the limits of ``settings``.

    Examples:
        ``uvicorn.Config(app, host=host, port=port, **uvicorn_options(settings))``

    Args:
        settings: The API settings (``request_deadline_s``, ``max_header_bytes``).

    Returns:
        ``http``: :class:`RequestDeadlineProtocol` configured with the settings,
        or ``"auto"`` (uvicorn's default, one warning) when the installed uvicorn
        is not :data:`TESTED_UVICORN`.
    """
    protocol = _deadline_protocol(
        settings.request_deadline_s, settings.max_header_bytes
    )
    return {"http": "auto" if protocol is None else protocol}


_warned = False


def _deadline_protocol(
    deadline_s: float, max_header_bytes: int
) -> type[asyncio.Protocol] | None:
    global _warned
    try:
        installed = version("uvicorn")
    except PackageNotFoundError:
        installed = "unknown"
    if installed != TESTED_UVICORN:
        if not _warned:
            _warned = True
            logger.warning(
                "api: uvicorn %s is not the tested %s: no total request deadline "
                "or header limit (uvicorn's default protocol serves)",
                installed,
                TESTED_UVICORN,
            )
        return None

    class Configured(RequestDeadlineProtocol):
        request_deadline_s = deadline_s
        header_limit = max_header_bytes

    return Configured


class RequestDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol with a total request deadline.

    A request's clock starts when its connection opens (the first request) or
    at its first byte (the next ones on a kept-alive connection) and stops when
    it has arrived whole. A sweep over the server's connections, a few times
    per deadline, closes those past it: the client gets a ``408`` if its
    headers were not complete yet, and the connection is closed either way.
    (One timer per server rather than one per request: a timer per request
    cost about 5 µs of each request under uvloop.) Headers over
    :attr:`header_limit` bytes get a ``431`` and a close.

    Tested with uvicorn :data:`TESTED_UVICORN` only: it relies on the parser
    callbacks ``on_message_begin``, ``on_headers_complete`` and
    ``on_message_complete`` of ``HttpToolsProtocol`` and on its
    ``server_state.connections``.

    Attributes:
        request_deadline_s: Seconds a request may take to arrive whole.
        header_limit: Most bytes of a request's headers.
    """

    request_deadline_s: float = 30.0
    header_limit: int = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Loop time the current request's clock started; None between requests.
        self._since: float | None = None
        self._headers_done = False
        self._header_bytes = 0

    def connection_made(  # type: ignore[override]  # uvicorn's signature
        self, transport: asyncio.Transport
    ) -> None:
        """Start the clock of the connection's first request."""
        super().connection_made(transport)
        # A connection that never sends its first byte is also cut off.
        self._since = self.loop.time()
        _Sweeper.of(self).ensure()

    def data_received(self, data: bytes) -> None:
        """Parse, then count the bytes of headers not yet complete."""
        super().data_received(data)
        if not self._headers_done and not self.transport.is_closing():
            # Counted only while the headers are still incomplete after the
            # chunk, so a chunk that ends them and carries body isn't counted.
            self._header_bytes += len(data)
            if self._header_bytes > self.header_limit:
                self._since = None
                self._close_with(431, "headers_too_large", "request headers too large")

    def on_message_begin(self) -> None:
        """A request's first byte: its clock starts (unless already running)."""
        super().on_message_begin()
        self._headers_done = False
        self._header_bytes = 0
        if self._since is None:
            self._since = self.loop.time()

    def on_headers_complete(self) -> None:
        """The headers are whole: the app gets the request."""
        self._headers_done = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The request is whole: its clock stops."""
        self._since = None
        super().on_message_complete()

    def check_deadline(self, now: float) -> None:
        """Close the connection if its request is past the deadline.

        Args:
            now: The loop's time.
        """
        since = self._since
        if since is None or now - since < self.request_deadline_s:
            return
        self._since = None
        if self.transport.is_closing():
            return
        logger.debug(
            "api: closing %s: request not whole within %s s",
            self.client,
            self.request_deadline_s,
        )
        if self._headers_done:
            # The app has the request and may be answering: only close.
            self.transport.close()
        else:
            self._close_with(
                408,
                "request_timeout",
                f"request not received whole within {self.request_deadline_s} s",
            )

    def _close_with(self, status: int, code: str, message: str) -> None:
        body = error_body(code, message)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\n"
            b"content-type: application/json\r\n"
            b"content-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
        )
        self.transport.close()


class _Sweeper:
    """Checks the deadline of every connection of one server, on its loop."""

    _by_server: ClassVar[weakref.WeakKeyDictionary[Any, _Sweeper]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, protocol: RequestDeadlineProtocol) -> None:
        self._loop = protocol.loop
        self._connections = protocol.connections
        # Closes at most a tenth of the deadline (and 1 s) late; never early.
        self._interval = min(1.0, protocol.request_deadline_s / 10)
        self._handle: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, protocol: RequestDeadlineProtocol) -> _Sweeper:
        """The sweeper of a protocol's server, made on first use."""
        sweeper = cls._by_server.get(protocol.server_state)
        if sweeper is None:
            sweeper = cls._by_server[protocol.server_state] = cls(protocol)
        return sweeper

    def ensure(self) -> None:
        """Run a sweep soon, unless one is due already."""
        if self._handle is None:
            self._handle = self._loop.call_later(self._interval, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        now = self._loop.time()
        ours = [c for c in self._connections if isinstance(c, RequestDeadlineProtocol)]
        for connection in ours:
            connection.check_deadline(now)
        if ours:  # none left: the next connection starts the sweeps again
            self.ensure()


_REASONS: Final = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
}
