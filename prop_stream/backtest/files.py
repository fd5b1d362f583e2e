"""Read the backtest's input files: the rules file and the tick files.

Everything here either returns clean, typed data or raises
:class:`~prop_stream.exceptions.InputFileError` with a one-line message that names
the file and, where it can, the account, field, column and row. Nothing here
evaluates a tick.

Tick files are read lazily with polars. Each file becomes a
:class:`polars.LazyFrame` with exactly the engine's tick columns
(:data:`prop_stream.rules.TICK_SCHEMA`); values that can't be converted become
nulls there, and :func:`check_ticks` / :func:`diagnose_tick_file` turn them into a
precise error before the run starts.
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal, cast

import polars as pl

from prop_stream.exceptions import InputFileError, RuleConfigError
from prop_stream.rules import DEAL_COLUMNS as ENGINE_DEAL_COLUMNS
from prop_stream.rules import (
    TICK_SCHEMA,
    PhaseSpec,
    RulesKey,
    from_epoch_ms,
    parse_ts_text,
    rules_key,
    validate_rules,
)

TickFormat = Literal["parquet", "csv"]

#: The columns a tick file must have (others are ignored).
TICK_COLUMNS: Final = tuple(TICK_SCHEMA)

_SUFFIXES: Final[Mapping[str, TickFormat]] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
}
_ACCOUNT_KEYS: Final = frozenset(
    {"account_id", "challenge_id", "phase_index", "started_at", "rules", "customer_id"}
)
_TOP_KEYS: Final = frozenset({"accounts", "hedge_window_seconds"})
#: The hedge window when the rules file does not set one (rules.md).
DEFAULT_HEDGE_WINDOW_SECONDS: Final = 60.0
_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1

_EXPECTED: Final = {
    "account_id": "a 64-bit integer",
    "ts": "a timestamp (ISO 8601 with Z, an offset or none for UTC, or epoch ms)",
    "equity": "a number",
    "balance": "a number",
}


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class RulesConfig:
    """Everything a rules file says.

    Attributes:
        specs: One phase per account, in file order.
        customers: ``customer_id`` per account, for the accounts that carry one
            (hedge flags pair only accounts of one customer).
        hedge_window_seconds: The top-level window of hedge flags; None turns
            them off.
    """

    specs: list[PhaseSpec]
    customers: dict[int, str]
    hedge_window_seconds: float | None


def read_rules(path: str | Path) -> list[PhaseSpec]:
    """The phases of a ``RULES.json`` file (see :func:`read_rules_config`).

    Raises:
        InputFileError: As :func:`read_rules_config`.
    """
    return read_rules_config(path).specs


def read_rules_config(path: str | Path) -> RulesConfig:
    """Read and validate a ``RULES.json`` file.

    The file is an object with one key, ``accounts``: a non-empty list of objects
    with ``account_id`` (int), ``challenge_id`` (non-empty string), ``phase_index``
    (int >= 0, default 0), ``started_at`` (ISO 8601 with ``Z`` or an offset) and
    ``rules`` (rule names of ``rules.md``; omitted rules take their defaults)
    and optionally ``customer_id`` (non-empty string, for hedge flags). The
    optional top-level ``hedge_window_seconds`` (number >= 0 or null, default 60)
    is the window of hedge flags.

    Args:
        path: The rules file.

    Returns:
        The phases, the customers and the hedge window.

    Raises:
        InputFileError: The file is missing, not JSON, or invalid; the message names
            the account and the field, e.g.
            ``account 1001: rules.profit_target: must be a ratio in (0, 1), got 1.5``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(f"rules file not found: {path}") from None
    except IsADirectoryError:
        raise InputFileError(f"rules file is a directory: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: can't read rules file: {exc}") from exc
    try:
        doc = json.loads(
            text,
            object_pairs_hook=_refuse_duplicate_keys,
            parse_constant=_refuse_constant,
        )
    except json.JSONDecodeError as exc:
        raise InputFileError(
            f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc
    except ValueError as exc:
        raise InputFileError(f"{path}: not valid JSON: {exc}") from exc
    try:
        return parse_rules_config(doc)
    except InputFileError as exc:
        raise InputFileError(f"{path}: {exc}") from exc


def parse_rules(doc: object) -> list[PhaseSpec]:
    """The phases of a decoded rules document (see :func:`parse_rules_config`).

    Raises:
        InputFileError: As :func:`parse_rules_config`.
    """
    return parse_rules_config(doc).specs


def parse_rules_config(doc: object) -> RulesConfig:
    """Validate a decoded rules document (see :func:`read_rules_config`).

    Args:
        doc: The decoded JSON value.

    Returns:
        The phases in document order, the customers and the hedge window.

    Raises:
        InputFileError: The document is invalid; the message names the account and
            the field.
    """
    if not isinstance(doc, dict):
        raise InputFileError(
            f'must be a JSON object with an "accounts" list, got {_kind(doc)}'
        )
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise InputFileError(f"unknown top-level key(s): {', '.join(unknown)}")
    if "accounts" not in doc:
        raise InputFileError('missing top-level key "accounts"')
    accounts = doc["accounts"]
    if not isinstance(accounts, list):
        raise InputFileError(f"accounts: must be a list, got {_kind(accounts)}")
    if not accounts:
        raise InputFileError("accounts: must list at least one account")
    window = _parse_hedge_window(doc.get("hedge_window_seconds", _DEFAULT))
    specs: list[PhaseSpec] = []
    customers: dict[int, str] = {}
    seen: dict[int, int] = {}
    valid: set[RulesKey] = set()
    starts: dict[str, datetime] = {}
    for index, entry in enumerate(accounts):
        spec = _parse_account(index, entry, valid, starts)
        if spec.account_id in seen:
            raise InputFileError(
                f"account {spec.account_id}: listed twice "
                f"(accounts[{seen[spec.account_id]}] and accounts[{index}])"
            )
        seen[spec.account_id] = index
        specs.append(spec)
        customer = cast(dict[str, object], entry).get("customer_id")
        if customer is not None:
            if not isinstance(customer, str) or not customer:
                raise InputFileError(
                    f"account {spec.account_id}: customer_id: must be a non-empty "
                    f"string, got {customer!r}"
                )
            customers[spec.account_id] = customer
    return RulesConfig(specs=specs, customers=customers, hedge_window_seconds=window)


_DEFAULT: Final = object()


def _parse_hedge_window(value: object) -> float | None:
    if value is _DEFAULT:
        return DEFAULT_HEDGE_WINDOW_SECONDS
    if value is None:
        return None
    bad = InputFileError(
        f"hedge_window_seconds: must be a number >= 0 or null, got {value!r}"
    )
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise bad
    try:
        window = float(value)
    except OverflowError:  # an integer beyond binary64
        raise bad from None
    if not math.isfinite(window) or window < 0:
        raise bad
    return window


def _parse_account(
    index: int, entry: object, valid: set[RulesKey], starts: dict[str, datetime]
) -> PhaseSpec:
    """One account of the rules file.

    ``valid`` holds the rule sets validated so far and ``starts`` the
    ``started_at`` texts parsed so far: a file repeats a few of each over
    thousands of accounts, and each is checked once.
    """
    where = f"accounts[{index}]"
    if not isinstance(entry, dict):
        raise InputFileError(f"{where}: must be an object, got {_kind(entry)}")
    if "account_id" not in entry:
        raise InputFileError(f"{where}: account_id: required")
    account_id = entry["account_id"]
    if not _is_int(account_id) or not _I64_MIN <= account_id <= _I64_MAX:
        raise InputFileError(
            f"{where}: account_id: must be a 64-bit integer, got {account_id!r}"
        )
    where = f"account {account_id}"
    if not entry.keys() <= _ACCOUNT_KEYS:
        unknown = sorted(entry.keys() - _ACCOUNT_KEYS)
        raise InputFileError(f"{where}: unknown key(s): {', '.join(unknown)}")
    for key in ("challenge_id", "started_at", "rules"):
        if key not in entry:
            raise InputFileError(f"{where}: {key}: required")

    challenge_id = entry["challenge_id"]
    if not isinstance(challenge_id, str) or not challenge_id:
        raise InputFileError(
            f"{where}: challenge_id: must be a non-empty string, got {challenge_id!r}"
        )
    phase_index = entry.get("phase_index", 0)
    if not _is_int(phase_index) or not 0 <= phase_index <= _I64_MAX:
        raise InputFileError(
            f"{where}: phase_index: must be an integer >= 0, got {phase_index!r}"
        )
    start = entry["started_at"]
    started_at = starts.get(start) if isinstance(start, str) else None
    if started_at is None:
        started_at = _parse_started_at(where, start)
        if isinstance(start, str):
            starts[start] = started_at

    rules = entry["rules"]
    if not isinstance(rules, dict):
        raise InputFileError(f"{where}: rules: must be an object, got {_kind(rules)}")
    # A rules file usually repeats a few programs' rules over thousands of
    # accounts: each distinct rule set is validated once.
    rules_id = rules_key(rules)
    if rules_id is None or rules_id not in valid:
        try:
            validate_rules(rules)
        except RuleConfigError as exc:
            raise InputFileError(f"{where}: {_rule_error_message(exc)}") from exc
        if rules_id is not None:
            valid.add(rules_id)
    return PhaseSpec(
        account_id=account_id,
        challenge_id=challenge_id,
        phase_index=phase_index,
        started_at=started_at,
        rules=rules,
    )


def _parse_started_at(where: str, value: object) -> datetime:
    bad = (
        f"{where}: started_at: must be an ISO 8601 timestamp with a Z or an offset "
        f"(e.g. 2026-01-05T00:00:00Z), got {value!r}"
    )
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value  # a rules dict built in Python (prop_stream.backtest)
    if not isinstance(value, str):
        raise InputFileError(bad)
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InputFileError(bad) from None
    # A naive start is refused rather than taken as UTC: a rules file is written by
    # hand, and a phase start an hour off moves every day boundary check.
    if parsed.tzinfo is None or "T" not in value.upper():
        raise InputFileError(bad)
    return parsed


def _rule_error_message(exc: RuleConfigError) -> str:
    field = getattr(exc, "field", None)
    message = str(exc).strip()
    if not field:
        return f"rules: {message}"
    for prefix in (f"rules.{field}", str(field)):
        if message.startswith(prefix):
            message = message[len(prefix) :].lstrip(" :")
            break
    return f"rules.{field}: {message}"


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) == len(pairs):  # the usual case, decided without a Python loop
        return out
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    return out  # pragma: no cover - a shorter dict always has a repeated key


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), f"a {type(value).__name__}")


