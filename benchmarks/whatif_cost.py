"""What ``prop-stream whatif`` costs per million archived ticks.

Builds a store with ``--accounts`` active challenges of one program (a
one-phase evaluation: 5% daily, 10% overall, 8% target, Europe/Prague days)
and an archive of ``--ticks`` ticks over ``--days`` days beside it, in the
service's layout (``DB.archive/ticks/day=*/part-*.parquet``, rows in time
order as the service judged them, a new file every ~``--file-rows`` rows). Then
runs, as whole processes (start-up included), side by side:

1. ``prop-stream whatif --program 1 --set max_daily_loss=0.04`` (two replays);
2. ``prop-stream backtest`` of the same phases over the same archive (one
   replay), the reference for "what a replay costs".

Each is timed ``--rounds`` times (the median is printed) with wall time and the
child's CPU time (user + sys). Then prints the cost per million archived ticks
and extrapolates to ``--extrapolate`` ticks (default: 30 days of 10k
challenges at one tick per account-second, 25.92 billion).

Example:
    .venv/bin/python benchmarks/whatif_cost.py --ticks 10000000
    .venv/bin/python benchmarks/whatif_cost.py --max-rows-in-memory 2500000
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from prop_stream.store import connect, init_database, transaction
from prop_stream.store.archive import archive_dir, part_name
from prop_stream.store.catalog import (
    EVALUATION,
    ProgramIn,
    ProgramPhaseIn,
    create_account_group,
    create_customer,
    create_program,
    open_account,
)
from prop_stream.store.lifecycle import start_challenge

PROP_STREAM = Path(sys.executable).with_name("prop-stream")
START = datetime(2026, 1, 5, tzinfo=UTC)
RULES = {
    "initial_balance": 100_000,
    "profit_target": 0.08,
    "max_daily_loss": 0.05,
    "max_total_loss": 0.10,
    "timezone": "Europe/Prague",
}
#: 30 days x 10,000 challenges x one tick per account-second.
DEFAULT_EXTRAPOLATE = 30 * 86_400 * 10_000


def build(root: Path, accounts: int, ticks: int, days: int, file_rows: int) -> Path:
    """The store and its archive; returns the database file."""
    db = root / "prop.duckdb"
    init_database(db)
    conn = connect(db)
    try:
        with transaction(conn):
            create_account_group(
                conn, name="DEMO", kind="DEMO", currency="USD", leverage=100
            )
            customer = create_customer(conn, email="bench@example.com")
            program = create_program(
                conn,
                program=ProgramIn(
                    name="Bench",
                    price=Decimal("100.00"),
                    currency="USD",
                    phases=(
                        ProgramPhaseIn(
                            name="Evaluation",
                            phase_type=EVALUATION,
                            account_group="DEMO",
                            rules=RULES,
                        ),
                    ),
                ),
            )
            ids = []
            for _ in range(accounts):
                account = open_account(conn, customer_id=customer, account_group="DEMO")
                start_challenge(
                    conn,
                    customer_id=customer,
                    program_id=program,
                    account_id=account,
                    started_at=START,
                )
                ids.append(account)
    finally:
        conn.close()

    # One tick per account per step, accounts interleaved in time as a stream
    # delivers them; equity a random walk that fails some accounts.
    per_account = ticks // accounts
    rng = np.random.default_rng(1)
    span_us = days * 86_400_000_000
    step_us = span_us // per_account
    base = int(START.timestamp() * 1_000_000)
    ticks_dir = archive_dir(db) / "ticks"
    seq = 0
    chunk = max(1, file_rows // accounts)
    equity = np.full(accounts, 100_000.0)
    for first in range(0, per_account, chunk):
        n = min(chunk, per_account - first)
        steps = rng.normal(0.0, 60.0, (n, accounts))
        walk = equity + np.cumsum(steps, axis=0)
        equity = walk[-1]
        ts = (
            base
            + (np.arange(first, first + n) * step_us)[:, None]
            + np.arange(accounts)[None, :]
        )
        frame = pl.DataFrame(
            {
                "account_id": np.tile(np.asarray(ids, dtype=np.int64), n),
                "ts": ts.ravel(),
                "equity": np.round(walk.ravel(), 2),
                "balance": np.round(walk.ravel(), 0),
            }
        ).with_columns(pl.from_epoch("ts", time_unit="us").dt.replace_time_zone("UTC"))
        for (day,), part in (
            frame.with_columns(_day=pl.col("ts").dt.date())
            .partition_by("_day", as_dict=True, maintain_order=True, include_key=False)
            .items()
        ):
            folder = ticks_dir / f"day={day}"
            folder.mkdir(parents=True, exist_ok=True)
            part.write_parquet(
                folder / part_name(seq, seq + part.height - 1), compression="zstd"
            )
            seq += part.height
    return db


def rules_file(db: Path, path: Path) -> Path:
    """The store's phases as a backtest rules file."""
    conn = connect(db, read_only=True)
    try:
        rows = conn.execute(
            "SELECT account_id, challenge_id, phase_index, started_at, rules "
            "FROM challenge_phases WHERE account_id IS NOT NULL"
        ).fetchall()
    finally:
        conn.close()
    path.write_text(
        json.dumps(
            {
                "accounts": [
                    {
                        "account_id": a,
                        "challenge_id": str(c),
                        "phase_index": p,
                        "started_at": s.isoformat(),
                        "rules": json.loads(r),
                    }
                    for a, c, p, s, r in rows
                ]
            }
        )
    )
    return path


