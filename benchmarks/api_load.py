"""Load benchmark of the runtime API: one uvicorn worker, a load generator beside it.

Seeds a DuckDB file (the demo data plus ``--challenges`` more, each judged by the
real engine once so every first phase has a latest metric), starts the server on
127.0.0.1 and drives ``GET /prop/challenges/{id}`` from a second process: ``wrk``
when it is installed (``apt-get install wrk``), otherwise a small keep-alive client
of our own in ``--clients`` processes. Everything is bounded in time and on
loopback only.

The server (``--source``):

- ``demo`` (default): ``prop-stream serve --source demo --demo-rate R``, the
  service as users run it, its evaluator loop judging ``R`` ticks/s of the demo
  simulator over every active phase while the API answers. The report adds the
  ticks the loop judged per second and how far the served metric trails the
  wall clock.
- ``none``: the same service with no tick source.
- ``api``: ``uvicorn --factory api.main:create_app`` alone (no evaluator).

``--postgres URL --replicas N`` seeds the PostgreSQL database ``URL`` (empty)
instead, starts ``N`` processes of ``prop-stream serve --role api`` on it and drives
them all at once with wrk (the connections split among them); it reports the
requests per second summed and the worst p50/p99 of the replicas. ``--writer-rate
R`` adds a ``serve --role evaluator --source demo`` process committing ``R`` demo
ticks/s meanwhile, so the replicas' cache syncs read metrics while they answer.

Examples:
    .venv/bin/python benchmarks/api_load.py --duration 10 --connections 32
    .venv/bin/python benchmarks/api_load.py --postgres URL --replicas 2
    .venv/bin/python benchmarks/api_load.py --postgres URL --writer-rate 20000
    .venv/bin/python benchmarks/api_load.py --source api
    .venv/bin/python benchmarks/api_load.py --no-hot-reads
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import cast

import polars as pl

from prop_stream.rules import TICK_SCHEMA, RuleEngine
from prop_stream.sinks.duckdb_sink import DuckDBSink
from prop_stream.store import (
    active_phase_specs,
    connect,
    create_customer,
    create_session,
    init_database,
    open_account,
    start_challenge,
    transaction,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


@dataclass
class Result:
    """What one run measured."""

    tool: str
    path: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    connections: int
    source: str = "api"
    hot_reads: bool = True
    access_log: bool = True
    ticks_per_s: float | None = None
    metric_lag_s: float | None = None


def seed(path: Path | str, challenges: int) -> tuple[str, list[int]]:
    """Make the database; return a token and the challenge ids its customer owns."""
    init_database(path, demo=True, now=T0)
    conn = connect(path)
    try:
        with transaction(conn):
            customer = create_customer(conn, email="load@example.com")
            owned = []
            for _ in range(challenges):
                account = open_account(
                    conn,
                    customer_id=customer,
                    account_group="DEMO",
                    balance=Decimal(100_000),
                )
                owned.append(
                    start_challenge(
                        conn,
                        customer_id=customer,
                        program_id=1,
                        account_id=account,
                        started_at=T0,
                    )
                )
        engine = RuleEngine()
        specs = active_phase_specs(conn)
        for spec in specs:
            engine.register(spec)
        ticks = pl.DataFrame(
            [
                {
                    "account_id": s.account_id,
                    "ts": T0 + timedelta(hours=1),
                    "equity": 100_250.0,
                    "balance": 100_000.0,
                }
                for s in specs
            ],
            schema=TICK_SCHEMA,
        )
        sink = DuckDBSink(conn, source="bench")
        sink.setup()
        sink.add(engine.process(ticks), position={"0": 1})
        sink.flush()
        token = create_session(conn, email="load@example.com")
    finally:
        conn.close()
    return token, owned


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(
    module_and_args: str,
    log: Path,
    *,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Run ``python -m <module_and_args> <extra>`` with its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and modules
            [sys.executable, "-m", *module_and_args.split(), *(extra or [])],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def start_server(path: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start one uvicorn worker and wait until it answers."""
    process = _launch(
        "uvicorn --factory api.main:create_app --host 127.0.0.1 --workers 1 "
        f"--no-access-log --log-level warning --port {port}",
        log,
        env={**os.environ, "PROP_STREAM_API_DB": str(path)},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"uvicorn exited: {log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return process
        except OSError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("uvicorn did not start within 60 s")


def _ready(
    process: subprocess.Popen[bytes], log: Path, what: str
) -> subprocess.Popen[bytes]:
    """Wait (120 s at most) for a ``serve`` process's ready line in its log."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited: {text}")
        if "ready on" in text:
            return process
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{what} did not start within 120 s")


def start_service(
    path: Path, port: int, log: Path, source: str, demo_rate: float
) -> subprocess.Popen[bytes]:
    """Start ``prop-stream serve`` and wait for its ready line."""
    process = _launch(
        f"prop_stream.cli serve --port {port} --source {source} "
        f"--demo-rate {demo_rate} --db",
        log,
        extra=[str(path)],
    )
    return _ready(process, log, "prop-stream serve")


def start_api_role(url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start ``prop-stream serve --role api`` on a PostgreSQL database."""
    process = _launch(
        f"prop_stream.cli serve --role api --port {port} --db",
        log,
        extra=[url],
        env={**os.environ, "PROP_STREAM_API_ACCESS_LOG": "false"},
    )
    return _ready(process, log, "prop-stream serve --role api")


def start_writer(
    url: str, port: int, rate: float, log: Path
) -> subprocess.Popen[bytes]:
    """Start ``serve --role evaluator --source demo``: commits while the API reads."""
    process = _launch(
        f"prop_stream.cli serve --role evaluator --port {port} --source demo "
        f"--demo-rate {rate} --db",
        log,
        extra=[url],
    )
    return _ready(process, log, "prop-stream serve --role evaluator")


def run_replicas(
    url: str,
    replicas: int,
    connections: int,
    duration: int,
    *,
    challenges: int = 2_000,
    writer_rate: float = 0.0,
) -> Result:
    """``replicas`` API processes on PostgreSQL, driven at once by wrk.

    With ``writer_rate`` a ``--role evaluator`` process judges that many demo
    ticks per second meanwhile, so the replicas' cache syncs have metrics to read.
    """
    from concurrent.futures import ThreadPoolExecutor

    token, owned = seed(url, challenges)
    path = f"/prop/challenges/{owned[len(owned) // 2]}"
    with tempfile.TemporaryDirectory() as tmp:
        ports = [_free_port() for _ in range(replicas)]
        servers = []
        try:
            if writer_rate > 0:
                servers.append(
                    start_writer(url, _free_port(), writer_rate, Path(tmp) / "w.log")
                )
            for i, port in enumerate(ports):
                servers.append(start_api_role(url, port, Path(tmp) / f"api{i}.log"))
            for port in ports:
                run_python(port, path, token, 1, 1, 1)
            each = max(1, connections // replicas)
            with ThreadPoolExecutor(replicas) as pool:
                results = list(
                    pool.map(
                        lambda port: run_wrk(
                            f"http://127.0.0.1:{port}{path}", token, each, duration
                        ),
                        ports,
                    )
                )
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                try:
                    server.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    server.kill()
    return Result(
        "wrk",
        path,
        sum(r.requests for r in results),
        max(r.seconds for r in results),
        sum(r.rps for r in results),
        max(r.p50_ms for r in results),
        max(r.p99_ms for r in results),
        sum(r.errors for r in results),
        each * replicas,
        source=f"api x{replicas} on postgres",
        access_log=False,
    )


def metric_lag(port: int, path: str, token: str) -> float | None:
    """Seconds between now and the latest metric the challenge's first phase shows."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    now = time.time()
    body = json.loads(data.partition(b"\r\n\r\n")[2])
    metric = body["phases"][0].get("latest_metric")
    if not metric:
        return None
    return now - datetime.fromisoformat(metric["ts"]).timestamp()


def stop_service(process: subprocess.Popen[bytes], log: Path) -> int | None:
    """SIGTERM the service; return the ticks its stop line reports."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        return None
    match = re.search(r"stopped after (\d+) ticks", log.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]  # wrk's own format
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, token: str, connections: int, duration: int) -> Result:
    """Drive the URL with wrk (one thread) and parse its report."""
    wrk = shutil.which("wrk")
    assert wrk is not None
    out = subprocess.run(  # noqa: S603 - a fixed command line
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {token}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 30,
    ).stdout
    sys.stderr.write(out)
    requests = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out).group(1))  # type: ignore[union-attr]  # wrk's report
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]  # wrk's report
    # Anchored to the start of a line: the Latency line's "+/- Stdev" column
    # (e.g. "94.99%") also contains "99%".
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]  # wrk's report
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]  # wrk's report
    errors = 0
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if match:
        errors = int(match.group(1))
    return Result(
        "wrk",
        url,
        requests,
        requests / rps if rps else 0.0,
        rps,
        p50,
        p99,
        errors,
        connections,
    )


