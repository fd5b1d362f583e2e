"""What one runtime-cache sync of an ``api`` process costs on PostgreSQL.

Seeds a PostgreSQL database per size (``api_load.seed``: ``N`` challenges, each
first phase judged once, so ``metrics_latest`` has ``N`` rows), builds the
``api`` role's :class:`~api.cache.RuntimeCache` (``reload_metrics=True``) and, in
each round, commits one flush of ``--changed`` accounts' metrics through the
service's sink (as an evaluator does), then times one ``sync()``: the thread's
CPU (what holds the GIL the requests wait for) and wall time, medians over
``--syncs`` rounds.

Run it against another checkout to compare codes side by side (``-P`` keeps the
script's folder off the path; ``PYTHONPATH`` picks the code)::

    PYTHONPATH=/path/to/other .venv/bin/python -P benchmarks/cache_sync_cost.py \\
        --postgres URL_PREFIX --tag other
    PYTHONPATH=$PWD .venv/bin/python -P benchmarks/cache_sync_cost.py \\
        --postgres URL_PREFIX --tag new

``URL_PREFIX`` is a server's URL without the database (``postgresql://u:p@h:port``);
a database ``sync_<tag>_<N>`` is created for each size (and dropped after).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import polars as pl
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_load import T0, seed

import api
import prop_stream
from api.cache import RuntimeCache
from api.db import Database
from prop_stream.evaluator import LatestMetrics
from prop_stream.rules import TICK_SCHEMA, RuleEngine
from prop_stream.sinks.duckdb_sink import DuckDBSink
from prop_stream.store import (
    active_phase_specs,
    cancel_challenge,
    connect,
    transaction,
)


def _database(prefix: str, name: str) -> str:
    _drop(prefix, name)
    with psycopg.connect(f"{prefix}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"{prefix}/{name}"


def _drop(prefix: str, name: str) -> None:
    # A non-superuser can't end an autovacuum worker in the database: wait it out.
    deadline = time.monotonic() + 60
    with psycopg.connect(f"{prefix}/postgres", autocommit=True) as admin:
        while True:
            try:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except psycopg.errors.InsufficientPrivilege:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            else:
                return


def measure(
    url: str, challenges: int, changed: int, syncs: int, cancelled: int = 0
) -> dict[str, float]:
    """Seed ``url``; the medians of ``syncs`` syncs after ``changed`` accounts moved.

    With ``cancelled``, that many challenges are also cancelled before each sync
    (a status change, as the purchase flow's cancel or a pass makes).
    """
    _token, owned = seed(url, challenges)
    writer = connect(url)
    engine = RuleEngine()
    specs = active_phase_specs(writer)
    for spec in specs:
        engine.register(spec)
    accounts = [s.account_id for s in specs]
    [(customer,)] = writer.execute(
        "SELECT customer_id FROM challenges WHERE id = ?", [owned[0]]
    ).fetchall()
    sink = DuckDBSink(writer, source="bench-writer")
    db = Database(connect(url), owned=True)
    cache = RuntimeCache(db, LatestMetrics(), reload_metrics=True)
    cache.load()
    cache.sync()  # the first sync reads everything in either code
    cpu: list[float] = []
    wall: list[float] = []
    for round_no in range(syncs):
        first = (round_no * changed) % len(accounts)
        moved = (accounts + accounts)[first : first + changed]
        ticks = pl.DataFrame(
            {
                "account_id": moved,
                "ts": [T0 + timedelta(hours=2, seconds=round_no)] * len(moved),
                "equity": [100_100.0 + round_no] * len(moved),
                "balance": [100_000.0] * len(moved),
            },
            schema=TICK_SCHEMA,
        )
        sink.add(engine.process(ticks), position={"0": round_no + 2})
        sink.flush()
        ended = owned[len(owned) - (round_no + 1) * cancelled :][:cancelled]
        if ended:
            with transaction(writer):
                for challenge_id in ended:
                    cancel_challenge(writer, challenge_id=challenge_id, now=T0)
        t_cpu, t_wall = time.thread_time(), time.perf_counter()
        cache.sync()
        cpu.append(time.thread_time() - t_cpu)
        wall.append(time.perf_counter() - t_wall)
        served = cache.metrics.get(moved[0])
        if served is None or served["equity"] != 100_100.0 + round_no:
            raise RuntimeError(f"round {round_no}: the sync missed a change")
        if ended:
            body = cache.challenge_body(ended[0], customer_id=customer)
            if body is None or json.loads(body)["status_name"] != "cancelled":
                raise RuntimeError(f"round {round_no}: the sync missed a cancel")
    if hasattr(cache, "close"):
        cache.close()
    db.close()
    writer.close()
    return {
        "sync_cpu_ms": round(statistics.median(cpu) * 1000, 2),
        "sync_wall_ms": round(statistics.median(wall) * 1000, 2),
    }


def main(argv: list[str] | None = None) -> None:
    """Measure each size; print one JSON line per size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", required=True, metavar="URL_PREFIX")
    parser.add_argument("--challenges", default="2000,20000")
    parser.add_argument("--changed", type=int, default=100)
    parser.add_argument("--syncs", type=int, default=20)
    parser.add_argument(
        "--cancelled", type=int, default=0, help="challenges cancelled per round"
    )
    parser.add_argument("--tag", default="run")
    args = parser.parse_args(argv)
    code = str(Path(prop_stream.__file__).resolve().parents[1])
    if str(Path(api.__file__).resolve().parents[1]) != code:
        raise SystemExit("prop_stream and api come from different checkouts")
    for n in (int(x) for x in args.challenges.split(",")):
        name = f"sync_{args.tag}_{n}"
        url = _database(args.postgres.rstrip("/"), name)
        try:
            result = measure(url, n, args.changed, args.syncs, args.cancelled)
        finally:
            _drop(args.postgres.rstrip("/"), name)
        print(
            json.dumps(
                {
                    "code": code,
                    "tag": args.tag,
                    "challenges": n,
                    "changed": args.changed,
                    "cancelled": args.cancelled,
                    **result,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
