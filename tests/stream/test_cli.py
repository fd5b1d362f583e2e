"""The ``prop-stream`` command line: exit statuses, messages, summary, entry points."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from prop_stream.cli import main

PROG_SCRIPT = Path(sys.executable).with_name("prop-stream")

HEADER = "account_id,ts,equity,balance"
GOOD_ROWS = [
    "1001,2026-01-05T09:00:00Z,100000.0,100000.0",
    "1001,2026-01-05T10:00:00Z,99500.5,100000.0",
    "1002,2026-01-05T10:00:00Z,50000.0,50000.0",
]


def account(account_id: int = 1001, **rules: Any) -> dict[str, Any]:
    return {
        "account_id": account_id,
        "challenge_id": f"c-{account_id}",
        "phase_index": 0,
        "started_at": "2026-01-05T00:00:00Z",
        "rules": {"initial_balance": 100_000, "max_total_loss": 0.1, **rules},
    }


GOOD_RULES: dict[str, Any] = {
    "accounts": [account(1001), account(1002, initial_balance=50_000)]
}


class Case:
    """A tmp directory with rules, ticks and an output path, written on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rules = root / "rules.json"
        self.ticks = root / "ticks.csv"
        self.out = root / "out"
        self.options: list[str] = []
        self.write_rules(GOOD_RULES)
        self.write_csv(GOOD_ROWS)

    def write_rules(self, doc: object) -> None:
        self.rules.write_text(json.dumps(doc))

    def write_csv(self, rows: list[str], header: str = HEADER) -> None:
        self.ticks.write_text("\n".join([header, *rows]) + "\n")

    def argv(self, *extra: str) -> list[str]:
        return [
            "backtest",
            "--rules",
            str(self.rules),
            "--ticks",
            str(self.ticks),
            "--out",
            str(self.out),
            *self.options,
            *extra,
        ]


@pytest.fixture
def case(tmp_path: Path) -> Case:
    return Case(tmp_path)


def _parquet_with(case: Case, **columns: list[Any]) -> None:
    frame = pl.DataFrame(
        {
            "account_id": [1001, 1001, 1002],
            "ts": [1_767_603_600_000, 1_767_607_200_000, 1_767_607_200_000],
            "equity": [100_000.0, 99_000.0, 50_000.0],
            "balance": [100_000.0, 100_000.0, 50_000.0],
        }
        | columns
    )
    case.ticks = case.root / "ticks.parquet"
    frame.write_parquet(case.ticks)


def _corrupt_parquet(case: Case) -> None:
    case.ticks = case.root / "bad.parquet"
    case.ticks.write_bytes(b"PAR1 not really a parquet file PAR1")


BadInput = Callable[[Case], object]

