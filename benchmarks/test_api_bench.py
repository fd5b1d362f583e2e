"""Smoke run of the runtime API load benchmark (``benchmarks/api_load.py``).

The figures in ``docs/benchmarks.md`` come from running the script itself for
longer; here a short run checks that the server, the load generator and the
parsing work, and that every answer under load was a 200.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import api_load

SMOKE = os.environ.get("PROP_STREAM_BENCH_SMOKE") == "1"


@pytest.mark.integration
@pytest.mark.parametrize("tool", ["python"])
def test_api_load_smoke(tool: str) -> None:
    result = api_load.main(
        [
            "--challenges",
            "50",
            "--duration",
            "1" if SMOKE else "3",
            "--connections",
            "4",
            "--tool",
            tool,
        ]
    )
    assert result.requests > 0
    assert result.errors == 0
    assert result.p50_ms <= result.p99_ms