# --------------------------------------------------------------------------- ticks


@dataclass(frozen=True, slots=True)
class TickFile:
    """One tick input file.

    Attributes:
        path: The file.
        format: ``parquet`` or ``csv``, from its suffix.
        index: Its position among the run's files; ties in ``ts`` keep this order.
    """

    path: Path
    format: TickFormat
    index: int

    def scan_raw(self) -> pl.LazyFrame:
        """The file as polars reads it (CSV: every column as text)."""
        if self.format == "csv":
            return pl.scan_csv(self.path, infer_schema=False)
        return pl.scan_parquet(self.path, hive_partitioning=False)

    def position(self, row: int) -> str:
        """Name a 0-based data row the way an editor shows it."""
        if self.format == "csv":
            return f"line {row + 2}"  # line 1 is the header
        return f"row {row + 1}"


def resolve_tick_files(spec: str | Path, what: str = "tick") -> list[TickFile]:
    """Expand ``--ticks`` into the files to read, in a stable order.

    ``spec`` is a Parquet or CSV file, a directory (searched recursively for
    ``*.parquet``, ``*.pq`` and ``*.csv``, skipping names that start with ``.`` or
    ``_``) or a glob (``ticks/*.csv``, ``data/**/*.parquet``). Files are sorted by
    path, so "file order" is path order.

    Args:
        spec: The ``--ticks`` argument (or ``--deals``).
        what: What the files hold, for messages (``tick`` or ``deal``).

    Returns:
        The files with their formats.

    Raises:
        InputFileError: Nothing matches, or a file has an unknown suffix.
    """
    text = str(spec)
    path = Path(text)
    paths: list[Path]
    if path.is_dir():
        paths = sorted(
            p
            for p in path.rglob("*")
            if p.suffix.lower() in _SUFFIXES and _visible(p, path) and p.is_file()
        )
        if not paths:
            raise InputFileError(f"no .parquet or .csv files in directory {path}")
    elif path.is_file():
        paths = [path]
    elif glob.has_magic(text):
        paths = sorted(Path(p) for p in glob.glob(text, recursive=True))
        paths = [p for p in paths if p.is_file()]
        if not paths:
            raise InputFileError(f"no {what} files match {text!r}")
    else:
        raise InputFileError(f"{what}s file not found: {path}")
    files = []
    for index, p in enumerate(paths):
        fmt = _SUFFIXES.get(p.suffix.lower())
        if fmt is None:
            raise InputFileError(
                f"{p}: unknown {what} file type {p.suffix!r}; use .parquet or .csv"
            )
        files.append(TickFile(path=p, format=fmt, index=index))
    return files