BAD_INPUTS: list[tuple[str, BadInput, list[str]]] = [
    (
        "unknown-rule",
        lambda c: c.write_rules({"accounts": [account(max_dailyloss=0.05)]}),
        ["account 1001: rules.", "max_dailyloss"],
    ),
    (
        "ratio-1.5",
        lambda c: c.write_rules({"accounts": [account(profit_target=1.5)]}),
        ["account 1001: rules.profit_target:", "1.5"],
    ),
    (
        "bad-timezone",
        lambda c: c.write_rules({"accounts": [account(timezone="Mars/Olympus")]}),
        ["account 1001: rules.timezone:"],
    ),
    (
        "bad-rollover",
        lambda c: c.write_rules({"accounts": [account(day_rollover="25:00")]}),
        ["account 1001: rules.day_rollover:"],
    ),
    (
        "second-account-bad",
        lambda c: c.write_rules(
            {"accounts": [account(1001), account(1002, max_total_loss=0)]}
        ),
        ["account 1002: rules.max_total_loss:"],
    ),
    (
        "missing-initial-balance",
        lambda c: c.write_rules(
            {"accounts": [{**account(), "rules": {"max_total_loss": 0.1}}]}
        ),
        ["account 1001: rules.initial_balance"],
    ),
    (
        "duplicate-account",
        lambda c: c.write_rules({"accounts": [account(1001), account(1001)]}),
        ["account 1001: listed twice (accounts[0] and accounts[1])"],
    ),
    (
        "bad-started-at",
        lambda c: c.write_rules(
            {"accounts": [{**account(), "started_at": "2026-01-05"}]}
        ),
        ["account 1001: started_at:", "'2026-01-05'"],
    ),
    (
        "naive-started-at",
        lambda c: c.write_rules(
            {"accounts": [{**account(), "started_at": "2026-01-05T00:00:00"}]}
        ),
        ["account 1001: started_at: must be an ISO 8601 timestamp with a Z"],
    ),
    (
        "account-id-text",
        lambda c: c.write_rules({"accounts": [{**account(), "account_id": "1001"}]}),
        ["accounts[0]: account_id: must be a 64-bit integer, got '1001'"],
    ),
    (
        "unknown-account-key",
        lambda c: c.write_rules({"accounts": [{**account(), "rule": {}}]}),
        ["account 1001: unknown key(s): rule"],
    ),
    (
        # Rule sets are validated once per distinct set: a later account with a
        # value equal in Python (True == 1) but of another type is still refused.
        "repeated-rules-then-bad-type",
        lambda c: c.write_rules(
            {
                "accounts": [
                    account(1001, initial_balance=1),
                    account(1002, initial_balance=1),
                    account(1003, initial_balance=True),
                ]
            }
        ),
        ["account 1003: rules.initial_balance: must be a number, got true"],
    ),
    (
        "json-duplicate-nested-key",
        lambda c: c.rules.write_text(
            '{"accounts": [{"account_id": 1, "account_id": 2}]}'
        ),
        ["rules.json: not valid JSON: duplicate key 'account_id'"],
    ),
    (
        "unknown-top-level-key",
        lambda c: c.write_rules({"acounts": [account()]}),
        ["unknown top-level key(s): acounts"],
    ),
    (
        "no-accounts",
        lambda c: c.write_rules({"accounts": []}),
        ["accounts: must list at least one account"],
    ),
    (
        "bad-json",
        lambda c: c.rules.write_text('{"accounts": [\n  {"account_id": 1001,}\n]}'),
        ["rules.json: not valid JSON:", "(line 2, column"],
    ),
    (
        "json-nan",
        lambda c: c.rules.write_text(
            json.dumps({"accounts": [account()]}).replace("0.1", "NaN")
        ),
        ["rules.json: not valid JSON: NaN"],
    ),
    (
        "json-duplicate-key",
        lambda c: c.rules.write_text(
            '{"accounts": [], "accounts": [' + json.dumps(account()) + "]}"
        ),
        ["rules.json: not valid JSON: duplicate key 'accounts'"],
    ),
    (
        "missing-rules-file",
        lambda c: c.rules.unlink(),
        ["rules file not found:", "rules.json"],
    ),
    (
        "missing-ticks-file",
        lambda c: c.ticks.unlink(),
        ["ticks file not found:", "ticks.csv"],
    ),
    (
        "glob-matches-nothing",
        lambda c: setattr(c, "ticks", c.root / "nope-*.parquet"),
        ["no tick files match", "nope-*.parquet"],
    ),
    (
        "unknown-suffix",
        lambda c: setattr(c, "ticks", c.ticks.rename(c.root / "ticks.txt")),
        ["ticks.txt: unknown tick file type '.txt'; use .parquet or .csv"],
    ),
    (
        "missing-column",
        lambda c: c.write_csv(
            ["1001,2026-01-05T09:00:00Z,1.0"], header="account_id,ts,equity"
        ),
        ["ticks.csv: missing column(s): balance"],
    ),
    (
        "unparseable-timestamp",
        lambda c: c.write_csv([GOOD_ROWS[0], "1001,2026-13-05T09:00:00Z,1.0,1.0"]),
        ["ticks.csv: column ts, line 3: can't read '2026-13-05T09:00:00Z'"],
    ),
    (
        "date-only-timestamp",
        lambda c: c.write_csv(["1001,2026-01-05,1.0,1.0"]),
        ["ticks.csv: column ts, line 2: can't read '2026-01-05'"],
    ),
    (
        "account-id-not-integer",
        lambda c: c.write_csv([*GOOD_ROWS, "10x1,2026-01-05T09:00:00Z,1.0,1.0"]),
        ["ticks.csv: column account_id, line 5: can't read '10x1'"],
    ),
    (
        "equity-nan",
        lambda c: c.write_csv([GOOD_ROWS[0], "1001,2026-01-05T10:00:00Z,NaN,1.0"]),
        ["ticks.csv: column equity, line 3: nan is not a finite number"],
    ),
    (
        "balance-empty",
        lambda c: c.write_csv([GOOD_ROWS[0], "1001,2026-01-05T10:00:00Z,1.0,"]),
        ["ticks.csv: column balance, line 3: missing value"],
    ),
    (
        "parquet-null-equity",
        lambda c: _parquet_with(c, equity=[1.0, None, 2.0]),
        ["ticks.parquet: column equity, row 2: missing value"],
    ),
    (
        "parquet-inf-balance",
        lambda c: _parquet_with(c, balance=[1.0, 2.0, float("inf")]),
        ["ticks.parquet: column balance, row 3: inf is not a finite number"],
    ),
    (
        "parquet-float-account-id",
        lambda c: _parquet_with(c, account_id=[1001.0, 1001.0, 1002.0]),
        ["ticks.parquet: column account_id: has type Float64, expected an integer"],
    ),
    (
        "corrupt-parquet",
        _corrupt_parquet,
        ["bad.parquet: can't read as parquet:"],
    ),
    (
        "tmp-dir-missing",
        lambda c: c.options.extend(["--tmp-dir", "/nonexistent"]),
        ["--tmp-dir /nonexistent: not a directory"],
    ),
    (
        "out-is-a-file",
        lambda c: setattr(c, "out", c.rules),
        ["--out", "rules.json: exists and is not a directory"],
    ),
]


