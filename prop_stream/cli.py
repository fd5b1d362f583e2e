"""The ``prop-stream`` command line.

Each subcommand is a ``_add_<name>`` function that declares its arguments and a
``_run_<name>`` handler returning the exit status: 0 on success, 2 on bad input
(one ``prop-stream: error: ...`` line on stderr), 1 when something else failed.

Examples:
    $ prop-stream backtest --rules RULES.json --ticks ticks/ --out results/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from prop_stream.backtest import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_MAX_ROWS_IN_MEMORY,
    run_backtest,
)
from prop_stream.exceptions import PropStreamError

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Risk engine for prop-trading challenges.",
    )
    commands = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND"
    )
    _add_backtest(commands)
    return parser


def _add_backtest(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = commands.add_parser(
        "backtest",
        help="replay tick files through the rules and write breaches, accounts, daily",
        description=(
            "Replay tick files through the rules engine. Writes breaches, accounts "
            "and daily to DIR, each as .parquet and .csv. Exit status 0 on success, "
            "2 on bad input (nothing is written then)."
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
        "--chunk-rows",
        type=_positive_int,
        default=DEFAULT_CHUNK_ROWS,
        help=argparse.SUPPRESS,
    )
    parser.set_defaults(handler=_run_backtest)


def _run_backtest(args: argparse.Namespace) -> int:
    result = run_backtest(
        args.rules,
        args.ticks,
        args.out,
        max_rows_in_memory=args.max_rows_in_memory,
        chunk_rows=args.chunk_rows,
        tmp_dir=args.tmp_dir,
        progress=sys.stderr.isatty(),
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
        f"{result.passed:,} passed, {result.failed:,} failed "
        f"in {result.seconds:.2f} s; wrote {args.out}",
        file=sys.stderr,
    )
    return EXIT_OK


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
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


if __name__ == "__main__":
    sys.exit(main())