def _visible(path: Path, root: Path) -> bool:
    # Skips dot files and the `_SUCCESS`/`_metadata` markers Spark and others write.
    return not any(part.startswith((".", "_")) for part in path.relative_to(root).parts)


def scan_ticks(file: TickFile) -> pl.LazyFrame:
    """Scan one tick file as the engine's four columns.

    Values that can't be converted (and missing ones) are null in the result;
    :func:`check_ticks` finds them, :func:`diagnose_tick_file` explains them.

    Args:
        file: The file to scan.

    Returns:
        A lazy frame with ``account_id`` (Int64), ``ts`` (Datetime us UTC),
        ``equity`` and ``balance`` (Float64).

    Raises:
        InputFileError: The file can't be opened, lacks a column, or a column has
            a type that can't hold the field.
    """
    raw = file.scan_raw()
    return raw.select(_tick_exprs(file, raw))


def _file_schema(file: TickFile, raw: pl.LazyFrame) -> pl.Schema:
    """The columns of a tick or deal file, or a refusal naming the file."""
    try:
        return raw.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputFileError(
            f"{file.path}: can't read as {file.format}: {_first_line(exc)}"
        ) from exc


def _tick_exprs(file: TickFile, raw: pl.LazyFrame) -> list[pl.Expr]:
    return _schema_exprs(str(file.path), _file_schema(file, raw))