@pytest.mark.parametrize(
    ("make_bad", "fragments"),
    [pytest.param(make, frags, id=name) for name, make, frags in BAD_INPUTS],
)
def test_cli_bad_input_exits_2_and_writes_nothing(
    case: Case,
    capsys: pytest.CaptureFixture[str],
    make_bad: BadInput,
    fragments: list[str],
) -> None:
    make_bad(case)
    before = sorted(case.root.rglob("*"))
    status = main(case.argv())
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    assert captured.err.endswith("\n")
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("prop-stream: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert sorted(case.root.rglob("*")) == before  # no output, no temp files


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param(["1001,2026-01-05T10:00:00Z,NaN,1.0"], id="nan"),
        pytest.param(["1001,yesterday,1.0,1.0"], id="bad-ts"),
    ],
)
def test_cli_bad_tick_in_partitioned_run_writes_nothing(
    case: Case, capsys: pytest.CaptureFixture[str], tmp_path: Path, rows: list[str]
) -> None:
    other = case.root / "ticks"
    other.mkdir()
    (other / "a.csv").write_text("\n".join([HEADER, *GOOD_ROWS]) + "\n")
    (other / "b.csv").write_text("\n".join([HEADER, *GOOD_ROWS, *rows]) + "\n")
    case.ticks = other
    spill = tmp_path / "spill"
    spill.mkdir()
    status = main(case.argv("--max-rows-in-memory", "2", "--tmp-dir", str(spill)))
    err = capsys.readouterr().err
    assert status == 2
    assert "b.csv: column" in err
    assert ", line 5: " in err
    assert not case.out.exists()
    assert list(spill.iterdir()) == []


