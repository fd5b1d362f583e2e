"""What each `serve` role runs and serves, in a real process over HTTP.

The command line allows roles other than ``all`` only with PostgreSQL (one
process owns a DuckDB file); the composition itself does not depend on the
backend, so each role's process is started here through ``api.serve.run`` on a
DuckDB file (a small launcher script, the same code the command reaches).
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
import service_process
from service_process import ServiceProcess, run_prop_stream

pytestmark = pytest.mark.integration

LAUNCHER = """#!{python}
import sys
from pathlib import Path

from api.serve import run
from prop_stream.config import StreamSettings

settings = StreamSettings(db=Path(sys.argv[1]), source="none")
sys.exit(run(settings, host="127.0.0.1", port=0, role=sys.argv[2]))
"""


@pytest.mark.parametrize(
    ("role", "api", "components"),
    [
        ("api", True, {"cache"}),
        ("evaluator", False, {"evaluator"}),
        ("jobs", False, {"jobs", "archive"}),
    ],
)
def test_each_role_serves_its_probes_and_runs_only_its_part(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    role: str,
    api: bool,
    components: set[str],
) -> None:
    db = tmp_path / "prop.duckdb"
    assert run_prop_stream(["init", "--db", str(db), "--demo"]).returncode == 0
    launcher = tmp_path / "serve-role"
    launcher.write_text(LAUNCHER.format(python=sys.executable))
    launcher.chmod(0o755)
    monkeypatch.setattr(service_process, "PROP_STREAM", launcher)
    proc = ServiceProcess([str(db), role], tmp_path)
    try:
        url = proc.wait_ready()
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        checks = ready.json()["checks"]
        running = {name for name, why in checks.items() if why == "ok"} - {"database"}
        assert running == components
        if "evaluator" not in components:
            assert checks["evaluator"] == "absent"
        metrics = httpx.get(f"{url}/metrics", timeout=10)
        assert metrics.status_code == 200
        assert "prop_stream_" in metrics.text
        programs = httpx.get(f"{url}/prop/programs", timeout=10)
        assert (programs.status_code != 404) is api
    finally:
        code = proc.stop(60)
    assert code == 0
    assert "Traceback" not in "".join(proc.lines())