def _client(
    port: int,
    path: str,
    token: str,
    seconds: float,
    conns: int,
    queue: mp.Queue[object],
) -> None:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    latencies: list[float] = []
    errors = 0
    end = time.monotonic() + seconds
    buffers = [b""] * conns
    while time.monotonic() < end:
        # One request in flight per connection, round robin.
        starts = []
        for sock in socks:
            starts.append(time.perf_counter())
            sock.sendall(request)
        for i, sock in enumerate(socks):
            data = buffers[i]
            while True:
                head, sep, rest = data.partition(b"\r\n\r\n")
                if sep:
                    length = int(
                        re.search(rb"content-length: (\d+)", head.lower()).group(1)  # type: ignore[union-attr]  # HTTP/1.1 answer
                    )
                    if len(rest) >= length:
                        buffers[i] = rest[length:]
                        if not head.startswith(b"HTTP/1.1 200"):
                            errors += 1
                        break
                data += sock.recv(65536)
            latencies.append(time.perf_counter() - starts[i])
    for sock in socks:
        sock.close()
    queue.put((latencies, errors))


def run_python(
    port: int, path: str, token: str, connections: int, duration: int, clients: int
) -> Result:
    """Drive the URL with our own keep-alive clients in ``clients`` processes."""
    queue: mp.Queue[object] = mp.Queue()
    per = max(1, connections // clients)
    procs = [
        mp.Process(target=_client, args=(port, path, token, duration, per, queue))
        for _ in range(clients)
    ]
    start = time.monotonic()
    for proc in procs:
        proc.start()
    latencies: list[float] = []
    errors = 0
    for _ in procs:
        got, errs = cast("tuple[list[float], int]", queue.get(timeout=duration + 60))
        latencies.extend(got)
        errors += errs
    for proc in procs:
        proc.join(timeout=30)
    seconds = time.monotonic() - start
    latencies.sort()
    n = len(latencies)
    return Result(
        "python",
        path,
        n,
        seconds,
        n / seconds,
        latencies[n // 2] * 1000 if n else 0.0,
        latencies[min(n - 1, int(n * 0.99))] * 1000 if n else 0.0,
        errors,
        per * clients,
    )


def main(argv: list[str] | None = None) -> Result:
    """Run the benchmark and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--challenges", type=int, default=2_000)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--tool", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--source", choices=["demo", "none", "api"], default="demo")
    parser.add_argument("--demo-rate", type=float, default=100_000.0)
    parser.add_argument(
        "--no-hot-reads",
        action="store_true",
        help="serve every request through FastAPI (PROP_STREAM_API_HOT_READS=false)",
    )
    parser.add_argument(
        "--no-access-log",
        action="store_true",
        help="no access-log line per request (PROP_STREAM_API_ACCESS_LOG=false)",
    )
    parser.add_argument("--postgres", metavar="URL", help="serve from this database")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--writer-rate",
        type=float,
        default=0.0,
        help="with --postgres: demo ticks/s a --role evaluator process commits",
    )
    args = parser.parse_args(argv)
    if args.postgres:
        if args.no_hot_reads:
            os.environ["PROP_STREAM_API_HOT_READS"] = "false"
        replicated = run_replicas(
            args.postgres,
            args.replicas,
            args.connections,
            args.duration,
            challenges=args.challenges,
            writer_rate=args.writer_rate,
        )
        replicated.hot_reads = not args.no_hot_reads
        print(json.dumps(asdict(replicated)))
        return replicated
    if args.no_hot_reads:
        os.environ["PROP_STREAM_API_HOT_READS"] = "false"
    if args.no_access_log:
        os.environ["PROP_STREAM_API_ACCESS_LOG"] = "false"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        token, owned = seed(path, args.challenges)
        port = _free_port()
        log = Path(tmp) / "server.log"
        if args.source == "api":
            server = start_server(path, port, log)
        else:
            server = start_service(path, port, log, args.source, args.demo_rate)
        started = time.monotonic()
        ticks: int | None = None
        lag: float | None = None
        try:
            url_path = f"/prop/challenges/{owned[len(owned) // 2]}"
            tool = args.tool
            if tool == "auto":
                tool = "wrk" if shutil.which("wrk") else "python"
            # Warm up: fill the session cache and the encoded body.
            run_python(port, url_path, token, 1, 1, 1)
            if tool == "wrk":
                result = run_wrk(
                    f"http://127.0.0.1:{port}{url_path}",
                    token,
                    args.connections,
                    args.duration,
                )
            else:
                result = run_python(
                    port, url_path, token, args.connections, args.duration, args.clients
                )
            if args.source == "demo":
                lag = metric_lag(port, url_path, token)
        finally:
            seconds = time.monotonic() - started
            if args.source == "api":
                server.terminate()
                try:
                    server.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    server.kill()
            else:
                ticks = stop_service(server, log)
    result.source = args.source
    result.hot_reads = not args.no_hot_reads
    result.access_log = not args.no_access_log
    result.metric_lag_s = lag
    if ticks is not None and args.source == "demo":
        result.ticks_per_s = ticks / seconds
    print(json.dumps(asdict(result)))
    return result


if __name__ == "__main__":
    main()