def test_cli_error_names_the_bad_file_in_a_directory(
    case: Case, capsys: pytest.CaptureFixture[str]
) -> None:
    ticks = case.root / "ticks"
    ticks.mkdir()
    (ticks / "a.csv").write_text("\n".join([HEADER, *GOOD_ROWS]) + "\n")
    (ticks / "b.csv").write_text("account_id,time,equity,balance\n")
    case.ticks = ticks
    assert main(case.argv()) == 2
    err = capsys.readouterr().err
    assert "b.csv: missing column(s): ts" in err
    assert not case.out.exists()


def test_cli_success_prints_summary_on_stderr(
    case: Case, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(case.argv())
    captured = capsys.readouterr()
    assert status == 0
    assert captured.out == ""
    (line,) = captured.err.splitlines()  # no progress bar off a terminal
    assert line.startswith("prop-stream: backtest: 2 accounts, 3 ticks evaluated")
    for fragment in ("0 late", "0 breaches", "0 passed", "0 failed", " s;"):
        assert fragment in line
    assert sorted(p.name for p in case.out.iterdir()) == [
        "accounts.csv",
        "accounts.parquet",
        "breaches.csv",
        "breaches.parquet",
        "daily.csv",
        "daily.parquet",
        "flags.csv",
        "flags.parquet",
    ]


def test_cli_summary_counts_breaches_and_failures(
    case: Case, capsys: pytest.CaptureFixture[str]
) -> None:
    case.write_csv([*GOOD_ROWS, "1001,2026-01-05T11:00:00Z,89000.0,100000.0"])
    assert main(case.argv()) == 0
    line = capsys.readouterr().err
    assert "4 ticks evaluated" in line
    assert "1 breach, 0 passed, 1 failed" in line


@pytest.mark.parametrize(
    ("argv", "status", "stream_text"),
    [
        (["--help"], 0, "backtest"),
        (["backtest", "--help"], 0, "--max-rows-in-memory"),
        ([], 2, "required"),
        (["frobnicate"], 2, "invalid choice"),
        (["backtest", "--rules", "r.json", "--ticks", "t.csv"], 2, "--out"),
        (
            [
                "backtest",
                "--rules",
                "r",
                "--ticks",
                "t",
                "--out",
                "o",
                "--max-rows-in-memory",
                "0",
            ],
            2,
            "must be at least 1",
        ),
    ],
)
def test_cli_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], status: int, stream_text: str
) -> None:
    assert main(argv) == status
    captured = capsys.readouterr()
    assert stream_text in (captured.out if status == 0 else captured.err)


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own interpreter and arguments
        argv, capture_output=True, text=True, check=False, timeout=120, **kwargs
    )


def test_cli_module_exit_status_for_bad_input(case: Case) -> None:
    case.write_rules({"accounts": [account(profit_target=1.5)]})
    proc = _run([sys.executable, "-m", "prop_stream.cli", *case.argv()])
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("prop-stream: error: ")
    assert "rules.json: account 1001: rules.profit_target: " in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not case.out.exists()


@pytest.mark.skipif(not PROG_SCRIPT.exists(), reason="package not installed")
def test_cli_console_script(case: Case) -> None:
    proc = _run([str(PROG_SCRIPT), *case.argv()])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert (case.out / "accounts.csv").exists()
    case.write_csv(["1001,soon,1.0,1.0"])
    proc = _run([str(PROG_SCRIPT), *case.argv()])
    assert proc.returncode == 2
    assert "column ts, line 2" in proc.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_cli_progress_bar_only_on_a_terminal(case: Case) -> None:
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    # A fresh pseudo-terminal is 0 columns wide, and tqdm draws nothing in that.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.run(  # noqa: S603 - our own interpreter and arguments
            [sys.executable, "-m", "prop_stream.cli", *case.argv()],
            stdout=subprocess.PIPE,
            stderr=follower,
            check=False,
            timeout=120,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO once the terminal's writer is gone
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    err = b"".join(chunks).decode()
    assert proc.returncode == 0
    assert proc.stdout == b""
    assert "backtest:" in err
    assert "tick" in err.split("prop-stream: backtest:")[0], repr(err)