def _schema_exprs(where: str, schema: pl.Schema) -> list[pl.Expr]:
    missing = [name for name in TICK_COLUMNS if name not in schema]
    if missing:
        raise InputFileError(
            f"{where}: missing column(s): {', '.join(missing)} "
            f"(a tick file needs {', '.join(TICK_COLUMNS)})"
        )
    return [_convert(where, name, schema[name]).alias(name) for name in TICK_COLUMNS]


def _convert(where: str, name: str, dtype: pl.DataType) -> pl.Expr:
    col = pl.col(name)
    if dtype == pl.String:
        text = col.str.strip_chars()
        if name == "ts":
            return parse_ts_text(text)
        return text.cast(pl.Int64 if name == "account_id" else pl.Float64, strict=False)
    if name == "ts":
        if isinstance(dtype, pl.Datetime):
            utc = (
                col.dt.replace_time_zone("UTC")
                if dtype.time_zone is None
                else col.dt.convert_time_zone("UTC")
            )
            return utc.dt.cast_time_unit("us")
        if dtype.is_integer():
            return from_epoch_ms(col)
    elif name == "account_id":
        if dtype.is_integer():
            return col.cast(pl.Int64, strict=False)
    elif dtype.is_numeric():
        return col.cast(pl.Float64, strict=False)
    expected = {
        "account_id": "an integer",
        "ts": "a timestamp or epoch milliseconds",
    }.get(name, "a number")
    raise InputFileError(
        f"{where}: column {name}: has type {dtype}, expected {expected}"
    )


def check_ticks(frame: pl.DataFrame | pl.LazyFrame) -> bool:
    """Whether converted ticks are all usable (no nulls, finite equity/balance).

    Args:
        frame: Ticks as :func:`scan_ticks` returns them (extra columns ignored).

    Returns:
        True when every row can go to the engine.
    """
    query = frame.lazy().select(
        *(pl.col(name).null_count().alias(f"{name}_nulls") for name in TICK_COLUMNS),
        *(
            (~pl.col(name).is_finite()).sum().alias(f"{name}_nonfinite")
            for name in ("equity", "balance")
        ),
    )
    return not any(query.collect().row(0))


def diagnose_tick_file(file: TickFile) -> None:
    """Raise the error for the first bad value in a file, if it has one.

    This is the slow path, run only once :func:`check_ticks` has failed: it reads
    the file again with a row index to name the column, row and value.

    Args:
        file: The file to inspect.

    Raises:
        InputFileError: For the first bad row (lowest row, then column order).
    """
    raw = file.scan_raw()
    _raise_first_bad_row(raw, _tick_exprs(file, raw), str(file.path), file.position)


