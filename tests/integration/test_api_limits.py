"""The HTTP limits over real HTTP: a real uvicorn, as ``prop-stream serve`` sets it up.

The server is ``limits_server.py`` (the app under ``uvicorn.Config(...,
**uvicorn_options(settings))``, the composition root's one call) with a 3 s
request deadline, so the slow-client tests end quickly. Memory is read from the
server process's ``/proc/PID/status``. The last test checks the real
``prop-stream serve`` enforces the deadline too.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from api_seed import Seeded, seed_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1].parent
SERVER = Path(__file__).with_name("limits_server.py")
PROP_STREAM = Path(sys.executable).with_name("prop-stream")
LIMIT = 1024 * 1024
DEADLINE_S = 3.0
#: How late past the deadline a slow client may still be connected (a loaded
#: 2-core machine; the deadline itself is what is checked from below).
MARGIN_S = 5.0
#: How much the server's peak resident memory may grow while refusing bodies.
RSS_SLACK_KB = 6 * 1024
SLOW_CLIENTS = 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout} s")
        time.sleep(0.05)


@dataclass
class Server:
    """A running server: its address and process."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    seeded: Seeded

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    def memory_kb(self) -> dict[str, int]:
        """``VmRSS`` and ``VmHWM`` (peak) of the server process, in kB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        values = {}
        for line in status.splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
        return values

    def auth(self) -> dict[str, str]:
        return self.seeded.headers(self.seeded.alice)


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    seeded = seed_database(tmp_path_factory.mktemp("limits") / "limits.duckdb")
    port = _free_port()
    log_path = Path(seeded.path).with_suffix(".log")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "PROP_STREAM_API_DB": str(seeded.path),
        "PROP_STREAM_API_CACHE_SYNC_INTERVAL_S": "0.2",
        "PROP_STREAM_API_REQUEST_DEADLINE_S": str(DEADLINE_S),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and script
            [sys.executable, str(SERVER), str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        running = Server("127.0.0.1", port, process, seeded)
        try:
            deadline = time.monotonic() + 30
            while not _healthy(running.base):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server did not start:\n{log_path.read_text()}")
                time.sleep(0.1)
            yield running
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
    # No request the limits refused or cut off made the app fail (a 500).
    assert "Exception in ASGI application" not in log_path.read_text(errors="replace")


def _error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body["error"]) == {"code", "message", "details"}
    return str(body["error"]["code"])


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        chunk = b"x" * min(size, total - sent)
        sent += len(chunk)
        yield chunk


def _raw(server: Server, request: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes on a fresh connection; read until the server closes it."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


# ------------------------------------------------------------------ bodies


def test_50mb_anonymous_bodies_cost_the_server_no_memory(
    server: Server, record_property: Callable[[str, object], None]
) -> None:
    # Warm up every path first (imports, first allocations), then watch the
    # peak resident memory while 50 MB bodies are refused three ways.
    for _ in range(3):
        httpx.post(f"{server.base}/prop/purchases", content=b"{}", timeout=10)
        httpx.post(
            f"{server.base}/prop/purchases",
            content=_chunks(2 * LIMIT),
            headers=server.auth(),
            timeout=10,
        )
    before = server.memory_kb()
    big = 50 * 1024 * 1024
    statuses = []
    for content, headers in (
        (b"x" * big, {}),  # Content-Length: 50 MB, anonymous
        (_chunks(big), {}),  # chunked, anonymous
        (_chunks(big), server.auth()),  # chunked with a session: counted
    ):
        response = httpx.post(
            f"{server.base}/prop/purchases",
            content=content,
            headers=headers,
            timeout=30,
        )
        statuses.append((response.status_code, _error_code(response)))
    after = server.memory_kb()
    grown = after["VmHWM"] - before["VmHWM"]
    record_property("server_peak_rss_growth_kb", grown)
    print(f"server memory before {before}, after {after} (kB)")
    assert grown < RSS_SLACK_KB, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < RSS_SLACK_KB, (before, after)
    assert statuses[0] in ((413, "payload_too_large"), (401, "unauthorized"))
    assert statuses[1] == (401, "unauthorized")  # no chunk read before the session
    assert statuses[2] == (413, "payload_too_large")


def test_2mib_body_with_a_session_is_413(server: Server) -> None:
    response = httpx.post(
        f"{server.base}/prop/purchases",
        content=b"x" * (2 * LIMIT),
        headers={**server.auth(), "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.headers["connection"] == "close"
    assert _error_code(response) == "payload_too_large"


def test_chunked_body_over_the_limit_is_413(server: Server) -> None:
    response = httpx.post(
        f"{server.base}/prop/purchases/preview",
        content=_chunks(LIMIT + 1, size=4096),
        headers={**server.auth(), "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413
    assert _error_code(response) == "payload_too_large"


def test_body_at_the_limit_reaches_the_route(server: Server) -> None:
    body = b'{"program_id": 2}'
    padded = body[:-1] + b" " * (LIMIT - len(body)) + b"}"
    response = httpx.post(
        f"{server.base}/prop/purchases/preview",
        content=padded,
        headers={**server.auth(), "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json()["program_id"] == 2


@pytest.mark.parametrize(
    ("length", "status"), [(10, b"401"), (50 * 1024 * 1024, b"413")]
)
def test_anonymous_body_is_answered_before_it_is_sent(
    server: Server, length: int, status: bytes
) -> None:
    # Headers only: the server answers at once. A server that waited for the
    # body would hold the request until the deadline and close without an answer.
    request = (
        b"POST /prop/purchases HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length
    )
    answer = _raw(server, request)
    assert answer.startswith(b"HTTP/1.1 " + status), answer


def test_public_routes_answer_anonymous_requests(server: Server) -> None:
    for path in ("/healthz", "/readyz", "/prop/programs", "/prop/programs/1"):
        assert httpx.get(f"{server.base}{path}").status_code == 200, path


# ------------------------------------------------------------ ids, redirects


NON_CANONICAL = ["01", "00", "+1", "1_0", "%201", "1%20", "1.0", "0x1", "-1"]
ID_ROUTES = [
    ("GET", "/prop/challenges/{id}", "challenge_id"),
    ("GET", "/prop/challenges/{id}/metrics", "challenge_id"),
    ("GET", "/prop/challenges/{id}/breaches", "challenge_id"),
    ("GET", "/prop/programs/{id}", "program_id"),
    ("GET", "/prop/purchases/{id}", "purchase_id"),
    ("POST", "/prop/purchases/{id}/retry", "purchase_id"),
    ("POST", "/prop/purchases/{id}/cancel", "purchase_id"),
]


@pytest.mark.parametrize(("method", "route", "field"), ID_ROUTES)
@pytest.mark.parametrize("raw", NON_CANONICAL)
def test_non_canonical_ids_are_422(
    server: Server, method: str, route: str, field: str, raw: str
) -> None:
    response = httpx.request(
        method, server.base + route.format(id=raw), headers=server.auth()
    )
    assert response.status_code == 422, response.text
    assert _error_code(response) == "validation_error"
    assert response.json()["error"]["details"]["field"] == field


@pytest.mark.parametrize(
    "path", ["/prop/challenges/", "/prop/programs/", "/healthz/", "/prop/purchases/"]
)
def test_no_redirect_names_the_host_header(server: Server, path: str) -> None:
    request = (
        b"GET %s HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer %s\r\n"
        b"Connection: close\r\n\r\n" % (path.encode(), server.seeded.alice.encode())
    )
    answer = _raw(server, request)
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert b"evil.example" not in answer
    assert b"\r\nlocation:" not in head
    assert head.startswith(b"http/1.1 404")


# ------------------------------------------------------------ slow clients


@dataclass
class _Slow:
    """One client that trickles its request and never finishes it."""

    sock: socket.socket
    opened: float
    closed: float | None = None
    answer: bytes = b""
    sent: int = 0
    payload: bytes = field(default=b"")


def _trickle(clients: list[_Slow], stop: threading.Event, limit_s: float) -> None:
    """Send each open client one more byte every 100 ms until the server closes it."""
    end = time.monotonic() + limit_s
    next_send = 0.0
    while not stop.is_set() and time.monotonic() < end:
        open_ = [c for c in clients if c.closed is None]
        if not open_:
            return
        readable, _, _ = select.select([c.sock for c in open_], [], [], 0.02)
        now = time.monotonic()
        for client in open_:
            if client.sock in readable:
                try:
                    data = client.sock.recv(4096)
                except OSError:
                    data = b""
                client.answer += data
                if not data:
                    client.closed = now
        if now >= next_send:
            next_send = now + 0.1
            for client in open_:
                if client.closed is not None:
                    continue
                byte = client.payload[client.sent : client.sent + 1] or b"a"
                try:
                    client.sock.send(byte)
                    client.sent += 1
                except OSError:
                    client.closed = now


def test_slow_clients_are_cut_off_while_healthz_answers(
    server: Server, record_property: Callable[[str, object], None]
) -> None:
    clients = []
    for _ in range(SLOW_CLIENTS):
        sock = socket.create_connection((server.host, server.port), timeout=10)
        sock.setblocking(False)
        # Headers that never end: one more byte of an X-Pad value each time.
        clients.append(
            _Slow(sock, time.monotonic(), payload=b"GET /healthz HTTP/1.1\r\nX-Pad: ")
        )
    stop = threading.Event()
    trickler = threading.Thread(
        target=_trickle, args=(clients, stop, DEADLINE_S + MARGIN_S + 10)
    )
    trickler.start()
    latencies_ms = []
    try:
        with httpx.Client(base_url=server.base, timeout=10) as http:
            while any(c.closed is None for c in clients) and trickler.is_alive():
                started = time.perf_counter()
                response = http.get("/healthz")
                latencies_ms.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200
                time.sleep(0.05)
    finally:
        stop.set()
        trickler.join()
        for client in clients:
            client.sock.close()
    record_property("healthz_count", len(latencies_ms))
    record_property("healthz_p50_ms", round(statistics.median(latencies_ms), 2))
    record_property("healthz_max_ms", round(max(latencies_ms), 2))
    print(
        f"/healthz with {SLOW_CLIENTS} slow clients: {len(latencies_ms)} requests, "
        f"p50 {statistics.median(latencies_ms):.1f} ms, "
        f"max {max(latencies_ms):.1f} ms"
    )
    assert len(latencies_ms) >= 10
    lifetimes = [c.closed - c.opened for c in clients if c.closed is not None]
    assert len(lifetimes) == SLOW_CLIENTS, "some slow clients were never cut off"
    assert min(lifetimes) >= DEADLINE_S - 0.25  # the deadline, not something else
    assert max(lifetimes) <= DEADLINE_S + MARGIN_S
    assert all(c.answer.startswith(b"HTTP/1.1 408 ") for c in clients)
    assert all(c.sent >= 10 for c in clients)  # they did keep trickling


def test_a_trickled_body_is_cut_off_too(server: Server) -> None:
    # Headers whole and a valid session; the body then comes a byte at a time.
    head = (
        b"POST /prop/purchases/preview HTTP/1.1\r\nHost: t\r\n"
        b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: 500\r\n\r\n" % server.seeded.alice.encode()
    )
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.setblocking(False)
    client = _Slow(sock, time.monotonic(), payload=head + b" " * 400)
    client.sock.send(head)
    client.sent = len(head)
    try:
        _trickle([client], threading.Event(), DEADLINE_S + MARGIN_S + 10)
    finally:
        sock.close()
    assert client.closed is not None
    assert DEADLINE_S - 0.25 <= client.closed - client.opened <= DEADLINE_S + MARGIN_S
    assert b"200 OK" not in client.answer


def test_each_request_on_a_kept_alive_connection_gets_its_own_deadline(
    server: Server,
) -> None:
    # The clock stops when a request has arrived whole: a second request sent
    # 0.8 deadlines later and trickled over 0.5 deadline more is still answered,
    # although the connection is then older than the deadline.
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        opened = time.monotonic()
        sock.sendall(request)
        assert _response(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(DEADLINE_S * 0.8)  # the elapsed time is what is tested
        for byte in request:
            sock.sendall(bytes([byte]))
            time.sleep(DEADLINE_S * 0.5 / len(request))
        assert time.monotonic() - opened > DEADLINE_S
        answer = _response(sock)
        assert answer.startswith(b"HTTP/1.1 200 "), answer


def _response(sock: socket.socket) -> bytes:
    """One whole response (headers and ``Content-Length`` body) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, f"closed after {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_headers_over_the_limit_are_431(server: Server) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 70_000
    answer = _raw(server, request)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


# ---------------------------------------------------------- prop-stream serve


def test_prop_stream_serve_cuts_off_a_slow_client(tmp_path: Path) -> None:
    db = tmp_path / "svc.duckdb"
    subprocess.run(  # noqa: S603 - our own command
        [str(PROP_STREAM), "init", "--db", str(db), "--demo"], check=True
    )
    proc = subprocess.Popen(  # noqa: S603 - our own command
        [str(PROP_STREAM), "serve", "--db", str(db), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PROP_STREAM_API_REQUEST_DEADLINE_S": "1.5"},
    )
    assert proc.stderr is not None
    try:
        url = ""
        deadline = time.monotonic() + 60
        while not url and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if "ready on http://" in line:
                url = line.split("ready on ", 1)[1].split()[0]
        assert url, "no ready line"
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        big = httpx.post(f"{url}/prop/purchases", content=b"x" * (2 * LIMIT))
        assert big.status_code == 413
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
