"""How long one evaluator-loop batch takes: demo source → engine → DuckDB commit.

Seeds the same database as ``api_load.py`` (the demo data plus ``--challenges``
challenges), builds the service's loop over it with the demo source running as
fast as it can (not paced to the wall clock), warms up, then times
``--batches`` batches of 200 ms of ``--demo-rate`` ticks each. ``--profile``
prints a cProfile of the timed batches.

``--archive-compare`` times the loop with the tick archive off and on side by side
in one run: two stores seeded alike, the batches timed in alternating blocks of
five, so both see the same machine load. It prints each one's ms per batch and
their ratio.

``--postgres URL`` times the loop on DuckDB and on PostgreSQL side by side in one
run (the URL names an empty database, which is seeded alike; alternating blocks of
five batches, archive off in both since PostgreSQL has none). It prints each
one's ms per batch, ticks/s and their ratio. ``--no-hedge-flags`` runs both with
the hedge flags off (``hedge_window_seconds=None``: the deals are still recorded),
to time the sink without the flags' join.

Examples:
    .venv/bin/python benchmarks/evaluator_loop.py --batches 50
    .venv/bin/python benchmarks/evaluator_loop.py --batches 50 --profile
    .venv/bin/python benchmarks/evaluator_loop.py --batches 50 --archive-compare
    .venv/bin/python benchmarks/evaluator_loop.py --batches 50 \
        --postgres "$(scripts/pg-local start | sed 's,/prop_stream$,/bench,')"
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

from api_load import seed

from prop_stream.config import StreamSettings
from prop_stream.evaluator.service import build_loop
from prop_stream.store import connect


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--challenges", type=int, default=2_000)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--demo-rate", type=float, default=100_000.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--archive-compare", action="store_true")
    parser.add_argument("--postgres", metavar="URL", help="compare with this database")
    parser.add_argument("--no-hedge-flags", action="store_true")
    args = parser.parse_args(argv)
    if args.postgres:
        return _backend_compare(
            args.challenges,
            args.batches,
            args.demo_rate,
            args.postgres,
            flags=not args.no_hedge_flags,
        )
    if args.archive_compare:
        return _archive_compare(args.challenges, args.batches, args.demo_rate)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "loop.duckdb"
        seed(db, args.challenges)
        settings = StreamSettings(
            db=db, source="demo", demo_rate=args.demo_rate, demo_realtime=False
        )
        conn = connect(db)
        try:
            loop = build_loop(settings, conn)
            loop.start()
            for _ in range(5):
                loop.run_once()
            ticks_before = loop.stats.ticks
            profile = cProfile.Profile() if args.profile else None
            if profile is not None:
                profile.enable()
            start = time.perf_counter()
            for _ in range(args.batches):
                loop.run_once()
            seconds = time.perf_counter() - start
            if profile is not None:
                profile.disable()
                pstats.Stats(profile, stream=sys.stderr).sort_stats(
                    "cumulative"
                ).print_stats(30)
            ticks = loop.stats.ticks - ticks_before
        finally:
            conn.close()
    result = {
        "batches": args.batches,
        "ticks": ticks,
        "ms_per_batch": seconds / args.batches * 1000,
        "ticks_per_s": ticks / seconds,
    }
    print(json.dumps(result))
    return result


def _archive_compare(challenges: int, batches: int, rate: float) -> dict[str, float]:
    """The loop with the archive off and on, timed in alternating blocks."""
    block = 5
    with tempfile.TemporaryDirectory() as tmp:
        first = Path(tmp) / "off.duckdb"
        seed(first, challenges)
        second = Path(tmp) / "on.duckdb"
        shutil.copy(first, second)
        loops = {}
        conns = []
        for name, db in (("off", first), ("on", second)):
            settings = StreamSettings(
                db=db,
                source="demo",
                demo_rate=rate,
                demo_realtime=False,
                archive=name == "on",
            )
            conn = connect(db)
            conns.append(conn)
            loop = build_loop(settings, conn)
            loop.start()
            for _ in range(5):
                loop.run_once()
            loops[name] = loop
        seconds = dict.fromkeys(loops, 0.0)
        done = 0
        try:
            while done < batches:
                n = min(block, batches - done)
                for name, loop in loops.items():
                    start = time.perf_counter()
                    for _ in range(n):
                        loop.run_once()
                    seconds[name] += time.perf_counter() - start
                done += n
            staged = (
                conns[1]
                .execute("SELECT count(*) FROM tick_archive_staging")
                .fetchall()[0][0]
            )
        finally:
            for conn in conns:
                conn.close()
    result = {
        "batches": batches,
        "ticks_per_batch": loops["on"].stats.ticks / loops["on"].stats.batches,
        "staged_ticks": float(staged),
        "ms_per_batch_archive_off": seconds["off"] / batches * 1000,
        "ms_per_batch_archive_on": seconds["on"] / batches * 1000,
        "ratio_on_to_off": seconds["on"] / seconds["off"],
    }
    print(json.dumps(result))
    return result


def _backend_compare(
    challenges: int, batches: int, rate: float, url: str, *, flags: bool = True
) -> dict[str, float]:
    """The loop on DuckDB and on PostgreSQL, timed in alternating blocks."""
    block = 5
    with tempfile.TemporaryDirectory() as tmp:
        stores: dict[str, Path | str] = {
            "duckdb": Path(tmp) / "loop.duckdb",
            "postgres": url,
        }
        loops = {}
        conns = []
        for name, db in stores.items():
            seed(db, challenges)
            settings = StreamSettings(
                db=db,
                source="demo",
                demo_rate=rate,
                demo_realtime=False,
                archive=False,
            )
            if not flags:
                settings = settings.model_copy(update={"hedge_window_seconds": None})
            conn = connect(db)
            conns.append(conn)
            loop = build_loop(settings, conn)
            loop.start()
            for _ in range(5):
                loop.run_once()
            loops[name] = loop
        seconds = dict.fromkeys(loops, 0.0)
        ticks = dict.fromkeys(loops, 0)
        done = 0
        try:
            while done < batches:
                n = min(block, batches - done)
                for name, loop in loops.items():
                    before = loop.stats.ticks
                    start = time.perf_counter()
                    for _ in range(n):
                        loop.run_once()
                    seconds[name] += time.perf_counter() - start
                    ticks[name] += loop.stats.ticks - before
                done += n
        finally:
            for conn in conns:
                conn.close()
    result: dict[str, float] = {
        "batches": batches,
        "challenges": challenges,
        "hedge_flags": float(flags),
    }
    for name in loops:
        result[f"ms_per_batch_{name}"] = seconds[name] / batches * 1000
        result[f"ticks_per_s_{name}"] = ticks[name] / seconds[name]
    result["ratio_postgres_to_duckdb"] = (
        result["ticks_per_s_postgres"] / result["ticks_per_s_duckdb"]
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