def scan_tick_frame(ticks: object, name: str = "ticks") -> pl.LazyFrame:
    """Convert an in-memory tick table to the engine's four columns, checked.

    The columns are converted as in a Parquet file (:func:`scan_ticks`), and every
    value is checked before this returns.

    Args:
        ticks: A polars DataFrame or LazyFrame, a pyarrow Table, or anything
            :class:`polars.DataFrame` accepts (e.g. an object with
            ``__arrow_c_stream__``).
        name: What error messages call the table.

    Returns:
        A lazy frame with ``account_id`` (Int64), ``ts`` (Datetime us UTC),
        ``equity`` and ``balance`` (Float64), no nulls, finite amounts.

    Raises:
        InputFileError: A column is missing or has a type that can't hold the
            field, or a value is missing or not finite; the message names the
            column and the 1-based row.
    """
    if isinstance(ticks, pl.LazyFrame):
        raw = ticks
    elif isinstance(ticks, pl.DataFrame):
        raw = ticks.lazy()
    else:
        try:
            raw = pl.DataFrame(cast(Any, ticks)).lazy()
        except (TypeError, ValueError, pl.exceptions.PolarsError) as exc:
            raise InputFileError(
                f"{name}: can't read {type(ticks).__name__} as a table: "
                f"{_first_line(exc)}"
            ) from exc
    try:
        schema = raw.collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise InputFileError(f"{name}: can't read: {_first_line(exc)}") from exc
    converted = _schema_exprs(name, schema)
    frame = raw.select(converted)
    if not check_ticks(frame):
        _raise_first_bad_row(raw, converted, name, lambda row: f"row {row + 1}")
    return frame


def _raise_first_bad_row(
    raw: pl.LazyFrame,
    converted: list[pl.Expr],
    label: str,
    position: Callable[[int], str],
) -> None:
    try:
        frame = (
            raw.select(*(pl.col(n).alias(f"raw_{n}") for n in TICK_COLUMNS), *converted)
            .with_row_index("_row")
            .filter(
                pl.any_horizontal(
                    *(pl.col(n).is_null() for n in TICK_COLUMNS),
                    *(~pl.col(n).is_finite() for n in ("equity", "balance")),
                )
            )
            .head(1)
            .collect()
        )
    except pl.exceptions.PolarsError as exc:
        raise InputFileError(f"{label}: can't read: {_first_line(exc)}") from exc
    if frame.height == 0:
        return
    row = frame.row(0, named=True)
    for name in TICK_COLUMNS:
        where = f"{label}: column {name}, {position(row['_row'])}"
        raw_value, value = row[f"raw_{name}"], row[name]
        if raw_value is None:
            raise InputFileError(f"{where}: missing value")
        if value is None:
            raise InputFileError(
                f"{where}: can't read {str(raw_value)!r} as {_EXPECTED[name]}"
            )
        if name in ("equity", "balance") and not math.isfinite(value):
            raise InputFileError(f"{where}: {value} is not a finite number")


def raise_first_bad_file(files: Iterable[TickFile]) -> None:
    """Diagnose files in order and raise the first file's first error.

    Args:
        files: The run's tick files.

    Raises:
        InputFileError: For the first bad value found.
    """
    for file in files:
        diagnose_tick_file(file)


def count_rows(files: Iterable[TickFile]) -> int:
    """Count the rows of the tick files (Parquet: from metadata).

    Args:
        files: The run's tick files.

    Returns:
        The total number of data rows.

    Raises:
        InputFileError: A file can't be read.
    """
    total = 0
    for file in files:
        try:
            total += int(file.scan_raw().select(pl.len()).collect().item())
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise InputFileError(
                f"{file.path}: can't read as {file.format}: {_first_line(exc)}"
            ) from exc
    return total


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- deals

