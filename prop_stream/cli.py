"""The ``prop-stream`` command line.

Each subcommand is a ``_add_<name>`` function that declares its arguments and a
``_run_<name>`` handler returning the exit status: 0 on success, 2 on bad input
(one ``prop-stream: error: ...`` line on stderr), 1 when something else failed.

Examples:
    $ prop-stream backtest --rules RULES.json --ticks ticks/ --out results/
    $ prop-stream init --db prop.duckdb --demo
    $ prop-stream session alice@example.com --db prop.duckdb
    $ prop-stream export --db prop.duckdb --out export/
    $ prop-stream serve --db prop.duckdb --source demo --port 8000
    $ prop-stream demo
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from importlib.metadata import entry_points
from pathlib import Path
from typing import Final, NoReturn

# Only what every command needs is imported here; each handler imports its own
# modules (Kafka, settings, the store), so that `prop-stream backtest` does not
# pay for pydantic-settings, kafka-python or DuckDB at start-up. The defaults
# shown in --help are mirrored below for the same reason (a test checks them).
from prop_stream.admin import DEFAULT_TIMEOUT_S
from prop_stream.backtest import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_MAX_ROWS_IN_MEMORY,
    run_backtest,
)
from prop_stream.dburl import is_url, parse_db, redact
from prop_stream.exceptions import PropStreamError
from prop_stream.logs import close_access_log, configure_logging

#: ``prop_stream.store.sessions.DEFAULT_SESSION_TTL`` in hours.
DEFAULT_SESSION_TTL_HOURS: Final = 7 * 24
#: ``prop_stream.kafka.produce.DEFAULT_PARTITIONS``.
DEFAULT_PARTITIONS: Final = 6

PROG: Final = "prop-stream"
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_BAD_INPUT: Final = 2
_EXIT_INTERRUPTED: Final = 130

Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on bad input or usage, 1 on other failures.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has reported
        return _exit_status(exc)
    handler: Handler = args.handler
    log_format = os.environ.get("PROP_STREAM_LOG_FORMAT", "auto")
    log_level = os.environ.get("PROP_STREAM_LOG_LEVEL", "INFO")
    if log_format not in ("auto", "json", "text"):
        _error(f"PROP_STREAM_LOG_FORMAT must be auto, json or text, not {log_format!r}")
        return EXIT_BAD_INPUT
    if not isinstance(logging.getLevelName(log_level.upper()), int):
        _error(f"PROP_STREAM_LOG_LEVEL {log_level!r} is not a logging level")
        return EXIT_BAD_INPUT
    root = logging.getLogger()
    saved_logging = (list(root.handlers), root.level)
    configure_logging(log_format, log_level)  # type: ignore[arg-type]  # checked just above
    # The database, its WAL and everything the service writes beside it (the
    # admin file, the risk mirror) are the operator's alone.
    saved_umask = os.umask(0o077) if args.command in _PRIVATE_COMMANDS else None
    try:
        return _handle(handler, args)
    finally:
        # Called in-process (tests, embedding), main leaves the process as it was.
        if saved_umask is not None:
            os.umask(saved_umask)
        close_access_log()
        root.handlers[:] = saved_logging[0]
        root.setLevel(saved_logging[1])


def _handle(handler: Handler, args: argparse.Namespace) -> int:
    """Run a command's handler; every error becomes one line and an exit status."""
    try:
        return handler(args)
    except PropStreamError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    except OSError as exc:
        _error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _error("interrupted")
        return _EXIT_INTERRUPTED
    except Exception as exc:  # every error is one line; the log has the rest
        if _is_validation_error(exc):
            _error(f"bad setting: {_validation_summary(exc)}")
            return EXIT_BAD_INPUT
        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        _error(f"unexpected {type(exc).__name__}: {exc}")
        return EXIT_FAILURE


#: Commands that create the database or files beside it (umask 077).
_PRIVATE_COMMANDS: Final = frozenset({"init", "serve", "demo", "session"})