def _never_initialised(path: Path) -> None:
    import duckdb

    duckdb.connect(str(path)).close()


@pytest.mark.parametrize(
    ("name", "make", "says"),
    [
        ("nope/sub/x.duckdb", None, "database not found"),
        ("a-folder", lambda p: p.mkdir(), "is not a database file"),
        ("text.duckdb", lambda p: p.write_text("hello\n"), "not a valid DuckDB"),
        ("empty.duckdb", lambda p: p.write_bytes(b""), "not a valid DuckDB"),
        ("bare.duckdb", _never_initialised, "never initialised"),
    ],
)
def test_serve_refuses_a_wrong_db_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    make: Callable[[Path], object] | None,
    says: str,
) -> None:
    db = tmp_path / name
    if make is not None:
        make(db)
    code = main(["serve", "--db", str(db), "--port", "0"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("prop-stream: error: ")
    assert str(db) in err[0]
    assert says in err[0]
    # A typo never creates folders or an empty database.
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["session", "a@example.com", "--ttl-hours", "99999999999"], "at most"),
        (["session", "a@example.com", "--ttl-hours", "0"], "at least 1"),
        (["serve", "--role", "api"], "needs a PostgreSQL database"),
        (["serve", "--role", "boss"], "invalid choice"),
        (
            [
                "serve",
                "--role",
                "evaluator",
                "--source",
                "kafka",
                "--kafka-bootstrap",
                "127.0.0.1:1",
                "--group",
                "g",
            ],
            "needs a PostgreSQL database",
        ),
        (["serve", "--group", "g"], "--group needs --source kafka"),
        (
            [
                "serve",
                "--source",
                "kafka",
                "--kafka-bootstrap",
                "127.0.0.1:1",
                "--group",
                " ",
            ],
            "consumer group name is empty",
        ),
        (["init"], "required: --db"),
    ],
)
def test_cli_usage_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    db = tmp_path / "x.duckdb"
    full = [*args, "--db", str(db)] if args != ["init"] else args
    assert main(full) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert says in err[0]
    assert "Traceback" not in err[0]


def test_cli_refuses_a_read_only_file_system_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("mounting a file system needs root (CI runs as root)")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(  # noqa: S603 - fixed arguments
        ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)],  # noqa: S607 - the system's mount
        check=True,
    )
    try:
        assert main(["init", "--db", str(ro / "x.duckdb")]) == 2
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)  # noqa: S603, S607 - fixed arguments
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Read-only file system" in err[0]


def test_init_creates_the_database_private(tmp_path: Path) -> None:
    db = tmp_path / "new" / "prop.duckdb"
    assert main(["init", "--db", str(db)]) == 0
    assert db.stat().st_mode & 0o777 == 0o600
    assert db.parent.stat().st_mode & 0o777 == 0o700


def _free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_cli_produce_without_a_broker_is_one_line_and_status_1(case: Case) -> None:
    case.write_csv(GOOD_ROWS)
    bootstrap = _free_address()  # nobody listens there
    proc = _run(
        [sys.executable, "-m", "prop_stream.cli", "produce", str(case.ticks),
         "--kafka-bootstrap", bootstrap, "--topic", "ticks"],
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == (
        f"prop-stream: error: no Kafka broker answers at {bootstrap}\n"
    )


@pytest.mark.parametrize("partitions", ["0", "-3", "six"])
def test_cli_produce_refuses_a_bad_partition_count(
    case: Case, capsys: pytest.CaptureFixture[str], partitions: str
) -> None:
    case.write_csv(GOOD_ROWS)
    argv = ["produce", str(case.ticks), "--kafka-bootstrap", "127.0.0.1:1"]
    assert main([*argv, "--partitions", partitions]) == 2
    assert "--partitions" in capsys.readouterr().err