def timed(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one ``prop-stream`` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603 - our own command
        [str(PROP_STREAM), *args], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {done.stderr}")
    print(f"  {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    """Build, run, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=10_000_000)
    parser.add_argument("--accounts", type=int, default=2_000)
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--file-rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-rows-in-memory", type=int, default=None)
    parser.add_argument("--extrapolate", type=int, default=DEFAULT_EXTRAPOLATE)
    args = parser.parse_args()
    memory = (
        []
        if args.max_rows_in_memory is None
        else ["--max-rows-in-memory", str(args.max_rows_in_memory)]
    )
    with tempfile.TemporaryDirectory(prefix="whatif-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        db = build(root, args.accounts, args.ticks, args.days, args.file_rows)
        rules = rules_file(db, root / "rules.json")
        ticks = int(
            pl.scan_parquet(archive_dir(db) / "ticks" / "**" / "*.parquet")
            .select(pl.len())
            .collect()
            .item()
        )
        print(
            f"built {args.accounts:,} challenges, {ticks:,} archived ticks over "
            f"{args.days} days in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        runs: dict[str, list[tuple[float, float]]] = {"whatif": [], "backtest": []}
        for _ in range(args.rounds):
            runs["whatif"].append(
                timed(
                    [
                        "whatif",
                        "--db",
                        str(db),
                        "--program",
                        "1",
                        "--set",
                        "max_daily_loss=0.04",
                        "--out",
                        str(root / "w"),
                        *memory,
                    ]
                )
            )
            runs["backtest"].append(
                timed(
                    [
                        "backtest",
                        "--rules",
                        str(rules),
                        "--ticks",
                        str(archive_dir(db) / "ticks"),
                        "--out",
                        str(root / "b"),
                        *memory,
                    ]
                )
            )
    result: dict[str, Any] = {}
    for name, samples in runs.items():
        wall = statistics.median(w for w, _ in samples)
        cpu = statistics.median(c for _, c in samples)
        result[name] = {
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "wall_s_per_million": round(wall / ticks * 1e6, 3),
            "cpu_s_per_million": round(cpu / ticks * 1e6, 3),
        }
    per_million = result["whatif"]["wall_s_per_million"]
    hours = per_million * args.extrapolate / 1e6 / 3600
    result["ratio_whatif_to_backtest_wall"] = round(
        result["whatif"]["wall_s"] / result["backtest"]["wall_s"], 2
    )
    result["extrapolated"] = {
        "ticks": args.extrapolate,
        "wall_hours": round(hours, 1),
        "cpu_hours": round(
            result["whatif"]["cpu_s_per_million"] * args.extrapolate / 1e6 / 3600, 1
        ),
    }
    result["ticks"] = ticks
    result["accounts"] = args.accounts
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
