"""End-to-end Kafka throughput: topic → KafkaSource → engine → the store.

Produces ``--ticks`` ticks of ``--accounts`` accounts (one phase each, every rule
on) to a fresh topic in the chosen encoding, then times an evaluator loop over a
fresh store from the first poll until every partition is read and committed.

Usage: ``.venv/bin/python benchmarks/kafka_e2e.py --bootstrap H:P
--encoding json|batch --ticks 1000000 [--paths raw,kafka-python]``. ``--paths``
reads the same topic once per record path, each into a fresh store: ``raw``
(record batches read in the Rust core, the default) and ``kafka-python`` (one
``ConsumerRecord`` per record, the old path). ``--archive off,on`` reads it once
without and once with the tick archive's staging (``docs/store.md``), side by
side in one run.

``--postgres URL`` reads the same topic with one evaluator into a fresh DuckDB
file and into a fresh PostgreSQL database on the server of ``URL`` (created and
dropped per run), alternately, ``--rounds`` times each, and prints each run and
the best and median ticks/s per backend and their ratio (archive off: PostgreSQL
has none). The hedge flags are on as in the service (``--no-hedge-flags``
turns them off in both).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
from kafka_bench_support import bench_loop, create_bench_topic, fresh_pg_database

from prop_stream.evaluator import EvaluatorLoop
from prop_stream.kafka import produce_file

RULES = {"max_daily_loss": 0.05, "max_total_loss": 0.1, "profit_target": 0.08}


def make_ticks(path: Path, ticks: int, accounts: int) -> Path:
    rng = np.random.default_rng(3)
    start = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp() * 1000)
    ids = 1_000_000 + (np.arange(ticks) % accounts)
    ts = start + np.arange(ticks) * 20  # 50 ticks/ms overall
    equity = 100_000.0 + rng.normal(0, 50, ticks).cumsum() / np.sqrt(accounts)
    frame = pl.DataFrame(
        {"account_id": ids, "ts": ts, "equity": equity, "balance": 100_000.0}
    ).with_columns(pl.from_epoch("ts", time_unit="ms").dt.replace_time_zone("UTC"))
    frame.write_parquet(path)
    return path


def consume(
    db: Path | str, topic: str, path: str, args: argparse.Namespace, *, archive: bool
) -> tuple[float, EvaluatorLoop]:
    """Read the whole topic into a fresh store; the seconds it took."""
    first = 1_000_000
    loop, source, conn = bench_loop(
        db,
        bootstrap=args.bootstrap,
        topic=topic,
        path=path,
        accounts=range(first, first + args.accounts),
        rules={**RULES, "initial_balance": 100_000.0},
        batch=args.batch,
        poll_timeout_s=0.5,
        archive=archive,
        hedge_flags=not args.no_hedge_flags,
    )
    ends = source.end_offsets()
    t0 = time.perf_counter()
    while any(source.position().get(k, 0) < v for k, v in ends.items()):
        loop.run_once()
    seconds = time.perf_counter() - t0
    source.close()
    conn.close()
    return seconds, loop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", default="127.0.0.1:19092")
    parser.add_argument("--encoding", choices=["json", "batch"], default="json")
    parser.add_argument("--ticks", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--batch", type=int, default=200_000)
    parser.add_argument("--paths", default="raw")
    parser.add_argument("--archive", default="off", help="off, on or off,on")
    parser.add_argument(
        "--postgres", metavar="URL", help="also read into PostgreSQL (this server)"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-hedge-flags", action="store_true")
    args = parser.parse_args()
    if args.postgres and args.archive != "off":
        raise SystemExit(
            "--postgres: the tick archive is DuckDB's; leave --archive off"
        )
    tmp = Path(tempfile.mkdtemp(prefix="kafka-e2e-"))
    ticks = make_ticks(tmp / "ticks.parquet", args.ticks, args.accounts)
    topic, admin = create_bench_topic(args.bootstrap, "bench-e2e", args.partitions)
    t0 = time.perf_counter()
    produce_file(ticks, bootstrap=args.bootstrap, topic=topic, encoding=args.encoding)
    produced = time.perf_counter() - t0

    if args.postgres:
        _backend_compare(tmp, topic, args, produced)
        admin.delete_topics([topic])
        admin.close()
        return
    runs = [(p, a) for p in args.paths.split(",") for a in args.archive.split(",")]
    for path, archive in runs:
        if archive not in ("off", "on"):
            raise SystemExit(f"--archive takes off, on or off,on; got {archive!r}")
        seconds, loop = consume(
            tmp / f"{path}-{archive}.duckdb", topic, path, args, archive=archive == "on"
        )
        print(
            f"{args.encoding} [{path}, archive {archive}]: {args.ticks:,} ticks, "
            f"{loop.stats.batches} batches, evaluated {loop.stats.evaluated:,}; "
            f"produce {produced:.1f} s; topic→DuckDB {seconds:.2f} s = "
            f"{args.ticks / seconds:,.0f} ticks/s"
        )
    admin.delete_topics([topic])
    admin.close()


def _backend_compare(
    tmp: Path, topic: str, args: argparse.Namespace, produced: float
) -> None:
    """The topic into DuckDB and into PostgreSQL, alternately, per path and round."""
    rates: dict[tuple[str, str], list[float]] = {}
    for path in args.paths.split(","):
        for round_ in range(args.rounds):
            # Alternate which backend goes first so both see the same warm-up.
            backends = (
                ("duckdb", "postgres") if round_ % 2 == 0 else ("postgres", "duckdb")
            )
            for backend in backends:
                with contextlib.ExitStack() as stack:
                    if backend == "postgres":
                        db: Path | str = stack.enter_context(
                            fresh_pg_database(args.postgres, "bench_e2e")
                        )
                    else:
                        db = tmp / f"{path}-{round_}.duckdb"
                    seconds, loop = consume(db, topic, path, args, archive=False)
                rate = args.ticks / seconds
                rates.setdefault((path, backend), []).append(rate)
                print(
                    f"{args.encoding} [{path}, {backend}, round {round_ + 1}]: "
                    f"{args.ticks:,} ticks, {loop.stats.batches} batches, evaluated "
                    f"{loop.stats.evaluated:,}; produce {produced:.1f} s; "
                    f"topic→{backend} {seconds:.2f} s = {rate:,.0f} ticks/s",
                    flush=True,
                )
    for path in args.paths.split(","):
        duck, pg = rates[(path, "duckdb")], rates[(path, "postgres")]
        print(
            f"{args.encoding} [{path}], hedge flags "
            f"{'off' if args.no_hedge_flags else 'on'}, {args.rounds} rounds: "
            f"DuckDB best {max(duck):,.0f} median {statistics.median(duck):,.0f}; "
            f"PostgreSQL best {max(pg):,.0f} median {statistics.median(pg):,.0f} "
            f"ticks/s; PostgreSQL / DuckDB best {max(pg) / max(duck):.2f}, "
            f"median {statistics.median(pg) / statistics.median(duck):.2f}"
        )


if __name__ == "__main__":
    main()
