"""Logging: the access log's fast path writes one line per request, batched."""

from __future__ import annotations

import io
import json

import pytest

from prop_stream.logs import AccessLog


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_access_log_writes_each_request_once_in_the_log_format(fmt: str) -> None:
    stream = io.StringIO()
    log = AccessLog(stream, fmt, flush_interval_s=60)  # type: ignore[arg-type]  # parametrized
    for i in range(3):
        log.record("GET", f"/prop/challenges/{i}", "/prop/challenges/{challenge_id}",
                   200, 1.25, "127.0.0.1")  # fmt: skip
    assert stream.getvalue() == ""  # batched until the flush
    log.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    if fmt == "json":
        first = json.loads(lines[0])
        assert first["logger"] == "prop_stream.access"
        assert first["level"] == "INFO"
        assert first["route"] == "/prop/challenges/{challenge_id}"
        assert first["path"] == "/prop/challenges/0"
        assert first["status"] == 200
        assert first["ts"].endswith("+00:00")
        assert "authorization" not in lines[0].lower()
    else:
        assert lines[0].endswith(
            "INFO prop_stream.access: GET /prop/challenges/0 200 1.2 ms"
        )
