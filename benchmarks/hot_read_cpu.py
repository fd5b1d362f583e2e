"""CPU time of one hot read through the whole ASGI stack, without a network.

``GET /prop/challenges/{id}`` is called on the app built by ``create_app`` (every
middleware: telemetry and the access log, the hot read, the body limit, FastAPI),
in-process, in a loop; the figure is the loop thread's CPU time per request
(``time.thread_time``), which a shared machine's other load disturbs far less
than wall-clock throughput. Compare two checkouts side by side with
``PYTHONPATH=<checkout>``.

Examples:
    .venv/bin/python benchmarks/hot_read_cpu.py --requests 30000
    .venv/bin/python benchmarks/hot_read_cpu.py --requests 30000 --access-log
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_load import seed

from api.core.config import ApiSettings
from api.main import create_app


async def measure(requests: int, access_log: bool) -> float:
    """Microseconds of CPU per hot read."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        token, owned = seed(path, 200)
        settings: dict[str, Any] = {"db": path, "cache_sync_interval_s": 0}
        if "access_log" in ApiSettings.model_fields:
            settings["access_log"] = access_log
        if access_log:
            from prop_stream.logs import configure_logging

            configure_logging("json", "INFO")
        app = create_app(settings=ApiSettings(**settings))
        url = f"/prop/challenges/{owned[len(owned) // 2]}"
        headers = [(b"host", b"x"), (b"authorization", f"Bearer {token}".encode())]
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        def scope() -> dict[str, Any]:
            return {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": url,
                "raw_path": url.encode(),
                "query_string": b"",
                "root_path": "",
                "headers": headers,
                "client": ("127.0.0.1", 50000),
                "server": ("127.0.0.1", 8000),
                "app": app,
            }

        async with app.router.lifespan_context(app):
            for _ in range(2_000):  # warm-up: caches, sessions, encoded bodies
                await app(scope(), receive, send)
            began = time.thread_time()
            for _ in range(requests):
                await app(scope(), receive, send)
            spent = time.thread_time() - began
        assert set(statuses) == {200}, set(statuses)
        return spent / requests * 1e6


def main() -> None:
    """Print ``{"us_per_request": ...}`` as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args()
    us = asyncio.run(measure(args.requests, args.access_log))
    print(json.dumps({"us_per_request": round(us, 1), "access_log": args.access_log}))


if __name__ == "__main__":
    main()