#: The deal columns as polars types: the engine's
#: :data:`prop_stream.rules.DEAL_SCHEMA` (``rules.md``, Deal events), without the
#: delivery position ``before_tick`` the backtest adds per call.
DEAL_SCHEMA: Final[dict[str, pl.DataType]] = {
    "account_id": pl.Int64(),
    "ts": pl.Datetime("us", "UTC"),
    "deal_id": pl.Int64(),
    "position_id": pl.Int64(),
    "symbol": pl.String(),
    "side": pl.String(),
    "volume": pl.Float64(),
    "price": pl.Float64(),
    "entry": pl.String(),
}
#: The columns a deal file must have (others are ignored).
DEAL_COLUMNS: Final = ENGINE_DEAL_COLUMNS
assert tuple(DEAL_SCHEMA) == DEAL_COLUMNS  # noqa: S101 - the two lists agree
_DEAL_INTS: Final = frozenset({"account_id", "deal_id", "position_id"})
_DEAL_TEXTS: Final = frozenset({"symbol", "side", "entry"})
_DEAL_EXPECTED: Final = {
    "account_id": "a 64-bit integer",
    "ts": _EXPECTED["ts"],
    "deal_id": "a 64-bit integer",
    "position_id": "a 64-bit integer",
    "symbol": "text",
    "side": "text",
    "volume": "a number",
    "price": "a number",
    "entry": "text",
}


def _deal_problems() -> dict[str, tuple[pl.Expr, str]]:
    """Per column: when a converted value is refused, and why (null aside)."""
    return {
        "symbol": (pl.col("symbol") == "", "must be a non-empty symbol"),
        "side": (~pl.col("side").is_in(["buy", "sell"]), "must be buy or sell"),
        "entry": (~pl.col("entry").is_in(["in", "out"]), "must be in or out"),
        # round_half_even(volume * 100) >= 1 exactly when volume * 100 > 0.5.
        "volume": (
            ~pl.col("volume").is_finite() | ~(pl.col("volume") * 100 > 0.5),
            "must be a finite number of lots >= 0.01 (at least one hundredth)",
        ),
        "price": (
            ~pl.col("price").is_finite() | ~(pl.col("price") > 0),
            "must be a finite number > 0",
        ),
    }


def scan_deals(file: TickFile) -> pl.LazyFrame:
    """Scan one deal file as the engine's deal columns.

    Values that can't be converted (and missing ones) are null in the result;
    :func:`check_deals` finds them and every other refused value,
    :func:`diagnose_deal_file` names the first.

    Args:
        file: The file to scan.

    Returns:
        A lazy frame with the columns of :data:`DEAL_SCHEMA`.

    Raises:
        InputFileError: The file can't be opened, lacks a column, or a column has
            a type that can't hold the field.
    """
    raw = file.scan_raw()
    return raw.select(_deal_file_exprs(file, raw))


def _deal_file_exprs(file: TickFile, raw: pl.LazyFrame) -> list[pl.Expr]:
    return _deal_exprs(str(file.path), _file_schema(file, raw))


def _deal_exprs(where: str, schema: pl.Schema) -> list[pl.Expr]:
    missing = [name for name in DEAL_COLUMNS if name not in schema]
    if missing:
        raise InputFileError(
            f"{where}: missing column(s): {', '.join(missing)} "
            f"(a deal file needs {', '.join(DEAL_COLUMNS)})"
        )
    return [
        _convert_deal(where, name, schema[name]).alias(name) for name in DEAL_COLUMNS
    ]


def _convert_deal(where: str, name: str, dtype: pl.DataType) -> pl.Expr:
    col = pl.col(name)
    if name in _DEAL_TEXTS:
        # Text is taken as written (no trimming): "buy " is not a side.
        if dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
            return col.cast(pl.String)
        raise InputFileError(f"{where}: column {name}: has type {dtype}, expected text")
    if name in _DEAL_INTS:
        if dtype == pl.String:
            return col.str.strip_chars().cast(pl.Int64, strict=False)
        if dtype.is_integer():
            return col.cast(pl.Int64, strict=False)
        raise InputFileError(
            f"{where}: column {name}: has type {dtype}, expected an integer"
        )
    if name == "ts":
        return _convert(where, "ts", dtype)
    # volume and price convert as a tick's amounts do.
    if dtype == pl.String:
        return col.str.strip_chars().cast(pl.Float64, strict=False)
    if dtype.is_numeric():
        return col.cast(pl.Float64, strict=False)
    raise InputFileError(f"{where}: column {name}: has type {dtype}, expected a number")


def _deal_bad_row() -> pl.Expr:
    problems = _deal_problems()
    return pl.any_horizontal(
        *(pl.col(n).is_null() for n in DEAL_COLUMNS),
        *(bad.fill_null(False) for bad, _ in problems.values()),
    )