def _is_validation_error(exc: Exception) -> bool:
    # A pydantic error can only come from a command that imported pydantic, so
    # the check needs no import of its own.
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and isinstance(exc, pydantic.ValidationError)


def _validation_summary(exc: Exception) -> str:
    from pydantic import ValidationError

    assert isinstance(exc, ValidationError)  # noqa: S101 - _is_validation_error
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "value"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``prop-stream serve: error: ...``)."""

    def error(self, message: str) -> NoReturn:
        """Print one line naming the command and the problem; exit status 2."""
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Risk engine for prop-trading challenges.",
    )
    commands = parser.add_subparsers(
        title="commands",
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=_Parser,
    )
    _add_backtest(commands)
    _add_whatif(commands)
    _add_init(commands)
    _add_session(commands)
    _add_export(commands)
    _add_serve(commands)
    _add_demo(commands)
    _add_produce(commands)
    return parser


def _add_backtest(
    commands: argparse._SubParsersAction[_Parser],
) -> None:
    parser = commands.add_parser(
        "backtest",
        help=(
            "replay tick (and deal) files through the rules and write breaches, "
            "accounts, daily, flags"
        ),
        description=(
            "Replay tick files, and deal files with --deals, through the rules "
            "engine. Writes breaches, accounts, daily and flags to DIR, each as "
            ".parquet and .csv (and report.html with --report). Exit status 0 on "
            "success, 2 on bad input (nothing is written then)."
        ),
    )
    parser.add_argument(
        "--rules", required=True, type=Path, metavar="RULES.json", help="rules file"
    )
    parser.add_argument(
        "--ticks",
        required=True,
        metavar="TICKS",
        help="Parquet or CSV file, directory or glob (quote it) of tick files",
    )
    parser.add_argument(
        "--deals",
        default=None,
        metavar="DEALS",
        help=(
            "Parquet or CSV file, directory or glob (quote it) of deal files: "
            "judged with the ticks by the deal rules, joined into hedge flags"
        ),
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output directory"
    )
    parser.add_argument(
        "--max-rows-in-memory",
        type=_positive_int,
        default=DEFAULT_MAX_ROWS_IN_MEMORY,
        metavar="N",
        help=(
            "sort up to N tick rows in memory; larger inputs are sorted through "
            "temporary Parquet partitions (default: %(default)s)"
        ),
    )
    parser.add_argument(
        "--tmp-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where temporary partitions go (default: the system temp directory)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help=(
            "also write DIR/report.html: outcomes and each account's equity "
            "against its floors, one file that works offline"
        ),
    )
    _add_threads(parser)
    parser.add_argument(
        "--chunk-rows",
        type=_positive_int,
        default=DEFAULT_CHUNK_ROWS,
        help=argparse.SUPPRESS,
    )
    parser.set_defaults(handler=_run_backtest)


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help=(
            "judge on at most N threads (default: one per core); the outputs "
            "are the same on any number"
        ),
    )


def _run_backtest(args: argparse.Namespace) -> int:
    result = run_backtest(
        args.rules,
        args.ticks,
        args.out,
        max_rows_in_memory=args.max_rows_in_memory,
        chunk_rows=args.chunk_rows,
        tmp_dir=args.tmp_dir,
        progress=sys.stderr.isatty(),
        report=args.report,
        deals=args.deals,
        threads=args.threads,
    )
    skipped = [f"{result.late:,} late"]
    if result.unknown:
        skipped.append(f"{result.unknown:,} for accounts not in the rules")
    if result.inactive:
        skipped.append(f"{result.inactive:,} after their phase ended")
    print(
        f"{PROG}: backtest: {_count(result.accounts, 'account')}, "
        f"{_count(result.evaluated, 'tick')} evaluated ({', '.join(skipped)}), "
        f"{_count(result.breaches, 'breach', 'breaches')}, "
        + (
            f"{_count(result.deals, 'deal')} processed, "
            f"{_count(result.flags, 'hedge flag')}, "
            if args.deals is not None
            else ""
        )
        + f"{result.passed:,} passed, {result.failed:,} failed "
        f"in {result.seconds:.2f} s; wrote {args.out}",
        file=sys.stderr,
    )
    return EXIT_OK


def _add_whatif(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = commands.add_parser(
        "whatif",
        help="replay recorded phases with changed rules, list the changed outcomes",
        description=(
            "Replay the archived ticks and deals of phases recorded in the store "
            "with the "
            "rules they ran with and with --set changes, and write the phases "
            "whose outcome changes (docs/backtest.md, 'What if'). Exit status 0 "
            "on success, 2 on bad input (nothing is written then)."
        ),
    )
    parser.add_argument(
        "--db",
        required=True,
        type=parse_db,
        metavar="DB",
        help="the service's DuckDB file, or the postgresql:// URL of its database",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--program", type=int, metavar="ID", help="every started phase of a program"
    )
    which.add_argument(
        "--phase-ids",
        nargs="+",
        metavar="CHALLENGE[:PHASE]",
        help="phases by challenge id and phase index (a challenge alone: all of them)",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        required=True,
        metavar="RULE=VALUE",
        help="a rule change (repeat for more); VALUE as JSON (0.04, null) or text",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output directory"
    )
    parser.add_argument(
        "--archive",
        type=Path,
        default=None,
        metavar="DIR",
        help=(
            "the tick archive (default: PATH.archive/ticks; with a PostgreSQL "
            "--db, $PROP_STREAM_ARCHIVE_DIR/ticks)"
        ),
    )
    parser.add_argument(
        "--deals-archive",
        type=Path,
        default=None,
        metavar="DIR",
        help="the deal archive (default: deals beside the tick archive)",
    )
    parser.add_argument(
        "--max-rows-in-memory",
        type=_positive_int,
        default=DEFAULT_MAX_ROWS_IN_MEMORY,
        metavar="N",
        help="as for backtest (default: %(default)s)",
    )
    parser.add_argument(
        "--tmp-dir", type=Path, default=None, metavar="DIR", help="as for backtest"
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="also write DIR/report.html with the floors before and after the change",
    )
    _add_threads(parser)
    parser.set_defaults(handler=_run_whatif)


def _run_whatif(args: argparse.Namespace) -> int:
    # Imported here: only this command needs it (the CLI imports per command).
    from prop_stream.backtest.whatif import parse_phase_ids, parse_sets, run_whatif

    changes = parse_sets(args.sets)
    phase_ids = parse_phase_ids(args.phase_ids) if args.phase_ids else ()
    result = run_whatif(
        args.db,
        changes,
        args.out,
        program=args.program,
        phase_ids=phase_ids,
        archive=args.archive,
        max_rows_in_memory=args.max_rows_in_memory,
        tmp_dir=args.tmp_dir,
        report=args.report,
        deals_archive=args.deals_archive,
        threads=args.threads,
    )
    if result.staged is None:
        print(
            f"{PROG}: whatif: {_shown(args.db)} is held by a running service: read its "
            f"risk copy {result.source}; ticks judged since the archive's last "
            "move are not in the replay (phases they decide are in mismatches)",
            file=sys.stderr,
        )
    kinds = ", ".join(f"{kind} {n:,}" for kind, n in result.changes.items())
    print(
        f"{PROG}: whatif: {_count(result.phases, 'phase')}, "
        f"{_count(result.ticks, 'tick')} and {_count(result.deals, 'deal')} "
        "replayed twice, "
        f"{_count(sum(result.changes.values()), 'change')}"
        f"{f' ({kinds})' if kinds else ''}, "
        f"{result.mismatches:,} not as recorded in {result.seconds:.2f} s; "
        f"wrote {args.out}",
        file=sys.stderr,
    )
    return EXIT_OK


def _add_init(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = commands.add_parser(
        "init",
        help="create or migrate the service's database",
        description=(
            "Create the DuckDB file or migrate it to the latest schema (a "
            "postgresql:// URL: migrate that existing database and grant the "
            "read-only role prop_stream_risk the risk_* views); running it again "
            "is a no-op. --demo adds the demo reference data once."
        ),
    )
    _add_db(parser)
    parser.add_argument(
        "--demo",
        action="store_true",
        help="add demo account groups, programs, customers and challenges",
    )
    parser.set_defaults(handler=_run_init)


def _run_init(args: argparse.Namespace) -> int:
    from prop_stream.store.init import init_database

    result = init_database(args.db, demo=args.demo)
    applied = (
        f"applied migration(s) {', '.join(map(str, result.applied))}"
        if result.applied
        else "already up to date"
    )
    demo = ""
    if args.demo:
        demo = "; demo data added" if result.seeded else "; demo data already there"
    role = f"; read-only role {result.risk_role}" if result.risk_role else ""
    print(
        f"{PROG}: init: {_shown(result.path)} at schema version {result.version} "
        f"({applied}){demo}{role}",
        file=sys.stderr,
    )
    return EXIT_OK


def _add_session(
    commands: argparse._SubParsersAction[_Parser],
) -> None:
    parser = commands.add_parser(
        "session",
        help="print a new session token for a customer",
        description=(
            "Issue a session token for the customer with this e-mail address and "
            "print it on stdout, and nothing else. Works while the service runs "
            "(the service issues it)."
        ),
    )
    parser.add_argument("email", metavar="EMAIL", help="the customer's e-mail")
    _add_db(parser)
    parser.add_argument(
        "--ttl-hours",
        type=_ttl_hours,
        default=DEFAULT_SESSION_TTL_HOURS,
        metavar="H",
        help="hours until the session expires (default: %(default)s)",
    )
    _add_timeout(parser)
    parser.set_defaults(handler=_run_session)


def _run_session(args: argparse.Namespace) -> int:
    from prop_stream.store.access import issue_session

    token = issue_session(
        args.db,
        args.email,
        ttl=timedelta(hours=args.ttl_hours),
        timeout_s=args.timeout,
    )
    print(token)
    return EXIT_OK


def _add_export(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = commands.add_parser(
        "export",
        help="export metric history, breaches and daily snapshots to Parquet",
        description=(
            "Write metric_history, breaches and prop_daily_snapshots as Parquet "
            "under DIR/<table>/day=YYYY-MM-DD/. Works while the service runs (the "
            "service exports them)."
        ),
    )
    _add_db(parser)
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="output directory"
    )
    _add_timeout(parser)
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from prop_stream.store.access import export_database

    result = export_database(args.db, args.out, timeout_s=args.timeout)
    rows = ", ".join(f"{_count(n, 'row')} of {t}" for t, n in result.rows.items())
    via = " (through the running service)" if result.via_service else ""
    print(f"{PROG}: export: {rows}; wrote {result.out_dir}{via}", file=sys.stderr)
    return EXIT_OK


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        required=True,
        type=parse_db,
        metavar="DB",
        help="the DuckDB file, or a postgresql:// URL of an existing database",
    )


def _shown(db: Path | str) -> str:
    """``--db`` as messages show it (a URL without its password)."""
    return redact(db) if isinstance(db, str) else str(db)


def _add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=(
            "seconds to wait for a running service that holds the database "
            "(default: %(default)s)"
        ),
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


#: The longest session ``prop-stream session`` issues: ten years.
MAX_TTL_HOURS: Final = 10 * 366 * 24


def _ttl_hours(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_TTL_HOURS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_TTL_HOURS} (ten years), got {value}"
        )
    return value


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n:,} {singular if n == 1 else plural or singular + 's'}"


def _error(message: str) -> None:
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"{PROG}: error: {line}", file=sys.stderr)


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None:
        return EXIT_OK
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return EXIT_FAILURE


#: The consumer group of the evaluators unless ``--group`` names another.
DEFAULT_GROUP: Final = "prop-stream"
#: Where ``prop-stream demo`` keeps its database unless told otherwise.
DEMO_DB: Final = Path("data/prop-stream-demo.duckdb")
#: The demo customer whose session ``prop-stream demo`` prints.
DEMO_EMAIL: Final = "alice@example.com"


def _add_listen(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=8000,
        help="port to listen on, 0 for a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--demo-rate",
        type=float,
        default=None,
        metavar="TICKS_PER_S",
        help="ticks per second of the demo source (default: 1000)",
    )


def _add_serve(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = commands.add_parser(
        "serve",
        help="run the service: API, evaluator and job worker in one process",
        description=(
            "Serve the HTTP API and run the evaluator loop over the tick source, "
            "storing results in the DuckDB file (created or migrated first). Logs "
            "one line when ready; SIGINT/SIGTERM finish the batch, commit and stop."
        ),
    )
    _add_db(parser)
    _add_listen(parser)
    parser.add_argument(
        "--source",
        choices=("none", "demo", "kafka"),
        default="none",
        help="where ticks come from (default: %(default)s)",
    )
    parser.add_argument(
        "--role",
        choices=("all", "api", "evaluator", "jobs"),
        default="all",
        help=(
            "what this process runs (default: %(default)s: API, evaluator and "
            "jobs); with a DuckDB file only 'all' (one process owns the file)"
        ),
    )
    parser.add_argument(
        "--kafka-bootstrap", metavar="H:P", help="Kafka bootstrap server (kafka source)"
    )
    parser.add_argument(
        "--topic", default="prop.equity-ticks", help="tick topic (kafka source)"
    )
    parser.add_argument(
        "--group",
        metavar="G",
        default=None,
        help=(
            "join the Kafka consumer group G and judge only the partitions it "
            "assigns, with state and fencing per partition (kafka source; "
            "default with PostgreSQL: prop-stream; with DuckDB the service "
            "takes every partition unless --group is given)"
        ),
    )
    parser.set_defaults(handler=_run_serve)


def _add_demo(commands: argparse._SubParsersAction[_Parser]) -> None:
    parser = commands.add_parser(
        "demo",
        help="init a demo database and serve it with the built-in tick source",
        description=(
            f"Create {DEMO_DB} with the demo data (once), print a session for "
            f"{DEMO_EMAIL} and serve with the demo tick source."
        ),
    )
    parser.add_argument(
        "--db",
        type=Path,
        default=DEMO_DB,
        metavar="PATH",
        help="the demo database (default: %(default)s)",
    )
    _add_listen(parser)
    parser.set_defaults(handler=_run_demo, source="demo")


def _serve(args: argparse.Namespace, *, source: str) -> int:
    server = [
        ep for ep in entry_points(group="prop_stream.server") if ep.name == "http"
    ]
    if not server:
        _error("the HTTP service (package api) is not installed")
        return EXIT_FAILURE
    role = getattr(args, "role", "all")
    postgres = is_url(args.db)
    if role != "all" and not postgres:
        _error(
            f"--role {role} needs a PostgreSQL database (the scale-out deployment); "
            f"with the DuckDB file {_shown(args.db)} only --role all runs"
        )
        return EXIT_BAD_INPUT
    overrides: dict[str, object] = {"db": args.db, "source": source}
    group = getattr(args, "group", None)
    if group is not None and not group.strip():
        _error("--group: the consumer group name is empty")
        return EXIT_BAD_INPUT
    if source == "kafka":
        if not getattr(args, "kafka_bootstrap", None):
            _error("--source kafka needs --kafka-bootstrap H:P")
            return EXIT_BAD_INPUT
        overrides["kafka_bootstrap"] = args.kafka_bootstrap
        overrides["kafka_topic"] = args.topic
        # Several processes share a PostgreSQL store: they share the partitions.
        if group is not None or postgres:
            overrides["kafka_consumer_group"] = True
            overrides["kafka_group_id"] = group or DEFAULT_GROUP
    elif group is not None:
        _error("--group needs --source kafka")
        return EXIT_BAD_INPUT
    if args.demo_rate is not None:
        overrides["demo_rate"] = args.demo_rate
    from prop_stream.config import StreamSettings

    settings = StreamSettings(**overrides)  # type: ignore[arg-type]  # validated
    run = server[0].load()
    if role == "all":
        status: int = run(settings, host=args.host, port=args.port)
    else:
        status = run(settings, host=args.host, port=args.port, role=role)
    return status


def _run_serve(args: argparse.Namespace) -> int:
    return _serve(args, source=args.source)


def _run_demo(args: argparse.Namespace) -> int:
    from prop_stream.store.access import issue_session
    from prop_stream.store.init import init_database

    args.db.parent.mkdir(parents=True, exist_ok=True)
    init_database(args.db, demo=True)
    token = issue_session(args.db, DEMO_EMAIL)
    print(
        f"{PROG}: demo: session for {DEMO_EMAIL}: {token}\n"
        f"{PROG}: demo: try  curl -H 'Authorization: Bearer {token}' "
        f"http://{args.host}:{args.port}/prop/challenges",
        file=sys.stderr,
    )
    return _serve(args, source="demo")


def _add_produce(
    commands: argparse._SubParsersAction[_Parser],
) -> None:
    parser = commands.add_parser(
        "produce",
        help="replay a tick file to a Kafka topic (JSON or the batch encoding)",
        description=(
            "Send the ticks of a Parquet or CSV file to a topic, keyed by account, "
            "as JSON messages (interfaces.md section 1) or in the compact batch "
            "encoding (header encoding: arrow-ipc-v1), creating the topic first "
            "unless it exists. Progress bar on a terminal. Exit status 0 when "
            "every message is acknowledged, 2 on bad input, 1 when no broker "
            "answers or the broker fails."
        ),
    )
    parser.add_argument("ticks", metavar="TICKS", type=Path, help="tick file")
    parser.add_argument(
        "--deals",
        type=Path,
        metavar="DEALS",
        default=None,
        help=(
            "a Parquet or CSV deal file sent with the ticks on the same topic "
            '("type": "deal", keyed by account), interleaved by (ts, a deal '
            "before a tick)"
        ),
    )
    parser.add_argument(
        "--kafka-bootstrap", required=True, metavar="H:P", help="Kafka bootstrap"
    )
    parser.add_argument(
        "--topic", default="prop.equity-ticks", help="topic (default: %(default)s)"
    )
    parser.add_argument(
        "--encoding",
        choices=("json", "batch"),
        default="json",
        help="message encoding (default: %(default)s)",
    )
    parser.add_argument(
        "--partitions",
        type=_positive_int,
        default=DEFAULT_PARTITIONS,
        metavar="N",
        help=(
            "partitions of the topic if it is created; an existing topic is "
            "left as it is (default: %(default)s)"
        ),
    )
    parser.set_defaults(handler=_run_produce)


def _run_produce(args: argparse.Namespace) -> int:
    from prop_stream.kafka import KafkaUnavailableError, produce_file

    try:
        sent = produce_file(
            args.ticks,
            bootstrap=args.kafka_bootstrap,
            topic=args.topic,
            deals=args.deals,
            encoding=args.encoding,
            progress=sys.stderr.isatty(),
            partitions=args.partitions,
        )
    except KafkaUnavailableError as exc:  # not bad input: the broker may come back
        _error(str(exc))
        return EXIT_FAILURE
    what = "ticks" if args.deals is None else "ticks and deals"
    print(f"{PROG}: produce: {sent} {what} to {args.topic}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
