"""The command line imports only what the command run needs (start-up time)."""

from __future__ import annotations

import subprocess
import sys

from prop_stream import cli
from prop_stream.kafka.produce import DEFAULT_PARTITIONS
from prop_stream.store.sessions import DEFAULT_SESSION_TTL

#: Modules a backtest never uses: Kafka, settings, the store and their libraries.
HEAVY = (
    "kafka",
    "duckdb",
    "pydantic_settings",
    "prop_stream.config",
    "prop_stream.kafka",
    "prop_stream.store",
)

_PROBE = """
import sys
from prop_stream.cli import main
status = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy_roots!r}
               or m.startswith({heavy_pkgs!r}))
print(status, ",".join(heavy))
"""


def _loaded_after(*argv: str) -> tuple[int, list[str]]:
    roots = {m for m in HEAVY if "." not in m}
    pkgs = tuple(m for m in HEAVY if "." in m)
    code = _PROBE.format(heavy_roots=roots, heavy_pkgs=pkgs)
    done = subprocess.run(  # noqa: S603 - our interpreter, our code
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    status, _, modules = done.stdout.strip().rpartition("\n")[2].partition(" ")
    return int(status), [m for m in modules.split(",") if m]


def test_help_and_backtest_import_no_kafka_settings_or_store() -> None:
    status, heavy = _loaded_after("--help")
    assert (status, heavy) == (0, [])
    status, heavy = _loaded_after("backtest", "--help")
    assert (status, heavy) == (0, [])


def test_help_lists_every_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "prop_stream.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    for command in (
        "backtest",
        "init",
        "session",
        "export",
        "serve",
        "demo",
        "produce",
    ):
        assert command in done.stdout


def test_a_store_command_still_loads_its_modules() -> None:
    # The probe itself can fail: `export --help` stops before the handler, so
    # nothing heavy is loaded; with a bad database path the handler runs.
    status, heavy = _loaded_after(
        "export", "--db", "/nonexistent/x.duckdb", "--out", "/nonexistent/out"
    )
    assert status != 0
    assert "prop_stream.store" in heavy


def test_mirrored_defaults_match_their_modules() -> None:
    assert cli.DEFAULT_PARTITIONS == DEFAULT_PARTITIONS
    assert DEFAULT_SESSION_TTL.total_seconds() == cli.DEFAULT_SESSION_TTL_HOURS * 3600