def check_deals(frame: pl.DataFrame | pl.LazyFrame) -> bool:
    """Whether converted deals are all valid (``rules.md``, Deal events).

    Args:
        frame: Deals as :func:`scan_deals` returns them (extra columns ignored).

    Returns:
        True when every row can go to the engine.
    """
    bad = frame.lazy().select(_deal_bad_row().any()).collect().item()
    return not bad


def first_bad_deal_index(frame: pl.LazyFrame) -> int | None:
    """The smallest ``_file`` index among bad deal rows, if any.

    Args:
        frame: Deals with a ``_file`` column (the partitions of a large run).

    Returns:
        The index of the first file with a bad row, or None.
    """
    value = frame.filter(_deal_bad_row()).select(pl.col("_file").min()).collect()
    item = value.item()
    return None if item is None else int(item)


def diagnose_deal_file(file: TickFile) -> None:
    """Raise the error for the first bad deal row in a file, if it has one.

    Args:
        file: The file to inspect.

    Raises:
        InputFileError: For the first bad row (lowest row, then column order),
            naming the file, the row and the field.
    """
    raw = file.scan_raw()
    _raise_first_bad_deal(
        raw, _deal_file_exprs(file, raw), str(file.path), file.position
    )


def raise_first_bad_deal_file(files: Iterable[TickFile]) -> None:
    """Diagnose deal files in order and raise the first file's first error.

    Raises:
        InputFileError: For the first bad value found.
    """
    for file in files:
        diagnose_deal_file(file)


def scan_deal_frame(deals: object, name: str = "deals") -> pl.LazyFrame:
    """Convert an in-memory deal table to the engine's deal columns, checked.

    Args:
        deals: A polars DataFrame or LazyFrame, a pyarrow Table, or anything
            :class:`polars.DataFrame` accepts.
        name: What error messages call the table.

    Returns:
        A lazy frame with the columns of :data:`DEAL_SCHEMA`, every row valid.

    Raises:
        InputFileError: A column is missing or has the wrong type, or a value is
            missing or refused; the message names the column and the 1-based row.
    """
    raw = _lazy_table(deals, name)
    try:
        schema = raw.collect_schema()
    except pl.exceptions.PolarsError as exc:
        raise InputFileError(f"{name}: can't read: {_first_line(exc)}") from exc
    converted = _deal_exprs(name, schema)
    frame = raw.select(converted)
    if not check_deals(frame):
        _raise_first_bad_deal(raw, converted, name, lambda row: f"row {row + 1}")
    return frame


def _lazy_table(table: object, name: str) -> pl.LazyFrame:
    if isinstance(table, pl.LazyFrame):
        return table
    if isinstance(table, pl.DataFrame):
        return table.lazy()
    try:
        return pl.DataFrame(cast(Any, table)).lazy()
    except (TypeError, ValueError, pl.exceptions.PolarsError) as exc:
        raise InputFileError(
            f"{name}: can't read {type(table).__name__} as a table: {_first_line(exc)}"
        ) from exc


def _raise_first_bad_deal(
    raw: pl.LazyFrame,
    converted: list[pl.Expr],
    label: str,
    position: Callable[[int], str],
) -> None:
    try:
        frame = (
            raw.select(*(pl.col(n).alias(f"raw_{n}") for n in DEAL_COLUMNS), *converted)
            .with_row_index("_row")
            .filter(_deal_bad_row())
            .head(1)
            .collect()
        )
    except pl.exceptions.PolarsError as exc:
        raise InputFileError(f"{label}: can't read: {_first_line(exc)}") from exc
    if frame.height == 0:
        return
    problems = _deal_problems()
    checked = frame.select(
        pl.col("_row"),
        *(bad.fill_null(False).alias(f"bad_{n}") for n, (bad, _) in problems.items()),
    ).row(0, named=True)
    row = frame.row(0, named=True)
    for name in DEAL_COLUMNS:
        where = f"{label}: column {name}, {position(row['_row'])}"
        raw_value, value = row[f"raw_{name}"], row[name]
        if raw_value is None:
            raise InputFileError(f"{where}: missing value")
        if value is None:
            raise InputFileError(
                f"{where}: can't read {str(raw_value)!r} as {_DEAL_EXPECTED[name]}"
            )
        if checked.get(f"bad_{name}"):
            raise InputFileError(f"{where}: {problems[name][1]}, got {value!r}")
