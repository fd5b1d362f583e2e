"""Rule-change impact: ``prop-stream whatif``.

Replays the archived ticks and deals of phases recorded in the service's store twice
through the backtest (:func:`prop_stream.backtest.run.judge`): once with the
rules each phase ran with (the *baseline*) and once with ``--set`` changes
applied (the *what-if*), and writes the phases whose outcome differs.

**What "before" is.** The diff is what-if against baseline, both replays of the
same ticks: only the rule change differs, so every difference is the change's.
The store's recorded outcome (``challenge_phases.status``, ``ended_at``, the
``phase_failed`` breach) is what actually happened; each phase's baseline is
checked against it and the phases where they differ are listed apart
(``mismatches``), because there the replay does not see what the service saw
(days removed by the archive's retention, ticks not archived yet, a phase the
service dropped). A diff against the record would credit those to the change.

**Reading the store.** The phases (``challenge_phases`` with their rules
snapshot, ``challenges.program_id``), the recorded breaches and daily snapshots
are read read-only from ``DB``. While ``prop-stream serve`` holds ``DB`` (DuckDB
lets no other process open it), they are read from the service's risk copy
``DB.risk/risk.duckdb`` instead, which is at most a refresh behind; ticks and
deals are read from the archive ``DB.archive/ticks`` and ``DB.archive/deals``
and, with the store open, also from ``tick_archive_staging`` and
``deal_archive_staging`` (judged, not archived yet). Through the risk copy the
staged rows can't be read: the summary says so, and phases they would change
show up as mismatches. The deals go through the engine with the ticks (deal
rules such as ``max_open_lots`` and the hedge flags are part of both replays),
merged as the backtest merges them (``docs/backtest.md``, "Deal files").

Each phase is replayed on its own account from its own recorded start; a later
phase is replayed even when the change fails the phase before it (it would not
have been opened): ``earlier_phase_changed`` marks it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

import duckdb
import polars as pl
import psycopg

from prop_stream.backtest.files import (
    TickFile,
    check_deals,
    resolve_tick_files,
    scan_deals,
    scan_ticks,
)
from prop_stream.backtest.run import (
    DEFAULT_MAX_ROWS_IN_MEMORY,
    REPORT_FILE,
    BacktestTables,
    DealInput,
    judge,
    write_outputs,
)
from prop_stream.dburl import is_url, redact
from prop_stream.exceptions import InputFileError, RuleConfigError
from prop_stream.rules import DEAL_COLUMNS, PhaseSpec, validate_rules
from prop_stream.store.archive import DEALS_DIR, TICKS_DIR, archive_dir
from prop_stream.store.db import Connection, configure, connect, query_frame
from prop_stream.store.exceptions import DatabaseLockedError, StoreError

#: A table the store does not have (an older store, the risk copy).
MISSING_TABLE: Final = (duckdb.CatalogException, psycopg.errors.UndefinedTable)

#: Where the risk copy lives beside ``DB`` (``docs/store.md``).
RISK_COPY: Final = "risk.duckdb"
#: Change kinds, in the order the counts list them.
CHANGE_KINDS: Final = (
    "passed_to_failed",
    "failed_to_passed",
    "active_to_failed",
    "active_to_passed",
    "passed_to_active",
    "failed_to_active",
    "failed_other_rule",
    "failed_other_day",
    "passed_other_day",
)
#: The summary file written beside the tables.
SUMMARY_FILE: Final = "summary.json"

_UTC_US: Final = pl.Datetime("us", "UTC")
_OUTCOME_SCHEMA: Final = {
    "status": pl.String(),
    "ts": _UTC_US,
    "rule": pl.String(),
    "day": pl.Date(),
}
_ENDED: Final = ("passed", "failed")


@dataclass(frozen=True, slots=True)
class StoredPhase:
    """A started phase as the store records it.

    Attributes:
        spec: The phase as the engine registered it (rules snapshot, start).
        challenge_id: The challenge.
        phase_index: The phase's position in the program.
        status: ``active``, ``passed`` or ``failed``.
        ended_at: When it passed or failed (None while active).
    """

    spec: PhaseSpec
    challenge_id: int
    phase_index: int
    status: str
    ended_at: datetime | None


@dataclass(frozen=True, slots=True)
class WhatIfResult:
    """What a what-if did.

    Attributes:
        phases: Phases replayed.
        cancelled: Selected phases left out because they were cancelled.
        ticks: Tick rows of those phases' accounts read.
        staged: Staged ticks read from the store (None: the store was held by a
            running service and its risk copy was read, so none could be).
        deals: Deal rows of those phases' accounts read (archived and staged).
        staged_deals: Staged deals read from the store (None as ``staged``).
        source: ``store`` or the risk copy's path, where the phases came from.
        changes: Changed phases per kind (kinds without a change left out).
        mismatches: Phases whose baseline differs from the store's record.
        seconds: Wall time.
        outputs: The files written.
    """

    phases: int
    cancelled: int
    ticks: int
    staged: int | None
    source: str
    changes: dict[str, int]
    mismatches: int
    seconds: float
    outputs: tuple[Path, ...]
    deals: int = 0
    staged_deals: int | None = None


# ------------------------------------------------------------------ --set


def parse_sets(items: Sequence[str]) -> dict[str, object]:
    """Parse ``--set NAME=VALUE`` items.

    A value is read as JSON when it is JSON (``0.04``, ``5``, ``true``,
    ``null`` to turn a rule off, ``"text"``), else taken as text
    (``total_loss_mode=trailing``, ``timezone=Europe/Prague``). Whether the
    rule exists and the value is allowed is checked against each phase's rules
    (:func:`apply_sets`).

    Args:
        items: The ``--set`` arguments.

    Returns:
        Rule name to value, in the given order.

    Raises:
        InputFileError: An item has no ``=`` or no name, or a rule is set twice.
    """
    if not items:
        raise InputFileError("--set: give at least one rule change (NAME=VALUE)")
    changes: dict[str, object] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputFileError(f"--set {item}: expected NAME=VALUE")
        if name in changes:
            raise InputFileError(f"--set {item}: {name} is set twice")
        try:
            value: object = json.loads(text, parse_constant=_refuse_constant)
        except ValueError:
            value = text
        changes[name] = value
    return changes


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def apply_sets(
    specs: Sequence[PhaseSpec], changes: Mapping[str, object]
) -> list[PhaseSpec]:
    """The phases with the changes applied, each rule set checked by the engine.

    Args:
        specs: The phases as they ran.
        changes: From :func:`parse_sets`.

    Returns:
        The changed phases, in order.

    Raises:
        InputFileError: The engine refuses a changed rule set (unknown rule, value
            out of range, wrong type); the message names the ``--set``, e.g.
            ``--set max_daily_loss=1.5: rules.max_daily_loss: must be a ratio
            in (0, 1), got 1.5``.
    """
    # The rules each phase ran with are known good: a refusal comes from a
    # change. Each change alone first, so the message names the culprit.
    for name, value in changes.items():
        for spec in specs:
            _check({**spec.rules, name: value}, name, value, spec)
    out = []
    for spec in specs:
        rules = {**spec.rules, **changes}
        _check(rules, None, None, spec)
        out.append(replace(spec, rules=rules))
    return out


def _check(
    rules: Mapping[str, Any], name: str | None, value: object, spec: PhaseSpec
) -> None:
    try:
        validate_rules(rules)
    except RuleConfigError as exc:
        field = getattr(exc, "field", None) or name or "rules"
        message = str(exc).strip()
        for prefix in (f"rules.{field}", str(field)):
            if message.startswith(prefix):
                message = message[len(prefix) :].lstrip(" :")
                break
        what = (
            f"--set {name}={json.dumps(value)}"
            if name is not None
            else "--set (the changes together)"
        )
        raise InputFileError(
            f"{what}: rules.{field}: {message} (challenge {spec.challenge_id} "
            f"phase {spec.phase_index}, account {spec.account_id})"
        ) from exc


# ------------------------------------------------------------------ the store


def parse_phase_ids(items: Sequence[str]) -> list[tuple[int, int | None]]:
    """Parse ``--phase-ids``: ``CHALLENGE:PHASE`` or ``CHALLENGE`` (all its phases).

    Items may also be comma-separated (``12:0,13``).

    Raises:
        InputFileError: An item is not of that form.
    """
    out: list[tuple[int, int | None]] = []
    for item in items:
        for part in item.split(","):
            text = part.strip()
            if not text:
                continue
            challenge, sep, phase = text.partition(":")
            try:
                ids = (int(challenge), int(phase) if sep else None)
            except ValueError:
                raise InputFileError(
                    f"--phase-ids {text}: expected CHALLENGE:PHASE or CHALLENGE "
                    "(integers)"
                ) from None
            out.append(ids)
    if not out:
        raise InputFileError("--phase-ids: give at least one CHALLENGE[:PHASE]")
    return out


def open_store(db: Path | str) -> tuple[Connection, str]:
    """Open the store read-only, or its risk copy while a service holds it.

    Args:
        db: The service's DuckDB file, or the ``postgresql://`` URL of the
            scale-out deployment's database (read as it is: PostgreSQL has
            no writer lock to wait for).

    Returns:
        The connection and what it is (``store`` or the risk copy's path).

    Raises:
        InputFileError: ``db`` does not exist or can't be reached, or a process
            holds the DuckDB file and there is no risk copy beside it.
    """
    if is_url(db):
        try:
            return connect(db), "store"
        except StoreError as exc:
            raise InputFileError(f"--db {exc}") from None
    db = Path(db)
    if not db.is_file():
        raise InputFileError(f"--db {db}: database not found")
    try:
        return connect(db, read_only=True), "store"
    except DatabaseLockedError:
        pass
    copy = Path(f"{db.resolve()}.risk") / RISK_COPY
    if not copy.is_file():
        raise InputFileError(
            f"--db {db}: held by another process (a running prop-stream serve?) "
            f"and there is no risk copy {copy} (PROP_STREAM_RISK_MIRROR_INTERVAL_S "
            "is 0?): stop the service, or run whatif on a copy of a stopped store"
        )
    conn = duckdb.connect(str(copy), read_only=True)
    configure(conn)
    return conn, str(copy)


def _default_archive(db: Path | str) -> Path:
    # Beside a DuckDB file; on PostgreSQL the deployment's shared directory.
    if not is_url(db):
        return archive_dir(db)
    # Imported here: only a what-if over PostgreSQL reads the service's settings.
    from prop_stream.config import StreamSettings

    setting = StreamSettings().archive_dir
    if setting is None:
        raise InputFileError(
            f"--db {redact(str(db))}: a PostgreSQL store keeps its archive in the "
            "shared directory PROP_STREAM_ARCHIVE_DIR (docs/scale-out.md): set it, "
            "or give --archive DIR/ticks"
        )
    return Path(setting).resolve()


_PHASES_QUERY: Final = (
    "SELECT cp.account_id, cp.challenge_id, cp.phase_index, cp.started_at, "
    "cp.rules, cp.status, cp.ended_at, c.program_id "
    "FROM challenge_phases cp JOIN challenges c ON c.id = cp.challenge_id "
    "WHERE cp.account_id IS NOT NULL AND cp.started_at IS NOT NULL "
    "AND cp.status <> 'pending'"
)


def select_phases(
    conn: Connection,
    *,
    program: int | None = None,
    phase_ids: Sequence[tuple[int, int | None]] = (),
) -> tuple[list[StoredPhase], int]:
    """The started phases of a program, or the phases named.

    Args:
        conn: The store (or its risk copy).
        program: A program id.
        phase_ids: ``(challenge, phase)`` pairs; phase None means all phases.

    Returns:
        The phases (not cancelled), by account, and how many cancelled ones
        were left out.

    Raises:
        InputFileError: The program or a named phase does not exist or never
            started, or nothing is left to replay.
    """
    rows = conn.execute(_PHASES_QUERY + " ORDER BY cp.account_id").fetchall()
    chosen: list[tuple[Any, ...]]
    if program is not None:
        exists = conn.execute(
            "SELECT count(*) FROM programs WHERE id = ?", [program]
        ).fetchall()
        if not exists[0][0]:
            raise InputFileError(f"--program {program}: no such program")
        chosen = [row for row in rows if int(row[7]) == program]
        if not chosen:
            raise InputFileError(f"--program {program}: no phase has started")
    else:
        chosen = []
        for challenge, phase in phase_ids:
            hits = [
                row
                for row in rows
                if int(row[1]) == challenge and (phase is None or int(row[2]) == phase)
            ]
            if not hits:
                name = f"{challenge}" if phase is None else f"{challenge}:{phase}"
                raise InputFileError(
                    f"--phase-ids {name}: no started phase "
                    f"{'of challenge ' + str(challenge) if phase is None else name}"
                )
            chosen += [row for row in hits if row not in chosen]
        chosen.sort(key=lambda row: int(row[0]))
    phases = [
        StoredPhase(
            spec=PhaseSpec(
                account_id=int(row[0]),
                challenge_id=str(row[1]),
                phase_index=int(row[2]),
                started_at=row[3],
                rules=json.loads(str(row[4])),
            ),
            challenge_id=int(row[1]),
            phase_index=int(row[2]),
            status=str(row[5]),
            ended_at=row[6],
        )
        for row in chosen
        if row[5] != "cancelled"
    ]
    cancelled = len(chosen) - len(phases)
    if not phases:
        raise InputFileError("every selected phase was cancelled: nothing to replay")
    return phases, cancelled


def recorded_outcomes(conn: Connection, phases: Sequence[StoredPhase]) -> pl.DataFrame:
    """What the store recorded per phase: status, when, the failing rule, the day.

    Returns:
        ``account_id, status, ts, rule, day`` (``day``: the phase's last local
        trading day with a snapshot, for ended phases).
    """
    ids = [p.spec.account_id for p in phases]
    # The first failing breach per phase, picked here rather than with an
    # aggregate only DuckDB has (arg_min): the same SQL on both backends.
    fails = (
        query_frame(
            conn,
            "SELECT account_id, rule, ts, breach_seq FROM breaches "
            "WHERE action = 'phase_failed' AND account_id IN (SELECT unnest(?))",
            [ids],
        )
        .sort("account_id", "ts", "breach_seq")
        .unique("account_id", keep="first", maintain_order=True)
        .select("account_id", "rule")
    )
    days = query_frame(
        conn,
        "SELECT account_id, max(day) AS day FROM prop_daily_snapshots "
        "WHERE account_id IN (SELECT unnest(?)) GROUP BY account_id",
        [ids],
    )
    frame = pl.DataFrame(
        {
            "account_id": ids,
            "status": [p.status for p in phases],
            "ts": [p.ended_at for p in phases],
        },
        schema={"account_id": pl.Int64, "status": pl.String, "ts": _UTC_US},
    )
    return _with_rule_and_day(frame, fails, days)


def _with_rule_and_day(
    frame: pl.DataFrame, fails: pl.DataFrame, days: pl.DataFrame
) -> pl.DataFrame:
    fails = fails.select(
        pl.col("account_id").cast(pl.Int64), pl.col("rule").cast(pl.String)
    )
    days = days.select(pl.col("account_id").cast(pl.Int64), pl.col("day").cast(pl.Date))
    ended = pl.col("status").is_in(_ENDED)
    return (
        frame.join(fails, on="account_id", how="left", maintain_order="left")
        .join(days, on="account_id", how="left", maintain_order="left")
        .with_columns(
            rule=pl.when(pl.col("status") == "failed").then(pl.col("rule")),
            day=pl.when(ended).then(pl.col("day")),
        )
        .select("account_id", *_OUTCOME_SCHEMA)
    )


def replay_outcomes(tables: BacktestTables) -> pl.DataFrame:
    """A replay's outcome per phase, in the shape of :func:`recorded_outcomes`."""
    frame = tables.accounts.select(
        "account_id", "status", pl.col("status_ts").alias("ts")
    )
    fails = (
        tables.breaches.filter(pl.col("action") == "phase_failed")
        .group_by("account_id")
        .agg(pl.col("rule").sort_by("ts").first())
    )
    days = tables.daily.group_by("account_id").agg(pl.col("day").max())
    return _with_rule_and_day(frame, fails, days)


# ------------------------------------------------------------------ ticks


def _archive_files(archive: Path, since: date, what: str = "tick") -> list[TickFile]:
    if not archive.is_dir():
        return []
    try:
        files = resolve_tick_files(archive, what)
    except InputFileError:
        return []  # an archive with no file yet
    # Day folders before the earliest start hold no tick a phase judged.
    kept = [f for f in files if (_day_of(f.path) or since) >= since]
    return [replace(f, index=i) for i, f in enumerate(kept)]


def _day_of(path: Path) -> date | None:
    name = path.parent.name
    if not name.startswith("day="):
        return None
    try:
        return date.fromisoformat(name[4:])
    except ValueError:
        return None


def _staged(conn: Connection, ids: Sequence[int]) -> pl.DataFrame | None:
    try:
        frame = query_frame(
            conn,
            "SELECT account_id, ts, equity, balance FROM tick_archive_staging "
            "WHERE account_id IN (SELECT unnest(?)) ORDER BY seq",
            [list(ids)],
        )
    except MISSING_TABLE:
        return None  # a store from before the archive
    return frame.select(
        pl.col("account_id").cast(pl.Int64),
        pl.col("ts").dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
        pl.col("equity").cast(pl.Float64),
        pl.col("balance").cast(pl.Float64),
    )


def _staged_deals(conn: Connection, ids: Sequence[int]) -> pl.DataFrame | None:
    try:
        frame = query_frame(
            conn,
            f"SELECT {', '.join(DEAL_COLUMNS)} FROM deal_archive_staging "  # noqa: S608
            "WHERE account_id IN (SELECT unnest(?)) ORDER BY stream, seq",
            [list(ids)],
        )
    except MISSING_TABLE:
        return None  # a store from before the deals' archive
    return frame.with_columns(
        pl.col("account_id").cast(pl.Int64),
        pl.col("ts").dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
        pl.col("deal_id").cast(pl.Int64),
        pl.col("position_id").cast(pl.Int64),
        pl.col("volume").cast(pl.Float64),
        pl.col("price").cast(pl.Float64),
    )


def _customers(conn: Connection, ids: Sequence[int]) -> dict[int, str]:
    """``customer_id`` per account, for the hedge flags (none via the risk copy)."""
    try:
        frame = query_frame(
            conn,
            "SELECT account_id, customer_id FROM trading_accounts "
            "WHERE account_id IN (SELECT unnest(?))",
            [list(ids)],
        )
    except MISSING_TABLE:
        return {}  # the risk copy has no trading_accounts
    return {
        int(a): str(c)
        for a, c in zip(
            frame["account_id"].to_list(), frame["customer_id"].to_list(), strict=True
        )
    }


# ------------------------------------------------------------------ the diff


def change_kind(before: Mapping[str, Any], after: Mapping[str, Any]) -> str | None:
    """How an outcome changed (one of :data:`CHANGE_KINDS`), or None.

    Args:
        before: ``status``, ``rule``, ``day`` of the baseline.
        after: The same of the what-if.

    Returns:
        The kind, or None when the outcome is the same (a phase that ends on
        the same day by the same rule, at another instant, is the same).
    """
    if before["status"] != after["status"]:
        return f"{before['status']}_to_{after['status']}"
    if before["status"] == "failed":
        if before["rule"] != after["rule"]:
            return "failed_other_rule"
        if before["day"] != after["day"]:
            return "failed_other_day"
    if before["status"] == "passed" and before["day"] != after["day"]:
        return "passed_other_day"
    return None


def diff_outcomes(
    phases: Sequence[StoredPhase],
    recorded: pl.DataFrame,
    baseline: pl.DataFrame,
    whatif: pl.DataFrame,
) -> pl.DataFrame:
    """One row per phase: recorded, baseline and what-if outcome, and the change.

    Returns:
        ``challenge_id, phase_index, account_id, change, recorded_*,
        baseline_*, whatif_*`` (``*`` = ``status, ts, rule, day``),
        ``as_recorded`` and ``earlier_phase_changed``, by account.
    """
    keys = pl.DataFrame(
        {
            "challenge_id": [p.challenge_id for p in phases],
            "phase_index": [p.phase_index for p in phases],
            "account_id": [p.spec.account_id for p in phases],
        },
        schema={
            "challenge_id": pl.Int64,
            "phase_index": pl.Int64,
            "account_id": pl.Int64,
        },
    )
    frame = keys
    for prefix, outcome in (
        ("recorded", recorded),
        ("baseline", baseline),
        ("whatif", whatif),
    ):
        frame = frame.join(
            outcome.rename({c: f"{prefix}_{c}" for c in _OUTCOME_SCHEMA}),
            on="account_id",
            how="left",
            maintain_order="left",
        )
    kinds = [
        change_kind(
            {c: row[f"baseline_{c}"] for c in _OUTCOME_SCHEMA},
            {c: row[f"whatif_{c}"] for c in _OUTCOME_SCHEMA},
        )
        for row in frame.iter_rows(named=True)
    ]
    same = [
        all(row[f"recorded_{c}"] == row[f"baseline_{c}"] for c in _OUTCOME_SCHEMA)
        for row in frame.iter_rows(named=True)
    ]
    frame = frame.with_columns(
        pl.Series("change", kinds, dtype=pl.String),
        pl.Series("as_recorded", same, dtype=pl.Boolean),
    )
    changed = frame.filter(pl.col("change").is_not_null())
    earlier = (
        frame.select("challenge_id", "phase_index")
        .join(
            changed.select(
                "challenge_id", pl.col("phase_index").alias("_changed_index")
            ),
            on="challenge_id",
            how="left",
        )
        .group_by("challenge_id", "phase_index")
        .agg((pl.col("_changed_index") < pl.col("phase_index")).any().alias("_earlier"))
    )
    frame = frame.join(
        earlier, on=["challenge_id", "phase_index"], how="left", maintain_order="left"
    ).with_columns(pl.col("_earlier").fill_null(False).alias("earlier_phase_changed"))
    return frame.select(
        "challenge_id",
        "phase_index",
        "account_id",
        "change",
        *(
            f"{prefix}_{c}"
            for prefix in ("recorded", "baseline", "whatif")
            for c in _OUTCOME_SCHEMA
        ),
        "as_recorded",
        "earlier_phase_changed",
    )


def count_changes(outcomes: pl.DataFrame) -> dict[str, int]:
    """Changed phases per kind, in :data:`CHANGE_KINDS` order, kinds seen only."""
    counts = dict(
        outcomes.filter(pl.col("change").is_not_null())
        .group_by("change")
        .len()
        .iter_rows()
    )
    return {kind: int(counts[kind]) for kind in CHANGE_KINDS if kind in counts}


# ------------------------------------------------------------------ the run


def run_whatif(
    db: str | Path,
    changes: Mapping[str, object],
    out_dir: str | Path,
    *,
    program: int | None = None,
    phase_ids: Sequence[tuple[int, int | None]] = (),
    archive: str | Path | None = None,
    max_rows_in_memory: int = DEFAULT_MAX_ROWS_IN_MEMORY,
    tmp_dir: str | Path | None = None,
    report: bool = False,
    deals_archive: str | Path | None = None,
    threads: int | None = None,
) -> WhatIfResult:
    """Replay recorded phases with and without rule changes; write the difference.

    Writes to ``out_dir``: ``outcomes`` (every phase), ``changes`` (the phases
    whose outcome changes), ``mismatches`` (phases whose baseline differs from
    the store's record), each ``.parquet`` and ``.csv``; ``counts.csv``;
    ``summary.json``; the two replays' tables in ``baseline/`` and ``whatif/``;
    and with ``report`` ``report.html`` (the what-if run, with the baseline's
    floors drawn too for the changed phases).

    Args:
        db: The service's DuckDB file.
        changes: Rule name to new value (:func:`parse_sets`).
        out_dir: The output directory (created if missing).
        program: Replay the started phases of this program ...
        phase_ids: ... or these ``(challenge, phase)`` (phase None: all).
        archive: The tick archive (default ``DB.archive/ticks``).
        max_rows_in_memory: As the backtest's.
        tmp_dir: As the backtest's.
        report: Also write ``report.html``.
        deals_archive: The deal archive (default: ``deals`` beside the tick
            archive); a missing directory means no archived deals.
        threads: As the backtest's.

    Returns:
        Counts and timings.

    Raises:
        InputFileError: Bad input; nothing was written.
    """
    started = time.perf_counter()
    if (program is None) == (not phase_ids):
        raise InputFileError("give either --program or --phase-ids")
    conn, source = open_store(db)
    try:
        phases, cancelled = select_phases(conn, program=program, phase_ids=phase_ids)
        specs = [p.spec for p in phases]
        changed_specs = apply_sets(specs, changes)
        recorded = recorded_outcomes(conn, phases)
        ids = [s.account_id for s in specs]
        staged = _staged(conn, ids) if source == "store" else None
        staged_deals = _staged_deals(conn, ids) if source == "store" else None
        customers = _customers(conn, ids)
    finally:
        conn.close()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputFileError(f"--out {out}: exists and is not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputFileError(f"--out {out}: can't write in {existing}")
    if tmp_dir is not None and not Path(tmp_dir).is_dir():
        raise InputFileError(f"--tmp-dir {tmp_dir}: not a directory")
    ticks_dir = (
        Path(archive) if archive is not None else _default_archive(db) / TICKS_DIR
    )
    deals_dir = (
        Path(deals_archive)
        if deals_archive is not None
        else ticks_dir.parent / DEALS_DIR
    )
    since = min(s.started_at for s in specs).astimezone(UTC).date()
    files = _archive_files(ticks_dir, since)
    deal_files = _archive_files(deals_dir, since, "deal")
    if not files and (staged is None or staged.height == 0):
        raise InputFileError(
            f"no archived ticks in {ticks_dir}"
            + ("" if staged is None else " and none staged in the store")
        )

    with tempfile.TemporaryDirectory(prefix="prop-stream-whatif-", dir=tmp_dir) as tmp:
        if staged is not None and staged.height:
            # Staged rows come after every archived one (larger seq): last file.
            path = Path(tmp) / "staged.parquet"
            staged.write_parquet(path)
            files.append(TickFile(path=path, format="parquet", index=len(files)))
        if staged_deals is not None and staged_deals.height:
            path = Path(tmp) / "staged-deals.parquet"
            staged_deals.write_parquet(path)
            deal_files.append(
                TickFile(path=path, format="parquet", index=len(deal_files))
            )
        wanted = pl.Series(ids, dtype=pl.Int64).implode()
        # The archive keeps the ticks the engine skipped as invalid (NaN,
        # infinite); the backtest refuses them, so they are dropped here, as
        # the service did, and counted.
        valid = (
            pl.col("ts").is_not_null()
            & pl.col("equity").is_finite()
            & pl.col("balance").is_finite()
        ).fill_null(False)
        scans = [
            scan_ticks(f).filter(pl.col("account_id").is_in(wanted)) for f in files
        ]
        tally = (
            pl.concat(
                [
                    lf.select(pl.len().alias("rows"), valid.sum().alias("valid"))
                    for lf in scans
                ]
            )
            .sum()
            .collect()
        )
        total = int(tally["valid"].item())
        invalid = int(tally["rows"].item()) - total
        lazies = [lf.filter(valid) for lf in scans]
        deal_lazies = [
            scan_deals(f).filter(pl.col("account_id").is_in(wanted)) for f in deal_files
        ]
        deal_rows = (
            int(
                pl.concat([lf.select(pl.len()) for lf in deal_lazies])
                .sum()
                .collect()
                .item()
            )
            if deal_lazies
            else 0
        )
        deal_input = DealInput(
            files=deal_files,
            lazies=deal_lazies,
            rows=deal_rows,
            customers=customers,
        )
        if total + deal_rows <= max_rows_in_memory:
            # Read once, replay twice.
            frame = pl.concat(lazies, how="vertical").collect()
            inputs: tuple[list[TickFile], list[pl.LazyFrame]] = ([], [frame.lazy()])
            if deal_rows:
                deal_frame = pl.concat(deal_lazies, how="vertical").collect()
                if not check_deals(deal_frame):
                    raise InputFileError(
                        f"archived deals in {deals_dir} hold missing or invalid values"
                    )
                deal_input = replace(deal_input, files=(), lazies=[deal_frame.lazy()])
        else:
            inputs = (files, lazies)
        runs = [
            judge(
                run_specs,
                inputs[0],
                inputs[1],
                total,
                max_rows_in_memory=max_rows_in_memory,
                tmp_dir=tmp_dir,
                progress=False,
                deals=deal_input,
                threads=threads,
            )[0]
            for run_specs in (specs, changed_specs)
        ]
        baseline, whatif = runs
        outcomes = diff_outcomes(
            phases, recorded, replay_outcomes(baseline), replay_outcomes(whatif)
        )
        counts = count_changes(outcomes)
        changed = outcomes.filter(pl.col("change").is_not_null())
        mismatches = outcomes.filter(~pl.col("as_recorded"))
        outputs = write_outputs(
            out,
            {"outcomes": outcomes, "changes": changed, "mismatches": mismatches},
        )
        outputs += write_outputs(out / "baseline", baseline.as_dict())
        outputs += write_outputs(out / "whatif", whatif.as_dict())
        counts_file = out / "counts.csv"
        pl.DataFrame(
            {"change": list(counts), "phases": list(counts.values())},
            schema={"change": pl.String, "phases": pl.Int64},
        ).write_csv(counts_file)
        outputs += (counts_file,)
        if report:
            from prop_stream.backtest.report import write_report

            outputs += (
                write_report(
                    out / REPORT_FILE,
                    changed_specs,
                    inputs[1],
                    whatif,
                    max_rows_in_memory=max_rows_in_memory,
                    baseline=(specs, baseline),
                    compare=set(changed["account_id"].to_list()),
                ),
            )
    result = WhatIfResult(
        phases=len(phases),
        cancelled=cancelled,
        ticks=total,
        staged=None if staged is None else staged.height,
        source=source,
        changes=counts,
        mismatches=mismatches.height,
        seconds=time.perf_counter() - started,
        outputs=outputs,
        deals=deal_rows,
        staged_deals=None if staged_deals is None else staged_deals.height,
    )
    summary = out / SUMMARY_FILE
    summary.write_text(
        json.dumps(
            {
                "db": redact(str(db)) if is_url(db) else str(Path(db)),
                "read_from": source,
                "archive": str(ticks_dir),
                "deals_archive": str(deals_dir),
                "staged_ticks": result.staged,
                "staged_deals": result.staged_deals,
                "staged_ticks_included": result.staged is not None,
                "set": dict(changes),
                "program": program,
                "phase_ids": [
                    f"{c}" if p is None else f"{c}:{p}" for c, p in phase_ids
                ],
                "phases": result.phases,
                "cancelled_left_out": cancelled,
                "ticks": total,
                "invalid_ticks_skipped": invalid,
                "deals": deal_rows,
                "changes": counts,
                "changed_phases": changed.height,
                "mismatches": result.mismatches,
                "seconds": round(result.seconds, 3),
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return replace(result, outputs=(*result.outputs, summary))
